"""The worker tier of the planner on recorded profiles of two and three machines
(tests/profiles/clusters/), no model run: splits fit where one machine does not, cost hops,
and are chosen only when the model does not fit here or the split is predicted faster."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moechat.backends.plan import workers as wk  # noqa: E402
from moechat.backends.plan.planner import NoFitError, make_plan  # noqa: E402
from tests.fixtures.clusters import read_cluster  # noqa: E402
from tests.fixtures.random_geometry import geometry_card  # noqa: E402


def splits_of(plan):
    return [c for c in plan.candidates if c.placement == "split"]


def test_two_machines_run_a_model_that_does_not_fit_in_one():
    here, workers = read_cluster("two-laptops-2.5gbe")
    card = geometry_card("mixtral-8x7b", qtype="Q4_0")  # 24.5 GiB; a laptop plans with 23.4
    assert make_plan(card, here).choice.engine == "stream"  # alone it would stream from disk
    plan = make_plan(card, here, workers=workers)
    c = plan.choice
    assert c.placement == "split" and c.fits and c.workers == (workers[0].endpoint,)
    assert sum(c.split) == card.n_layers and c.split[1] > 0
    need = wk.memory(card, wk.Split(c.split, ""), 4096)
    assert need[0] == c.ram_bytes and need[1] <= wk.capacity_bytes(workers[0])
    assert "do not fit" in plan.reason and workers[0].endpoint in plan.reason
    alone = next(x for x in plan.candidates if x.placement == "cpu")
    assert 0 < c.decode_tok_s < alone.decode_tok_s  # the same CPUs, plus the hop
    assert json.loads(json.dumps(plan.to_dict()))["choice"]["tensor_split"] == list(c.split[1:])


def test_a_model_that_fits_here_stays_here():
    here, workers = read_cluster("two-laptops-2.5gbe")
    plan = make_plan(geometry_card("qwen3-30b-a3b", qtype="Q4_K"), here, workers=workers)
    assert plan.choice.placement == "cpu"
    assert splits_of(plan) and all(s.decode_tok_s < plan.choice.decode_tok_s for s in splits_of(plan))


def test_three_machines_hold_what_two_cannot():
    card = geometry_card("qwen3-235b-a22b", qtype="Q4_K")  # 123 GiB
    here, workers = read_cluster("three-desktops-1gbe")
    assert make_plan(card, here, workers=workers[:0] or ()).choice.engine == "stream"
    plan = make_plan(card, here, workers=workers)
    assert plan.choice.placement == "split" and len(plan.choice.split) == 3
    need = wk.memory(card, wk.Split(plan.choice.split, ""), 4096)
    assert all(n <= wk.capacity_bytes(w) for n, w in zip(need[1:], workers))
    # proportional to memory spreads the layers; "most layers here" fills this machine first
    rules = {s.note.split(";")[0]: s.split for s in splits_of(plan)}
    assert rules["most layers here"][0] >= max(rules["proportional to memory"])


def test_a_faster_link_predicts_faster_and_a_dead_slow_one_far_slower():
    card = geometry_card("mixtral-8x7b", qtype="Q4_0")
    split = wk.Split((16, 16), "")
    speeds = []
    for link in ((0.117, 250e-6), (0.29, 150e-6), (1.15, 60e-6)):
        here, workers = read_cluster("two-laptops-2.5gbe", link=link)
        speeds.append(wk.predict(card, here, workers, split).decode_tok_s)
    assert speeds[0] < speeds[1] < speeds[2]
    here, workers = read_cluster("two-laptops-2.5gbe", link=(0.001, 0.05))  # 1 MB/s, 50 ms
    slow = wk.predict(card, here, workers, split)
    hop = 1.5 * 0.05 + 2 * card.hidden_size * 4 / 1e6 + wk.RPC_CALL_S  # 108 ms: the hop dominates
    assert slow.decode_terms[f"hops to {workers[0].endpoint}"] == pytest.approx(hop)
    assert slow.decode_tok_s < speeds[0] * 0.6


def test_more_workers_cost_more_hops():
    card = geometry_card("qwen3-235b-a22b", qtype="Q4_K")
    here, two = read_cluster("three-desktops-1gbe", n_workers=2)
    _, three = read_cluster("three-desktops-1gbe", n_workers=3)
    p2 = wk.predict(card, here, two, wk.Split((32, 31, 31), ""))
    p3 = wk.predict(card, here, three, wk.Split((24, 24, 23, 23), ""))
    assert p3.decode_tok_s < p2.decode_tok_s
    assert sum(1 for t in p3.decode_terms if t.startswith("hops")) == 3


def test_a_much_faster_worker_is_chosen_even_when_the_model_fits_here():
    here, workers = read_cluster("two-laptops-2.5gbe", link=(1.15, 60e-6))
    fast = dataclasses.replace(here, ram_read_gbs=here.ram_read_gbs * 3,
                               cpu_matvec_gbs={q: v * 3 for q, v in here.cpu_matvec_gbs.items()})
    workers = (dataclasses.replace(workers[0], machine=fast),)
    plan = make_plan(geometry_card("qwen3-30b-a3b", qtype="Q4_K"), here, workers=workers)
    c = plan.choice
    assert c.placement == "split" and c.split[1] > c.split[0]  # most layers on the fast worker
    assert "predicted faster than here alone" in plan.reason


def test_too_big_even_for_the_workers_streams_here():
    """No split holds it: the plan falls back to streaming the experts from disk here (a model
    that cannot even stream is refused, naming the workers: test below)."""
    here, workers = read_cluster("two-laptops-2.5gbe")
    plan = make_plan(geometry_card("qwen3-235b-a22b", qtype="Q4_K"), here, workers=workers)
    assert not any(s.fits for s in splits_of(plan)) and plan.choice.engine == "stream"


def test_what_cannot_even_stream_is_refused_naming_the_workers():
    here, workers = read_cluster("two-laptops-2.5gbe")
    tiny = dataclasses.replace(here, ram=dataclasses.replace(here.ram, available_bytes=64 * 2**20))
    with pytest.raises(NoFitError, match="and its 1 worker"):
        make_plan(geometry_card("qwen3-235b-a22b", qtype="Q4_K"), tiny, workers=workers)


def test_worker_profiles_round_trip():
    _, workers = read_cluster("three-desktops-1gbe")
    for w in workers:
        assert wk.WorkerProfile.from_dict(json.loads(json.dumps(w.to_dict()))) == w
