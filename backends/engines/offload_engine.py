"""What both offload engines add to the torch engine: an expert backend installed after
the model loads (it needs the model's expert store), a VRAM budget, per-reply stats in
every Event, and the reply as the sequence HOBBIT's counters reset on."""

from __future__ import annotations

import dataclasses
import threading
from typing import Iterator

from moechat.backends.engines.engine import Message, Sampling
from moechat.backends.engines.events import Event
from moechat.backends.model.model_card import ModelCard
from moechat.backends.engines.torch_engine import TorchEngine

CPU_STAND_IN_SHARE = 0.5  # without a GPU: "VRAM" holds half the experts, so both paths run
VRAM_RESERVE = 512 * 1024**2  # CUDA context, activations, allocator slack


class _Deferred:
    """Stands in as the expert backend while the model loads (the real one needs the
    model's expert store); never called."""

    def moe_forward(self, *args):
        raise RuntimeError("expert backend not installed")


def all_expert_bytes(store) -> int:
    return sum(store.expert(l, 0).nbytes for l in store.layers) * store.n_experts


def default_vram_budget(model, devices, expert_bytes: int) -> int:
    """What the planner leaves free: free VRAM after the dense weights (already loaded),
    the KV cache and a reserve; without CUDA, a fixed share of the experts."""
    import torch

    if not devices.has_cuda:
        return int(CPU_STAND_IN_SHARE * expert_bytes)
    free, _ = torch.cuda.mem_get_info(devices.gpu)
    return max(0, free - VRAM_RESERVE - gpu_workspace_bytes(model))


def gpu_workspace_bytes(model) -> int:
    """Transient GPU memory a forward step needs on top of the cached experts: a missed
    expert dequantized whole (twice: the staged one and the next), and a prefill chunk's
    attention scores and probabilities in float32 (three [H, chunk, n_ctx] tensors)."""
    from moechat.backends.engines.torch_engine import PREFILL_CHUNK

    a, store = model.args, model.experts
    expert = store.expert(store.layers[0], 0)
    params = sum(t.shape[0] * t.shape[1] for t in (expert.gate, expert.up, expert.down))
    scores = 3 * a.n_heads * PREFILL_CHUNK * model.max_tokens * 4
    return 2 * params * model.dtype.itemsize + scores


class OffloadEngine(TorchEngine):
    """What both offload engines add to the torch engine: a deferred expert backend, per-
    reply stats in every Event, and a sequence start per reply."""

    backend = None

    def __init__(self, card: ModelCard, n_ctx=None, threads=None, device=None, ui: bool = False):
        from moechat.backends.offload.devices import pick_devices

        self.devices = pick_devices(device)
        super().__init__(card, n_ctx=n_ctx, threads=threads, device=self.devices.gpu.type,
                         expert_backend=_Deferred(), ui=ui)

    def forward(self, tokens, start, all_logits=False):
        self.backend.stats.tokens += len(tokens)
        if hasattr(self.backend, "position"):
            self.backend.position = start
        return super().forward(tokens, start, all_logits)

    def begin_reply(self) -> None:
        self.backend.stats.reset()

    def kv_variant(self) -> str:
        return self.placement  # which experts run in which precision changes the keys and values

    def event_stats(self) -> dict:
        raise NotImplementedError

    def generate(self, messages: list[Message], sampling: Sampling,
                 cancel: threading.Event | None = None) -> Iterator[Event]:
        self.begin_reply()
        for event in super().generate(messages, sampling, cancel):
            stats = {**event.stats, **self.event_stats()}
            yield dataclasses.replace(event, stats=stats, vram_bytes=self.vram_bytes())

    def vram_bytes(self) -> int:
        import torch

        return torch.cuda.memory_allocated(self.devices.gpu) if self.devices.has_cuda else 0

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        super().close()
