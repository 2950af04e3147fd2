"""The table of published runs (tests/fixtures/external_runs/) and the ranges `plan` shows from it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.plan_vs_world import predict_run  # noqa: E402
from moechat.backends.plan import error_bands  # noqa: E402
from moechat.backends.plan.hardware_profile import read_profile  # noqa: E402
from moechat.backends.plan.planner import make_plan  # noqa: E402
from tests.fixtures.random_geometry import geometry_card  # noqa: E402
from tests.fixtures.world_runs import (  # noqa: E402
    CHIPLET_LINKS, GROUPS, MONOLITHIC_AMD, PROFILES, RUNS_CSV, as_measured, link_read_gbs, load_runs, run_card)

REPO = Path(__file__).resolve().parents[1]


def test_table_parses_with_enough_runs_machines_groups_and_families():
    with open(RUNS_CSV, newline="") as f:
        raw = list(csv.DictReader(f))
    runs = load_runs()
    assert len(runs) == len(raw) >= 25
    assert len({r.id for r in runs}) == len(runs)
    assert len({r.machine for r in runs}) >= 10
    assert {r.group for r in runs} == set(GROUPS)
    assert {r.placement for r in runs if r.group == "split"} == {"moe"}
    families = {r.model.split("-")[0] for r in runs}
    assert {"qwen3", "gpt"} <= families and families & {"mixtral", "deepseek"}
    for r in runs:
        assert r.decode_tok_s > 0 and (r.prefill_tok_s is None or r.prefill_tok_s > 0), r.id
        assert r.group != "split" or r.n_cpu_moe, r.id


def test_every_run_has_a_source_and_peer_claims_are_marked():
    for r in load_runs():
        assert r.url.startswith(("https://", "http://")), r.id
        assert r.date and r.who, r.id
        assert r.kind in ("project", "independent", "peer"), r.id
    peers = [r for r in load_runs() if "llmfit" in r.url]
    assert peers and all(r.kind == "peer" for r in peers)


def test_every_machine_has_a_profile_with_sources():
    for machine in {r.machine for r in load_runs()}:
        p = read_profile(PROFILES / f"{machine}.json")
        assert p.sources and p.machine, machine
    unified = {r.machine for r in load_runs() if r.group == "unified"}
    assert all(read_profile(PROFILES / f"{m}.json").gpus[0].unified for m in unified)


def test_amd_chiplet_profiles_read_no_more_than_their_links():
    """Part E's rule: every AMD profile is a chiplet part with its links listed, or one die;
    a chiplet profile's CPU read and rates stay under the links, and say so where they bind."""
    for path in sorted(PROFILES.glob("*.json")):
        p = read_profile(path)
        if not p.cpu.model.startswith("AMD"):
            assert path.stem not in CHIPLET_LINKS, path.stem
            continue
        assert (path.stem in CHIPLET_LINKS) != (path.stem in MONOLITHIC_AMD), path.stem
        cap = link_read_gbs(path.stem)
        if cap is None:
            continue
        ccds = CHIPLET_LINKS[path.stem][0]
        assert ccds * 32 * 2**20 <= p.cpu.llc_bytes, path.stem  # at least 32 MB of L3 a CCD
        assert p.ram_read_gbs <= cap + 0.05, (path.stem, p.ram_read_gbs, cap)
        assert all(rate <= cap + 0.05 for rate in p.cpu_matvec_gbs.values()), path.stem
        if p.ram_read_gbs > cap - 0.05:
            assert "CCD" in p.sources["ram_read_gbs"], path.stem


def test_holdout_is_every_third_run_of_each_group():
    position = {}
    for r in load_runs():
        i = position.get(r.group, 0)
        position[r.group] = i + 1
        assert r.holdout == (i % 3 == 1), r.id


def test_cards_have_the_published_file_size():
    for r in load_runs():
        if r.model_gib:
            assert abs(run_card(r).tensor_bytes / 2**30 - r.model_gib) < 0.01, r.id


def test_error_bands_agree_with_the_table():
    ratios = {g: [] for g in GROUPS}
    for r in load_runs():
        ratios[r.group].append(r.decode_tok_s / as_measured(r, predict_run(r).decode_tok_s))
    for group in GROUPS:
        band = error_bands.BANDS[group]
        lo, hi = error_bands.band_of_ratios(ratios[group])
        assert (band.low, band.high) == (lo, hi), f"{group}: rerun benchmarks/plan_vs_world.py --bands"
        assert band.runs == tuple(r.id for r in load_runs() if r.group == group)


