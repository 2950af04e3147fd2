"""`moechat ask --engine torch|fiddler|hobbit` on the tiny gpt-oss fixtures — MXFP4 experts
(the type gpt-oss ships in) and every other expert type the fixture builder writes: the
same greedy tokens as `--engine llama.cpp`, on the CPU.

HOBBIT's own point is to compute unimportant experts from low-precision copies, which
changes the output by design. Its default (`--hobbit-low auto`) keeps none without a GPU,
so here it must agree token for token, as `none` must; the int2 copies a GPU would get
for an MXFP4 file run when asked for by name.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures.tiny_models import EXPERT_TYPES, tiny_model_path
from tests.test_new_arch_engines import CPU_ONLY, ENGINES, ask_tokens

PROMPT = "Hello there, how are you?"


def _ask(path, *args):
    out = subprocess.run([sys.executable, "-m", "moechat.app.cli", "ask", "--model", str(path), "--threads", "1",
                          "--max-tokens", "16", "--json", *args, PROMPT],
                         capture_output=True, text=True, timeout=300, env=CPU_ONLY)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def gpt_oss_mxfp4():
    return tiny_model_path("gpt-oss", "MXFP4")


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_every_engine_gives_llamacpp_greedy_tokens(expert_type):
    path = tiny_model_path("gpt-oss", expert_type)
    ref = ask_tokens(path, "llama.cpp", prompt=PROMPT)  # one reference per file
    assert len(ref) == 16  # random weights: it never stops early
    for engine in ENGINES:
        assert ask_tokens(path, engine, prompt=PROMPT) == ref, engine


def test_hobbit_without_low_tier_and_int2_copies(gpt_oss_mxfp4):
    ref = ask_tokens(gpt_oss_mxfp4, "torch", prompt=PROMPT)  # llama.cpp's (test above)
    assert ask_tokens(gpt_oss_mxfp4, "hobbit", "--hobbit-low", "none", prompt=PROMPT) == ref
    reply = _ask(gpt_oss_mxfp4, "--engine", "hobbit", "--hobbit-low", "int2", "--vram-budget", "50%")
    s = reply["stats"]
    assert "rest int2" in s["placement"]
    assert s["low_hits"] + s["misses"] > 0 and len(reply["token_ids"]) == 16


def test_hobbit_auto_keeps_no_low_tier_without_a_gpu(gpt_oss_mxfp4):
    placement = _ask(gpt_oss_mxfp4, "--engine", "hobbit")["stats"]["placement"]
    assert "no low-precision tier" in placement and "CPU standing in" in placement
