"""Counters an offloading engine keeps and reports in its Events.

One mutable record per engine; `reset()` per reply. The engines pick the fields they
report (Fiddler: hit rate, CPU experts, bytes copied, time split; HOBBIT: high/low hits,
misses, skips, prefetch accuracy, bytes moved) through their own `event_stats`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class OffloadStats:
    tokens: int = 0  # tokens forwarded (prompt + generated)
    expert_calls: int = 0  # (token-batch, expert) pairs computed or skipped
    gpu_hits: int = 0  # selected expert already resident on the GPU side
    experts_on_cpu: int = 0  # missed experts computed by the CPU kernel
    experts_copied: int = 0  # missed experts whose weights were copied and run on the GPU side
    high_hits: int = 0
    low_hits: int = 0
    misses: int = 0
    skips: int = 0
    prefetch_predicted: int = 0  # experts guessed by the stacked routers and later checked
    prefetch_correct: int = 0  # of those, selected by the real router
    bytes_copied: int = 0  # weights moved host -> GPU (misses and prefetches)
    time_s: dict[str, float] = field(default_factory=dict)  # "gpu", "cpu", "copy", "dense", ...

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, {} if f.name == "time_s" else 0)

    @contextmanager
    def timer(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add_time(part, time.perf_counter() - start)

    def add_time(self, part: str, seconds: float) -> None:
        self.time_s[part] = self.time_s.get(part, 0.0) + seconds

    @property
    def gpu_hit_rate(self) -> float:
        return self.gpu_hits / self.expert_calls if self.expert_calls else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        return self.prefetch_correct / self.prefetch_predicted if self.prefetch_predicted else 0.0

    def ms_per_token(self) -> dict[str, float]:
        """Time split per token, e.g. {"cpu_ms_per_tok": ..., "gpu_ms_per_tok": ...}."""
        n = max(self.tokens, 1)
        return {f"{part}_ms_per_tok": round(1000 * s / n, 3) for part, s in sorted(self.time_s.items())}
