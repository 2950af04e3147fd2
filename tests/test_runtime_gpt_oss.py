"""gpt-oss in the torch runtime agrees with llama.cpp on the same file (tiny fixtures,
tests/fixtures/tiny_models.py): teacher-forced logits over 64 positions for each expert
type, with the sliding window short enough to matter and with YaRN RoPE; the sliding
layers' ring cache gives what a full forward gives; the GPU code path (dequantized
weights, batched attention) agrees with the CPU one.

Tolerances (docs/runtime.md): max |Δlogit| per position, logits span about ±2-4.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.fixtures.tiny_models import build_tiny_model, spec_for, tiny_model_path
from tests.test_runtime_parity import check_agreement, llama_logits, torch_logits

# measured 2026-12-01 (max over 64 positions): F32 1.1e-4, F16 2.8e-4, MXFP4 1.8e-4,
# Q4_0 2.5e-3, Q8_0 7.4e-3, Q4_K 1.2e-2, Q6_K 1.8e-2
GPT_OSS_TOLERANCE = {"F32": 5e-3, "F16": 5e-3, "MXFP4": 5e-3, "Q8_0": 5e-2, "Q4_0": 5e-2, "Q4_K": 0.25}
TOKENS = [1] + [int(t) for t in np.random.default_rng(0).integers(2, 49152, 63)]


@pytest.fixture(scope="module")
def short_window(tmp_path_factory):
    """MXFP4 experts, an 8-token window (so 56 of the 64 positions see a cut window) and
    YaRN RoPE (factor 32 over a 64-token training context, as gpt-oss's 32 over 4096)."""
    spec = replace(spec_for("gpt-oss"), sliding_window=8, yarn_factor=32.0, yarn_orig_ctx=64, context=2048)
    return build_tiny_model("gpt-oss", tmp_path_factory.mktemp("gpt-oss") / "w8-yarn.gguf", "MXFP4", spec=spec)


@pytest.mark.parametrize("expert_type", list(GPT_OSS_TOLERANCE))
def test_gpt_oss_parity(expert_type):
    path = tiny_model_path("gpt-oss", expert_type)
    got, ref = torch_logits(path, TOKENS)[0], llama_logits(path, TOKENS)
    check_agreement(got, ref, GPT_OSS_TOLERANCE[expert_type], require_clear=False)
    assert (got.argmax(-1) == ref.argmax(-1)).all()  # measured: every position, not just clear ones


def test_sliding_window_sinks_and_yarn_match_llamacpp(short_window, monkeypatch):
    import moechat.backends.runtime.gpt_oss as gpt_oss
    import moechat.backends.runtime.rope as rope

    ref = llama_logits(short_window, TOKENS)
    got, model = torch_logits(short_window, TOKENS)
    assert model.windows == [8, 0] and model.args.rope_yarn_orig_ctx == 64
    check_agreement(got, ref, GPT_OSS_TOLERANCE["MXFP4"], require_clear=False)
    # each feature is needed: without it the logits move by far more than the tolerance
    broken = {
        "sinks": (gpt_oss, "_softmax_with_sink", lambda s, sink: torch.softmax(s, -1)),
        "window": (gpt_oss, "sliding_windows", lambda n, w, p=None: [0] * n),
        "yarn": (rope, "yarn_ramp", lambda dims, *a: np.zeros(dims // 2, np.float32)),
    }
    for name, (module, attr, fake) in broken.items():
        with monkeypatch.context() as m:
            m.setattr(module, attr, fake)
            wrong, _ = torch_logits(short_window, TOKENS)
        assert np.abs(wrong - ref).max() > 0.1, name


def test_ring_cache_decode_equals_full_forward(short_window, monkeypatch):
    """Prefill 40 tokens, then decode one at a time through a ring of window + 4 slots that
    wraps many times: the same logits as one full forward (the per-query attention is
    exact; only ggml's batched vs one-row expert products round differently)."""
    import moechat.backends.runtime.swa_cache as swa_cache

    monkeypatch.setattr(swa_cache, "SLACK", 4)
    full, model = torch_logits(short_window, TOKENS)
    cache = model.new_cache(256)
    assert cache.sizes == [12, 256]
    with torch.inference_mode():
        steps = [model.forward(torch.tensor(TOKENS[:40]), cache, 0, all_logits=False)]
        for i in range(40, 64):
            steps.append(model.forward(torch.tensor(TOKENS[i : i + 1]), cache, i, all_logits=False))
    np.testing.assert_allclose(torch.cat(steps).numpy(), full[39:], atol=2e-3, rtol=0)


def test_sliding_cache_truncate_keeps_only_what_it_still_holds():
    from moechat.backends.runtime.swa_cache import SLACK, SlidingKVCache

    cache = SlidingKVCache([4, 0], n_kv_heads=1, head_dim=2, max_tokens=4096)
    ring = cache.sizes[0]
    assert ring == 4 + SLACK and cache.sizes[1] == 4096
    kv = torch.ones(ring + 10, 1, 2)
    for layer in (0, 1):
        cache.update(layer, 0, kv, kv)
    cache.advance(ring + 10)  # positions 0..9 are overwritten in the ring
    assert cache.truncate(ring + 5) == ring + 5  # its window (ring+2 .. ring+4) is still there
    assert cache.truncate(12) == 0  # positions 9..11 are gone: re-evaluate from the start
    with pytest.raises(ValueError, match="KV cache full"):
        cache.update(1, 4090, kv, kv)


def test_gpu_code_path_on_cpu_agrees(short_window):
    """kernels="torch": every weight dequantized (MXFP4 experts through TorchExperts), as on
    a GPU; and the batched, masked attention equals the per-query one."""
    from moechat.backends.runtime.gpt_oss import sink_attention

    cpu, _ = torch_logits(short_window, TOKENS)
    dequantized, model = torch_logits(short_window, TOKENS, kernels="torch")
    assert type(model.expert_backend).__name__ == "TorchExperts"
    # ggml rounds the activations to Q8_0 before MXFP4 products; the float path does not:
    # ≤ 0.016 apart, but one position where a near-tie in routing picks another expert (0.97)
    diff = np.abs(dequantized - cpu).max(-1)
    within = diff <= 5e-2
    assert (~within).sum() <= 1, np.round(diff, 3)
    check_agreement(dequantized[within], cpu[within], 5e-2, require_clear=False)
    rng = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, 16, generator=rng)
    k, v = torch.randn(2, 12, 16, generator=rng).half(), torch.randn(2, 12, 16, generator=rng).half()
    sinks = torch.randn(4, generator=rng)
    for window in (0, 3):  # keys for positions 2..13, queries at 9..13
        one = sink_attention(q, k, v, 9, 2, 0.25, sinks, window, batched=False)
        many = sink_attention(q, k, v, 9, 2, 0.25, sinks, window, batched=True)
        torch.testing.assert_close(many, one, atol=1e-5, rtol=0)


def test_model_card_and_planner_count_the_capped_sliding_cache(short_window):
    """The card reads the window; llama-cpp-python's full-size SWA cache is what the
    llama.cpp placements count, the torch engines' ring what theirs count — and the ring
    the runtime allocates is exactly that many bytes."""
    from moechat.backends.model.model_card import SWA_CACHE_SLACK, read_model_card
    from moechat.backends.plan import cost_model as cm
    from moechat.backends.runtime import load_model

    card = read_model_card(short_window)
    assert card.sliding_window == 8 and card.n_sliding_layers == 1
    n_ctx, per_layer = 2048, card.kv_bytes_per_token // card.n_layers
    assert cm.kv_bytes(card, n_ctx, cm.Placement("cpu", 0)) == card.kv_bytes_per_token * n_ctx
    capped = cm.kv_bytes(card, n_ctx, cm.Placement("hobbit", 0))
    assert capped == per_layer * (n_ctx + 8 + SWA_CACHE_SLACK)  # one full layer, one ring
    model = load_model(short_window, threads=1, max_tokens=n_ctx)
    assert model.new_cache(n_ctx).nbytes == capped
    assert read_model_card(tiny_model_path("qwen3moe")).kv_bytes(n_ctx, sliding_capped=True) == \
        read_model_card(tiny_model_path("qwen3moe")).kv_bytes_per_token * n_ctx  # no window: no cap


@pytest.mark.parametrize("slack", [256, 4])
def test_two_turn_chat_equals_llamacpp_with_and_without_prefix_reuse(short_window, slack, monkeypatch):
    """The torch engine on the 8-token-window file: a second turn reuses the cached prefix
    when the ring still holds its window (slack 256), and re-evaluates the prompt when it
    does not (slack 4: a ring of 12 positions) — greedy tokens equal llama.cpp's either way."""
    import moechat.backends.runtime.swa_cache as swa_cache
    from moechat.backends.engines.engine import Sampling
    from moechat.backends.engines.llamacpp_engine import LlamaCppEngine
    from moechat.backends.engines.torch_engine import TorchEngine
    from moechat.backends.model.model_card import read_model_card

    monkeypatch.setattr(swa_cache, "SLACK", slack)
    card = read_model_card(short_window)
    first = [{"role": "user", "content": "Tell me about the sea."}]

    def chat(engine):
        out = []
        try:
            events = list(engine.generate(first, Sampling(max_tokens=8)))
            out.append([t for e in events for t in e.token_ids])
            # not the generated reply: the prompts part at its start, 8+ tokens before the end
            second = first + [{"role": "assistant", "content": "Waves."}, {"role": "user", "content": "And rivers?"}]
            events = list(engine.generate(second, Sampling(max_tokens=8)))
            out.append([t for e in events for t in e.token_ids])
            return out, events[-1].stats
        finally:
            engine.close()

    ref, _ = chat(LlamaCppEngine(card, n_ctx=256, threads=1))
    got, stats = chat(TorchEngine(card, n_ctx=256, threads=1, device="cpu"))
    assert got == ref
    assert (stats["prompt_tokens_reused"] > 0) == (slack == 256)
