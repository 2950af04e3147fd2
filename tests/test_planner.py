"""Planner choices on recorded consumer machines (tests/profiles/*.json), no model run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moechat.backends.plan.hardware_profile import read_profile  # noqa: E402
from moechat.backends.plan import cost_model as cm  # noqa: E402
from moechat.backends.errors import MoechatError  # noqa: E402
from moechat.backends.plan.planner import NoFitError, make_plan  # noqa: E402
from tests.fixtures.random_geometry import geometry_card  # noqa: E402

PROFILES = Path(__file__).parent / "profiles"


def profile(name):
    return read_profile(PROFILES / f"{name}.json")


def test_every_recorded_profile_round_trips():
    for path in PROFILES.glob("*.json"):
        p = read_profile(path)
        assert type(p).from_dict(json.loads(json.dumps(p.to_dict()))) == p
        assert p.sources, f"{path.name} must say where its numbers come from"


def test_model_that_fits_in_vram_goes_all_on_gpu():
    for machine, model in (("desktop-4090-ddr5", ("qwen3-30b-a3b", "Q4_K")),
                           ("desktop-3060-ddr4", ("olmoe-1b-7b", "Q4_0")),
                           ("laptop-4060-8gb", ("olmoe-1b-7b", "Q4_0")),
                           ("apple-m2-pro", ("qwen3-30b-a3b", "Q4_K"))):
        plan = make_plan(geometry_card(model[0], qtype=model[1]), profile(machine))
        assert (plan.choice.engine, plan.choice.placement) == ("llama.cpp", "gpu"), machine
        assert "fits" in plan.reason


def test_no_gpu_means_cpu():
    plan = make_plan(geometry_card("qwen3-30b-a3b", qtype="Q4_K"), profile("laptop-ddr5-nogpu"))
    assert plan.choice.placement == "cpu"
    assert "no GPU" in plan.reason
    gpu_rows = [c for c in plan.candidates if c.placement != "cpu"]
    assert gpu_rows and not any(c.fits for c in gpu_rows)


def test_vram_too_small_keeps_experts_of_fewest_layers_in_ram():
    for machine, (model, qtype) in (("desktop-4090-ddr5", ("mixtral-8x7b", "Q4_0")),
                                    ("desktop-3060-ddr4", ("mixtral-8x7b", "Q4_0")),
                                    ("desktop-3060-ddr4", ("qwen3-30b-a3b", "Q4_K"))):
        card, prof = geometry_card(model, qtype=qtype), profile(machine)
        plan = make_plan(card, prof, n_ctx=4096)
        n = plan.choice.n_cpu_moe
        assert plan.choice.placement == "moe" and 0 < n < card.n_layers, (machine, model)
        # fewest: one layer fewer in RAM would not fit in VRAM
        _, vram_fewer = cm.memory(card, cm.Placement("moe", n - 1), 4096)
        assert vram_fewer > cm.gpu_capacity_bytes(prof)
        assert plan.choice.vram_bytes <= cm.gpu_capacity_bytes(prof)
        moe_rows = [c for c in plan.candidates if c.placement == "moe"]
        assert all(c.fits for c in moe_rows) and min(c.n_cpu_moe for c in moe_rows) == n
        assert f"first {n} layer" in plan.reason
        cpu = next(c for c in plan.candidates if c.placement == "cpu")
        assert plan.choice.decode_tok_s > cpu.decode_tok_s


def test_too_big_for_ram_and_vram_streams_its_experts_from_disk():
    card = geometry_card("mixtral-8x7b", qtype="Q8_0")  # 46 GiB
    plan = make_plan(card, profile("laptop-4060-8gb"))
    by_engine = {c.engine: c for c in plan.candidates if c.placement in ("cpu over mmap", "experts streamed from disk")}
    assert set(by_engine) == {"llama.cpp", "stream"}
    mmap, stream = by_engine["llama.cpp"], by_engine["stream"]
    assert plan.choice is stream and stream.fits and stream.decode_tok_s > 2 * mmap.decode_tok_s
    assert "experts per layer" in stream.note and "4 KiB" in mmap.note


def test_what_cannot_run_even_streamed_is_refused_clearly():
    import dataclasses

    from moechat.backends.plan.hardware_profile import RamInfo

    card = geometry_card("mixtral-8x7b", qtype="Q8_0")
    small = dataclasses.replace(profile("laptop-ddr5-nogpu"), ram=RamInfo(16 * 1024**3, 1024**3))
    with pytest.raises(NoFitError) as err:
        make_plan(card, small)
    message = str(err.value)
    assert "does not fit" in message and "GiB" in message and "\n" not in message
    assert isinstance(err.value, MoechatError) and err.value.candidates


def test_unbuilt_engines_are_predicted_but_unavailable():
    plan = make_plan(geometry_card("mixtral-8x7b", qtype="Q4_0"), profile("desktop-4090-ddr5"))
    by_engine = {c.engine for c in plan.candidates}
    assert {"llama.cpp", "fiddler", "hobbit"} <= by_engine
    for c in plan.candidates:
        if c.engine != "llama.cpp":
            assert not c.available and c.decode_tok_s > 0
    assert plan.choice.available


def test_longer_context_needs_more_memory():
    card, prof = geometry_card("mixtral-8x7b", qtype="Q4_0"), profile("desktop-4090-ddr5")
    short = make_plan(card, prof, n_ctx=2048).choice
    long = make_plan(card, prof, n_ctx=32768).choice
    assert long.n_cpu_moe >= short.n_cpu_moe


def _moechat(*args, env_extra=None):
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "moechat.app.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_plan_json_keys_for_another_machine(demo_model):
    r = _moechat("plan", str(demo_model), "--json", "--profile", str(PROFILES / "desktop-3060-ddr4.json"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"choice", "candidates", "reason"}
    keys = {"engine", "placement", "prefill_tok_s", "decode_tok_s", "ram_bytes", "vram_bytes"}
    assert keys <= set(out["choice"]) and all(keys <= set(c) for c in out["candidates"])
    assert out["choice"]["placement"] == "gpu"  # 1.2 GiB fits a 12 GB card
    assert out["choice"] in out["candidates"]


def test_plan_table_and_errors(demo_model, tmp_path):
    r = _moechat("plan", str(demo_model), "--profile", str(PROFILES / "laptop-ddr5-nogpu.json"))
    assert r.returncode == 0, r.stderr
    assert "choice: llama.cpp · CPU only" in r.stdout and "why: no GPU here" in r.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for args in (["plan", str(tmp_path / "missing.gguf")], ["plan", str(demo_model), "--profile", str(bad)],
                 ["plan", str(demo_model), "--ctx", "0"]):
        r = _moechat(*args)
        assert r.returncode == 2, args
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_open_engine_auto_follows_the_plan_and_flags_override(demo_model, monkeypatch):
    from moechat.backends.plan import hardware_profile as hp
    from moechat.backends import manager
    from moechat.backends.model.model_card import read_model_card

    card = read_model_card(demo_model)
    seen = []
    real_plan = manager.planned_choice

    def spy(card, n_ctx, force=False):
        choice = real_plan(card, n_ctx, force)
        seen.append(choice)
        return choice

    monkeypatch.setattr(manager, "planned_choice", spy)
    monkeypatch.setattr(hp, "load_profile", lambda **kw: profile("laptop-ddr5-nogpu"))
    engine = manager.open_engine(card, "auto", n_ctx=256)
    try:
        assert seen and seen[0].placement == "cpu" and engine.placement == "CPU only"
    finally:
        engine.close()
    engine = manager.open_engine(card, "auto", n_cpu_moe=2, n_ctx=256)  # the flag wins
    try:
        assert len(seen) == 1 and engine.placement_spec.kind == "moe" and engine.placement_spec.n_cpu_moe == 2
    finally:
        engine.close()


def test_bench_json_and_record(demo_model, tmp_path):
    record = tmp_path / "benchmarks.md"
    r = _moechat("bench", str(demo_model), "--tokens", "4", "--prompt-tokens", "8", "--rounds", "1",
                 "--threads", "1", "--json", "--record", str(record))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_ram_bytes", "peak_vram_bytes",
                "roofline_fraction", "achieved_gbs"):
        assert key in out
    assert out["decode_tok_s"] > 0 and out["peak_ram_bytes"] > 0
    assert out["achieved_gbs"] == pytest.approx(out["decode_tok_s"] * out["active_bytes_per_token"] / 1e9, rel=0.01)
    text = record.read_text()
    assert "## moechat bench rows" in text and text.count("\n| 20") == 1 and "moechat bench" in text
    r = _moechat("bench", str(demo_model), "--tokens", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
