"""Sampling, configuration errors, and the torch engine through the CLI."""

import json
import subprocess
import sys

import pytest
import torch

from moechat.backends.errors import MoechatError
from moechat.backends.runtime.config import model_args
from moechat.backends.runtime.sampling import sample


def test_sampling_greedy_seeded_and_filters():
    logits = torch.tensor([0.0, 3.0, 2.9, -5.0, 1.0])
    assert sample(logits) == 1
    draws = lambda seed, **kw: [sample(logits, 1.0, generator=g, **kw)  # noqa: E731
                                for g in [torch.Generator().manual_seed(seed)] for _ in range(50)]
    assert draws(3) == draws(3)  # same seed, same tokens
    assert len(set(draws(3))) > 1  # temperature 1 does sample
    assert set(draws(4, top_k=2)) <= {1, 2}
    assert set(draws(5, top_p=0.3)) == {1}  # token 1 alone holds > 30% of the mass
    assert set(draws(6, top_k=1)) == {1}


def test_unsupported_architecture_and_rope_refused_by_name():
    base = {"general.architecture": "mamba", "general.name": "X"}
    with pytest.raises(MoechatError, match="mamba"):
        model_args(base, {})
    meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.block_count": 2,
            "llama.attention.head_count": 4, "llama.rope.scaling.type": "longrope"}
    with pytest.raises(MoechatError, match="longrope"):
        model_args(meta, {})


@pytest.mark.slow
def test_ask_engine_torch_json(demo_model):
    out = subprocess.run(
        [sys.executable, "-m", "moechat", "ask", "--engine", "torch", "--json", "--threads", "1",
         "--model", str(demo_model), "What is the capital of France? Answer in one sentence."],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # no llama.cpp log noise
    reply = json.loads(out.stdout)
    assert "Paris" in reply["text"]
    assert reply["engine"] == "torch" and reply["finish_reason"] == "stop"
    assert reply["token_ids"] and all(isinstance(t, int) for t in reply["token_ids"])
    assert reply["decode_tok_s"] > 0 and reply["prompt_tokens"] > 0


def test_ask_engine_torch_rejects_n_cpu_moe(demo_model):
    out = subprocess.run(
        [sys.executable, "-m", "moechat", "ask", "--engine", "torch", "--n-cpu-moe", "2",
         "--model", str(demo_model), "hi"], capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2 and "n-cpu-moe" in out.stderr and "Traceback" not in out.stderr


def test_torch_kernel_path_matches_ggml_path():
    """kernels="torch" (dequantized weights, plain matmuls) is the code path a GPU runs;
    here it runs on the CPU against the ggml path on dense SmolLM2."""
    import numpy as np

    from moechat.backends.model.demo_model import smollm2_path
    from moechat.backends.runtime import load_model

    tokens = torch.tensor([1, 504, 3575, 282, 4649, 314, 7042, 30])
    out = []
    # float16 weights are what a GPU multiplies (activations stay float32); torch on the
    # CPU computes that too, slowly
    for kernels, dtype in (("ggml", None), ("torch", None), ("torch", torch.float16)):
        model = load_model(smollm2_path(), threads=1, max_tokens=16, kernels=kernels, dtype=dtype)
        with torch.inference_mode():
            out.append(model.forward(tokens, model.new_cache(16), 0).float().numpy())
    ggml_logits, torch_logits, half_logits = out
    # ggml rounds activations to Q8_1 for these Q4_1 weights; torch multiplies exact values
    assert np.abs(ggml_logits - torch_logits).max() < 2.5
    assert (ggml_logits.argmax(-1) == torch_logits.argmax(-1)).mean() >= 0.75
    assert np.abs(half_logits - torch_logits).max() < 0.5  # measured 0.07
    assert (half_logits.argmax(-1) == torch_logits.argmax(-1)).all()
