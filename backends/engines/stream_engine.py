"""The streamed engine (`--engine stream`): a model bigger than memory on the torch runtime,
its non-expert weights in RAM and its experts read from the GGUF on demand into a RAM
expert cache sized to `--ram-budget` (backends/offload/disk_experts.py).

The budget covers the whole process: what the runtime holds once loaded (measured), the
non-expert weights, the KV cache and the read buffers come first; the rest is the expert
cache (backends/plan/streamed.py sizes it, the same arithmetic the planner predicts with).
"""

from __future__ import annotations

import dataclasses
import sys
import time

from moechat.backends.engines.offload_engine import OffloadEngine
from moechat.backends.errors import MoechatError
from moechat.backends.model.model_card import ModelCard
from moechat.backends.plan.streamed import PLACEMENT as STREAM_PLACEMENT


class StreamEngine(OffloadEngine):
    name = "stream"
    plan_placement = STREAM_PLACEMENT  # the planner's candidate (its recorded runs correct it)

    def __init__(self, card: ModelCard, n_ctx=None, threads=None, ram_budget: int | None = None,
                 policy: str = "hobbit", prefetch: bool = True, progress: bool = True,
                 max_slots: int | None = None, direct: bool | None = None, ui: bool = False):
        """ram_budget: bytes the process may use in all (None: what the machine and its memory
        cgroup allow, minus headroom); max_slots caps the experts cached per layer (tests,
        benchmarks); direct: force O_DIRECT on/off (None: where the filesystem allows)."""
        import psutil

        from moechat.backends.offload.disk_experts import DiskExperts
        from moechat.backends.offload.disk_reader import DiskReader
        from moechat.backends.offload.prefetch import stack_routers
        from moechat.backends.plan.streamed import READ_THREADS, default_process_budget, size_stream

        super().__init__(card, n_ctx, threads, device="cpu", ui=ui)  # threads: as the torch engine
        model, store = self.model, self.model.experts
        held = psutil.Process().memory_info().rss
        bound = "--ram-budget"
        if ram_budget is None:
            ram_budget, bound = default_process_budget(held)
        biggest = max(store.expert(l, 0).gate.nbytes for l in store.layers)
        biggest = max(biggest, max(store.expert(l, 0).down.nbytes for l in store.layers))
        self.reader = DiskReader(card.path, READ_THREADS, max_read=biggest, direct=direct)
        kv = self.cache.k.nbytes + self.cache.v.nbytes
        self.sizing = size_stream(card, ram_budget, held, kv, self.reader.buffer_bytes)
        if max_slots is not None:
            self.sizing = dataclasses.replace(self.sizing, slots=min(self.sizing.slots, max_slots))
        if not self.sizing.runs:
            self.reader.close()
            raise MoechatError(self.sizing.refusal(card.name))
        a = model.args
        routers = stack_routers(model.routers()) if prefetch else None
        self.backend = DiskExperts(store, self.reader, model.cpu_kernels, routers, a.n_layers,
                                   a.n_experts, a.n_experts_used, self.sizing.cache_bytes,
                                   policy, prefetch=prefetch)
        model.expert_backend = self.backend
        gib = 1024**3
        self.placement = (f"experts streamed from disk ({'O_DIRECT' if self.reader.direct else 'buffered'}) "
                          f"into a {self.sizing.cache_bytes / gib:.2f} GiB RAM cache "
                          f"({self.sizing.slots} experts of {self.sizing.n_layers}x{a.n_experts}, {policy}), "
                          f"budget {ram_budget / gib:.2f} GiB ({bound})")
        self._decode_bytes = 0
        self._decode_tokens = 0
        if progress:
            print(f"[stream] {self.placement}", file=sys.stderr)

    def forward(self, tokens, start, all_logits=False):
        before = self.reader.counters.bytes
        t0 = time.perf_counter()
        out = super().forward(tokens, start, all_logits)
        if len(tokens) == 1:
            self._decode_tokens += 1
            self._decode_bytes += self.reader.counters.bytes - before
        self.backend.stats.time_s["forward"] = self.backend.stats.time_s.get("forward", 0.0) + time.perf_counter() - t0
        return out

    def io_wait_s(self) -> float:
        return self.backend.stats.stall_s

    def begin_reply(self) -> None:
        super().begin_reply()
        self.backend.begin_sequence()
        self.reader.counters.reset()
        self._decode_bytes = self._decode_tokens = 0

    def event_stats(self) -> dict:
        s, c = self.backend.stats, self.reader.counters
        n = max(self._decode_tokens, 1)
        return {
            "ram_hit_rate": round(s.hit_rate, 4),
            "ram_cache_bytes": self.sizing.cache_bytes,
            "disk_bytes_per_tok": int(self._decode_bytes / n),
            "disk_bytes_read": c.bytes,
            "read_gb_s": round(c.bytes / c.busy_s / 1e9, 3) if c.busy_s else 0.0,
            "experts_read": s.experts_read,
            "prefetch_accuracy": round(s.prefetch_accuracy, 4),
            "read_stall_ms_per_tok": round(1000 * s.stall_s / max(s.tokens, 1), 3),
        }

    def close(self) -> None:
        backend = self.backend
        if backend is not None and backend.decode_counts.any():
            from moechat.backends.plan.streamed import save_routing

            try:  # the next plan's hit rates; a read-only cache dir only loses the record
                save_routing(self.card.path, backend.decode_counts, backend.decode_prefetch)
            except OSError:
                pass
        super().close()
