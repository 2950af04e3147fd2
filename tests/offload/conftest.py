"""Routing traces for the policy tests.

`synthetic_trace`: a seeded, Zipf-skewed routing pattern with sequence structure and a
noisy stacked-router prediction — the shape of real MoE routing, built in milliseconds.
`demo_trace`: routing recorded on the demo model (tests/fixtures/traces/), when present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moechat.backends.offload.fiddler_policy import OffloadCosts, replay_costs
from moechat.backends.plan.hardware_profile import read_profile
from moechat.backends.offload.trace import RoutingTrace, load_trace

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PROFILES = sorted((FIXTURES.parent / "profiles").glob("*.json"))  # the planner's recorded machines
DEMO_TRACE = FIXTURES / "traces" / "demo_e8_top2.npz"


def make_trace(n_seqs=4, seq_len=80, prompt_len=40, n_layers=6, n_experts=8, top_k=2,
               depth=3, seed=0, skew=1.2, stickiness=0.6) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    # per-layer popularity (Zipf over a per-layer permutation) and per-sequence drift
    base = 1.0 / np.arange(1, n_experts + 1) ** skew
    pops = np.stack([base[rng.permutation(n_experts)] for _ in range(n_layers)])  # [L, E]
    n = n_seqs * seq_len
    ids = np.zeros((n, n_layers, top_k), np.int16)
    w = np.zeros((n, n_layers, top_k), np.float32)
    for t in range(n):
        for layer in range(n_layers):
            p = pops[layer].copy()
            if t % seq_len and rng.random() < stickiness:  # tokens reuse their predecessor's experts
                p[ids[t - 1, layer]] *= 4
            p /= p.sum()
            chosen = rng.choice(n_experts, size=top_k, replace=False, p=p)
            g = np.sort(rng.dirichlet(np.ones(top_k) * 2))[::-1]
            ids[t, layer], w[t, layer] = chosen, g
    pred = np.full((n, n_layers, depth, top_k), -1, np.int16)
    for d in range(depth):  # right with probability 0.9 - 0.1·d, else a random expert
        for layer in range(n_layers - 1 - d):
            real = ids[:, layer + 1 + d]
            wrong = rng.integers(0, n_experts, size=real.shape)
            pred[:, layer, d] = np.where(rng.random(real.shape) < 0.9 - 0.1 * d, real, wrong)
    prefill = np.tile(np.arange(seq_len) < prompt_len, n_seqs)
    return RoutingTrace(n_experts, ids, w, np.arange(0, n, seq_len, dtype=np.int64), prefill, pred,
                        "synthetic")


@pytest.fixture(scope="session")
def synthetic_trace() -> RoutingTrace:
    return make_trace()


@pytest.fixture(scope="session")
def demo_trace() -> RoutingTrace:
    if not DEMO_TRACE.exists():
        pytest.skip("no recorded demo trace (benchmarks/replay_trace.py record writes it)")
    return load_trace(DEMO_TRACE)


@pytest.fixture(scope="session", params=[p.stem for p in PROFILES])
def machine(request) -> OffloadCosts:
    return replay_costs(read_profile(FIXTURES.parent / "profiles" / f"{request.param}.json"))
