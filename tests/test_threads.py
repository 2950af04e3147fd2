"""Default threads under load (backends/plan/threads.py) and the llama.cpp engine stepping down
a thread when a reply stalls."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from moechat.backends.plan import threads as th


@pytest.mark.parametrize("physical, usable, busy, ui, expected", [
    (2, 2, 0.0, False, 2),   # quiet: one per physical core
    (2, 2, 0.3, False, 2),   # a little background work does not take a core
    (2, 2, 1.0, False, 1),   # one busy process holds a core
    (2, 2, 0.7, False, 1),
    (2, 2, 2.0, False, 1),   # never below one
    (4, 8, 1.0, False, 4),   # SMT: a busy hyperthread leaves the physical cores
    (4, 8, 5.0, False, 3),
    (2, 2, 0.0, True, 2),    # small machine: the UI gets no core of its own
    (8, 8, 0.0, True, 7),    # big one: the UI keeps one
])
def test_threads_for(physical, usable, busy, ui, expected):
    assert th.threads_for(physical, usable, busy, ui=ui) == expected


def test_load_meter_sees_a_busy_process_and_not_itself():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        meter = th.LoadMeter()
        t_end = time.monotonic() + 0.4
        while time.monotonic() < t_end:  # our own spinning must not count
            pass
        seen = meter.busy_cores(0.4)
    finally:
        busy.kill()
        busy.wait()
    assert seen >= 0.6, seen  # the other process: about one core (less on a crowded machine)


def test_stall_watch():
    watch = th.StallWatch(window=4)
    assert not any(watch.observe(0.01) for _ in range(10))  # steady
    assert not watch.observe(0.1)  # one slow token is noise
    assert not any(watch.observe(0.012) for _ in range(3))
    assert [watch.observe(0.1) for _ in range(4)][-1]  # a run of slow ones is a stall
    watch.reset()
    assert not any(watch.observe(0.1) for _ in range(8))  # fewer threads: a new baseline


def test_prediction_slower_than_the_run_raises_the_bar():
    watch = th.StallWatch(expected_s=0.05, window=4)
    for _ in range(4):
        watch.observe(0.01)
    assert not any(watch.observe(0.04) for _ in range(4))  # slower than seen, not than predicted


def test_engine_steps_down_when_a_reply_stalls(tiny_model, monkeypatch):
    """Per-token times that jump 10x (a core taken mid-reply) make the auto engine drop a thread;
    a fixed --threads is left alone. The count used is in the final event's stats."""
    from moechat.backends.engines import llamacpp_engine as le
    from moechat.backends.engines.engine import Sampling
    from moechat.backends.model.model_card import read_model_card

    card = read_model_card(tiny_model("llama", "F32"))
    monkeypatch.setattr(le, "default_threads", lambda ui=False, meter=None: 2)
    clock = {"t": 0.0, "n": 0}

    def fake_clock():  # 10 ms a token, then 100 ms from the 12th token on
        clock["n"] += 1
        clock["t"] += 0.01 if clock["n"] < 24 else 0.1
        return clock["t"]

    monkeypatch.setattr(le.time, "perf_counter", fake_clock)
    messages = [{"role": "user", "content": "Count to a hundred"}]
    auto = le.LlamaCppEngine(card, n_ctx=256)
    try:
        assert auto.threads == 2
        last = list(auto.generate(messages, Sampling(max_tokens=40)))[-1]
        assert last.stats["threads"] == 1 and last.stats["thread_steps_down"] == 1
    finally:
        auto.close()
    clock.update(t=0.0, n=0)
    fixed = le.LlamaCppEngine(card, n_ctx=256, threads=2)
    try:
        last = list(fixed.generate(messages, Sampling(max_tokens=40)))[-1]
        assert last.stats["threads"] == 2 and last.stats["thread_steps_down"] == 0
    finally:
        fixed.close()


def test_ask_json_says_the_threads(tiny_model):
    model = tiny_model("llama", "F32")
    result = subprocess.run([sys.executable, "-m", "moechat", "ask", "-m", str(model), "--json",
                             "--threads", "1", "--max-tokens", "2", "Hi"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["threads"] == 1 and out["stats"]["threads"] == 1
