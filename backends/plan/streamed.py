"""The streamed candidate: a model bigger than memory, its experts read from disk into a RAM
expert cache (backends/offload/disk_experts.py). Sizing and prediction, shared by the
planner and the engine so that both see the same numbers.

Sizing: the process may use `budget` bytes (default: what it holds now plus what the machine
and its memory cgroup still allow, minus headroom). Fixed costs — the runtime itself, the
non-expert weights, the KV cache, the read buffers — come first; what is left holds S
slots per MoE layer. S must reach the experts one token selects (top-k) or nothing runs.

Prediction (decode, per token): hit rate h from the cache size (uniform routing: S/E, or
replayed on a recorded routing trace when there is one); bytes read = (1 − h) · top-k ·
expert bytes · MoE layers; time = compute + bytes / read bandwidth · (1 − overlap).
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024**2
HEADROOM_BYTES = 96 * MIB  # allocator slack, ggml graph buffers, Python objects made per step
HEADROOM_SHARE = 0.04  # ... and a share of the budget on top (page cache of the dense weights)
READ_THREADS = 4  # reads in flight
PREFETCH_OVERLAP = 0.25  # share of the read time hidden behind compute by prefetch (measured here)


@dataclass(frozen=True, slots=True)
class StreamSizing:
    budget: int  # bytes the whole process may use
    fixed: int  # runtime + non-expert weights + KV cache + read buffers + headroom
    slot_bytes: int  # one expert in every MoE layer
    slots: int  # experts cached per MoE layer (0..E)
    n_experts: int
    top_k: int

    @property
    def cache_bytes(self) -> int:
        return self.slots * self.slot_bytes

    @property
    def runs(self) -> bool:
        return self.slots >= self.top_k

    def refusal(self, name: str) -> str:
        gib = 1024**3
        need = self.fixed + self.top_k * self.slot_bytes
        return (f"{name} cannot run in {self.budget / gib:.2f} GiB even streaming its experts from "
                f"disk: the runtime, non-expert weights and KV cache take {self.fixed / gib:.2f} GiB "
                f"and one layer's {self.top_k} selected experts {self.top_k * self.slot_bytes / gib:.2f} "
                f"GiB more; it needs at least {need / gib:.2f} GiB (--ram-budget, or a shorter --ctx)")


def default_process_budget(held_now: int) -> tuple[int, str]:
    """What this process may use in all: what it holds now plus what is still available to
    it (the machine's RAM or its memory cgroup's room, the smaller), minus headroom."""
    from moechat.backends.plan.memory import ram_budget

    ram = ram_budget()
    total = held_now + ram.available
    total -= HEADROOM_BYTES + int(HEADROOM_SHARE * total)
    return max(0, total), ram.bound_by


def share_base() -> int:
    """What "--ram-budget 50%" is a share of: the memory cgroup's limit, else the machine's RAM."""
    import psutil

    from moechat.backends.plan.memory import cgroup_limit

    limit = cgroup_limit()
    machine = psutil.virtual_memory().total
    return min(machine, limit[0]) if limit else machine


def size_stream(card, budget: int, runtime_bytes: int, kv_bytes: int, read_buffer_bytes: int) -> StreamSizing:
    """Slots per layer that fit `budget` next to the fixed costs."""
    n_layers = max(1, len(card.expert_layers))
    slot_bytes = card.bytes_per_expert * n_layers
    fixed = runtime_bytes + card.dense_bytes + kv_bytes + read_buffer_bytes + HEADROOM_BYTES
    slots = max(0, (budget - fixed) // slot_bytes) if slot_bytes else 0
    return StreamSizing(budget, fixed, slot_bytes, int(min(slots, card.n_experts)), card.n_experts,
                        card.n_experts_used)


@dataclass(frozen=True, slots=True)
class StreamPrediction:
    hit_rate: float
    bytes_per_token: int  # read from disk per decoded token
    decode_s: float
    compute_s: float
    read_s: float


def predict_stream(card, sizing: StreamSizing, compute_s: float, read_bytes_s: float,
                   hit_rate: float | None = None, overlap: float = PREFETCH_OVERLAP) -> StreamPrediction:
    """Per decoded token: misses read at `read_bytes_s`, partly hidden behind compute."""
    h = sizing.slots / sizing.n_experts if hit_rate is None else hit_rate
    miss_bytes = int((1 - h) * sizing.top_k * sizing.slot_bytes)
    read_s = miss_bytes / read_bytes_s if read_bytes_s > 0 else float("inf")
    return StreamPrediction(h, miss_bytes, compute_s + read_s * (1 - overlap), compute_s, read_s)


def physical_limit_s(miss_bytes_per_token: float, read_bytes_s: float, compute_s: float) -> float:
    """The benchmark's yardstick: bytes missed per token over the measured read bandwidth,
    plus the compute of a token with every expert in RAM."""
    return miss_bytes_per_token / read_bytes_s + compute_s
