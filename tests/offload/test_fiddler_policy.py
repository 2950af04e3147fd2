"""Fiddler placement and per-expert decisions on traces and consumer machine profiles."""

import numpy as np
import pytest

from moechat.backends.offload.fiddler_policy import (
    ExpertShape, OffloadCosts, OnlineCostModel, cpu_seconds, crossover_tokens, gpu_seconds,
    hit_rate, place_experts, popularity_ranking, replay_fiddler,
)

MIXTRAL_Q4 = ExpertShape(weight_bytes=3 * 4096 * 14336 * 9 // 16, params=3 * 4096 * 14336, hidden=4096)
MIXTRAL_BF16 = ExpertShape(weight_bytes=3 * 4096 * 14336 * 2, params=3 * 4096 * 14336, hidden=4096)


def test_ranking_and_budget():
    counts = np.array([[5, 0, 9], [7, 1, 2]])
    ranking = popularity_ranking(counts)
    assert ranking[:3] == [(0, 2), (1, 0), (0, 0)]
    assert place_experts(ranking, 10, 25) == {(0, 2), (1, 0)}
    # per-layer sizes: a big expert that does not fit is skipped for smaller ones
    sizes = np.array([30, 10])
    assert place_experts(ranking, sizes, 25) == {(1, 0), (1, 2)}


@pytest.mark.parametrize("trace_name", ["synthetic_trace", "demo_trace"])
def test_popularity_placement_beats_other_orders_on_held_out_routing(trace_name, request):
    trace = request.getfixturevalue(trace_name)
    calib, held = trace.split(0.5)
    n_pairs = trace.n_layers * trace.n_experts
    budget = n_pairs // 4  # a quarter of the experts fit, 1 byte each
    popular = place_experts(popularity_ranking(calib.counts()), 1, budget)
    unpopular = place_experts(popularity_ranking(-calib.counts()), 1, budget)
    assert len(popular) == budget
    held_counts = held.counts()
    assert hit_rate(held_counts, popular) > 0.25 > hit_rate(held_counts, unpopular)


def test_decode_runs_misses_on_cpu_and_long_prefill_copies(machine):
    if not machine.vram_bytes:
        pytest.skip("no GPU in this profile")
    for shape in (MIXTRAL_Q4, MIXTRAL_BF16):
        model = OnlineCostModel(machine)
        assert model.choose(shape, 1) == "cpu"
        assert model.choose(shape, 2048) == "copy"
        n = crossover_tokens(machine, shape)
        assert model.choose(shape, n) == "copy" and model.choose(shape, n - 1) == "cpu"


def test_crossover_follows_the_bandwidth_ratio(machine):
    # a faster link copies sooner; a faster CPU kernel keeps more on the CPU
    if not machine.vram_bytes:
        pytest.skip("no GPU in this profile: no link to speed up")
    n = crossover_tokens(machine, MIXTRAL_Q4)
    faster_link = OffloadCosts.from_dict({**_as_dict(machine), "pcie_gbs": machine.pcie_gbs * 4})
    faster_cpu = OffloadCosts.from_dict({**_as_dict(machine), "cpu_matvec_gbs": machine.cpu_matvec_gbs * 4,
                                         "cpu_gflops": machine.cpu_gflops * 4})
    assert crossover_tokens(faster_link, MIXTRAL_Q4) < n or n == 1
    assert crossover_tokens(faster_cpu, MIXTRAL_Q4) > n


def test_bf16_mixtral_expert_figures_match_the_notes():
    # notes §5: copying a bf16 Mixtral expert over PCIe 3 ≈ 22 ms; computing it on a CPU
    # reading 68–128 GB/s ≈ 3–5 ms
    pcie3 = OffloadCosts(cpu_matvec_gbs=100, pcie_gbs=15.75, gpu_gbs=900, vram_bytes=1)
    assert 0.020 < gpu_seconds(pcie3, MIXTRAL_BF16, 1, copy=True) < 0.024
    assert 0.003 < cpu_seconds(pcie3, MIXTRAL_BF16, 1) < 0.005


def test_online_refinement_flips_a_wrong_profile():
    costs = OffloadCosts(cpu_matvec_gbs=50, pcie_gbs=25, gpu_gbs=1000, cpu_gflops=500,
                         gpu_gflops=50000, vram_bytes=1)
    model = OnlineCostModel(costs)
    n = crossover_tokens(costs, MIXTRAL_Q4) // 2
    assert model.choose(MIXTRAL_Q4, n) == "cpu"
    slow = 5 * model.predict("cpu", MIXTRAL_Q4, n)  # the CPU turns out 5x slower than profiled
    for _ in range(40):
        model.observe("cpu", MIXTRAL_Q4, n, slow)
    assert model.scale["cpu"] > 4
    assert model.choose(MIXTRAL_Q4, n) == "copy"
    model.observe("cpu", MIXTRAL_Q4, n, 1e9)  # one absurd timing moves it only by alpha
    assert model.scale["cpu"] < 0.1 * 1e3 + 5


@pytest.mark.parametrize("trace_name", ["synthetic_trace", "demo_trace"])
def test_cost_rule_is_never_worse_than_either_fixed_rule(trace_name, request, machine):
    trace = request.getfixturevalue(trace_name)
    placement = place_experts(popularity_ranking(trace.counts()), 1,
                              trace.n_layers * trace.n_experts // 2)
    runs = {rule: replay_fiddler(trace, placement, machine, MIXTRAL_Q4, rule)
            for rule in ("cost", "cpu", "copy")}
    assert runs["cost"].seconds <= min(runs["cpu"].seconds, runs["copy"].seconds) * (1 + 1e-9)
    assert runs["cost"].overlapped_seconds <= runs["cost"].seconds
    assert runs["cpu"].bytes_copied == 0 and runs["copy"].experts_on_cpu == 0
    assert runs["cost"].gpu_hit_rate == runs["cpu"].gpu_hit_rate > 0.5
    # token by token (decode) nothing is copied; whole sequences as one prefill step copy
    decode = replay_fiddler(trace, placement, machine, MIXTRAL_Q4, "cost",
                            step_tokens=np.ones(trace.n_tokens, int))
    prefill = replay_fiddler(trace, placement, machine, MIXTRAL_Q4, "cost",
                             step_tokens=np.diff([*trace.seq_starts, trace.n_tokens]))
    assert decode.bytes_copied == 0
    # a missed expert sees ~10-16 of a sequence's tokens here: copying pays where the
    # crossover is below that (not on the 16-core 4090 desktop, whose CPU keeps up to 18)
    if machine.vram_bytes and crossover_tokens(machine, MIXTRAL_Q4) <= 16:
        assert 0 < prefill.bytes_copied <= runs["copy"].bytes_copied
    else:
        assert prefill.bytes_copied <= runs["copy"].bytes_copied


def _as_dict(costs: OffloadCosts) -> dict:
    return {f: getattr(costs, f) for f in costs.__slots__}


def test_costs_from_a_planner_profile():
    from types import SimpleNamespace

    from moechat.backends.offload.fiddler_policy import costs_from_hardware_profile

    gpu = SimpleNamespace(unified=False, h2d_gbs=24.0, mem_gbs=900.0, tflops=80.0,
                          vram_total_bytes=24 << 30)
    profile = SimpleNamespace(gpus=(gpu,), cpu_matvec_gbs={"Q4_0": 40.0, "Q8_0": 50.0},
                              cpu_gflops=800.0, ram_read_gbs=70.0, machine="box")
    costs = costs_from_hardware_profile(profile, "Q8_0")
    assert (costs.cpu_matvec_gbs, costs.pcie_gbs, costs.gpu_gbs) == (50.0, 24.0, 900.0)
    assert costs_from_hardware_profile(profile, "F16").cpu_matvec_gbs == 50.0  # best measured
    assert OnlineCostModel(costs).choose(MIXTRAL_Q4, 1) == "cpu"
    no_gpu = SimpleNamespace(**{**vars(profile), "gpus": ()})
    assert costs_from_hardware_profile(no_gpu, "Q8_0") is None


def test_planner_decode_estimate_matches_trace_replay(demo_trace, machine):
    from moechat.backends.offload.fiddler_policy import decode_expert_seconds

    trace = demo_trace.decode_only()
    placement = place_experts(popularity_ranking(trace.counts()), 1, trace.n_layers * trace.n_experts // 2)
    run = replay_fiddler(trace, placement, machine, MIXTRAL_Q4, "cost",
                         step_tokens=np.ones(trace.n_tokens, int))
    per_token = decode_expert_seconds(machine, MIXTRAL_Q4, run.gpu_hit_rate, trace.n_layers, trace.top_k)
    # the closed form assumes independent misses; the replay sees them as they came
    assert per_token == pytest.approx(run.overlapped_seconds / trace.n_tokens, rel=0.1)
    assert decode_expert_seconds(machine, MIXTRAL_Q4, 1.0, 1, 2) < decode_expert_seconds(machine, MIXTRAL_Q4, 0.0, 1, 2)


def test_planner_offload_availability_needs_torch_and_cuda():
    from types import SimpleNamespace

    from moechat.backends.plan.planner import offload_engines_available

    cuda = SimpleNamespace(gpus=(SimpleNamespace(backend="cuda"),))
    assert offload_engines_available(cuda)  # torch is installed here
    assert not offload_engines_available(SimpleNamespace(gpus=(SimpleNamespace(backend="mps"),)))
    assert not offload_engines_available(SimpleNamespace(gpus=()))
