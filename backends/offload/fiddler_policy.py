"""Fiddler-style decisions as pure functions: which experts live on the GPU, and where a
missed expert runs.

Placement: rank (layer, expert) pairs by how often a calibration pass routed to them and
fill the VRAM budget in that order. Decision: a selected expert that is not resident either
runs on the CPU (its n tokens' activations go down, results come back) or has its weights
copied into a staging buffer and runs on the GPU — whichever the cost model predicts
faster for those n tokens. Decode (n = 1) then runs misses on the CPU and long prefills
copy. The predicted times are corrected online by an EWMA of observed/predicted ratios.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

GB = 1e9


@dataclass(frozen=True, slots=True)
class OffloadCosts:
    """The measured machine figures the decision needs (GB/s are 1e9 bytes per second)."""

    cpu_matvec_gbs: float  # expert weights read per second by the CPU expert kernel, batch 1
    pcie_gbs: float  # host -> device copy bandwidth from pinned memory
    gpu_gbs: float  # GPU memory bandwidth
    cpu_gflops: float = 200.0  # CPU expert kernel arithmetic rate, once batched
    gpu_gflops: float = 20_000.0
    ram_read_gbs: float = 0.0  # informational (the CPU kernel's rate is what counts)
    vram_bytes: int = 0  # total GPU memory; 0 = no GPU
    cpu_call_s: float = 30e-6  # fixed cost of one CPU expert call (thread hand-off)
    gpu_call_s: float = 20e-6  # fixed cost of one GPU expert call (kernel launches)
    name: str = ""

    def __post_init__(self):
        assert self.cpu_matvec_gbs > 0 and self.pcie_gbs > 0 and self.gpu_gbs > 0

    @classmethod
    def from_dict(cls, data: dict) -> "OffloadCosts":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def costs_from_hardware_profile(profile, expert_type: str) -> OffloadCosts | None:
    """The planner's HardwareProfile (backends/plan/hardware_profile.py; read by attribute, so this
    module needs no import of it) -> the decision's figures; None without a usable GPU
    measurement. The CPU rate is the profile's matvec rate for the experts' quant type."""
    gpus = [g for g in getattr(profile, "gpus", ()) if not getattr(g, "unified", False)]
    rates = getattr(profile, "cpu_matvec_gbs", {}) or {}
    cpu = rates.get(expert_type) or (max(rates.values()) if rates else 0.0)
    if not gpus or not cpu or not gpus[0].h2d_gbs or not gpus[0].mem_gbs:
        return None
    g = gpus[0]
    return OffloadCosts(cpu_matvec_gbs=cpu, pcie_gbs=g.h2d_gbs, gpu_gbs=g.mem_gbs,
                        cpu_gflops=profile.cpu_gflops or 100.0,
                        gpu_gflops=(g.tflops or 10.0) * 1000, ram_read_gbs=profile.ram_read_gbs,
                        vram_bytes=g.vram_total_bytes, name=getattr(profile, "machine", ""))


def replay_costs(profile, expert_type: str = "Q4_0") -> OffloadCosts:
    """A recorded machine's figures for trace replays. Without a discrete GPU the CPU stands in
    for it, as in the engines' CPU runs: the "copy" is a RAM memcpy and vram_bytes is 0."""
    costs = costs_from_hardware_profile(profile, expert_type)
    if costs is not None:
        return costs
    rates = profile.cpu_matvec_gbs
    cpu = rates.get(expert_type) or max(rates.values())
    return OffloadCosts(cpu_matvec_gbs=cpu, pcie_gbs=profile.ram_read_gbs / 2, gpu_gbs=cpu,
                        cpu_gflops=profile.cpu_gflops, gpu_gflops=profile.cpu_gflops,
                        ram_read_gbs=profile.ram_read_gbs, vram_bytes=0, name=profile.machine)


@dataclass(frozen=True, slots=True)
class ExpertShape:
    """One expert as the cost model sees it."""

    weight_bytes: int  # gate + up + down in the file's own quantization
    params: int  # 3 · D · I
    hidden: int  # D

    @property
    def flops_per_token(self) -> float:
        return 2.0 * self.params


# --- placement -------------------------------------------------------------------------