def test_plan_table_and_json_show_a_range_per_candidate(tmp_path):
    profile = PROFILES / "10900x-rtx2080.json"
    plan = make_plan(geometry_card("qwen3-30b-a3b", qtype="Q4_K"), read_profile(profile))
    llama = [c for c in plan.candidates if c.engine == "llama.cpp" and c.decode_tok_s]
    assert llama and all(c.decode_range and c.decode_range[0] < c.decode_tok_s * 1.05 for c in llama)
    split = [r.id for r in load_runs() if r.group == "split"]
    assert all(c.range_backed_by.startswith(f"{len(split)} published runs") for c in llama if c.placement == "moe")

    from moechat.app.plan_cmd import render_table

    table = render_table(plan.candidates, plan.choice)
    head, *lines = table.splitlines()
    assert "decode range" in head
    moe = next(c for c in plan.candidates if c.placement == "moe")
    assert f"{moe.decode_range[0]:.1f}-{moe.decode_range[1]:.1f}" in table
    assert f"--n-cpu-moe: {len(split)} published runs ({split[0]}..{split[-1]})" in table
    assert "fiddler: no published runs of this kind: no range" in table  # said, not left blank

    out = subprocess.run([sys.executable, "-m", "moechat.app.cli", "plan", str(REPO / "tests/fixtures/external_runs"
                          / "missing.gguf"), "--profile", str(profile), "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr  # bad model: one line, exit 2
    entry = plan.to_dict()["candidates"][0]
    assert entry["decode_tok_s_range"] and entry["decode_range_backed_by"]
    assert json.loads(json.dumps(plan.to_dict()))["choice"]["decode_tok_s"] == round(plan.choice.decode_tok_s, 2)


def test_calibrated_gpu_bandwidths_come_from_the_dense_runs():
    from tests.fixtures.world_runs import dense_bandwidth

    calibrated = 0
    for path in PROFILES.glob("*.json"):
        p = read_profile(path)
        implied = dense_bandwidth(path.stem)
        if implied:
            calibrated += 1
            assert p.gpus[0].mem_gbs == round(implied[0]), path.stem
            assert "dense llama-bench runs" in p.sources["gpus[0].mem_gbs"]
            assert implied[0] < p.gpus[0].mem_gbs * 1.01 and 0 < implied[1] < 5e-3
    assert calibrated == 9


def test_gpu_runs_cpu_rate_comes_from_the_dense_split_runs():
    """The 10900X's ':plain' rates (what its GPU runs read RAM-resident weights at) are the
    rate its own dense layer-split runs imply, no MoE run entering it."""
    from moechat.backends.plan.cost_model import PLAIN
    from tests.fixtures.world_runs import dense_cpu_rate

    p = read_profile(PROFILES / "10900x-rtx2080.json")
    rate = dense_cpu_rate("10900x-rtx2080")
    plain = {k: v for k, v in p.cpu_matvec_gbs.items() if k.endswith(PLAIN)}
    assert plain and all(v == round(rate, 1) for v in plain.values())
    assert rate < p.cpu_matvec_gbs["Q4_K"] / 1.5  # far below the figure the CPU-only rule gave
    assert dense_cpu_rate("265k-rtx4090") is None  # no split runs published for it


def test_llmfit_bench_rows_are_predicted_as_the_tool_measures_them():
    from tests.fixtures.world_runs import LLMFIT_REQUEST_S

    runs = {r.id: r for r in load_runs()}
    bench = [r for r in runs.values() if r.decode_test.startswith("llmfit bench")]
    assert bench and all(r.request_tokens for r in bench)
    assert 0.2 < LLMFIT_REQUEST_S < 0.5  # s01's own pair: bench 4432 ms a request vs 36.7 tok/s decode
    s02 = runs["s02"]
    assert as_measured(s02, 50.0) == pytest.approx(s02.request_tokens / (s02.request_tokens / 50.0 + LLMFIT_REQUEST_S))
    assert as_measured(runs["s01"], 50.0) == 50.0  # the server's own decode timing: taken as is


def test_gpt_oss_cards_keep_mxfp4_experts_at_their_exact_size():
    import math

    for r in load_runs():
        if r.model.startswith("gpt-oss"):
            card = run_card(r)
            experts = [t for t in card.tensors if t.is_expert and t.type_name == "MXFP4"]
            assert experts and all(t.n_bytes == math.prod(t.shape) * 17 // 32 for t in experts), r.id


def test_k_quant_rows_whose_width_is_not_256_take_the_quantizers_fallback_type():
    """llama.cpp writes a tensor whose rows are not a multiple of 256 in a 32-block type
    (DeepSeek-V2-Lite's 1408-wide experts: ffn_down_exps Q5_0, Q8_0 in the _M recipe's
    more-bits layers); Qwen3-30B-A3B's 768-wide experts stay Q4_K."""
    by_id = {r.id: r for r in load_runs()}
    deepseek = run_card(by_id["s03"])
    down = {t.layer: t.type_name for t in deepseek.tensors if t.name.endswith("ffn_down_exps.weight")}
    assert set(down.values()) == {"Q5_0", "Q8_0"}
    assert down[1] == "Q8_0" and down[3] == "Q5_0"  # layer 1 < 27 // 8 gets more bits, layer 3 does not
    assert all(t.type_name == "Q4_K" for t in deepseek.tensors if t.name.endswith("ffn_gate_exps.weight"))
    assert all(t.type_name in ("Q4_K", "F32") for t in run_card(by_id["s01"]).tensors)


def test_a_runs_kv_cache_type_and_per_head_layout_set_the_cache_bytes():
    by_id = {r.id: r for r in load_runs()}
    c02 = by_id["c02"]
    assert (c02.kv_type, c02.kv_layout) == ("q8_0", "per-head")
    card = run_card(c02)
    # DeepSeek-V2-Lite without the MLA split: 16 heads x (192 + 128) values a layer, q8_0
    assert card.kv_bytes_per_token == int(27 * 16 * (192 + 128) * 8.5 / 8)
    latent = geometry_card("deepseek-v2-lite", qtype="Q4_K")
    assert latent.kv_bytes_per_token == 27 * 1 * 576 * 2  # the MLA latent in f16, as moechat runs it
