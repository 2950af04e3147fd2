"""Random weights, real geometry: the file has the real shapes and llama.cpp runs it."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moechat.backends.model.model_card import read_model_card  # noqa: E402
from tests.fixtures.random_geometry import GEOMETRIES, geometry_card, random_geometry_path  # noqa: E402


def test_olmoe_one_layer_has_real_shapes_and_decodes():
    import llama_cpp

    path = random_geometry_path("olmoe-1b-7b", n_layers=1, qtype="Q4_0")
    assert path == random_geometry_path("olmoe-1b-7b", n_layers=1, qtype="Q4_0")  # cached
    card = read_model_card(path)
    g = GEOMETRIES["olmoe-1b-7b"]
    assert (card.architecture, card.n_layers, card.hidden_size) == (g.arch, 1, g.hidden)
    assert (card.n_experts, card.n_experts_used, card.expert_ffn_size) == (g.n_experts, g.n_used, g.expert_ffn)
    up = card.tensor("blk.0.ffn_up_exps.weight")
    assert up.shape == (g.hidden, g.expert_ffn, g.n_experts) and up.type_name == "Q4_0"
    assert up.n_bytes == g.hidden * g.expert_ffn * g.n_experts // 32 * 18
    assert card.vocab_size == g.vocab  # SmolLM2's tokenizer padded to OLMoE's vocab
    # the card computed without writing a file agrees with the file
    assert geometry_card("olmoe-1b-7b", n_layers=1, qtype="Q4_0").tensor_bytes == card.tensor_bytes
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=False)
    try:
        llm.eval([1, 2, 3])
        assert llm.scores[llm.n_tokens - 1].shape == (g.vocab,)
    finally:
        llm.close()


def test_geometries_have_the_published_parameter_counts():
    import math

    published = {"mixtral-8x7b": 46.7e9, "qwen3-30b-a3b": 30.5e9, "olmoe-1b-7b": 6.9e9, "gpt-oss-20b": 20.9e9,
                 "gpt-oss-120b": 116.8e9, "deepseek-v2-lite": 15.7e9, "qwen3-235b-a22b": 235.1e9, "deepseek-v3": 671e9}
    # DeepSeek-V3's q goes through a 1536-wide LoRA; the geometry projects it directly (+1.2%)
    tolerance = {"deepseek-v3": 0.015}
    assert set(published) == set(GEOMETRIES)
    for name, total in published.items():
        card = geometry_card(name, qtype="F16")
        params = sum(math.prod(t.shape) for t in card.tensors)
        assert abs(params / total - 1) < tolerance.get(name, 0.01), (name, params)
        assert len(card.expert_layers) == GEOMETRIES[name].n_layers - GEOMETRIES[name].n_dense_layers
