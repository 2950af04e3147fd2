"""HOBBIT loading precision, cache priority/eviction, prefetch and replay on traces."""

import numpy as np
import pytest

from moechat.backends.offload.hobbit_cache import LFU, LRU, HobbitCache, PriorityWeights, UseCounters, priority
from moechat.backends.offload.hobbit_loading import HIGH, LOW, SKIP, per_expert_need, unimportance, wanted_precision
from moechat.backends.offload.prefetch import adaptive_targets
from moechat.backends.offload.replay import CachePlan, compare_policies, fit_weights, predictor_accuracy, replay


def test_unimportance_is_the_weight_ranked_above():
    w = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1]])
    s = unimportance(w)
    assert np.allclose(s, [[0.9, 0.0, 0.5], [0.0, 0.7, 0.9]])
    assert (s[np.arange(2), w.argmax(1)] == 0).all()  # top-1 scores 0


def test_thresholds_and_skip():
    w = np.array([[0.55, 0.3, 0.1, 0.05]])  # scores 0, .55, .85, .95
    assert wanted_precision(w).tolist() == [[HIGH, HIGH, LOW, LOW]]
    assert wanted_precision(w, allow_skip=True).tolist() == [[HIGH, HIGH, LOW, SKIP]]
    # whatever the weights, the top-1 expert is high
    rng = np.random.default_rng(0)
    g = rng.dirichlet(np.ones(8), size=200)
    p = wanted_precision(g, allow_skip=True)
    assert (p[np.arange(200), g.argmax(1)] == HIGH).all()
    assert per_expert_need(np.array([[3, 1], [1, 5]]), np.array([[LOW, SKIP], [HIGH, LOW]])) == {3: LOW, 1: HIGH, 5: LOW}


def test_priority_terms():
    w = PriorityWeights(0.25, 0.25, 0.25, 0.25)
    c = UseCounters(last_use=10, uses=5, high_uses=2)
    # layer just ahead (distance 1 of 4) vs just behind (distance 3 of 4)
    ahead = priority(w, c, now=10, layer=2, now_layer=1, n_layers=4)
    behind = priority(w, c, now=10, layer=0, now_layer=1, n_layers=4)
    assert ahead == pytest.approx(0.25 * (1 + 0.5 + 0.2 + 0.75))
    assert behind == pytest.approx(0.25 * (1 + 0.5 + 0.2 + 0.25))


def test_eviction_order_and_protection():
    cache = HobbitCache(high_budget=30, low_budget=0, n_layers=4, weights=LRU)
    for t, key in enumerate([(0, 0), (0, 1), (0, 2)]):
        cache.advance(t, 0)
        assert cache.insert(key, True, 10) == (True, [])
        cache.touch(key, True)
    cache.advance(3, 0)
    cache.touch((0, 0), True)  # (0,1) is now least recently used
    assert cache.insert((1, 0), True, 10) == (True, [(0, 1)])
    cache.protected = {(0, 2), (0, 0), (1, 0)}
    assert cache.insert((1, 1), True, 10) == (False, [])  # all protected: nothing evicted
    assert set(cache.high.sizes) == {(0, 0), (0, 2), (1, 0)}
    cache.release_layer(0)
    assert cache.protected == {(1, 0)}
    ok, evicted = cache.insert((1, 1), True, 10)
    assert ok and evicted[0][0] == 0


def test_lfu_counters_reset_per_sequence():
    cache = HobbitCache(20, 0, 2, LFU)
    cache.advance(0, 0)
    cache.insert((0, 0), True, 10)
    for _ in range(5):
        cache.touch((0, 0), True)
    cache.insert((0, 1), True, 10)
    cache.touch((0, 1), True)
    assert cache.insert((0, 2), True, 10)[1] == [(0, 1)]
    cache.begin_sequence()  # (0,0)'s five uses belonged to the last sequence
    cache.advance(0, 0)
    cache.touch((0, 2), True)
    assert cache.insert((0, 3), True, 10)[1] == [(0, 0)]


def test_adaptive_depth_skips_layers_already_cached():
    pred = np.array([[1, 2], [3, 4], [5, 6]])  # layers 1, 2, 3 as seen from layer 0
    cached = {(1, 1), (1, 2), (2, 3)}
    assert adaptive_targets(pred, 0, 8, lambda k: k in cached) == [(2, 4)]
    assert adaptive_targets(pred, 0, 8, lambda k: True) == []
    assert adaptive_targets(pred, 6, 8, lambda k: False) == [(7, 1), (7, 2)]  # depth stops at the last layer


