"""Default threads under load (backends/plan/threads.py) and every engine stepping down a thread
when a reply stalls (llama.cpp's and the torch runtime's: AdaptiveThreads), and saying the count."""

from __future__ import annotations

import json
import os
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
    monkeypatch.setattr(th, "default_threads", lambda ui=False, meter=None: 2)
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


def test_adaptive_threads_steps_down_only_when_automatic(monkeypatch):
    monkeypatch.setattr(th, "default_threads", lambda ui=False, meter=None: 3)
    applied = []
    auto = th.AdaptiveThreads()
    auto.apply = applied.append
    auto.begin_reply()
    for token_s in [0.01] * 8 + [0.1] * 8 + [0.5] * 16:  # slower again after the step
        auto.token(token_s)
    assert auto.stats() == {"threads": 1, "thread_steps_down": 2} and applied == [2, 1]
    auto.begin_reply()  # the next reply starts from the load again
    assert auto.threads == 3 and auto.steps_down == 0 and applied[-1] == 3
    fixed = th.AdaptiveThreads(2)
    fixed.apply = applied.append
    fixed.begin_reply()
    for token_s in [0.01] * 8 + [0.1] * 16:
        fixed.token(token_s)
    assert fixed.stats() == {"threads": 2, "thread_steps_down": 0} and applied == [2, 1, 3]


class FakeClock:
    """perf_counter for the torch engine: `fast` a call, `slow` a call from call `after` on."""

    def __init__(self, fast=0.01, slow=0.1, after=30):
        self.t, self.n, self.fast, self.slow, self.after = 0.0, 0, fast, slow, after
        self.extra = 0.0  # seconds the slow calls added in all

    def __call__(self) -> float:
        self.n += 1
        step = self.fast if self.n < self.after else self.slow
        self.extra += step - self.fast
        self.t += step
        return self.t


def _torch_reply(card, monkeypatch, clock, **kw):
    from moechat.backends.engines import torch_engine as te
    from moechat.backends.engines.engine import Sampling

    engine = te.TorchEngine(card, n_ctx=256, device="cpu", **kw)
    try:
        monkeypatch.setattr(te.time, "perf_counter", clock)
        last = list(engine.generate([{"role": "user", "content": "Count to a hundred"}],
                                    Sampling(max_tokens=40)))[-1]
        monkeypatch.undo()
        return last, engine.model.cpu_kernels.threads
    finally:
        engine.close()


@pytest.mark.parametrize("arch", ["llama", "llama-moe"])
def test_torch_engine_steps_down_when_a_reply_stalls(tiny_model, monkeypatch, arch):
    """The torch runtime's engines (torch, and fiddler/hobbit/stream built on it) drop a thread
    of ggml's pool when the decode steps turn 10x slower; a fixed --threads is left alone."""
    from moechat.backends.model.model_card import read_model_card

    card = read_model_card(tiny_model(arch, "F32"))
    monkeypatch.setattr(th, "default_threads", lambda ui=False, meter=None: 2)
    last, pool = _torch_reply(card, monkeypatch, FakeClock())
    assert last.stats["decoded_tokens"] >= 30  # long enough for a stall to show
    assert last.stats["threads"] == 1 and last.stats["thread_steps_down"] == 1 and pool == 1
    monkeypatch.setattr(th, "default_threads", lambda ui=False, meter=None: 2)
    last, pool = _torch_reply(card, monkeypatch, FakeClock(), threads=2)
    assert last.stats["threads"] == 2 and last.stats["thread_steps_down"] == 0 and pool == 2


def test_waiting_on_reads_is_not_a_stall(tiny_model, monkeypatch):
    """Slow steps that were all waiting on the disk (the stream engine's io_wait_s) keep the
    threads: fewer of them would not read faster."""
    from moechat.backends.engines import torch_engine as te
    from moechat.backends.model.model_card import read_model_card

    card = read_model_card(tiny_model("llama-moe", "F32"))
    monkeypatch.setattr(th, "default_threads", lambda ui=False, meter=None: 2)
    clock = FakeClock()
    monkeypatch.setattr(te.TorchEngine, "io_wait_s", lambda self: clock.extra)
    last, pool = _torch_reply(card, monkeypatch, clock)
    assert last.stats["threads"] == 2 and last.stats["thread_steps_down"] == 0 and pool == 2


@pytest.mark.parametrize("engine", ["torch", "fiddler", "hobbit", "stream"])
def test_ask_json_says_the_threads_of_every_engine(tiny_model, engine):
    """Without --threads the count is chosen from the load, and said (it was null for the
    torch runtime's engines)."""
    model = tiny_model("llama-moe", "Q8_0")
    result = subprocess.run([sys.executable, "-m", "moechat", "ask", "-m", str(model), "--json",
                             "--engine", engine, "--max-tokens", "2", "Hi"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert isinstance(out["threads"], int) and 1 <= out["threads"] <= (os.cpu_count() or 1)
    assert out["stats"]["threads"] == out["threads"] and out["stats"]["thread_steps_down"] == 0


def test_ask_json_says_the_threads(tiny_model):
    model = tiny_model("llama", "F32")
    result = subprocess.run([sys.executable, "-m", "moechat", "ask", "-m", str(model), "--json",
                             "--threads", "1", "--max-tokens", "2", "Hi"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["threads"] == 1 and out["stats"]["threads"] == 1
