"""Record routing while a model runs: an ExpertBackend wrapper that logs every layer's
expert ids and gate weights (and the stacked-router guesses for the next layers) into a
TraceRecorder, then delegates to the wrapped backend."""

from __future__ import annotations

import torch

from moechat.backends.offload.prefetch import MAX_DEPTH, predict_experts, stack_routers
from moechat.backends.offload.trace import TraceRecorder


class RecordingExperts:
    def __init__(self, inner, routers: list[torch.Tensor], n_experts: int, top_k: int,
                 depth: int = MAX_DEPTH, model: str = ""):
        self.inner, self.n_experts, self.top_k, self.depth = inner, n_experts, top_k, depth
        self.n_layers = len(routers)
        self.stacked = stack_routers(routers)
        self.recorder = TraceRecorder(self.n_layers, n_experts, depth, model)

    def moe_forward(self, layer, hidden, expert_ids, gate_weights):
        guess = predict_experts(self.stacked, hidden, layer, self.n_layers, self.n_experts,
                                self.top_k, self.depth)  # [T, P, A]
        self.recorder.record(layer, expert_ids, gate_weights, guess)
        return self.inner.moe_forward(layer, hidden, expert_ids, gate_weights)
