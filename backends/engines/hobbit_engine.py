"""The HOBBIT-style engine: the torch runtime with a GPU expert cache in two precisions.

On a miss, an expert that matters less to this token (unimportance in (T1, T2]) loads as
its groupwise int4/int2 copy — 3–6× fewer bytes — and past T2 is skipped when --skip is
given (low copies by default only with a GPU: offload/low_copies.py); the next layers' experts are prefetched from stacked routers; eviction weighs
recency, frequency, high-precision use and layer distance, per sequence (one reply).
Without CUDA, the CPU stands in for the GPU: slow, correct.
"""

from __future__ import annotations

import sys

from moechat.backends.model.model_card import ModelCard
from moechat.backends.offload.budget import budget_bytes
from moechat.backends.engines.offload_engine import OffloadEngine, all_expert_bytes, default_vram_budget

HIGH_FRACTION = 0.75  # the high tier's share of the budget (HOBBIT: the larger cache)


class HobbitEngine(OffloadEngine):
    name = "hobbit"

    def __init__(self, card: ModelCard, n_ctx=None, threads=None, vram_budget=None,
                 low_format: str = "auto", skip: bool = False, device=None,
                 prefetch: bool = True, t1: float | None = None, progress: bool = True,
                 ui: bool = False):
        from moechat.backends.offload.hobbit_cache import DEFAULT_WEIGHTS, HobbitCache
        from moechat.backends.offload.hobbit_experts import HobbitExperts
        from moechat.backends.offload.hobbit_loading import T1
        from moechat.backends.offload.low_copies import load_or_build, low_bits
        from moechat.backends.offload.prefetch import stack_routers

        super().__init__(card, n_ctx, threads, device, ui=ui)
        model = self.model
        store = model.experts
        expert_type = store.expert(store.layers[0], 0).gate.type_name
        bits = low_bits(low_format, expert_type, self.devices.has_cuda)  # auto: none without a GPU
        low = load_or_build(card.path, bits, progress)
        total = all_expert_bytes(store)
        budget = (budget_bytes(vram_budget, total) if vram_budget is not None
                  else default_vram_budget(model, self.devices, total))
        high_budget = int(budget * HIGH_FRACTION) if bits else budget  # none: no low tier
        cache = HobbitCache(high_budget, budget - high_budget, model.args.n_layers, DEFAULT_WEIGHTS)
        routers = stack_routers(model.routers()).to(self.devices.gpu)
        a = model.args
        self.backend = HobbitExperts(store, self.devices, low, cache, routers, a.n_experts,
                                     a.n_experts_used, model.dtype, allow_skip=skip,
                                     prefetch=prefetch and bits > 0, t1=T1 if t1 is None else t1,
                                     cpu=model.cpu_kernels)
        model.expert_backend = self.backend
        where = "GPU" if self.devices.has_cuda else "CPU standing in for the GPU"
        tiers = (f"{HIGH_FRACTION:.0%} {expert_type}, rest int{bits}" if bits else
                 f"all {expert_type}: no low-precision tier, no prefetch")
        self.placement = (f"expert cache {budget / 1e9:.2f} GB on the {where} ({tiers}), "
                          f"{'skipping unimportant experts' if skip else 'no skipping'}")
        if progress:
            print(f"[hobbit] {self.placement}", file=sys.stderr)

    def begin_reply(self) -> None:
        super().begin_reply()
        self.backend.begin_sequence()

    def event_stats(self) -> dict:
        s = self.backend.stats
        return {
            "high_hits": s.high_hits,
            "low_hits": s.low_hits,
            "misses": s.misses,
            "skips": s.skips,
            "prefetch_accuracy": round(s.prefetch_accuracy, 4),
            "bytes_moved": s.bytes_copied,
            **s.ms_per_token(),
        }
