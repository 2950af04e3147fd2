"""`moechat ask --engine hobbit|fiddler` from the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import os

PARIS = "What is the capital of France? Answer in one sentence."


def _ask(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "moechat.app.cli", "ask", *args],
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


@pytest.mark.slow
def test_ask_hobbit_answers_paris_with_json_stats(demo_model):
    out = _ask("--model", str(demo_model), "--engine", "hobbit", "--threads", "1",
               "--vram-budget", "40%", "--hobbit-low", "int4", "--max-tokens", "10", "--json", PARIS)
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert "Paris" in reply["text"] and reply["engine"] == "hobbit"
    for key in ("high_hits", "low_hits", "misses", "skips", "prefetch_accuracy", "bytes_moved"):
        assert key in reply["stats"]


@pytest.mark.parametrize("args, message", [
    (["--engine", "hobbit", "--vram-budget", "lots"], "--vram-budget: not a size"),
    (["--engine", "fiddler", "--skip"], "hobbit engine options"),
])
def test_bad_offload_options_fail_in_one_line(demo_model, args, message):
    out = _ask("--model", str(demo_model), *args, PARIS, timeout=60)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
