"""The expert path the Fiddler/HOBBIT engines build on: per-expert weights, routing,
pluggable backends (the torch/GPU code path checked on the CPU against ggml's)."""

import gguf
import numpy as np
import pytest
import torch

from moechat.backends.runtime import load_model
from moechat.backends.runtime.experts import GgmlExperts, TorchExperts, TracingExperts, route


@pytest.fixture(scope="module")
def q8_model(demo_model_q8):
    return load_model(demo_model_q8, threads=1, max_tokens=64)


def test_route_softmax_topk_and_normalisation():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 3.5, 0.0]])
    ids, w = route(logits, 2, norm_topk=False)
    probs = torch.softmax(logits, -1)
    assert ids.tolist() == [[0, 1], [2, 1]]
    assert torch.allclose(w, probs.gather(1, ids))
    ids_n, w_n = route(logits, 2, norm_topk=True)
    assert ids_n.tolist() == ids.tolist() and torch.allclose(w_n.sum(-1), torch.ones(2))
    assert torch.allclose(route(logits, 2, norm_topk=True, scale=2.5)[1], w_n * 2.5)


@pytest.mark.slow
def test_per_expert_bytes_and_dequantize(q8_model):
    store = q8_model.experts
    assert store.layers == tuple(range(30)) and store.n_experts == 8
    w = store.expert(3, 5)
    assert (w.gate.type_name, w.gate.shape, w.down.shape) == ("Q8_0", (1536, 576), (576, 1536))
    assert w.nbytes == 3 * 1536 * 576 // 32 * 34
    stacked_up = store.stacked(3)[1]
    ref = gguf.quants.dequantize(stacked_up.data, gguf.GGMLQuantizationType.Q8_0)[5]  # [I, D]
    gate, up, down = store.dequantize(3, 5, dtype=torch.float32)
    assert np.array_equal(up.numpy(), ref)
    assert gate.shape == (1536, 576) and down.shape == (576, 1536)
    with pytest.raises(IndexError):
        store.expert(3, 8)
    routers = q8_model.routers()
    assert len(routers) == 30 and routers[0].shape == (8, 576)


@pytest.mark.slow
def test_torch_expert_backend_matches_ggml(q8_model):
    """TorchExperts is the GPU path (dequantized experts); here it runs on the CPU."""
    store = q8_model.experts
    ggml_backend = q8_model.expert_backend
    assert isinstance(ggml_backend, GgmlExperts)
    layers_subset = TorchExperts(store, "cpu", torch.float32, layers=(0, 7))  # keeps RAM small
    rng = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 576, generator=rng)
    ids = torch.randint(0, 8, (5, 2), generator=rng)
    weights = torch.rand(5, 2, generator=rng)
    for layer in (0, 7):
        a = ggml_backend.moe_forward(layer, hidden, ids, weights)
        b = layers_subset.moe_forward(layer, hidden, ids, weights)
        assert a.shape == b.shape == (5, 576)
        rel = (a - b).abs().max() / b.abs().max()
        assert rel < 3e-2  # ggml rounds the activation to Q8_0 first


@pytest.mark.slow
def test_routing_of_every_layer_and_token_is_visible(q8_model):
    tracer = TracingExperts(q8_model.expert_backend)
    q8_model.expert_backend = tracer
    try:
        with torch.inference_mode():
            q8_model.forward(torch.tensor([1, 504, 3575, 282]), q8_model.new_cache(64), 0)
    finally:
        q8_model.expert_backend = tracer.inner
    assert [layer for layer, _, _ in tracer.trace] == list(range(30))
    for _, ids, w in tracer.trace:
        assert ids.shape == (4, 2) and ids.dtype == torch.int64
        assert torch.allclose(w.sum(-1), torch.ones(4))  # Mixtral renormalises the top-2
    assert len({tuple(ids.flatten().tolist()) for _, ids, _ in tracer.trace}) > 1


@pytest.mark.slow
def test_ggml_experts_behind_a_torch_kernel_model(demo_model_q8):
    """The Fiddler engine on a GPU: dense layers dequantized in torch (kernels="torch"), its
    CPU experts on ggml's backend, which the model keeps for them; activations of another
    dtype (the GPU runs float16) come back in that dtype."""
    model = load_model(demo_model_q8, threads=1, max_tokens=16, kernels="torch")
    assert model.cpu is None and model.cpu_kernels is not None  # dense: torch; experts: ggml
    cpu_experts = GgmlExperts(model.experts, model.cpu_kernels)
    rng = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 576, generator=rng)
    ids = torch.randint(0, 8, (3, 2), generator=rng)
    weights = torch.rand(3, 2, generator=rng)
    full = cpu_experts.moe_forward(4, hidden, ids, weights)
    half = cpu_experts.moe_forward(4, hidden.half(), ids, weights.half())
    assert full.dtype == torch.float32 and half.dtype == torch.float16
    assert ((half.float() - full).abs().max() / full.abs().max()) < 1e-2  # f16 input rounding
    reference = TorchExperts(model.experts, "cpu", torch.float32, layers=(4,)).moe_forward(4, hidden, ids, weights)
    assert ((full - reference).abs().max() / reference.abs().max()) < 3e-2
    cpu_experts.close()
