"""The disk-tier ExpertBackend: experts streamed from the GGUF into a RAM expert cache.

One pool of S slots serves every MoE layer whose experts share shape and type (a second
pool only for files that mix expert types across layers). A slot holds one expert's bytes
exactly as they lie in the file, stacked like the file's own [E, ...] expert tensors, so
ggml's mul_mat_id computes from the pool with slot ids instead of expert ids (the same
kernel and numerics as the all-in-RAM path). A missed expert is read (its gate, up and
down slices: three large reads, in flight together) into a slot chosen by the policy in
ram_cache.py. At decode, after each layer, the next layers' routers stacked (HOBBIT's
prefetch, prefetch.py) guess their experts, and the missing ones are read on the reader's
threads while this and the next layers compute (always leaving top-k slots unprotected).

A step whose unique experts outnumber the slots (a long prefill) runs in groups of S:
each group's experts are loaded, the layer's products computed, and the group's results
kept; the weighted sum over the active experts is then taken in slot order, as llama.cpp
sums them. Axes: T tokens, D model dim, A active experts per token, S slots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from moechat.backends.offload.disk_reader import DiskReader
from moechat.backends.offload.prefetch import MAX_DEPTH, PrefetchGate, adaptive_targets, predict_experts
from moechat.backends.offload.ram_cache import SlotCache
from moechat.kernels.ggml import QuantWeight, aligned_empty
from moechat.kernels.ggml_ops import QuantExperts


@dataclass(slots=True)
class DiskStats:
    tokens: int = 0  # tokens forwarded (prompt + generated); the engine counts them
    decode_tokens: int = 0
    expert_calls: int = 0  # token-expert selections
    ram_hits: int = 0  # selections served from the RAM cache without waiting on a read
    prefetch_hits: int = 0  # of those, served by a prefetched read
    misses: int = 0
    experts_read: int = 0
    prefetch_predicted: int = 0
    prefetch_correct: int = 0
    bytes_read: int = 0
    decode_bytes_read: int = 0
    read_busy_s: float = 0.0
    stall_s: float = 0.0  # time the compute waited on reads
    time_s: dict[str, float] = field(default_factory=dict)

    def reset(self) -> None:
        for name in self.__slots__:
            setattr(self, name, {} if name == "time_s" else 0)

    @property
    def hit_rate(self) -> float:
        return self.ram_hits / self.expert_calls if self.expert_calls else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        return self.prefetch_correct / self.prefetch_predicted if self.prefetch_predicted else 0.0

    @property
    def read_gb_s(self) -> float:
        return self.bytes_read / self.read_busy_s / 1e9 if self.read_busy_s else 0.0


@dataclass(frozen=True, slots=True)
class LayerFile:
    """Where one MoE layer's expert tensors lie in the file."""

    offsets: tuple[int, int, int]  # byte offset of expert 0's gate, up, down slice
    slice_bytes: tuple[int, int, int]  # one expert's bytes per projection
    ggml_type: int
    shapes: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # ggml (in, out) per projection

    @property
    def expert_bytes(self) -> int:
        return sum(self.slice_bytes)


