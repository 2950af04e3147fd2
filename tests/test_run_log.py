"""Real runs beside the plan's predictions (backends/plan/run_log.py): the store, the
correction the planner applies, `moechat plan` showing it, and re-measuring a drifted profile."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moechat.backends.plan import hardware_profile as hp
from moechat.backends.plan import run_log
from moechat.backends.plan.planner import make_plan
from moechat.backends.plan.run_log import Run, RunLog

PROFILES = Path(__file__).parent / "profiles"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECHAT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def measured_profile(when: str = "2026-12-01T10:00:00Z"):
    """A recorded laptop profile, as if measured here at `when`."""
    profile = hp.read_profile(PROFILES / "laptop-ddr5-nogpu.json")
    return dataclasses.replace(profile, measured_at=when)


def run(ratio: float, placement="llama.cpp|cpu|", profile="2026-12-01T10:00:00Z", model="m.gguf:1",
        prompt_tokens=64, prefill_ratio=1.0) -> Run:
    return Run(model=model, placement=placement, profile=profile, threads=2,
               prompt_tokens=prompt_tokens, decode_tokens=64, predicted_prefill=100.0,
               predicted_decode=20.0, measured_prefill=100.0 * prefill_ratio,
               measured_decode=20.0 * ratio)


def test_correction_is_the_median_ratio():
    found = run_log.correction([run(1.5, prefill_ratio=2.0), run(1.2), run(1.4, prompt_tokens=5)])
    assert found.decode == pytest.approx(1.4) and found.runs == 3
    assert found.prefill == pytest.approx(1.5)  # the short prompt does not count for prefill
    assert found.last.measured_decode == pytest.approx(30.0)
    assert run_log.correction([]) is None


def test_store_keeps_runs_per_profile_model_and_placement(tmp_path):
    log = RunLog(tmp_path / "runs.sqlite3")
    for r in [run(1.0), run(2.0), run(3.0, placement="llama.cpp|moe|4"), run(4.0, profile="old")]:
        log.add(r)
    newest_first = [r.measured_decode for r in log.recent("2026-12-01T10:00:00Z", "m.gguf:1", "llama.cpp|cpu|")]
    assert newest_first == [40.0, 20.0]
    assert len(log.recent("2026-12-01T10:00:00Z")) == 3  # another profile's runs are not its own
    log.close()


def test_planner_applies_the_correction(cache):
    from tests.fixtures.random_geometry import geometry_card

    card = geometry_card("olmoe-1b-7b", n_layers=2)
    profile = measured_profile()
    plain = make_plan(card, profile)
    cpu = next(c for c in plain.candidates if c.placement == "cpu")
    found = run_log.correction([run(1.3), run(1.5), run(1.4)])
    plan = make_plan(card, profile, corrections={"llama.cpp|cpu|": found})
    corrected = next(c for c in plan.candidates if c.placement == "cpu")
    assert corrected.decode_tok_s == pytest.approx(cpu.decode_tok_s * 1.4)
    assert corrected.cost_model_decode_tok_s == pytest.approx(cpu.decode_tok_s)
    out = corrected.to_dict()["correction"]
    assert out["decode_factor"] == 1.4 and out["runs"] == 3
    assert out["last_measured_decode_tok_s"] == pytest.approx(26.0)
    assert "correction" not in cpu.to_dict()


def test_profile_drift_needs_three_misses(tmp_path):
    profile = measured_profile()
    log = RunLog(tmp_path / "runs.sqlite3")
    log.add(run(1.4))
    log.add(run(1.3))
    assert not run_log.profile_drifted(profile, log)  # two runs are not "repeated" yet
    log.add(run(1.1))  # within 25%
    assert not run_log.profile_drifted(profile, log)
    log.add(run(0.7))
    log.add(run(1.5))
    assert not run_log.profile_drifted(profile, log)  # 0.7, 1.5, 1.1: the last three
    log.add(run(1.6))
    assert run_log.profile_drifted(profile, log)
    assert not run_log.profile_drifted(dataclasses.replace(profile, measured_at="other"), log)
    log.close()


def test_a_drifted_profile_is_remeasured_only_when_idle(cache, monkeypatch):
    from moechat.backends.plan import threads

    old = measured_profile()
    hp.write_profile(old, hp.profile_path())
    log = RunLog()
    for ratio in (1.5, 1.4, 1.6):
        log.add(run(ratio))
    log.close()
    fresh = measured_profile("2026-12-01T11:00:00Z")
    measured = []
    monkeypatch.setattr(hp, "measure_profile", lambda progress=None, cancel=None: measured.append(1) or fresh)
    monkeypatch.setattr(threads.LoadMeter, "busy_cores", lambda self, min_window_s=0: 1.5)
    assert run_log.remeasure_if_drifted() is None and measured == []  # busy: not now
    monkeypatch.setattr(threads.LoadMeter, "busy_cores", lambda self, min_window_s=0: 0.1)
    assert run_log.remeasure_if_drifted().measured_at == fresh.measured_at and measured == [1]
    assert hp.load_profile(measure=False).measured_at == fresh.measured_at
    assert run_log.remeasure_if_drifted() is None  # the new profile has no runs: not drifted


def test_real_runs_correct_the_plan(cache, tiny_model, monkeypatch, capsys):
    """Three `moechat ask` runs on a profile of another machine: `moechat plan` then predicts
    the measured speed, and shows cost model, last measured and the correction."""
    from moechat.app import plan_cmd
    from moechat.app.cli import build_parser

    model = tiny_model("llama-moe", "F16")
    hp.write_profile(measured_profile(), hp.profile_path())
    env = dict(os.environ, MOECHAT_CACHE_DIR=str(cache))
    decodes = []
    for _ in range(3):
        result = subprocess.run([sys.executable, "-m", "moechat", "ask", "-m", str(model), "--json",
                                 "--engine", "llama.cpp", "--max-tokens", "40", "Tell me a story"],
                                capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr
        decodes.append(json.loads(result.stdout)["decode_tok_s"])
    log = RunLog()
    runs = log.recent(measured_profile().measured_at)
    log.close()
    assert len(runs) == 3 and sorted(r.measured_decode for r in runs) == pytest.approx(sorted(decodes), rel=0.01)

    monkeypatch.setattr(run_log, "remeasure_if_drifted", lambda progress=None: None)
    args = build_parser().parse_args(["plan", "--json", str(model)])
    assert plan_cmd.run(args) == 0
    cpu = next(c for c in json.loads(capsys.readouterr().out)["candidates"] if c["placement"] == "cpu")
    assert cpu["correction"]["runs"] == 3
    median = sorted(decodes)[1]
    assert cpu["decode_tok_s"] == pytest.approx(median, rel=0.02)  # within 2 % of measured
    assert plan_cmd.run(build_parser().parse_args(["plan", str(model)])) == 0
    text = capsys.readouterr().out
    assert "cost model decode" in text and "last run decode" in text and "x" in text
    assert "corrected: llama.cpp · CPU only" in text


def test_ask_says_once_that_a_drifted_profile_is_stale(cache, tiny_model):
    """`ask` never re-measures (one-shot, scripted) but says, on one stderr line and only the
    first time for a profile, that its predictions drifted."""
    model = tiny_model("llama", "F32")
    hp.write_profile(measured_profile(), hp.profile_path())

    def ask() -> str:
        result = subprocess.run([sys.executable, "-m", "moechat", "ask", "-m", str(model), "--engine",
                                 "llama.cpp", "--threads", "1", "--max-tokens", "2", "Hi"],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stderr

    assert "stale" not in ask()  # no runs yet: nothing drifted
    log = RunLog()
    for ratio in (1.5, 1.4, 1.6):
        log.add(run(ratio))
    log.close()
    first, second = ask(), ask()
    hint = [line for line in first.splitlines() if "stale" in line]
    assert len(hint) == 1 and "profile is stale: moechat profile --refresh" in hint[0], first
    assert "stale" not in second  # once per profile
    assert hp.read_profile(hp.profile_path()).measured_at == measured_profile().measured_at  # not re-measured


def test_a_run_is_stored_beside_the_prediction_it_was_opened_with(cache, tmp_path):
    """An engine the plan chose keeps that candidate: its uncorrected prediction is stored,
    not one from a plan made with the model loaded (which sees the engine's own memory as
    taken: a streamed model would then no longer fit and nothing would be recorded)."""
    from types import SimpleNamespace

    from moechat.backends.plan.planner import Candidate
    from tests.fixtures.random_geometry import geometry_card

    hp.write_profile(measured_profile(), hp.profile_path())
    card = geometry_card("mixtral-8x7b", qtype="Q8_0")
    planned = Candidate("stream", "experts streamed from disk", None, 30.0, 6.0, 1, 0, True, True, "",
                        cost_model_decode_tok_s=5.0, cost_model_prefill_tok_s=25.0)
    last = SimpleNamespace(stats={"decoded_tokens": 64, "prompt_tokens_evaluated": 40, "threads": 2},
                           decode_tok_s=4.0, prefill_tok_s=20.0)
    log = RunLog(tmp_path / "runs.sqlite3")
    stored = run_log.record_run(card, "stream", "experts streamed from disk", None, 4096, last, log, planned)
    assert (stored.predicted_decode, stored.predicted_prefill, stored.measured_decode) == (5.0, 25.0, 4.0)
    assert log.recent(measured_profile().measured_at) == [stored]
    # another placement than the one planned: predicted from a plan made now
    other = run_log.record_run(card, "llama.cpp", "cpu", None, 4096, last, log, planned)
    assert other is None or other.predicted_decode != 5.0
