"""The Fiddler-style engine: the torch runtime with dense weights and the most popular
experts on the GPU; a missed expert runs on the CPU (ggml, on the mapped quantized bytes)
or is copied to the GPU, whichever is predicted faster for its token count.

Placement comes from a calibration pass (cached per model file); decisions from a start-up
microbenchmark refined online. Without CUDA, the CPU stands in for the GPU: slow, correct.
"""

from __future__ import annotations

import sys

from moechat.backends.model.model_card import ModelCard
from moechat.backends.offload.budget import budget_bytes
from moechat.backends.engines.offload_engine import OffloadEngine, all_expert_bytes, default_vram_budget


class FiddlerEngine(OffloadEngine):
    name = "fiddler"

    def __init__(self, card: ModelCard, n_ctx=None, threads=None, vram_budget=None,
                 device=None, costs=None, force=None, progress: bool = True,
                 calibration_prompts=None, ui: bool = False):
        """vram_budget: parse_budget() spec, or None for the default; costs: OffloadCosts
        (default: measured at start-up); force: {(layer, expert): "cpu"|"copy"} (tests)."""
        from moechat.backends.offload.calibration import CALIBRATION_PROMPTS, cached_counts
        from moechat.backends.offload.fiddler_experts import FiddlerExperts, measure_costs
        from moechat.backends.offload.fiddler_policy import OnlineCostModel, place_experts, popularity_ranking
        from moechat.backends.runtime.experts import GgmlExperts

        super().__init__(card, n_ctx, threads, device, ui=ui)
        model = self.model
        store = model.experts
        cpu_experts = GgmlExperts(store, model.cpu_kernels)  # the runtime's fast CPU kernel
        model.expert_backend = cpu_experts  # calibration runs all experts on the CPU
        counts = cached_counts(model, card.path, lambda t: self.tokenizer.tokenize(t), progress,
                               calibration_prompts or CALIBRATION_PROMPTS)
        total = all_expert_bytes(store)
        budget = (budget_bytes(vram_budget, total) if vram_budget is not None
                  else default_vram_budget(model, self.devices, total))
        placement = place_experts(popularity_ranking(counts), store.expert(store.layers[0], 0).nbytes, budget)
        if costs is None and self.devices.has_cuda:
            costs = _profile_costs(store)
        costs = costs or measure_costs(store, cpu_experts.layers, self.devices, model.dtype)
        self.backend = FiddlerExperts(store, cpu_experts.layers, self.devices, placement,
                                      OnlineCostModel(costs), model.dtype, force)
        self._cpu_experts = cpu_experts
        model.expert_backend = self.backend
        n_pairs = len(store.layers) * store.n_experts
        where = "GPU" if self.devices.has_cuda else "CPU standing in for the GPU"
        self.placement = (f"{len(placement)}/{n_pairs} experts resident ({where}, "
                          f"{self.backend.resident_bytes / 1e9:.2f} GB), the rest from RAM")
        if progress:
            print(f"[fiddler] {self.placement}; calibration hit rate "
                  f"{_hit(counts, placement):.0%}", file=sys.stderr)

    def event_stats(self) -> dict:
        s = self.backend.stats
        return {
            "gpu_hit_rate": round(s.gpu_hit_rate, 4),
            "experts_on_cpu": s.experts_on_cpu,
            "experts_copied": s.experts_copied,
            "bytes_copied": s.bytes_copied,
            **s.ms_per_token(),
        }

    def close(self) -> None:
        super().close()
        if getattr(self, "_cpu_experts", None) is not None:
            self._cpu_experts.close()


def _profile_costs(store):
    """The planner's cached hardware profile, when there is one with GPU measurements."""
    from moechat.backends.offload.fiddler_policy import costs_from_hardware_profile

    try:
        from moechat.backends.plan.hardware_profile import profile_path, read_profile
    except ImportError:  # built without the planner
        return None
    path = profile_path()
    if not path.exists():
        return None
    try:
        profile = read_profile(path)
    except Exception:  # an unreadable cache: measure instead
        return None
    return costs_from_hardware_profile(profile, store.expert(store.layers[0], 0).gate.type_name)


def _hit(counts, placement) -> float:
    from moechat.backends.offload.fiddler_policy import hit_rate

    return hit_rate(counts, placement)
