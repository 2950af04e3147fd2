"""How many CPU threads an engine uses by default, and when a run has stalled and should use fewer.

ggml's threads meet at a barrier after every op: when another process holds one of the cores a
thread runs on, every op waits for that thread's time slice and decode collapses (20–30x measured
on 2 cores). So the default is not "one thread per physical core" but the cores that are free
*now*: physical cores, less the cores other processes keep busy (sampled from the machine's CPU
time minus this process's own), less one for the chat app's UI on machines with cores to spare.

Load changes during a run, so `StallWatch` watches the per-token times: when the recent median
is far above what this run (or the cost model) showed it can do, the engine steps down a thread.
`AdaptiveThreads` is that policy as every engine uses it (llama.cpp's and the torch runtime's):
the count chosen at load, chosen again before each reply, stepped down on a stall; the engine
only says how to apply a count and how long each token took.

Why by hand: psutil gives the CPU-time counters; no library turns them into a thread count for a
barrier-synchronised thread pool.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

UI_CORE_FROM = 6  # with this many cores, one is left to the chat app's UI (1/6 of decode at most)
BUSY_CORE_SHARE = 0.6  # another process using this share of a core counts as holding it
SAMPLE_S = 0.15  # shortest window the load is measured over


def _cores() -> tuple[int, int]:
    """(physical cores, logical CPUs this process may run on)."""
    import psutil

    logical = psutil.cpu_count() or 1
    try:
        usable = len(psutil.Process().cpu_affinity())
    except (AttributeError, OSError):  # macOS has no affinity
        usable = logical
    physical = psutil.cpu_count(logical=False) or logical
    return min(physical, usable), usable


def threads_for(physical: int, usable: int, busy_cores: float, ui: bool = False) -> int:
    """The thread count for `busy_cores` CPUs' worth of other work (pure: unit-tested)."""
    held = int(busy_cores + (1 - BUSY_CORE_SHARE))  # 0.6 of a core busy -> that core is taken
    threads = min(physical, usable - held)
    if ui and physical >= UI_CORE_FROM:
        threads -= 1
    return max(1, threads)


@dataclass
class LoadMeter:
    """CPU time used by *other* processes since the last `mark()`, in cores."""

    _t: float = 0.0
    _busy: float = 0.0
    _own: float = 0.0

    def __post_init__(self) -> None:
        self.mark()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        import psutil

        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0) - getattr(times, "steal", 0.0)
        own = psutil.Process().cpu_times()
        return time.monotonic(), busy, own.user + own.system

    def mark(self) -> None:
        self._t, self._busy, self._own = self._sample()

    def busy_cores(self, min_window_s: float = SAMPLE_S) -> float:
        """Other processes' CPU use since mark(), in cores; waits until the window is long enough."""
        wait = self._t + min_window_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        t, busy, own = self._sample()
        if t - self._t <= 0:
            return 0.0
        return max(0.0, (busy - self._busy) - (own - self._own)) / (t - self._t)


def default_threads(ui: bool = False, meter: LoadMeter | None = None) -> int:
    """Threads for an engine now: the physical cores other work leaves free (see the module
    docstring). `meter` measures the load since its mark (a fresh one samples SAMPLE_S)."""
    physical, usable = _cores()
    meter = meter or LoadMeter()
    return threads_for(physical, usable, meter.busy_cores(), ui=ui)


@dataclass
class StallWatch:
    """Says when a run's recent tokens are far slower than it has shown it can go.

    The baseline is the fastest token seen at the current thread count, or the predicted
    per-token time when that is slower (a prediction that is too optimistic must not trigger
    it); a stall is the median of the last `window` tokens above `factor` x the baseline."""

    expected_s: float = 0.0  # the cost model's seconds per token (0: unknown)
    factor: float = 3.0
    window: int = 8
    _recent: deque = field(default_factory=deque)
    _best: float = float("inf")

    def observe(self, token_s: float) -> bool:
        self._best = min(self._best, token_s)
        self._recent.append(token_s)
        if len(self._recent) > self.window:
            self._recent.popleft()
        if len(self._recent) < self.window:
            return False
        baseline = max(self._best, self.expected_s)
        return statistics.median(self._recent) > self.factor * baseline

    def reset(self) -> None:
        """After a change of thread count: a fresh baseline."""
        self._recent.clear()
        self._best = float("inf")


class AdaptiveThreads:
    """One engine's thread count. `fixed` (the user's --threads) is never changed; otherwise
    the count is default_threads() at load and before each reply, and one less each time a
    reply stalls (down to one). The engine sets `apply` (how to change its thread pools) once
    its model is loaded, calls begin_reply / token(seconds) / end_reply around each reply,
    and puts `stats()` in the reply's final event."""

    def __init__(self, fixed: int | None = None, ui: bool = False):
        self.auto, self.ui = fixed is None, ui
        self._load = LoadMeter()
        self.threads = fixed or default_threads(ui=ui, meter=self._load)
        self.steps_down = 0  # in the last reply, because it stalled
        self.apply: Callable[[int], None] = lambda n: None
        self._watch = StallWatch()

    def begin_reply(self, expected_token_s: float = 0.0) -> None:
        """expected_token_s: the plan's seconds per decoded token (0: unknown)."""
        if self.auto:  # the load may have changed since the last reply
            self._set(default_threads(ui=self.ui, meter=self._load))
        self.steps_down = 0
        self._watch = StallWatch(expected_s=expected_token_s)

    def token(self, seconds: float) -> None:
        """One decoded token took `seconds`: a stall (a core taken) drops a thread."""
        if self.auto and self._watch.observe(seconds) and self.threads > 1:
            self._set(self.threads - 1)
            self.steps_down += 1
            self._watch.reset()

    def end_reply(self) -> None:
        self._load.mark()  # the next reply's default sees the load since this one ended

    def stats(self) -> dict[str, int]:
        return {"threads": self.threads, "thread_steps_down": self.steps_down}

    def _set(self, n: int) -> None:
        if n != self.threads:
            self.apply(n)
            self.threads = n
