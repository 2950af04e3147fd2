"""deepseek2 (V2- and V3-style gating) and phimoe in every engine: `moechat ask` greedy with
--engine torch, fiddler and hobbit gives llama.cpp's tokens on each tiny fixture, and the
runtime's KV cache is the size the model card (and llama.cpp) says."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.fixtures.tiny_models import tiny_model_path

PROMPT = "Write one sentence about the sea."
# The fixtures (F32) and quantized files. The 256-wide Q4_K models alternate between nearly
# tied tokens: they hold because on the CPU every engine computes each expert with ggml's
# kernel (Fiddler's and HOBBIT's "resident" experts too: offload/expert_compute.GgmlExpert),
# and HOBBIT keeps no low-precision copies without a GPU (--hobbit-low auto). Before that,
# dequantized float32 products flipped a tie within 16 tokens on phimoe Q4_K.
CASES = [("deepseek2", "F32"), ("deepseek2-v3", "F32"), ("phimoe", "F32"),
         ("deepseek2-v3", "Q8_0"), ("phimoe", "Q6_K"),
         ("deepseek2", "Q4_K"), ("deepseek2-v3", "Q4_K"), ("phimoe", "Q4_K")]
ENGINES = ("torch", "fiddler", "hobbit")
CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the acceptance is on the CPU, GPU or not


def ask_tokens(path, engine: str, *extra: str, prompt: str = PROMPT) -> list[int]:
    out = subprocess.run([sys.executable, "-m", "moechat.app.cli", "ask", "--model", str(path), "--engine", engine,
                          "--threads", "1", "--max-tokens", "16", "--json", *extra, prompt],
                         capture_output=True, text=True, timeout=300, env=CPU_ONLY)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    reply = json.loads(out.stdout)
    assert reply["engine"] == engine
    return reply["token_ids"]


@pytest.mark.parametrize("arch, expert_type", CASES)
def test_ask_every_engine_gives_llamacpp_greedy_tokens(arch, expert_type):
    path = tiny_model_path(arch, expert_type)
    ref = ask_tokens(path, "llama.cpp")  # one reference per file
    assert len(ref) == 16
    for engine in ENGINES:
        assert ask_tokens(path, engine) == ref, engine


@pytest.mark.parametrize("arch", ["deepseek2", "deepseek2-v3"])
def test_mla_cache_holds_only_the_latent_as_the_card_says(arch):
    from moechat.backends.model.model_card import read_model_card
    from moechat.backends.runtime import load_model
    from tests.fixtures.tiny_models import spec_for

    path, spec = tiny_model_path(arch), spec_for(arch)
    card = read_model_card(path)
    cache = load_model(path, threads=1, max_tokens=64).new_cache(64)
    cache_bytes = sum(t.numel() * t.element_size() for t in vars(cache).values() if hasattr(t, "numel"))
    assert cache_bytes == 64 * card.kv_bytes_per_token
    # f16 latent (kv_lora_rank) + shared rope key per layer: 6x less than per-head K and V here
    assert card.kv_bytes_per_token == spec.n_layers * (spec.kv_lora_rank + spec.rope_dim) * 2


@pytest.mark.parametrize("expert_type", ["F32", "Q8_0"])
def test_unsplit_kv_b_file_runs_as_multi_head_attention_like_llamacpp(tmp_path, expert_type):
    """Older deepseek2 GGUFs (attn_kv_b unsplit, no *_mla keys): llama.cpp attends with
    per-head K and V and caches them; so does the runtime, with the same numbers."""
    from dataclasses import replace

    import numpy as np

    from moechat.backends.model.model_card import read_model_card
    from tests.fixtures.tiny_models import build_tiny_model, spec_for
    from tests.test_runtime_parity import TINY_TOLERANCE, check_agreement, llama_logits, torch_logits

    spec = replace(spec_for("deepseek2", expert_type), mla_split=False, n_kv_heads=4)
    path = build_tiny_model("deepseek2", tmp_path / "ds2-legacy.gguf", expert_type, spec=spec)
    tokens = [1] + [int(t) for t in np.random.default_rng(0).integers(2, 49152, 63)]
    got, model = torch_logits(path, tokens)
    assert not model.mla.absorbed
    check_agreement(got, llama_logits(path, tokens), TINY_TOLERANCE[expert_type], require_clear=False)
    cache = model.new_cache(8)
    assert (cache.k.numel() + cache.v.numel()) * 2 == 8 * read_model_card(path).kv_bytes_per_token


@pytest.mark.parametrize("yarn", [(4.0, 32, 0.707), (40.0, 16, 1.0)])
def test_deepseek2_yarn_rope_and_softmax_scale_like_llamacpp(tmp_path, yarn):
    """Real DeepSeek-V2(-Lite) files use YaRN (factor 40 over 4k positions, log multiplier
    0.0707·10): the rotated dims blend interpolated and original angles, and the softmax
    scale grows by mscale². Context 64 > original 16/32 positions, so both parts matter."""
    from dataclasses import replace

    import numpy as np

    from tests.fixtures.tiny_models import build_tiny_model, spec_for
    from tests.test_runtime_parity import check_agreement, llama_logits, torch_logits

    path = build_tiny_model("deepseek2", tmp_path / "ds2-yarn.gguf", spec=replace(spec_for("deepseek2"), yarn=yarn))
    tokens = [1] + [int(t) for t in np.random.default_rng(0).integers(2, 49152, 63)]
    got, model = torch_logits(path, tokens)
    assert model.attn_scale > model.args.attn_scale  # mscale² > 1
    check_agreement(got, llama_logits(path, tokens), 5e-3, require_clear=False)


@pytest.mark.parametrize("arch", ["deepseek2", "deepseek2-v3", "phimoe"])
def test_gpu_code_path_on_the_cpu_agrees_with_llamacpp(arch):
    """kernels="torch": dense weights and MLA's per-head products dequantized, plain torch
    products (what a GPU runs), on the CPU. No Q8 rounding of activations here, so the Q8_0
    file's own tolerance applies (measured 0.003 / 0.011 / 0.013)."""
    import numpy as np

    from tests.test_runtime_parity import TINY_TOLERANCE, check_agreement, llama_logits, torch_logits

    path = tiny_model_path(arch, "Q8_0")
    tokens = [1] + [int(t) for t in np.random.default_rng(0).integers(2, 49152, 63)]
    got, _ = torch_logits(path, tokens, kernels="torch")
    check_agreement(got, llama_logits(path, tokens), TINY_TOLERANCE["Q8_0"], require_clear=False)


