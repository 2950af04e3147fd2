"""DeepSeek-style expert gating, as llama.cpp's build_moe_ffn computes it when a file asks
for more than the plain softmax of experts.route():

    probs     = softmax(logits) or sigmoid(logits)            (expert_gating_func 1 / 2)
    selection = probs + exp_probs_b                           (V3: a per-expert bias that
                                                               steers the choice only)
    groups    : experts split into G equal groups; a group scores the sum of its two best
                selection values; all but the best G_used groups are masked out (V3's
                group-limited top-k)
    ids       = top-A of selection;  weights = probs[ids]  (unbiased)
    weights  /= sum(weights)  if expert_weights_norm;   weights *= expert_weights_scale

A pure function, so it can be tested against a hand computation without a model.
Legend: T tokens, E experts, A active experts, G groups.
"""

from __future__ import annotations

import torch

GATING_SOFTMAX, GATING_SIGMOID = 1, 2  # llama_expert_gating_func_type


def route_grouped(router_logits: torch.Tensor, n_used: int, gating: int = GATING_SOFTMAX,
                  bias: torch.Tensor | None = None, n_groups: int = 0, n_groups_used: int = 0,
                  norm: bool = False, scale: float = 0.0):
    """logits [T, E] -> (expert_ids [T, A] int64, gate_weights [T, A] float32)."""
    logits = router_logits.float()
    if gating == GATING_SIGMOID:
        probs = torch.sigmoid(logits)  # [T, E]
    elif gating == GATING_SOFTMAX:
        probs = torch.softmax(logits, dim=-1)
    else:
        raise ValueError(f"expert gating function {gating} is not supported")
    selection = probs if bias is None else probs + bias  # [T, E]
    if n_groups > 1:
        t, e = selection.shape
        grouped = selection.view(t, n_groups, e // n_groups)  # [T, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
        keep = group_scores.topk(n_groups_used, dim=-1).indices  # [T, G_used]
        masked = torch.full_like(grouped, float("-inf"))
        masked.scatter_(1, keep[:, :, None].expand(-1, -1, e // n_groups), grouped.gather(
            1, keep[:, :, None].expand(-1, -1, e // n_groups)))
        selection = masked.view(t, e)
    expert_ids = selection.topk(n_used, dim=-1).indices  # [T, A]
    gate_weights = probs.gather(1, expert_ids)  # [T, A]
    if norm:
        gate_weights = gate_weights / gate_weights.sum(-1, keepdim=True)
    if scale and scale != 1.0:
        gate_weights = gate_weights * scale
    return expert_ids, gate_weights
