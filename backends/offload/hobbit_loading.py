"""HOBBIT token-level loading: how important is each selected expert to this token?

Axes: T tokens, A active experts. The unimportance of the i-th ranked expert is the sum of
the normalised gate weights of the experts ranked above it, so the top-1 expert scores 0
and is always loaded in high precision. On a miss: score <= T1 -> high, <= T2 -> low,
beyond -> skipped (only when skipping is enabled; otherwise low).
"""

from __future__ import annotations

import numpy as np

HIGH, LOW, SKIP = 0, 1, 2
PRECISION_NAMES = ("high", "low", "skip")
T1 = 0.6  # HOBBIT's Mixtral thresholds (paper §3.2)
T2 = 0.9


def unimportance(gate_weights: np.ndarray) -> np.ndarray:
    """gate_weights [T, A] (any order, >= 0) -> scores [T, A] in [0, 1)."""
    w = np.asarray(gate_weights, dtype=np.float64)
    w = w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-12)
    order = np.argsort(-w, axis=-1, kind="stable")  # rank 0 = most important
    ranked = np.take_along_axis(w, order, axis=-1)
    above = np.cumsum(ranked, axis=-1) - ranked  # weight of the experts ranked above
    scores = np.empty_like(w)
    np.put_along_axis(scores, order, above, axis=-1)
    return scores


def wanted_precision(gate_weights: np.ndarray, t1: float = T1, t2: float = T2,
                     allow_skip: bool = False) -> np.ndarray:
    """[T, A] codes HIGH / LOW / SKIP for each selected expert if it misses."""
    assert 0 <= t1 <= t2 <= 1
    s = unimportance(gate_weights)
    out = np.where(s <= t1, HIGH, np.where(s <= t2, LOW, SKIP if allow_skip else LOW))
    return out.astype(np.int8)


def per_expert_need(expert_ids: np.ndarray, precision: np.ndarray) -> dict[int, int]:
    """When several tokens route to one expert (prefill), it is needed at the most
    demanding precision any of them asks for: {expert: HIGH|LOW|SKIP}."""
    need: dict[int, int] = {}
    for e, p in zip(np.asarray(expert_ids).ravel().tolist(), np.asarray(precision).ravel().tolist()):
        need[e] = min(need.get(e, SKIP), p)
    return need
