"""DeepSeek gating (backends/runtime/gating.py) against hand-worked cases, and the planner's
view of deepseek2: shared experts always read, MLA's latent-only KV cache."""

import pytest
import torch

from moechat.backends.runtime.gating import GATING_SIGMOID, GATING_SOFTMAX, route_grouped


def test_softmax_gating_without_options_is_plain_top_k():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    ids, w = route_grouped(logits, 2, GATING_SOFTMAX)
    probs = torch.softmax(logits, -1)[0]
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(w[0], probs[[1, 2]])


def test_selection_bias_picks_the_experts_but_weights_stay_unbiased():
    logits = torch.tensor([[0.0, 1.0, 0.5, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.9])  # sigmoid(-1) + 0.9 = 1.17 beats sigmoid(1) = 0.73
    ids, w = route_grouped(logits, 2, GATING_SIGMOID, bias=bias, norm=False)
    assert ids.tolist() == [[3, 1]]
    torch.testing.assert_close(w[0], torch.sigmoid(torch.tensor([-1.0, 1.0])))


def test_group_limited_top_k_masks_all_but_the_best_groups_then_renormalises_and_scales():
    # 3 groups of 2: scores are the sum of each group's two values
    #   group 0: 0.9 + 0.0 = 0.9   group 1: 0.5 + 0.5 = 1.0   group 2: 0.8 + 0.1 = 0.9 (index tie-break)
    sel = torch.tensor([[0.9, 0.0, 0.5, 0.5, 0.8, 0.1]])
    logits = torch.logit(sel)  # sigmoid gives sel back
    ids, w = route_grouped(logits, 2, GATING_SIGMOID, n_groups=3, n_groups_used=1, norm=True, scale=2.0)
    # only group 1 survives: experts 2 and 3, though 0 and 4 score higher overall
    assert sorted(ids[0].tolist()) == [2, 3]
    torch.testing.assert_close(w[0], torch.tensor([1.0, 1.0]))  # 0.5 / (0.5 + 0.5) * 2
    ids, _ = route_grouped(logits, 2, GATING_SIGMOID)  # without groups
    assert ids[0].tolist() == [0, 4]


def test_unknown_gating_function_refused():
    with pytest.raises(ValueError, match="gating"):
        route_grouped(torch.zeros(1, 4), 2, gating=3)


def test_planner_reads_shared_experts_every_token_and_counts_the_latent_kv():
    from moechat.backends.plan.cost_model import kv_bytes, read_bytes_per_token
    from tests.fixtures.random_geometry import geometry_card

    card = geometry_card("deepseek-v2-lite", qtype="Q4_0")
    shared = card.tensor("blk.1.ffn_gate_shexp.weight")
    routed = card.tensor("blk.1.ffn_gate_exps.weight")
    assert read_bytes_per_token(card, shared) == shared.n_bytes  # always active
    assert read_bytes_per_token(card, routed) == routed.n_bytes * 6 / 64
    # 27 layers x (kv_lora_rank 512 + rope 64) f16: 31 KB a token, not 27 x 16 x (192 + 128) x 2
    assert kv_bytes(card, 1) == 27 * (512 + 64) * 2