def layer_files(store) -> dict[int, LayerFile]:
    """File offsets of every MoE layer's expert tensors (no page of them is touched)."""
    base = store.weights.map.ctypes.data
    out = {}
    for l in store.layers:
        ts = store.stacked(l)
        out[l] = LayerFile(
            tuple(t.data.ctypes.data - base for t in ts),
            tuple(t.data.nbytes // t.shape[2] for t in ts),
            ts[0].ggml_type,
            tuple((t.shape[0], t.shape[1]) for t in ts),
        )
    return out


class _Pool:
    """Slots for the layers whose experts have one signature: buffers, kernel, cache."""

    def __init__(self, f: LayerFile, slots: int, n_layers: int, policy: str, cpu):
        self.cache = SlotCache(n_layers, slots, policy)
        self.buffers = tuple(aligned_empty(slots * n).reshape(slots, n) for n in f.slice_bytes)  # zero pages until read
        weights = [QuantWeight(b.reshape(-1), f.ggml_type, (*shape, slots)) for b, shape in zip(self.buffers, f.shapes)]
        self.kernel = QuantExperts(*weights, cpu)
        self.slot_bytes = f.expert_bytes


def _signature(f: LayerFile):
    return (f.ggml_type, f.shapes, f.slice_bytes)


class DiskExperts:
    def __init__(self, store, reader: DiskReader, cpu, stacked_routers: torch.Tensor | None,
                 n_layers: int, n_experts: int, top_k: int, cache_bytes: int, policy: str = "hobbit",
                 prefetch: bool = True):
        self.store, self.reader = store, reader
        self.n_experts, self.top_k, self.n_layers = n_experts, top_k, n_layers
        self.stacked, self.prefetch = stacked_routers, prefetch and stacked_routers is not None
        self.files = layer_files(store)
        groups: dict[tuple, list[int]] = {}
        for l, f in self.files.items():
            groups.setdefault(_signature(f), []).append(l)
        total = sum(f.expert_bytes for f in self.files.values())  # one expert of every layer
        self.pool_of: dict[int, _Pool] = {}
        self.pools: list[_Pool] = []
        for layers in groups.values():
            f = self.files[layers[0]]
            share = cache_bytes * len(layers) * f.expert_bytes // total  # bytes for this pool
            slots = min(len(layers) * n_experts, share // f.expert_bytes)
            if slots < top_k:
                raise ValueError(f"{slots} slots cannot hold one token's {top_k} experts")
            pool = _Pool(f, slots, n_layers, policy, cpu)
            self.pools.append(pool)
            for l in layers:
                self.pool_of[l] = pool
        self.inflight: dict[tuple[int, int], list] = {}  # (layer, expert) -> futures
        self.prefetched: dict[int, set[int]] = {l: set() for l in self.files}  # read ahead, not yet checked
        self.gate = PrefetchGate()
        self.stats = DiskStats()
        self.decode_counts = np.zeros((n_layers, n_experts), np.int64)  # for the planner's record
        self.decode_prefetch = (0, 0)  # experts read ahead at decode, of them used (the record too)
        self.position = 0  # tokens of the sequence before this forward (set by the engine)

    @property
    def slots(self) -> int:
        return sum(p.cache.slots for p in self.pools)

    @property
    def cache_bytes(self) -> int:
        return sum(p.cache.slots * p.slot_bytes for p in self.pools)

    def begin_sequence(self) -> None:
        for p in self.pools:
            p.cache.begin_sequence()
        self.position = 0

    def is_cached(self, key) -> bool:
        pool = self.pool_of.get(key[0])
        return pool is None or pool.cache.slot_of(key) is not None

    # ---- reads -------------------------------------------------------------------------
    def _start_read(self, key, slot: int) -> None:
        layer, expert = key
        f, bufs = self.files[layer], self.pool_of[layer].buffers
        self.inflight[key] = [self.reader.submit(off + expert * n, buf[slot])
                              for off, n, buf in zip(f.offsets, f.slice_bytes, bufs)]
        self.stats.experts_read += 1

    def _wait(self, keys) -> None:
        t0 = time.perf_counter()
        try:
            for key in keys:
                futures = self.inflight.pop(key, None)
                if futures is None:
                    continue
                try:
                    for fut in futures:
                        fut.result()
                except BaseException:
                    self.pool_of[key[0]].cache.forget(key)
                    raise
        finally:
            self.stats.stall_s += time.perf_counter() - t0

    def _ready(self, key) -> bool:
        futures = self.inflight.get(key)
        return futures is None or all(f.done() for f in futures)

    # ---- the hook ----------------------------------------------------------------------
    def moe_forward(self, layer, hidden, expert_ids, gate_weights):
        s = self.stats
        t_count, n_used = expert_ids.shape
        self.reader.check_unchanged()
        pool = self.pool_of[layer]
        for p in self.pools:
            p.cache.advance(self.position + t_count - 1, layer)
        ids = expert_ids.cpu().numpy().astype(np.int64)  # [T, A]
        gw = gate_weights.float().cpu().numpy()  # [T, A]
        x = np.ascontiguousarray(hidden.float().cpu().numpy())  # [T, D]
        wanted = list(dict.fromkeys(ids.reshape(-1).tolist()))  # unique, in first-use order
        guessed, self.prefetched[layer] = self.prefetched[layer], set()
        s.prefetch_predicted += len(guessed)
        s.prefetch_correct += len(guessed.intersection(wanted))
        if t_count == 1:
            used = len(guessed.intersection(wanted))
            self.gate.record(len(guessed), used)
            self.decode_prefetch = (self.decode_prefetch[0] + len(guessed), self.decode_prefetch[1] + used)
        counts = np.bincount(ids.reshape(-1), minlength=self.n_experts)
        if t_count == 1:
            self.decode_counts[layer] += counts
        s.expert_calls += int(ids.size)

        size = pool.cache.slots
        groups = [wanted[i : i + size] for i in range(0, len(wanted), size)]
        if len(groups) == 1:
            slot_ids = self._load(layer, groups[0], counts, guessed)[ids]
            t0 = time.perf_counter()
            y = pool.kernel(x, slot_ids, gw)  # [T, D], weighted and summed in the graph
            s.time_s["experts"] = s.time_s.get("experts", 0.0) + time.perf_counter() - t0
        else:
            y = self._grouped(layer, x, ids, gw, groups, counts, guessed)
        if self.prefetch and t_count == 1 and self.gate.allow():
            self._prefetch(layer, hidden[-1:])
        return torch.from_numpy(y).to(hidden.device, hidden.dtype)

    def _load(self, layer, group, counts, guessed) -> np.ndarray:
        """Make every expert of `group` resident; -> a lookup table expert id -> slot."""
        s, cache = self.stats, self.pool_of[layer].cache
        keys = [(layer, e) for e in group]
        misses = [k for k in keys if cache.slot_of(k) is None]
        ready = [k for k in keys if k not in misses and self._ready(k)]
        s.ram_hits += int(sum(counts[e] for _, e in ready))
        s.prefetch_hits += int(sum(counts[e] for _, e in ready if e in guessed))
        s.misses += int(sum(counts[e] for e in group)) - int(sum(counts[e] for _, e in ready))
        # this layer's unused read-aheads: wait for them (issued a layer or more ago) and let
        # them go, so what stays protected never depends on how fast the drive was
        self._wait([k for k in list(self.inflight) if k[0] == layer and k not in keys])
        protected = set(keys) | set(self.inflight) | self._read_ahead()  # never reuse a slot a read is filling
        for key in misses:
            try:
                slot, _ = cache.assign(key, protected)
            except RuntimeError:  # every other slot awaits a read-ahead: give those up first
                self._wait([k for k in list(self.inflight) if k not in keys])
                self._drop_read_ahead()
                protected = set(keys) | set(self.inflight)
                slot, _ = cache.assign(key, protected)
            self._start_read(key, slot)
        self._wait(keys)
        table = np.zeros(self.n_experts, dtype=np.int32)
        for key in keys:
            cache.touch(key)
            table[key[1]] = cache.slot_of(key)
        return table

    def _grouped(self, layer, x, ids, gw, groups, counts, guessed) -> np.ndarray:
        kernel = self.pool_of[layer].kernel
        y_all = np.zeros((*ids.shape, x.shape[1]), dtype=np.float32)  # [T, A, D]
        for group in groups:
            table = self._load(layer, group, counts, guessed)
            mine = np.isin(ids, group)  # [T, A]
            y = kernel(x, np.where(mine, table[ids], 0).astype(np.int32))  # [T, A, D]
            y_all[mine] = y[mine]
        out = y_all[:, 0] * gw[:, 0, None]
        for a in range(1, ids.shape[1]):  # in slot order, as llama.cpp sums the experts
            out = out + y_all[:, a] * gw[:, a, None]
        return out

    def _prefetch(self, layer, gate_input) -> None:
        t0 = time.perf_counter()
        predicted = predict_experts(self.stacked, gate_input, layer, self.n_layers, self.n_experts,
                                    self.top_k, MAX_DEPTH)  # [1, P, A]
        if predicted.shape[1]:
            targets = adaptive_targets(predicted[0].numpy(), layer, self.n_layers, self.is_cached)
            busy = set(self.inflight) | set(targets) | self._read_ahead()
            for key in targets:
                cache = self.pool_of[key[0]].cache
                if cache.free_slots(busy) <= self.top_k:  # keep room for the next layer's misses
                    break
                slot, _ = cache.assign(key, busy)
                self._start_read(key, slot)
                self.prefetched[key[0]].add(key[1])
        self.stats.time_s["prefetch"] = self.stats.time_s.get("prefetch", 0.0) + time.perf_counter() - t0

    def _read_ahead(self) -> set:
        """Prefetched experts whose layer has not run yet: kept until it does (evicting them
        first, as never-used entries, would make every read-ahead evict the last one)."""
        return {(l, e) for l, es in self.prefetched.items() for e in es}

    def _drop_read_ahead(self) -> None:
        for es in self.prefetched.values():
            es.clear()

    def settle(self) -> None:
        """Wait for every read in flight (before closing)."""
        self._wait(list(self.inflight))

    def close(self) -> None:
        try:
            self.inflight.clear()
            self.reader.close()
        finally:
            for p in self.pools:
                p.kernel.close()
