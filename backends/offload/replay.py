"""Replay a routing trace through an expert cache: LRU, LFU, or HOBBIT's full policy
(mixed precision, stacked-router prefetch, multidimensional priority), and fit HOBBIT's
priority weights on a trace to minimise the bytes moved.

Tokens are replayed one at a time, layer by layer, as decode sees them; the clock T is the
token's position in its sequence and the counters reset at every sequence start.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from moechat.backends.offload.hobbit_cache import LFU, LRU, HobbitCache, PriorityWeights
from moechat.backends.offload.hobbit_loading import HIGH, SKIP, T1, T2, wanted_precision
from moechat.backends.offload.prefetch import adaptive_targets
from moechat.backends.offload.trace import RoutingTrace


@dataclass(frozen=True, slots=True)
class CachePlan:
    budget_bytes: int  # total VRAM for cached experts
    high_bytes: int  # one expert in the file's precision
    low_bytes: int  # one expert in the low-precision copy
    high_fraction: float = 0.75  # share of the budget for the high tier (mixed policies)

    def __post_init__(self):
        assert 0 < self.high_fraction <= 1 and self.low_bytes <= self.high_bytes


@dataclass(frozen=True, slots=True)
class ReplayResult:
    policy: str
    selections: int
    high_hits: int
    low_hits: int
    misses: int
    skips: int
    bytes_moved: int  # demand loads + prefetches
    prefetched: int
    prefetch_used: int  # prefetched experts the router then selected at that layer

    @property
    def hit_rate(self) -> float:
        return (self.high_hits + self.low_hits) / self.selections if self.selections else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        return self.prefetch_used / self.prefetched if self.prefetched else 0.0


def replay(trace: RoutingTrace, plan: CachePlan, weights: PriorityWeights,
           mixed: bool = True, prefetch: bool = True, allow_skip: bool = False,
           t1: float = T1, t2: float = T2, name: str = "") -> ReplayResult:
    """Replay `trace`. mixed=False: one high-precision tier with the whole budget (the
    classic cache); prefetch needs trace.predicted."""
    n_layers = trace.n_layers
    high_budget = int(plan.budget_bytes * (plan.high_fraction if mixed else 1.0))
    cache = HobbitCache(high_budget, plan.budget_bytes - high_budget if mixed else 0,
                        n_layers, weights)
    use_prefetch = prefetch and mixed and trace.predicted is not None
    hh = lh = miss = skip = moved = pf = pf_used = 0
    pending: dict[tuple[int, int], bool] = {}  # prefetched key -> used yet
    for start, end in trace.sequences():
        cache.begin_sequence()
        pending.clear()
        for t in range(start, end):
            need_all = (wanted_precision(trace.gate_weights[t], t1, t2, allow_skip) if mixed
                        else np.zeros(trace.gate_weights[t].shape, np.int8))  # [L, A]
            for layer in range(n_layers):
                cache.advance(t - start, layer)
                for e, need in zip(trace.expert_ids[t, layer].tolist(), need_all[layer].tolist()):
                    key = (layer, e)
                    if key in pending:
                        pf_used += 1
                        del pending[key]
                    if key in cache.high:
                        hh += 1
                        cache.touch(key, True)
                    elif need != HIGH and key in cache.low:
                        lh += 1
                        cache.touch(key, False)
                    elif need == SKIP:
                        skip += 1
                    else:
                        miss += 1
                        high = need == HIGH
                        moved += plan.high_bytes if high else plan.low_bytes
                        cache.insert(key, high, plan.high_bytes if high else plan.low_bytes)
                        cache.touch(key, high)
                cache.release_layer(layer)
                for key in [k for k in pending if k[0] == layer]:
                    del pending[key]  # a wrong guess
                if use_prefetch:
                    targets = adaptive_targets(trace.predicted[t, layer], layer, n_layers,
                                               lambda k: k in cache.high or k in cache.low)
                    for key in targets:
                        ok, _ = cache.insert(key, False, plan.low_bytes, protect=True)
                        if ok:
                            pf += 1
                            moved += plan.low_bytes
                            pending[key] = False
    selections = trace.n_tokens * n_layers * trace.top_k
    return ReplayResult(name, selections, hh, lh, miss, skip, moved, pf, pf_used)


def predictor_accuracy(trace: RoutingTrace) -> list[float]:
    """Share of the experts the stacked routers guessed at layer l for layer l+d that layer
    l+d then selected, for d = 1..P (over all tokens and layers)."""
    assert trace.predicted is not None
    out = []
    for d in range(trace.predicted.shape[2]):
        hit = total = 0
        for layer in range(trace.n_layers - 1 - d):
            guess = trace.predicted[:, layer, d]  # [N, A]
            real = trace.expert_ids[:, layer + 1 + d]  # [N, A]
            hit += int((guess[:, :, None] == real[:, None, :]).any(-1).sum())
            total += guess.size
        out.append(hit / total if total else 0.0)
    return out


def compare_policies(trace: RoutingTrace, plan: CachePlan, weights: PriorityWeights,
                     allow_skip: bool = False, t1: float = T1) -> list[ReplayResult]:
    """The rows of the trace tool's table."""
    return [
        replay(trace, plan, LRU, mixed=False, name="lru"),
        replay(trace, plan, LFU, mixed=False, name="lfu"),
        replay(trace, plan, weights, mixed=False, name="hobbit-priority"),
        replay(trace, plan, weights, mixed=True, prefetch=False, allow_skip=allow_skip, t1=t1,
               name="hobbit-mixed"),
        replay(trace, plan, weights, mixed=True, prefetch=True, allow_skip=allow_skip, t1=t1,
               name="hobbit"),
    ]


def weight_grid(step: float) -> list[PriorityWeights]:
    n = round(1 / step)
    return [PriorityWeights(a / n, b / n, c / n, (n - a - b - c) / n)
            for a, b, c in itertools.product(range(n + 1), repeat=3) if a + b + c <= n]


def fit_weights(trace: RoutingTrace, plan: CachePlan, step: float = 0.25,
                mixed: bool = True, prefetch: bool = False,
                high_fractions: tuple[float, ...] = ()) -> tuple[PriorityWeights, int, float]:
    """Grid search over the weight simplex (and, if given, the high tier's share of the
    budget) for the fewest bytes moved — HOBBIT's miss penalty: a high miss costs its bytes,
    a low miss the low copy's. Returns (weights, bytes moved, high fraction)."""
    best = None
    for fraction in high_fractions or (plan.high_fraction,):
        p = CachePlan(plan.budget_bytes, plan.high_bytes, plan.low_bytes, fraction)
        for w in weight_grid(step):
            moved = replay(trace, p, w, mixed=mixed, prefetch=prefetch).bytes_moved
            if best is None or moved < best[1]:
                best = (w, moved, fraction)
    return best


def decode_traffic(trace: RoutingTrace, plan: CachePlan, weights: PriorityWeights,
                   t1: float = T1, prefetch: bool = True) -> tuple[float, float]:
    """For the planner: HOBBIT's hit rate and host->GPU bytes per decoded token on a
    recorded trace (prompts dropped), at this cache plan. Returns (hit rate, bytes/token)."""
    decode = trace.decode_only()
    r = replay(decode, plan, weights, mixed=True, prefetch=prefetch, t1=t1)
    return r.hit_rate, r.bytes_moved / max(decode.n_tokens, 1)
