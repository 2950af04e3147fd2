"""`moechat ask --engine torch|fiddler|hobbit` on the tiny gpt-oss fixture with MXFP4
experts (the type gpt-oss ships in): the same greedy tokens as `--engine llama.cpp`.

HOBBIT's own point is to compute unimportant experts from low-precision copies, which
changes the output by design. Its default (`--hobbit-low auto`) keeps none without a GPU,
so here it must agree token for token, as `none` must; the int2 copies a GPU would get
for an MXFP4 file run when asked for by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.fixtures.tiny_models import tiny_model_path

PROMPT = "Hello there, how are you?"


def _ask(path, *args):
    out = subprocess.run([sys.executable, "-m", "moechat.app.cli", "ask", "--model", str(path), "--threads", "1",
                          "--max-tokens", "16", "--json", *args, PROMPT],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def gpt_oss_mxfp4():
    return tiny_model_path("gpt-oss", "MXFP4")


@pytest.fixture(scope="module")
def reference(gpt_oss_mxfp4):
    reply = _ask(gpt_oss_mxfp4, "--engine", "llama.cpp")
    assert len(reply["token_ids"]) == 16  # random weights: it never stops early
    return reply["token_ids"]


@pytest.mark.parametrize("engine_args", [
    ["--engine", "torch"],
    ["--engine", "fiddler"],
    ["--engine", "hobbit"],
    ["--engine", "hobbit", "--hobbit-low", "none"],
])
def test_greedy_tokens_equal_llamacpp(gpt_oss_mxfp4, reference, engine_args):
    reply = _ask(gpt_oss_mxfp4, *engine_args)
    assert reply["engine"] == engine_args[1]
    assert reply["token_ids"] == reference


def test_hobbit_int2_copies_run(gpt_oss_mxfp4):
    reply = _ask(gpt_oss_mxfp4, "--engine", "hobbit", "--hobbit-low", "int2", "--vram-budget", "50%")
    s = reply["stats"]
    assert "rest int2" in s["placement"]
    assert s["low_hits"] + s["misses"] > 0 and len(reply["token_ids"]) == 16
