"""The Fiddler-style ExpertBackend: popular experts resident on the GPU, the rest in RAM;
each missed expert runs where the cost model says is faster for its token count.

Per layer: resident experts compute on the GPU; missed experts are split into CPU work
(ggml on the mapped quantized bytes, on a worker thread, overlapping the GPU work) and
copies (weights into the staging buffer, then computed on the GPU). Results are combined
in gate-weight slot order. Axes: T tokens, D model dim, A active experts.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from moechat.backends.offload.devices import CpuWorker, Devices, StagingBuffer, pin
from moechat.backends.offload.expert_compute import (
    DeviceExpert, GgmlExpert, combine, device_expert, host_parts, token_groups,
)
from moechat.backends.offload.fiddler_policy import ExpertShape, OnlineCostModel
from moechat.backends.offload.stats import OffloadStats
from moechat.backends.offload.trace import TraceRecorder


class FiddlerExperts:
    def __init__(self, store, cpu_layers: dict, devices: Devices, placement: frozenset,
                 cost_model: OnlineCostModel, dtype: torch.dtype, force: dict | None = None):
        """store: the runtime's ExpertStore; cpu_layers: {layer: ggml QuantExperts};
        force: {(layer, expert): "cpu" | "copy"} overrides the decision (tests)."""
        self.store, self.cpu_layers, self.devices, self.dtype = store, cpu_layers, devices, dtype
        self.model, self.force = cost_model, force or {}
        self.stats = OffloadStats()
        self.recorder: TraceRecorder | None = None
        self.worker = CpuWorker()
        # without a GPU, "resident" experts run ggml's kernel on the CPU backend the CPU
        # experts use (expert_compute.GgmlExpert): the same numbers as the CPU side
        self.cpu = next(iter(cpu_layers.values())).backend if cpu_layers else None
        self.resident: dict[tuple[int, int], DeviceExpert | GgmlExpert] = {}
        for layer, expert in sorted(placement):
            w = store.expert(layer, expert)
            parts = [p.to(devices.gpu) if devices.has_cuda else p.clone() for p in host_parts(w)]
            self.resident[(layer, expert)] = device_expert(w, parts, self.cpu)
        biggest = max(store.expert(l, 0).nbytes for l in store.layers)
        self.staging = StagingBuffer(biggest + 4 * 256, devices)
        self.shapes = {l: _shape(store, l) for l in store.layers}

    @property
    def resident_bytes(self) -> int:
        return sum(e.nbytes for e in self.resident.values())

    def moe_forward(self, layer, hidden, expert_ids, gate_weights):
        t_count, n_used = expert_ids.shape
        if self.recorder is not None:
            self.recorder.record(layer, expert_ids, gate_weights)
        groups = token_groups(expert_ids)
        shape = self.shapes[layer]
        on_gpu, to_cpu, to_copy = [], [], []
        for e, (tok, slot) in groups.items():
            if (layer, e) in self.resident:
                on_gpu.append(e)
            else:
                path = self.force.get((layer, e)) or self.model.choose(shape, len(tok))
                (to_cpu if path == "cpu" else to_copy).append(e)
        s = self.stats
        s.expert_calls += t_count * n_used
        s.gpu_hits += sum(len(groups[e][0]) for e in on_gpu)
        s.experts_on_cpu += len(to_cpu)
        s.experts_copied += len(to_copy)

        y = torch.zeros(t_count, n_used, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        future = None
        if to_cpu:  # starts now, runs while the GPU side below computes
            x_host = hidden.detach().float().cpu().numpy()
            future = self.worker.submit(self._cpu_experts, layer, x_host,
                                        {e: groups[e][0].cpu().numpy() for e in to_cpu})
        x = hidden.to(self.dtype)
        start = time.perf_counter()
        for e in on_gpu:
            tok, slot = groups[e]
            y[tok, slot] = self.resident[(layer, e)].forward(x[tok]).float()
        self._sync()  # the resident experts' work is done: neither copy times nor "gpu" miss it
        gpu_done = time.perf_counter()
        for e in to_copy:
            tok, slot = groups[e]
            t0 = time.perf_counter()
            w = self.store.expert(layer, e)
            parts, moved = self.staging.load(host_parts(w))
            y[tok, slot] = device_expert(w, parts, self.cpu).forward(x[tok]).float()
            s.bytes_copied += w.nbytes
            self._sync()
            self.model.observe("copy", shape, len(tok), time.perf_counter() - t0)
        copy_done = time.perf_counter()
        s.add_time("gpu", gpu_done - start)
        s.add_time("copy", copy_done - gpu_done)
        if future is not None:
            wait_start = time.perf_counter()
            results, cpu_seconds = future.result()  # blocks on the worker: no spinning
            s.add_time("cpu", cpu_seconds)
            s.add_time("cpu_wait", time.perf_counter() - wait_start)
            for e, out in results.items():
                tok, slot = groups[e]
                y[tok, slot] = out.to(y.device)
        return combine(y, gate_weights.to(y.device)).to(hidden.dtype)

    def _cpu_experts(self, layer: int, x: np.ndarray, tokens: dict[int, np.ndarray]):
        """On the worker thread: each CPU expert on its tokens with ggml's kernel.
        Returns ({expert: [t, D] float32 tensor}, seconds)."""
        start = time.perf_counter()
        kernel = self.cpu_layers[layer]
        out = {}
        experts = list(tokens)
        if x.shape[0] == 1 and len(experts) > 1:  # decode: all of this token's CPU experts in one call
            y = kernel(x, np.asarray([experts], dtype=np.int32))  # [1, k, D]
            out = {e: torch.from_numpy(y[:, i].copy()) for i, e in enumerate(experts)}
        else:
            for e, tok in tokens.items():
                y = kernel(x[tok], np.full((len(tok), 1), e, dtype=np.int32))  # [t, 1, D]
                out[e] = torch.from_numpy(y[:, 0].copy())
        seconds = time.perf_counter() - start
        shape = self.shapes[layer]
        for e, tok in tokens.items():
            self.model.observe("cpu", shape, len(tok), seconds / len(tokens))
        return out, seconds

    def _sync(self) -> None:
        if self.devices.has_cuda:
            torch.cuda.synchronize(self.devices.gpu)

    def close(self) -> None:
        self.worker.close()
        for e in self.resident.values():
            if isinstance(e, GgmlExpert):
                e.close()
        self.resident.clear()


def _shape(store, layer: int) -> ExpertShape:
    w = store.expert(layer, 0)
    rows, cols = w.gate.shape  # [I, D]
    return ExpertShape(weight_bytes=w.nbytes, params=3 * rows * cols, hidden=cols)


def measure_costs(store, cpu_layers: dict, devices, dtype, repeats: int = 3):
    """A start-up microbenchmark on one real expert (replaces Fiddler's hard-coded 7 vs 70):
    the CPU kernel at 1 and 32 tokens, the GPU-side compute at 1 and 32 tokens, and one
    host->device copy. The online model refines these as the engine runs."""
    from moechat.backends.offload.fiddler_policy import OffloadCosts

    layer = store.layers[0]
    w = store.expert(layer, 0)
    shape = _shape(store, layer)
    parts = [p.to(devices.gpu) if devices.has_cuda else p.clone() for p in host_parts(w)]
    kernel = cpu_layers[layer]
    resident = device_expert(w, parts, kernel.backend)

    def best(fn):
        fn()  # warm-up (graph build, allocation)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            if devices.has_cuda:
                torch.cuda.synchronize(devices.gpu)
            times.append(time.perf_counter() - t0)
        return max(min(times), 1e-7)

    x1 = np.random.default_rng(0).standard_normal((1, shape.hidden)).astype(np.float32)
    x32 = np.repeat(x1, 32, axis=0)
    cpu1 = best(lambda: kernel(x1, np.zeros((1, 1), np.int32)))
    cpu32 = best(lambda: kernel(x32, np.zeros((32, 1), np.int32)))
    g1, g32 = (torch.from_numpy(x).to(devices.gpu, dtype) for x in (x1, x32))
    gpu1 = best(lambda: resident.forward(g1))
    gpu32 = best(lambda: resident.forward(g32))
    host = [pin(p, devices) for p in host_parts(w)]
    copy = best(lambda: [p.to(devices.gpu, non_blocking=True) if devices.has_cuda else p.clone() for p in host])
    vram = torch.cuda.get_device_properties(devices.gpu).total_memory if devices.has_cuda else 0
    gb = 1e9
    return OffloadCosts(
        cpu_matvec_gbs=shape.weight_bytes / cpu1 / gb,
        cpu_gflops=32 * shape.flops_per_token / cpu32 / 1e9,
        gpu_gbs=shape.weight_bytes / gpu1 / gb,
        gpu_gflops=32 * shape.flops_per_token / gpu32 / 1e9,
        pcie_gbs=shape.weight_bytes / copy / gb,
        vram_bytes=vram, cpu_call_s=0.0, gpu_call_s=0.0,
        name=f"measured at start-up on expert ({layer}, 0)")
