"""The HOBBIT-style ExpertBackend: a GPU expert cache in two precisions, filled token by
token by importance, with stacked-router prefetch of the next layers' experts.

Per layer and step: each selected expert is served from the high tier if there, else
from the low tier if the token can take low precision, else skipped (with --skip, for the
least important), else loaded — in high precision when its unimportance is <= T1, low
otherwise — into its tier (evicting by HOBBIT's priority). After the layer, at decode,
the next layers' routers applied to this gate input pick experts to prefetch (low
precision, protected from eviction until their layer runs).
Axes: T tokens, D model dim, A active experts, P prefetch depth.
"""

from __future__ import annotations

import time

import torch

from moechat.backends.offload.devices import CopyStream, Devices, StagingBuffer, pin
from moechat.backends.offload.expert_compute import (
    DeviceExpert, GgmlExpert, combine, device_expert, host_parts, low_expert_forward, token_groups,
)
from moechat.backends.offload.hobbit_cache import HobbitCache
from moechat.backends.offload.hobbit_loading import HIGH, LOW, SKIP, T1, T2, per_expert_need, wanted_precision
from moechat.backends.offload.low_copies import LowCopies
from moechat.backends.offload.prefetch import MAX_DEPTH, adaptive_targets, predict_experts
from moechat.backends.offload.stats import OffloadStats
from moechat.backends.offload.trace import TraceRecorder
from moechat.kernels.ggml import CpuBackend


PIN_LIMIT = 4 * 1024**3  # pin the low copies only up to this much page-locked RAM