@pytest.mark.parametrize("trace_name", ["synthetic_trace", "demo_trace"])
def test_replay_policies_on_trace(trace_name, request):
    trace = request.getfixturevalue(trace_name)
    high, low = 1000, 1000 * 5 // 16  # F16 vs int4 g32
    plan = CachePlan(budget_bytes=high * trace.n_layers * trace.n_experts // 4, high_bytes=high, low_bytes=low)
    rows = {r.policy: r for r in compare_policies(trace, plan, PriorityWeights(), t1=0.5)}
    for r in rows.values():
        assert r.high_hits + r.low_hits + r.misses + r.skips == r.selections
    lru, prio, mixed, full = rows["lru"], rows["hobbit-priority"], rows["hobbit-mixed"], rows["hobbit"]
    assert lru.low_hits == 0 and lru.bytes_moved == lru.misses * high
    # loading the less important experts in low precision moves fewer bytes than a
    # high-only cache with the same priority and budget
    assert mixed.low_hits > 0 and mixed.bytes_moved < prio.bytes_moved
    assert full.prefetched > 0 and full.prefetch_accuracy > 0.3
    assert full.skips == 0  # skipping only when asked
    skipping = replay(trace, plan, PriorityWeights(), allow_skip=True, t1=0.3, t2=0.45)
    assert skipping.skips > 0 and skipping.bytes_moved < full.bytes_moved


def test_flat_top2_routing_never_asks_for_low_precision(demo_trace):
    # the demo model's routers are small and random: its top-1 normalised weight stays
    # near 0.5, so with T1 = 0.6 the second expert (score = top-1 weight) is always high
    need = wanted_precision(demo_trace.gate_weights.reshape(-1, demo_trace.top_k))
    assert (need == HIGH).all()


def test_predictor_accuracy_on_synthetic(synthetic_trace):
    acc = predictor_accuracy(synthetic_trace)
    assert acc[0] > acc[2] and 0.8 < acc[0] < 1.0  # built right 90% / 70% of the time


def test_fitted_weights_do_no_worse_than_lru_on_held_out(synthetic_trace):
    fit, held = synthetic_trace.split(0.5)
    plan = CachePlan(budget_bytes=1000 * 12, high_bytes=1000, low_bytes=312)
    best, moved, _ = fit_weights(fit, plan, step=0.5)
    assert moved <= replay(fit, plan, LRU, prefetch=False).bytes_moved
    assert replay(held, plan, best, prefetch=False).bytes_moved <= 1.1 * replay(held, plan, LRU, prefetch=False).bytes_moved


def test_decode_traffic_falls_with_the_budget(demo_trace):
    from moechat.backends.offload.replay import decode_traffic

    small, large = (CachePlan(int(s * 240 * 1000), 1000, 312) for s in (0.25, 0.75))
    hit_s, bytes_s = decode_traffic(demo_trace, small, PriorityWeights())
    hit_l, bytes_l = decode_traffic(demo_trace, large, PriorityWeights())
    assert hit_l > hit_s and bytes_l < bytes_s
    assert 0 < bytes_s <= demo_trace.n_layers * demo_trace.top_k * 1000 + demo_trace.n_layers * 2 * 312


def test_stacked_routers_leave_dense_layers_out():
    """A model whose first layer is dense (no router): its stacked rows are zeros, and the
    other layers' rows are their routers, in layer order."""
    import torch

    from moechat.backends.offload.prefetch import predict_experts, stack_routers

    r1, r2 = torch.randn(4, 8), torch.randn(4, 8)
    stacked = stack_routers([None, r1, r2])
    assert stacked.shape == (12, 8)
    assert torch.equal(stacked[:4], torch.zeros(4, 8))
    assert torch.equal(stacked[4:8], r1) and torch.equal(stacked[8:], r2)
    x = torch.randn(2, 8)
    predicted = predict_experts(stacked, x, 0, 3, 4, 2, depth=2)  # layers 1 and 2 from layer 0
    assert torch.equal(predicted[:, 0], (x @ r1.T).topk(2).indices)