@pytest.mark.parametrize("n_kv_heads, dk, dv", [(1, 40, 32), (4, 24, 16)])
def test_latent_attention_batched_equals_per_query(n_kv_heads, dk, dv):
    """The GPU's one masked product gives what the CPU's query-at-a-time loop gives (MLA's
    one latent head with V a prefix of K; multi-head with K and V of different widths)."""
    import torch

    from moechat.backends.runtime.mla import latent_attention_batched, latent_attention_per_query

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, dk, generator=gen)
    k = torch.randn(n_kv_heads, 9, dk, generator=gen).half()
    v = k[..., :dv] if n_kv_heads == 1 else torch.randn(n_kv_heads, 9, dv, generator=gen).half()
    per_query = latent_attention_per_query(q, k, v, 4, 0.2)
    torch.testing.assert_close(latent_attention_batched(q, k, v, 4, 0.2), per_query, atol=1e-5, rtol=1e-5)
    assert per_query.shape == (5, 4, dv)


@pytest.mark.parametrize("original, which", [(64, "long"), (512, "short")])
def test_phimoe_longrope_like_llamacpp(tmp_path, original, which):
    """Phi-3.5-MoE's LongRoPE: rope_factors_long divide the rotation frequencies when the
    context (256 here, llama.cpp's n_ctx and the runtime's tables) exceeds the original
    training context, rope_factors_short otherwise; cos/sin times rope.scaling.attn_factor.
    Each part is needed: the other factor set, or no attention factor, misses by far more."""
    from dataclasses import replace

    import numpy as np
    import torch

    from moechat.backends.runtime.rope import Rope
    from tests.fixtures.tiny_models import build_tiny_model, spec_for
    from tests.test_runtime_parity import TINY_TOLERANCE, check_agreement, llama_logits, torch_logits

    spec = replace(spec_for("phimoe"), longrope=(original, 1.3))
    path = build_tiny_model("phimoe", tmp_path / "phimoe-longrope.gguf", spec=spec)
    tokens = [1] + [int(t) for t in np.random.default_rng(0).integers(2, 49152, 63)]
    ref = llama_logits(path, tokens)
    got, model = torch_logits(path, tokens)
    check_agreement(got, ref, TINY_TOLERANCE["F32"], require_clear=False)
    a = model.args
    other = "short" if which == "long" else "long"

    def rope(factors: str, attn_factor: float) -> Rope:
        data = model.weights.get(f"rope_factors_{factors}.weight").data
        return Rope(a.head_dim, a.rope_dims, a.rope_base, a.rope_neox, 256, 1.0, data, attn_factor=attn_factor)

    for name, wrong in {"other factors": rope(other, 1.3), "no attention factor": rope(which, 1.0)}.items():
        model.rope = wrong
        with torch.inference_mode():
            logits = model.forward(torch.tensor(tokens), model.new_cache(256), 0).numpy()
        assert np.abs(logits - ref).max() > 10 * TINY_TOLERANCE["F32"], name


def test_phimoe_longrope_in_every_engine(tmp_path):
    """A LongRoPE file (the real Phi-3.5-MoE GGUFs carry the factors) runs in every engine
    with llama.cpp's greedy tokens (context 4096 > original 64: the long factors)."""
    from dataclasses import replace

    from tests.fixtures.tiny_models import build_tiny_model, spec_for

    spec = replace(spec_for("phimoe"), longrope=(64, 1.3))
    path = build_tiny_model("phimoe", tmp_path / "phimoe-longrope.gguf", spec=spec)
    ref = ask_tokens(path, "llama.cpp")
    for engine in ENGINES:
        assert ask_tokens(path, engine) == ref, engine
