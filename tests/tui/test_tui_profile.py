"""The chat app re-measures a drifted profile when idle (profile_refresh.py): in a worker, with
one status-bar line, input live; a reply started meanwhile stops it and nothing is cached. And
the status bar says the engine's thread count from the moment the model is loaded."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
from conftest import SIZE, ready, send, wait_until
from fake_engine import FakeEngine
from fixtures.fake_probes import FakeProbes

from moechat.backends.plan import hardware_profile as hp
from moechat.backends.plan.run_log import Run, RunLog

PROFILES = Path(__file__).parents[1] / "profiles"
OLD = "2026-12-01T10:00:00Z"  # when the cached profile was "measured"


@pytest.fixture
def drifted(tmp_path, monkeypatch):
    """A cached profile whose predictions missed the last three runs by 40-60%, on a machine
    that reads as idle (it is shared: the real load would make the test a coin toss)."""
    from moechat.backends.plan import threads

    monkeypatch.setenv("MOECHAT_CACHE_DIR", str(tmp_path / "cache"))
    profile = dataclasses.replace(hp.read_profile(PROFILES / "laptop-ddr5-nogpu.json"), measured_at=OLD)
    hp.write_profile(profile, hp.profile_path())
    log = RunLog()
    for ratio in (1.5, 1.4, 1.6):
        log.add(Run(model="m.gguf:1", placement="llama.cpp|cpu|", profile=OLD, threads=2,
                    prompt_tokens=64, decode_tokens=64, predicted_prefill=100.0, predicted_decode=20.0,
                    measured_prefill=100.0, measured_decode=20.0 * ratio))
    log.close()
    monkeypatch.setattr(threads.LoadMeter, "busy_cores", lambda self, min_window_s=0: 0.1)


def cached_measured_at() -> str:
    return hp.read_profile(hp.profile_path()).measured_at


@pytest.mark.asyncio
async def test_a_drifted_profile_is_remeasured_when_the_app_is_idle(make_app, drifted, monkeypatch):
    gate = threading.Event()
    probes = FakeProbes(monkeypatch, gate=gate)
    app = make_app(remeasure_idle_s=0.3)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await wait_until(pilot, lambda: probes.started.is_set())
        await wait_until(pilot, lambda: "re-measuring this machine" in app.status.render())
        await pilot.press("o", "k")  # typing goes on while it measures
        assert app.prompt.text.endswith("ok")
        gate.set()
        await wait_until(pilot, lambda: app.remeasure_state == "done")
        assert "profile re-measured" in app.status.render()
        assert cached_measured_at() != OLD and probes.windows == 3
        await wait_until(pilot, lambda: app.remeasure_state == "unchanged")  # checked again when idle
        assert probes.windows == 3  # the new profile has no runs: nothing drifted, nothing measured


@pytest.mark.asyncio
async def test_a_reply_stops_the_measurement_and_nothing_is_cached(make_app, drifted, monkeypatch):
    gate = threading.Event()
    probes = FakeProbes(monkeypatch, gate=gate)
    engine = FakeEngine(["Sure, here it is."])
    app = make_app(engine, remeasure_idle_s=0.3)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await wait_until(pilot, lambda: probes.started.is_set())
        app.remeasure_idle_s = None  # after this reply, no second try
        await send(pilot, "hi")  # the measurement is still inside its first window
        assert app.chat.last("assistant").text == "Sure, here it is."
        assert "re-measuring" not in app.status.render()
        gate.set()  # the window ends; the next one is not started
        await wait_until(pilot, lambda: app.remeasure_state == "stopped")
        assert probes.windows == 1 and cached_measured_at() == OLD


@pytest.mark.asyncio
async def test_not_drifted_nothing_is_measured(make_app, drifted, monkeypatch):
    probes = FakeProbes(monkeypatch)
    log = RunLog()
    log.add(Run(model="m.gguf:1", placement="llama.cpp|cpu|", profile=OLD, threads=2, prompt_tokens=64,
                decode_tokens=64, predicted_prefill=100.0, predicted_decode=20.0,
                measured_prefill=100.0, measured_decode=21.0))  # the last run: within 25 %
    log.close()
    app = make_app(remeasure_idle_s=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await wait_until(pilot, lambda: app.remeasure_state == "unchanged")
        assert probes.windows == 0 and cached_measured_at() == OLD


@pytest.mark.asyncio
async def test_the_status_bar_says_the_threads_once_loaded(make_app):
    engine = FakeEngine(["Hi."])
    engine.threads = 3
    app = make_app(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.pause()
        assert "3 threads" in app.status.render()
