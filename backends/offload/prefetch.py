"""HOBBIT's layer-level prefetch: guess the next layers' experts from the current gate input.

Adjacent layers' gate inputs are similar, so applying layer l+d's router to layer l's gate
input predicts its experts well (HOBBIT: 96% top-1 at d = 1, ~90% at d = 2–3). All routers
are stacked once into one [L·E, D] matrix; a prediction for layers l+1..l+P is one product
with a contiguous slice of it. Axes: T tokens, D hidden, E experts, L layers, P depth, A active.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

MAX_DEPTH = 3


def stack_routers(routers):
    """routers: L tensors [E, D], None for a layer without experts -> [L·E, D] (torch).
    A dense layer's rows are zeros: it predicts nothing worth fetching (its "experts" are
    never missing, see HobbitExperts._prefetch)."""
    import torch

    present = [r for r in routers if r is not None]
    return torch.cat([r.float() if r is not None else torch.zeros_like(present[0], dtype=torch.float32)
                      for r in routers], dim=0)


def predict_experts(stacked, gate_input, layer: int, n_layers: int, n_experts: int,
                    top_k: int, depth: int = MAX_DEPTH):
    """One product: the top-k experts layers layer+1..layer+depth would pick for each
    token if their gate input were `gate_input` [T, D]. Returns [T, P, A] int64 (P may be
    smaller near the last layer; P = 0 at the last layer)."""
    import torch

    first, last = layer + 1, min(layer + depth, n_layers - 1)
    if first > last:
        return torch.empty(gate_input.shape[0], 0, top_k, dtype=torch.long)
    w = stacked[first * n_experts : (last + 1) * n_experts]  # [P·E, D]
    logits = gate_input.float().to(w.device) @ w.T  # [T, P·E]
    logits = logits.view(gate_input.shape[0], last - first + 1, n_experts)  # [T, P, E]
    return logits.topk(top_k, dim=-1).indices  # [T, P, A]


def adaptive_targets(predicted: np.ndarray, layer: int, n_layers: int,
                     is_cached: Callable[[tuple[int, int]], bool]) -> list[tuple[int, int]]:
    """Adaptive depth (HOBBIT §3.3): if every expert predicted for layer+1 is already
    cached, look at layer+2, and so on up to the depth predicted; prefetch the missing
    experts of the first layer that has any. predicted: [P, A] (or [T, P, A], merged over
    tokens) expert ids, -1 = none. Returns (layer, expert) keys to fetch, possibly empty."""
    p = np.asarray(predicted)
    if p.ndim == 3:
        p = p.transpose(1, 0, 2).reshape(p.shape[1], -1)  # [P, T·A]
    for d in range(p.shape[0]):
        target = layer + 1 + d
        if target >= n_layers:
            break
        experts = sorted({int(e) for e in p[d] if e >= 0})
        missing = [(target, e) for e in experts if not is_cached((target, e))]
        if missing:
            return missing
    return []


class PrefetchGate:
    """Whether reading ahead is paying for itself. On a drive-bound tier (the disk tier) a
    read-ahead that goes unused costs as many bytes as a miss and evicts an entry that may
    be wanted: measured on an upcycled SmolLM2 MoE whose routers predict each other poorly
    (43% of read-aheads used), prefetching doubled the bytes read per token. The gate keeps
    the share of the last `window` read-aheads that their layer used; below `min_useful` it
    lets only every `probe_every`-th chance through, so the share keeps being measured and
    prefetching resumes when the model's routing turns predictable."""

    def __init__(self, min_useful: float | None = None, window: int = 256, probe_every: int = 8):
        from collections import deque

        from moechat.backends.plan.streamed import PREFETCH_MIN_USEFUL  # the planner predicts with it

        min_useful = PREFETCH_MIN_USEFUL if min_useful is None else min_useful
        self.min_useful, self.probe_every = min_useful, probe_every
        self.outcomes: deque[bool] = deque(maxlen=window)
        self.chances = 0

    def record(self, read: int, used: int) -> None:
        """A layer ran: `read` experts had been read ahead for it, `used` of them it picked."""
        self.outcomes.extend([True] * used + [False] * (read - used))

    @property
    def useful_share(self) -> float | None:
        return sum(self.outcomes) / len(self.outcomes) if len(self.outcomes) >= 32 else None

    def allow(self) -> bool:
        self.chances += 1
        share = self.useful_share
        return share is None or share >= self.min_useful or self.chances % self.probe_every == 0
