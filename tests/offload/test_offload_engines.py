"""The Fiddler-style and HOBBIT-style engines on the demo model, on the CPU (the CPU stands
in for the GPU): parity with the torch runtime under forced mixed placements, and the
Paris answer through the Engine protocol with their stats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moechat.backends.engines.engine import Sampling
from moechat.backends.offload.calibration import CALIBRATION_PROMPTS

PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
TEXT = "In 1889 the Eiffel Tower opened in Paris; def add(a, b): return a + b"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runtime(demo_model):
    from moechat.backends.engines.prompt import ChatTokenizer
    from moechat.backends.runtime import load_model

    model = load_model(str(demo_model), threads=1, max_tokens=128)
    tokens = ChatTokenizer.open(str(demo_model)).tokenize(TEXT)
    ref = _run(model, tokens)
    return model, tokens, ref


def _run(model, tokens, n_prefill=None):
    """Prefill all but the last 3 tokens, then decode those 3 one at a time: [T, V] logits."""
    n_prefill = n_prefill or len(tokens) - 3
    cache = model.new_cache(128)
    with torch.inference_mode():
        out = [model.forward(torch.tensor(tokens[:n_prefill]), cache, 0)]
        for i in range(n_prefill, len(tokens)):
            out.append(model.forward(torch.tensor(tokens[i : i + 1]), cache, i))
    return torch.cat(out).numpy()


def _fiddler_backend(model, placement, force):
    from moechat.backends.offload.devices import pick_devices
    from moechat.backends.offload.fiddler_experts import FiddlerExperts
    from moechat.backends.offload.fiddler_policy import OffloadCosts, OnlineCostModel

    costs = OffloadCosts(cpu_matvec_gbs=10, pcie_gbs=10, gpu_gbs=10)
    return FiddlerExperts(model.experts, model.expert_backend.layers, pick_devices("cpu"),
                          placement, OnlineCostModel(costs), model.dtype, force)


def test_fiddler_all_on_cpu_equals_the_runtime(runtime):
    model, tokens, ref = runtime
    ggml = model.expert_backend
    fx = _fiddler_backend(model, frozenset(), {})  # nothing resident; decode -> CPU
    fx.force = {(l, e): "cpu" for l in range(30) for e in range(8)}
    model.expert_backend = fx
    try:
        got = _run(model, tokens)
    finally:
        model.expert_backend = ggml
        fx.close()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)  # same kernel, same summation order
    assert fx.stats.experts_on_cpu > 0 and fx.stats.gpu_hits == 0 and fx.stats.bytes_copied == 0


def test_fiddler_mixed_placements_agree_with_the_runtime(runtime):
    model, tokens, ref = runtime
    rng = np.random.default_rng(0)
    pairs = [(l, e) for l in range(30) for e in range(8)]
    resident = frozenset(p for p in pairs if rng.random() < 0.4)
    force = {p: ("cpu" if rng.random() < 0.5 else "copy") for p in pairs}
    ggml = model.expert_backend
    fx = _fiddler_backend(model, resident, force)
    model.expert_backend = fx
    try:
        got = _run(model, tokens)
    finally:
        model.expert_backend = ggml
        fx.close()
    # on the CPU, resident and copied experts run ggml's kernel too: the runtime's numbers
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    s = fx.stats
    assert s.gpu_hits > 0 and s.experts_on_cpu > 0 and s.experts_copied > 0
    assert s.bytes_copied == s.experts_copied * model.experts.expert(0, 0).nbytes
    assert 0 < s.gpu_hit_rate < 1


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    """A fresh cache dir that still sees the built demo model and low-precision copies."""
    from moechat.backends.paths import cache_dir

    real = cache_dir()
    fresh = tmp_path / "cache"
    fresh.mkdir()
    for name in ("demo", "hobbit"):
        (real / name).mkdir(exist_ok=True)
        (fresh / name).symlink_to(real / name)
    monkeypatch.setenv("MOECHAT_CACHE_DIR", str(fresh))
    return fresh


def test_fiddler_engine_answers_with_stats(demo_model, isolated_cache):
    from moechat.backends.engines.fiddler_engine import FiddlerEngine
    from moechat.backends.model.model_card import read_model_card

    prompts = CALIBRATION_PROMPTS[:2]  # a short calibration keeps the test fast
    engine = FiddlerEngine(read_model_card(demo_model), n_ctx=256, threads=1,
                           vram_budget=("share", 0.5), progress=False, calibration_prompts=prompts)
    try:
        assert len(list((isolated_cache / "calibration").glob("*.json"))) == 1
        events = list(engine.generate(PARIS, Sampling(max_tokens=10)))
    finally:
        engine.close()
    text = "".join(e.text for e in events)
    assert "Paris" in text
    stats = events[-1].stats
    assert 0 < stats["gpu_hit_rate"] < 1
    assert stats["experts_on_cpu"] > 0  # decode misses run on the CPU
    for key in ("bytes_copied", "cpu_ms_per_tok", "gpu_ms_per_tok"):
        assert key in stats
    assert events[-1].finish_reason == "stop"


def test_hobbit_engine_answers_with_low_precision_and_prefetch(demo_model):
    from moechat.backends.engines.hobbit_engine import HobbitEngine
    from moechat.backends.model.model_card import read_model_card

    # T1 = 0.5: every second expert is "less important", so misses load int4 copies; a
    # quarter of the experts fit, so the cache misses, evicts and prefetches
    # (on the CPU, auto keeps no low copies: int4 is asked for by name)
    engine = HobbitEngine(read_model_card(demo_model), n_ctx=256, threads=1,
                          vram_budget=("share", 0.25), low_format="int4", t1=0.5, progress=False)
    try:
        events = list(engine.generate(PARIS, Sampling(max_tokens=12)))
        second = list(engine.generate(PARIS, Sampling(max_tokens=3)))
    finally:
        engine.close()
    text = "".join(e.text for e in events)
    assert "Paris" in text
    s = events[-1].stats
    assert s["misses"] > 0 and s["bytes_moved"] > 0
    assert s["high_hits"] + s["low_hits"] > 0
    assert s["skips"] == 0
    assert 0 < s["prefetch_accuracy"] <= 1
    assert second[-1].stats["bytes_moved"] < s["bytes_moved"]  # stats are per reply


def test_gpu_workspace_covers_a_dequantized_expert_and_attention(runtime):
    """The VRAM the default budget keeps back beyond the fixed reserve: room for a missed
    expert dequantized whole (twice) and a prefill chunk's float32 attention scores."""
    from moechat.backends.engines.offload_engine import gpu_workspace_bytes
    from moechat.backends.engines.torch_engine import PREFILL_CHUNK

    model = runtime[0]
    a = model.args
    expert_params = 3 * a.dim * model.experts.expert(0, 0).gate.shape[0]  # gate, up, down
    scores = a.n_heads * PREFILL_CHUNK * model.max_tokens * 4
    assert gpu_workspace_bytes(model) >= 2 * expert_params * model.dtype.itemsize + scores
