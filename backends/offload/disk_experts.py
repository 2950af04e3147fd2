"""The disk-tier ExpertBackend: experts streamed from the GGUF into a RAM expert cache.

Per MoE layer, S slots hold S experts' bytes exactly as they lie in the file, stacked like
the file's own [E, ...] expert tensors, so ggml's mul_mat_id computes from them with slot
ids instead of expert ids (the same kernel and numerics as the all-in-RAM path). A missed
expert is read (its gate, up and down slices: three large reads, in flight together) into
a slot chosen by the policy in ram_cache.py. At decode, after each layer, the next layers'
routers stacked (HOBBIT's prefetch, prefetch.py) guess their experts and the missing ones
are read on the reader's threads while this and the next layers compute.

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
from moechat.backends.offload.prefetch import MAX_DEPTH, adaptive_targets, predict_experts
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


class DiskExperts:
    def __init__(self, store, reader: DiskReader, cache: SlotCache, cpu, stacked_routers: torch.Tensor | None,
                 n_experts: int, top_k: int, prefetch: bool = True):
        self.store, self.reader, self.cache = store, reader, cache
        self.n_experts, self.top_k, self.n_layers = n_experts, top_k, cache.n_layers
        self.stacked, self.prefetch = stacked_routers, prefetch and stacked_routers is not None
        self.files = layer_files(store)
        slots = cache.slots
        self.buffers: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.kernels: dict[int, QuantExperts] = {}
        for l, f in self.files.items():
            bufs = tuple(aligned_empty(slots * n).reshape(slots, n) for n in f.slice_bytes)  # zero pages until read
            self.buffers[l] = bufs
            weights = [QuantWeight(b.reshape(-1), f.ggml_type, (*shape, slots)) for b, shape in zip(bufs, f.shapes)]
            self.kernels[l] = QuantExperts(*weights, cpu)
        self.inflight: dict[int, dict[int, list]] = {l: {} for l in self.files}  # layer -> expert -> futures
        self.prefetched: dict[int, set[int]] = {l: set() for l in self.files}  # read ahead, not yet checked
        self.stats = DiskStats()
        self.position = 0  # tokens of the sequence before this forward (set by the engine)

    @property
    def cache_bytes(self) -> int:
        return self.cache.slots * sum(f.expert_bytes for f in self.files.values())

    def begin_sequence(self) -> None:
        self.cache.begin_sequence()
        self.position = 0

    # ---- reads -------------------------------------------------------------------------
    def _start_read(self, layer: int, expert: int, slot: int) -> None:
        f, bufs = self.files[layer], self.buffers[layer]
        futures = [self.reader.submit(off + expert * n, buf[slot])
                   for off, n, buf in zip(f.offsets, f.slice_bytes, bufs)]
        self.inflight[layer][expert] = futures
        self.stats.experts_read += 1

    def _wait_layer(self, layer: int) -> None:
        pending = self.inflight[layer]
        if not pending:
            return
        t0 = time.perf_counter()
        try:
            for expert, futures in list(pending.items()):
                try:
                    for fut in futures:
                        fut.result()
                except BaseException:
                    self.cache.forget(layer, expert)
                    raise
        finally:
            pending.clear()
            self.stats.stall_s += time.perf_counter() - t0

    # ---- the hook ----------------------------------------------------------------------
    def moe_forward(self, layer, hidden, expert_ids, gate_weights):
        s = self.stats
        t_count, n_used = expert_ids.shape
        self.reader.check_unchanged()
        self.cache.advance(self.position + t_count - 1, layer)
        ids = expert_ids.cpu().numpy().astype(np.int64)  # [T, A]
        gw = gate_weights.float().cpu().numpy()  # [T, A]
        x = np.ascontiguousarray(hidden.float().cpu().numpy())  # [T, D]
        wanted = list(dict.fromkeys(ids.reshape(-1).tolist()))  # unique, in first-use order
        guessed, self.prefetched[layer] = self.prefetched[layer], set()
        s.prefetch_predicted += len(guessed)
        s.prefetch_correct += len(guessed.intersection(wanted))
        counts = np.bincount(ids.reshape(-1), minlength=self.n_experts)
        s.expert_calls += int(ids.size)

        groups = [wanted[i : i + self.cache.slots] for i in range(0, len(wanted), self.cache.slots)]
        if len(groups) == 1:
            slot_ids = self._load(layer, groups[0], counts, guessed)[ids]
            t0 = time.perf_counter()
            y = self.kernels[layer](x, slot_ids, gw)  # [T, D], weighted and summed in the graph
            s.time_s["experts"] = s.time_s.get("experts", 0.0) + time.perf_counter() - t0
        else:
            y = self._grouped(layer, x, ids, gw, groups, counts, guessed)
        if self.prefetch and t_count == 1:
            self._prefetch(layer, hidden[-1:])
        return torch.from_numpy(y).to(hidden.device, hidden.dtype)

    def _load(self, layer, group, counts, guessed) -> np.ndarray:
        """Make every expert of `group` resident; -> a lookup table expert id -> slot."""
        s = self.stats
        misses = [e for e in group if self.cache.slot_of(layer, e) is None]
        inflight = self.inflight[layer]
        ready = [e for e in group if e not in misses
                 and (e not in inflight or all(f.done() for f in inflight[e]))]
        s.ram_hits += int(sum(counts[e] for e in ready))
        s.prefetch_hits += int(sum(counts[e] for e in ready if e in guessed))
        s.misses += int(sum(counts[e] for e in group)) - int(sum(counts[e] for e in ready))
        protected = set(group)
        self._wait_layer(layer)  # read-ahead into this layer first: its slots must be settled
        for e in misses:
            slot, _ = self.cache.assign(layer, e, protected)
            self._start_read(layer, e, slot)
        self._wait_layer(layer)
        table = np.zeros(self.n_experts, dtype=np.int32)
        for e in group:
            self.cache.touch(layer, e)
            table[e] = self.cache.slot_of(layer, e)
        return table

    def _grouped(self, layer, x, ids, gw, groups, counts, guessed) -> np.ndarray:
        y_all = np.zeros((*ids.shape, x.shape[1]), dtype=np.float32)  # [T, A, D]
        for group in groups:
            table = self._load(layer, group, counts, guessed)
            mine = np.isin(ids, group)  # [T, A]
            y = self.kernels[layer](x, np.where(mine, table[ids], 0).astype(np.int32))  # [T, A, D]
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
            targets = adaptive_targets(predicted[0].numpy(), layer, self.n_layers,
                                       lambda k: k[0] not in self.files or self.cache.slot_of(*k) is not None)
            if targets:
                target_layer = targets[0][0]
                busy = set(self.inflight[target_layer]) | {e for _, e in targets}
                free = self.cache.slots - len(busy & set(self.cache.where[target_layer]))
                for _, e in targets[:max(free, 0)]:  # never evict a read still in flight
                    slot, _ = self.cache.assign(target_layer, e, busy)
                    self._start_read(target_layer, e, slot)
                    self.prefetched[target_layer].add(e)
        self.stats.time_s["prefetch"] = self.stats.time_s.get("prefetch", 0.0) + time.perf_counter() - t0

    def settle(self) -> None:
        """Wait for every read in flight (before a reply's stats are taken, or closing)."""
        for l in self.files:
            self._wait_layer(l)

    def close(self) -> None:
        try:
            for l in self.files:
                self.inflight[l].clear()
            self.reader.close()
        finally:
            for k in self.kernels.values():
                k.close()
