"""The streamed candidate: a model bigger than memory, its experts read from disk into a RAM
expert cache (backends/offload/disk_experts.py). Sizing and prediction, shared by the
planner and the engine so that both see the same numbers.

Sizing: the process may use `budget` bytes (default: what it holds now plus what the machine
and its memory cgroup still allow, minus headroom). Fixed costs — the runtime itself, the
non-expert weights, the KV cache, the read buffers — come first; what is left holds S expert
slots shared by all MoE layers. S must reach the experts one token selects in one layer
(top-k) or nothing runs.

Prediction (decode, per token): hit rate h from the cache size (uniform routing: S/(L·E), or
the S/L most popular experts per layer of this file's routing record when there is one);
bytes read = (1 − h) · top-k · expert bytes · MoE layers; time = compute + bytes / read
bandwidth · (1 − overlap). The overlap is PREFETCH_OVERLAP where reading ahead pays, and 0
where this file's record shows the engine's read-aheads mostly unused (the engine then stops
reading ahead, backends/offload/prefetch.py PrefetchGate).
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024**2
PLACEMENT = "experts streamed from disk"  # the planner's name for the stream engine's placement
HEADROOM_BYTES = 96 * MIB  # allocator slack, ggml graph buffers, Python objects made per step
HEADROOM_SHARE = 0.04  # ... and a share of the budget on top (page cache of the dense weights)
READ_THREADS = 4  # reads in flight
PREFETCH_OVERLAP = 0.25  # share of the read time hidden behind compute by prefetch (measured here)
STREAM_LAYER_OVERHEAD_S = 200e-6  # the disk tier's per-layer hook on top of the torch engine's (cache
# lookups, slot table, numpy hand-over, read-ahead product): all experts in RAM, 30-layer SmolLM2 MoE,
# 29 ms/token streamed vs 23 ms in the torch engine (docs/benchmarks.md, issue 14)
PREFETCH_MIN_USEFUL = 0.6  # below this share of read-aheads used, the engine stops reading ahead


@dataclass(frozen=True, slots=True)
class StreamSizing:
    budget: int  # bytes the whole process may use
    fixed: int  # runtime + non-expert weights + KV cache + read buffers + headroom
    slot_bytes: int  # one expert of one layer
    slots: int  # experts cached, all MoE layers together (0..L·E)
    n_experts: int
    top_k: int
    n_layers: int = 1  # MoE layers

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
    """Expert slots that fit `budget` next to the fixed costs."""
    n_layers = max(1, len(card.expert_layers))
    slot_bytes = card.bytes_per_expert
    fixed = runtime_bytes + card.dense_bytes + kv_bytes + read_buffer_bytes + HEADROOM_BYTES
    slots = max(0, (budget - fixed) // slot_bytes) if slot_bytes else 0
    return StreamSizing(budget, fixed, slot_bytes, int(min(slots, n_layers * card.n_experts)),
                        card.n_experts, card.n_experts_used, n_layers)


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
    h = sizing.slots / (sizing.n_layers * sizing.n_experts) if hit_rate is None else hit_rate
    miss_bytes = int((1 - h) * sizing.top_k * sizing.slot_bytes * sizing.n_layers)
    read_s = miss_bytes / read_bytes_s if read_bytes_s > 0 else float("inf")
    return StreamPrediction(h, miss_bytes, compute_s + read_s * (1 - overlap), compute_s, read_s)


def physical_limit_s(miss_bytes_per_token: float, read_bytes_s: float, compute_s: float) -> float:
    """The benchmark's yardstick: bytes missed per token over the measured read bandwidth,
    plus the compute of a token with every expert in RAM."""
    return miss_bytes_per_token / read_bytes_s + compute_s


# ---- the planner's two over-RAM candidates ----------------------------------------------------

TORCH_RUNTIME_BYTES = 340 * MIB  # RSS of the torch runtime once loaded, before the weights (measured here)
NOMINAL_DISK = (3.0, 0.05)  # GB/s large / 4 KiB reads, for a profile of another machine (an NVMe drive)
PREFILL_CHUNK = 256  # the torch engine's prefill chunk (backends/engines/torch_engine.py)


@dataclass(frozen=True, slots=True)
class OverRam:
    """One way to run a model bigger than memory: predicted speeds, memory, and why."""

    prefill_tok_s: float
    decode_tok_s: float
    ram_bytes: int
    fits: bool
    note: str
    hit_rate: float = 0.0
    bytes_per_token: int = 0


def over_ram(card, profile, n_ctx: int, routing=None, disk: tuple[float, float] | None = None):
    """(llama.cpp over mmap, stream engine) for a model whose weights do not fit in RAM.

    mmap: the page cache keeps what fits of the experts (the popular ones, with a routing
    record); every other selected expert is faulted in at the drive's 4 KiB rate.
    stream: S experts per layer in RAM (size_stream), misses read at the large-read rate."""
    from moechat.backends.plan import cost_model as cm

    large_gbs, small_gbs = disk or disk_rates(card.path, card.bytes_per_expert // 3)
    routing = routing or recorded_routing(card.path)
    budget = cm.ram_capacity_bytes(profile)
    layers = card.expert_layers or tuple(range(card.n_layers))
    cpu = cm.predict(card, profile, cm.Placement("cpu"), routing, n_ctx)
    cpu_s = 1.0 / cpu.decode_tok_s if cpu.decode_tok_s else float("inf")
    kv = cm.kv_bytes(card, n_ctx)

    def hit(n_resident: int) -> float:
        return sum(routing.resident_hit_rate(l, n_resident, card.n_experts) for l in layers) / len(layers)

    # llama.cpp over mmap
    fixed = card.dense_bytes + kv + cm.RUNTIME_OVERHEAD_BYTES
    resident = max(0, budget - fixed) * card.n_experts // max(1, card.expert_bytes)
    h_mmap = hit(int(resident))
    miss = (1 - h_mmap) * card.active_expert_bytes_per_token
    mmap_s = cpu_s + miss / (small_gbs * 1e9)
    mmap_prefill = 1.0 / (1.0 / cpu.prefill_tok_s + card.expert_bytes * (1 - h_mmap) / (small_gbs * 1e9) / cm.N_UBATCH)
    mmap = OverRam(mmap_prefill, 1.0 / mmap_s, fixed, fixed <= budget,
                   f"over mmap: {h_mmap:.0%} of expert picks in the page cache, "
                   f"{miss / 1e6:.0f} MB/token faulted in at {small_gbs * 1000:.0f} MB/s (4 KiB reads)",
                   h_mmap, int(miss))

    # the stream engine
    sizing = size_stream(card, budget, TORCH_RUNTIME_BYTES, kv, READ_THREADS * 2 * (LARGEST_READ_GUESS))
    if not sizing.runs:
        return mmap, OverRam(0.0, 0.0, sizing.fixed + card.n_experts_used * sizing.slot_bytes, False,
                             sizing.refusal(card.name))
    compute_s = cpu_s + card.n_layers * (cm.TORCH_LAYER_OVERHEAD_S + STREAM_LAYER_OVERHEAD_S)
    share = recorded_prefetch_share(card.path)
    overlap = PREFETCH_OVERLAP if share is None or share >= PREFETCH_MIN_USEFUL else 0.0
    p = predict_stream(card, sizing, compute_s, large_gbs * 1e9, hit(sizing.slots // sizing.n_layers), overlap)
    groups = -(-min(card.n_experts, PREFILL_CHUNK * card.n_experts_used) // sizing.slots)
    prefill_s = (groups / cpu.prefill_tok_s
                 + card.expert_bytes / (large_gbs * 1e9) / PREFILL_CHUNK)
    stream = OverRam(1.0 / prefill_s, 1.0 / p.decode_s, sizing.budget, True,
                     f"{sizing.slots / sizing.n_layers:.1f}/{card.n_experts} experts per layer in a "
                     f"{sizing.cache_bytes / 1024**3:.2f} GiB RAM cache, {p.hit_rate:.0%} hits, "
                     f"{p.bytes_per_token / 1e6:.0f} MB/token read at {large_gbs:.2f} GB/s"
                     + ("" if overlap else f", no read-ahead (only {share:.0%} of it was used)"),
                     p.hit_rate, p.bytes_per_token)
    return mmap, stream


LARGEST_READ_GUESS = 4 * MIB  # a bounce buffer per read thread (the engine sizes its own exactly)


def disk_rates(path, slice_bytes: int = 3 * MIB) -> tuple[float, float]:
    """(large, 4 KiB) read GB/s of the drive holding `path`, large = the engine's reads of
    one expert slice (gate, up or down of one expert)."""
    import os

    if not path or not os.path.exists(path):
        return NOMINAL_DISK
    from moechat.backends.plan.disk_probe import disk_speed

    s = disk_speed(str(path), read_bytes=slice_bytes)
    return s.large_gbs, s.small_gbs


# ---- routing records: what the stream engine saw, for the next plan -----------------------


def _record_path(model_path: str):
    import hashlib
    import os

    from moechat.backends.paths import cache_dir

    st = os.stat(model_path)
    key = hashlib.sha1(f"{os.path.abspath(model_path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "stream" / "routing" / f"{key}.json"


def save_routing(model_path: str, counts, prefetch: tuple[int, int] = (0, 0)) -> None:
    """Add per-(layer, expert) selection counts [L][E] to this model file's record (atomic),
    and `prefetch` = (experts read ahead, of them used) at decode: whether reading ahead pays
    on this file (backends/offload/prefetch.py PrefetchGate) decides the overlap predicted."""
    import json
    import os

    path = _record_path(model_path)
    old = _load_record(path)
    new = [[int(c) for c in row] for row in counts]
    prev = old.get("counts")
    if prev and len(prev) == len(new) and all(len(a) == len(b) for a, b in zip(prev, new)):
        new = [[a + b for a, b in zip(ra, rb)] for ra, rb in zip(prev, new)]
    read, used = (int(old.get("prefetch_read", 0)) + int(prefetch[0]), int(old.get("prefetch_used", 0)) + int(prefetch[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"counts": new, "prefetch_read": read, "prefetch_used": used}))
    os.replace(tmp, path)


def _load_record(path) -> dict:
    import json

    try:
        record = json.loads(path.read_text())
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def recorded_routing(model_path):
    """The routing record of this model file as a cost-model Routing (uniform without one)."""
    import os

    from moechat.backends.plan.cost_model import Routing

    if not model_path or not os.path.exists(model_path):
        return Routing()
    counts = _load_record(_record_path(str(model_path))).get("counts")
    if not counts or not isinstance(counts, list):
        return Routing()
    freq = []
    for row in counts:
        total = sum(row)
        freq.append(tuple(c / total for c in row) if total else ())
    return Routing(tuple(freq))


def recorded_prefetch_share(model_path) -> float | None:
    """The share of read-aheads the stream engine's runs on this file used (None: too few)."""
    import os

    if not model_path or not os.path.exists(model_path):
        return None
    record = _load_record(_record_path(str(model_path)))
    read = int(record.get("prefetch_read", 0) or 0)
    return int(record.get("prefetch_used", 0) or 0) / read if read >= MIN_PREFETCH_RECORD else None


MIN_PREFETCH_RECORD = 64  # read-aheads before their share says anything
