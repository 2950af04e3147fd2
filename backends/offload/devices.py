"""Where expert weights live and how they move: devices, pinned memory, copy streams,
a GPU staging buffer and a CPU worker thread — each degrading to plain CPU without CUDA.

Without a GPU, the "gpu" device is the CPU: copies are real memcpys into the staging
buffer, streams and events are no-ops, and the worker thread still overlaps CPU experts
with the "GPU" side (both on CPU cores, so slower, but the same code path and numbers).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True, slots=True)
class Devices:
    gpu: torch.device  # where resident experts and dense weights compute ("cpu" stand-in)
    cpu: torch.device

    @property
    def has_cuda(self) -> bool:
        return self.gpu.type == "cuda"


def pick_devices(gpu: str | None = None) -> Devices:
    """CUDA when present (or asked for), else the CPU standing in for the GPU."""
    if gpu is None:
        gpu = "cuda" if torch.cuda.is_available() else "cpu"
    return Devices(gpu=torch.device(gpu), cpu=torch.device("cpu"))


def pin(tensor: torch.Tensor, devices: Devices) -> torch.Tensor:
    """Page-locked copy for async host->device copies; unchanged without CUDA."""
    if devices.has_cuda and not tensor.is_pinned():
        return tensor.pin_memory()
    return tensor


class CopyStream:
    """A side stream for weight copies, so they overlap compute; a no-op on CPU."""

    def __init__(self, devices: Devices):
        self.stream = torch.cuda.Stream(devices.gpu) if devices.has_cuda else None

    def context(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def record(self):
        """An event marking 'everything queued so far on this stream' (None on CPU)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def wait(self, event) -> None:
        """Make the compute stream (this stream's device's current one) wait for `event` —
        no host-side spin."""
        if event is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(event)

    def follow(self) -> None:
        """Make this stream wait for everything queued on the compute stream so far. Call
        before allocating on this stream: a cache entry freed just before may be reused at
        once by the allocator while queued compute still reads it."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))


class StagingBuffer:
    """One preallocated device buffer that a missed expert's weights are copied into, fed
    through one pinned host buffer of the same size (with CUDA) so the copy runs at full
    PCIe speed without pinning the memory-mapped file.

    `load` copies host tensors into consecutive slices and returns device views of the same
    dtypes and shapes. The views are only valid until the next `load`, so one expert is
    staged at a time (the caller computes it first). `upload` makes fresh device tensors
    (for a cache) through the same pinned buffer."""

    def __init__(self, nbytes: int, devices: Devices):
        self.devices = devices
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=devices.gpu)
        self.host = torch.empty(nbytes, dtype=torch.uint8).pin_memory() if devices.has_cuda else None

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def _slices(self, parts: list[torch.Tensor]):
        offset = 0
        for part in parts:
            n = part.numel() * part.element_size()
            offset = (offset + 255) // 256 * 256  # keep each slice aligned
            if offset + n > self.nbytes:
                raise ValueError(f"staging buffer of {self.nbytes} bytes is too small")
            yield part, offset, n
            offset += n

    def load(self, parts: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        """Copy `parts` (host tensors) in; returns (device views, bytes copied)."""
        views, total = [], 0
        if self.host is not None:
            torch.cuda.current_stream(self.devices.gpu).synchronize()  # the last copy is done with `host`
        for part, offset, n in self._slices(parts):
            dst = self.buffer[offset : offset + n].view(part.dtype).view(part.shape)
            if self.host is None:
                dst.copy_(part)
            else:
                src = self.host[offset : offset + n].view(part.dtype).view(part.shape)
                src.copy_(part)  # pageable (the mapped file) -> pinned
                dst.copy_(src, non_blocking=True)  # pinned -> device, async
            views.append(dst)
            total += n
        return views, total

    def upload(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Fresh device copies of `parts` (kept by the caller)."""
        if self.host is None:
            return [p.clone() for p in parts]
        views, _ = self.load(parts)
        return [v.clone() for v in views]


class CpuWorker:
    """One background thread for CPU experts; callers block on the Future (no spinning)."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moechat-cpu-experts")

    def submit(self, fn: Callable, *args) -> Future:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
