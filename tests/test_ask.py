"""`moechat ask` end to end on real upcycled SmolLM2 MoE models (the demo and variants)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moechat.backends.model.demo_model import UpcycleRecipe, demo_model_path

PARIS = "What is the capital of France? Answer in one sentence."


def ask(*args: str, stdin: str = "", model=None) -> subprocess.CompletedProcess:
    model_args = ["--model", str(model)] if model else []
    return subprocess.run(
        [sys.executable, "-m", "moechat", "ask", *model_args, *args],
        input=stdin, capture_output=True, text=True, timeout=300,
    )


def test_demo_model_is_the_default_and_answers_paris(demo_model):
    result = ask(PARIS)  # no --model: the built-in demo (already built by the fixture)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert result.stdout.strip().endswith(".")


@pytest.mark.parametrize(
    "recipe",
    [
        UpcycleRecipe(expert_type="Q8_0"),
        UpcycleRecipe(n_experts=4, n_used=1, expert_type="Q8_0", seed=1),
        UpcycleRecipe(n_experts=16, n_used=4, expert_type="Q8_0", seed=2),
    ],
    ids=lambda r: r.file_name,
)
def test_any_upcycled_smollm2_answers_paris(recipe):
    model = demo_model_path(recipe, progress=False)
    result = ask("--json", PARIS, model=model)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "Paris" in out["text"]
    assert out["finish_reason"] == "stop"


def test_json_fields(demo_model):
    result = ask("--json", "--max-tokens", "5", PARIS, model=demo_model)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for key in ("text", "token_ids", "prompt_tokens", "prefill_tok_s", "decode_tok_s",
                "engine", "model", "finish_reason"):
        assert key in out, key
    assert out["engine"] == "llama.cpp"
    assert out["model"] == str(demo_model)
    assert len(out["token_ids"]) == 5 and out["finish_reason"] == "length"
    assert out["prompt_tokens"] > 10 and out["prefill_tok_s"] > 0 and out["decode_tok_s"] > 0


def test_stdin_is_the_context(demo_model):
    notes = "The secret password is BLUEBERRY42. Remember it."
    result = ask("--json", "What is the secret password? Answer with the password only.",
                 stdin=notes, model=demo_model)
    assert result.returncode == 0, result.stderr
    assert "BLUEBERRY42" in json.loads(result.stdout)["text"]


def test_stdin_alone_is_the_prompt(demo_model):
    result = ask("--json", stdin=PARIS, model=demo_model)
    assert "Paris" in json.loads(result.stdout)["text"]


def test_same_seed_same_sampled_text(demo_model, monkeypatch):
    # Both runs evaluate the prompt in full: with the KV state cache on, the second would
    # restore the first's state and evaluate the last prompt token alone, whose logits differ
    # from the batched ones by ulps (up to 0.24 on this F16 file) — enough to change a token
    # sampled at temperature 1 (greedy is unaffected; see tests/test_kv_resume.py).
    monkeypatch.setenv("MOECHAT_KV_CACHE_SIZE", "0")
    runs = [ask("--json", "--temperature", "1.0", "--seed", "7", "--max-tokens", "12",
                "Tell me a story.", model=demo_model) for _ in range(2)]
    texts = [json.loads(r.stdout)["token_ids"] for r in runs]
    assert texts[0] == texts[1]


def test_ctrl_c_keeps_what_was_printed_and_exits_130(demo_model):
    proc = subprocess.Popen(
        [sys.executable, "-m", "moechat", "ask", "--model", str(demo_model), "--max-tokens", "2000",
         "Write a very long story about a dragon who learns to cook."],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    first = proc.stdout.read(40)  # blocks until the reply is streaming
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert len(first) == 40 and b"Traceback" not in err
    assert len(first + rest) < 2000 * 4  # stopped early