class HobbitExperts:
    def __init__(self, store, devices: Devices, low: LowCopies, cache: HobbitCache,
                 stacked_routers: torch.Tensor, n_experts: int, top_k: int, dtype: torch.dtype,
                 allow_skip: bool = False, prefetch: bool = True, t1: float = T1, t2: float = T2,
                 cpu: CpuBackend | None = None):
        """cpu: ggml's CPU backend; without a GPU, high-tier experts are computed with it
        (expert_compute.GgmlExpert: llama.cpp's numerics)."""
        self.store, self.devices, self.low_copies, self.cache = store, devices, low, cache
        self.cpu = cpu
        self.stacked, self.n_experts, self.top_k, self.dtype = stacked_routers, n_experts, top_k, dtype
        self.allow_skip, self.prefetch, self.t1, self.t2 = allow_skip, prefetch, t1, t2
        self.n_layers = cache.n_layers
        self.high: dict[tuple[int, int], DeviceExpert | GgmlExpert] = {}
        self.low: dict[tuple[int, int], tuple] = {}
        self.pending: dict[tuple[int, int], object] = {}  # prefetched, not yet checked -> copy event
        self.stream = CopyStream(devices)
        biggest = max(store.expert(l, 0).nbytes for l in store.layers)
        self.staging = StagingBuffer(biggest + 4 * 256, devices)  # pinned path for high loads
        low_total = sum(low.expert_bytes(k) for k in low.experts)
        if devices.has_cuda and low_total <= PIN_LIMIT:  # what prefetch moves: pinned copies run async
            for key, parts in low.experts.items():
                low.experts[key] = tuple(p.with_tensors([pin(t, devices) for t in p.tensors()]) for p in parts)
        self.stats = OffloadStats()
        self.recorder: TraceRecorder | None = None
        self.position = 0  # tokens of the sequence before this forward (set by the engine)

    def begin_sequence(self) -> None:
        self.cache.begin_sequence()
        self.pending.clear()
        self.position = 0

    # ---- loading ----------------------------------------------------------------------
    def _load_high(self, key) -> DeviceExpert | GgmlExpert:
        w = self.store.expert(*key)
        self.stats.bytes_copied += w.nbytes
        return device_expert(w, self.staging.upload(host_parts(w)), self.cpu)

    def _load_low(self, key) -> tuple:
        parts = self.low_copies.experts[key]
        self.stats.bytes_copied += sum(p.nbytes for p in parts)
        if self.devices.has_cuda:  # pinned -> device, on the current (copy or compute) stream
            return tuple(p.to(self.devices.gpu) for p in parts)
        return tuple(p.with_tensors([t.clone() for t in p.tensors()]) for p in parts)

    def _admit(self, key, high: bool, value, protect: bool = False) -> None:
        nbytes = value.nbytes if high else sum(p.nbytes for p in value)
        ok, evicted = self.cache.insert(key, high, nbytes, protect=protect)
        store = self.high if high else self.low
        for victim in evicted:
            store.pop(victim, None)
        if ok:
            store[key] = value

    # ---- the hook -----------------------------------------------------------------------
    def moe_forward(self, layer, hidden, expert_ids, gate_weights):
        t_count, n_used = expert_ids.shape
        s = self.stats
        self.cache.advance(self.position + t_count - 1, layer)
        need_tok = wanted_precision(gate_weights.float().cpu().numpy(), self.t1, self.t2, self.allow_skip)
        if not self.low_copies.experts:  # no low tier (--hobbit-low none): what is not skipped is high
            need_tok[need_tok == LOW] = HIGH
        ids_np = expert_ids.cpu().numpy()
        need = per_expert_need(ids_np, need_tok)
        predicted = None
        if self.recorder is not None:
            predicted = self._predict(layer, hidden)  # [T, P, A] for the trace
            self.recorder.record(layer, expert_ids, gate_weights, predicted)
        for key in [k for k in self.pending if k[0] == layer]:  # score last step's guesses
            s.prefetch_predicted += 1
            s.prefetch_correct += int(key[1] in need)
            self.stream.wait(self.pending.pop(key))

        x = hidden.to(self.dtype)
        y = torch.zeros(t_count, n_used, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        keep = torch.ones(t_count, n_used, dtype=torch.bool, device=hidden.device)
        start = time.perf_counter()
        for e, (tok, slot) in token_groups(expert_ids).items():
            key, want = (layer, e), need[e]
            s.expert_calls += len(tok)
            if key in self.high:
                s.high_hits += len(tok)
                self.cache.touch(key, True)
                y[tok, slot] = self.high[key].forward(x[tok]).float()
            elif want != HIGH and key in self.low:
                s.low_hits += len(tok)
                self.cache.touch(key, False)
                y[tok, slot] = low_expert_forward(x[tok], self.low[key], self.store.expert(*key)).float()
            elif want == SKIP:
                s.skips += len(tok)
                keep[tok, slot] = False
            else:
                s.misses += len(tok)
                t0 = time.perf_counter()
                high = want == HIGH
                value = self._load_high(key) if high else self._load_low(key)
                s.add_time("copy", time.perf_counter() - t0)
                self._admit(key, high, value)
                self.cache.touch(key, high)
                y[tok, slot] = (value.forward(x[tok]) if high else
                                low_expert_forward(x[tok], value, self.store.expert(*key))).float()
        s.add_time("experts", time.perf_counter() - start)
        self.cache.release_layer(layer)
        if self.prefetch and t_count == 1:
            t0 = time.perf_counter()
            self._prefetch(layer, hidden, predicted)
            s.add_time("prefetch", time.perf_counter() - t0)
        gw = gate_weights.to(y.device) * keep  # skipped experts contribute nothing
        return combine(y, gw).to(hidden.dtype)

    def _predict(self, layer, hidden):
        return predict_experts(self.stacked, hidden, layer, self.n_layers, self.n_experts,
                               self.top_k, MAX_DEPTH)

    def _prefetch(self, layer, hidden, predicted=None) -> None:
        if predicted is None:
            predicted = self._predict(layer, hidden[-1:])
        if predicted.shape[1] == 0:
            return
        moe_layers = self.store.layers  # a dense layer has nothing to fetch
        targets = adaptive_targets(predicted[-1].cpu().numpy(), layer, self.n_layers,
                                   lambda k: k[0] not in moe_layers or k in self.high or k in self.low)
        self.stream.follow()  # evicted entries may still be read by queued compute
        with self.stream.context():
            for key in targets:
                self._admit(key, False, self._load_low(key), protect=True)
                if key in self.low:
                    self.pending[key] = self.stream.record()

    def close(self) -> None:
        self.high.clear()
        self.low.clear()