def popularity_ranking(counts: np.ndarray) -> list[tuple[int, int]]:
    """(layer, expert) pairs, most routed first; ties broken by layer then expert.

    counts: [L, E] selections from a calibration pass."""
    n_layers, n_experts = counts.shape
    order = np.lexsort((np.tile(np.arange(n_experts), n_layers),
                        np.repeat(np.arange(n_layers), n_experts),
                        -counts.ravel()))
    return [(int(i // n_experts), int(i % n_experts)) for i in order]


def place_experts(ranking: list[tuple[int, int]], expert_bytes: int | np.ndarray,
                  budget_bytes: int) -> frozenset[tuple[int, int]]:
    """Fill `budget_bytes` of VRAM in ranking order; an expert that does not fit is skipped
    (a smaller one further down may still fit when sizes differ per layer)."""
    used, placed = 0, []
    for layer, expert in ranking:
        size = int(expert_bytes if np.isscalar(expert_bytes) else expert_bytes[layer])
        if used + size <= budget_bytes:
            placed.append((layer, expert))
            used += size
    return frozenset(placed)


def hit_rate(counts: np.ndarray, placement: frozenset[tuple[int, int]]) -> float:
    """Share of routed (token, layer, expert) selections that land on a resident expert."""
    total = counts.sum()
    hits = sum(int(counts[l, e]) for l, e in placement)
    return hits / total if total else 0.0


# --- per-expert decision ---------------------------------------------------------------

def cpu_seconds(costs: OffloadCosts, shape: ExpertShape, n_tokens: int) -> float:
    """Run on the CPU: weights read once (memory-bound) or arithmetic-bound when batched,
    plus the activations down and the results back over PCIe when there is a GPU."""
    compute = max(shape.weight_bytes / (costs.cpu_matvec_gbs * GB),
                  n_tokens * shape.flops_per_token / (costs.cpu_gflops * 1e9))
    activations = 2 * n_tokens * shape.hidden * 4 / (costs.pcie_gbs * GB) if costs.vram_bytes else 0.0
    return costs.cpu_call_s + compute + activations


def gpu_seconds(costs: OffloadCosts, shape: ExpertShape, n_tokens: int, copy: bool) -> float:
    """Run on the GPU, first copying the weights into the staging buffer when `copy`."""
    transfer = shape.weight_bytes / (costs.pcie_gbs * GB) if copy else 0.0
    compute = max(shape.weight_bytes / (costs.gpu_gbs * GB),
                  n_tokens * shape.flops_per_token / (costs.gpu_gflops * 1e9))
    return costs.gpu_call_s + transfer + compute


def crossover_tokens(costs: OffloadCosts, shape: ExpertShape, limit: int = 1 << 16) -> int:
    """Smallest token count at which copying a missed expert beats the CPU (limit if never)."""
    lo, hi = 1, limit
    if gpu_seconds(costs, shape, hi, True) >= cpu_seconds(costs, shape, hi):
        return limit
    while lo < hi:  # cpu - copy grows with n: binary search the sign change
        mid = (lo + hi) // 2
        if gpu_seconds(costs, shape, mid, True) < cpu_seconds(costs, shape, mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(slots=True)
class OnlineCostModel:
    """The profile's prediction times a correction per path, refined from observed timings.

    `scale[path]` is an exponentially weighted moving average of observed/predicted for
    that path ("cpu" or "copy"), so a profile that is off by 2× stops mattering after a
    few dozen calls, while one noisy timing moves it only by `alpha`."""

    costs: OffloadCosts
    alpha: float = 0.1
    scale: dict[str, float] = field(default_factory=lambda: {"cpu": 1.0, "copy": 1.0})
    observations: dict[str, int] = field(default_factory=lambda: {"cpu": 0, "copy": 0})

    def predict(self, path: str, shape: ExpertShape, n_tokens: int) -> float:
        raw = (cpu_seconds(self.costs, shape, n_tokens) if path == "cpu"
               else gpu_seconds(self.costs, shape, n_tokens, copy=True))
        return raw * self.scale[path]

    def choose(self, shape: ExpertShape, n_tokens: int) -> str:
        """"cpu" or "copy" for a missed expert with `n_tokens` routed to it."""
        cpu = self.predict("cpu", shape, n_tokens)
        copy = self.predict("copy", shape, n_tokens)
        return "cpu" if cpu <= copy else "copy"

    def observe(self, path: str, shape: ExpertShape, n_tokens: int, seconds: float) -> None:
        raw = (cpu_seconds(self.costs, shape, n_tokens) if path == "cpu"
               else gpu_seconds(self.costs, shape, n_tokens, copy=True))
        ratio = min(max(seconds / raw, 1e-3), 1e3)  # one absurd timing cannot wreck it
        self.scale[path] = (1 - self.alpha) * self.scale[path] + self.alpha * ratio
        self.observations[path] += 1


# --- replay: what a placement and decision rule cost on a trace --------------------------

@dataclass(frozen=True, slots=True)
class FiddlerReplay:
    gpu_hit_rate: float
    experts_on_cpu: int
    experts_copied: int
    bytes_copied: int
    seconds: float  # predicted expert time over the trace (CPU and GPU sides serialised)
    overlapped_seconds: float  # same with CPU and GPU experts of a layer overlapping


def replay_fiddler(trace, placement: frozenset[tuple[int, int]], costs: OffloadCosts,
                   shape: ExpertShape, rule: str = "cost", step_tokens: np.ndarray | None = None
                   ) -> FiddlerReplay:
    """Predict expert time on a trace. `rule`: "cost" (the per-expert decision), "cpu"
    (always compute misses on the CPU), "copy" (always copy). Tokens are grouped into
    forward steps: each prefill sequence is one step, each decoded token its own step
    (or `step_tokens` gives each step's token count explicitly)."""
    model = OnlineCostModel(costs)
    steps = _steps(trace) if step_tokens is None else _explicit_steps(step_tokens)
    hits = cpu_n = copy_n = moved = 0
    total = overlapped = 0.0
    for start, end in steps:
        for layer in range(trace.n_layers):
            ids = trace.expert_ids[start:end, layer].ravel()
            experts, n_per = np.unique(ids, return_counts=True)
            gpu_t = cpu_t = 0.0
            for expert, n in zip(experts.tolist(), n_per.tolist()):
                if (layer, expert) in placement:
                    hits += n
                    gpu_t += gpu_seconds(costs, shape, n, copy=False)
                    continue
                path = rule if rule != "cost" else model.choose(shape, n)
                if path == "cpu":
                    cpu_n += 1
                    cpu_t += cpu_seconds(costs, shape, n)
                else:
                    copy_n += 1
                    moved += shape.weight_bytes
                    gpu_t += gpu_seconds(costs, shape, n, copy=True)
            total += gpu_t + cpu_t
            overlapped += max(gpu_t, cpu_t)
    selections = trace.n_tokens * trace.n_layers * trace.top_k
    return FiddlerReplay(hits / selections if selections else 0.0, cpu_n, copy_n, moved,
                         total, overlapped)


def _steps(trace) -> list[tuple[int, int]]:
    out = []
    for start, end in trace.sequences():
        t = start
        while t < end and trace.prefill[t]:
            t += 1
        if t > start:
            out.append((start, t))
        out.extend((i, i + 1) for i in range(t, end))
    return out


def _explicit_steps(step_tokens: np.ndarray) -> list[tuple[int, int]]:
    ends = np.cumsum(step_tokens)
    return [(int(e - n), int(e)) for n, e in zip(step_tokens, ends)]


def decode_expert_seconds(costs: OffloadCosts, shape: ExpertShape, hit_rate: float,
                          n_layers: int, top_k: int) -> float:
    """Expected routed-expert time per decoded token, for the planner: per layer, top_k
    selections each resident with probability `hit_rate`; a miss runs where it is cheaper
    for one token (the CPU, overlapped with the GPU side, or a copy, serialised with it).
    The expectation is over the number of misses k ~ Binomial(top_k, 1 - hit_rate)."""
    from math import comb

    gpu = gpu_seconds(costs, shape, 1, copy=False)
    cpu = cpu_seconds(costs, shape, 1)
    copy = gpu_seconds(costs, shape, 1, copy=True)
    per_layer = 0.0
    for k in range(top_k + 1):
        p = comb(top_k, k) * (1 - hit_rate) ** k * hit_rate ** (top_k - k)
        hits = (top_k - k) * gpu
        t = max(hits, k * cpu) if cpu <= copy else hits + k * copy
        per_layer += p * t
    return n_layers * per_layer
