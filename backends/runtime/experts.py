"""The expert path: routing, the pluggable ExpertBackend, per-expert weight access.

The MoE layer of each architecture computes routing itself (router logits -> top-k expert
ids and gate weights with that architecture's normalisation) and hands the routed experts
to an `ExpertBackend`; shared experts stay in the model file. An engine that wants to place
experts (Fiddler: popular experts on the GPU, the rest on the CPU; HOBBIT: a GPU expert
cache with low-precision fills) implements `moe_forward` and sees, for every layer and
token, the gate input, the expert ids and the gate weights.

Axis legend: T tokens, D model dim, E experts, A active experts per token, I expert FFN dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from moechat.backends.runtime.gguf_weights import GGUFWeights, RawTensor
from moechat.kernels import dequant
from moechat.kernels.ggml import CpuBackend, maybe_repack
from moechat.kernels.ggml_ops import QuantExperts

PROJECTIONS = ("gate", "up", "down")


class ExpertBackend(Protocol):
    def moe_forward(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                    gate_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, D] (the gate input), expert_ids [T, A] int64, gate_weights [T, A] float32
        -> sum over a of gate_weights[t, a] * expert_{ids[t, a]}(hidden[t])   [T, D]"""
        ...


# ---- routing ----------------------------------------------------------------------------


def route(router_logits: torch.Tensor, n_used: int, norm_topk: bool, scale: float = 0.0):
    """llama.cpp's build_moe_ffn gating (softmax): logits [T, E] -> (ids [T, A], weights [T, A])."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    gate_weights, expert_ids = torch.topk(probs, n_used, dim=-1)  # [T, A]
    if norm_topk:
        gate_weights = gate_weights / gate_weights.sum(-1, keepdim=True)
    if scale and scale != 1.0:
        gate_weights = gate_weights * scale
    return expert_ids, gate_weights


# ---- per-expert weights -----------------------------------------------------------------


@dataclass(frozen=True)
class ExpertTensor:
    """One projection of one expert, as quantized bytes in the GGUF."""

    data: np.ndarray  # [rows, row_bytes] uint8 view on the memory map (or float values)
    type_name: str
    ggml_type: int
    shape: tuple[int, int]  # torch order: (out_features, in_features)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def to_torch(self, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return dequant.dequantize(self.data, self.type_name, self.shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class ExpertWeights:
    gate: ExpertTensor  # [I, D]
    up: ExpertTensor  # [I, D]
    down: ExpertTensor  # [D, I]

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes


class ExpertStore:
    """Every routed expert of every layer, addressable as (layer, expert), read in place."""

    def __init__(self, weights: GGUFWeights, n_layers: int, n_experts: int):
        self.weights, self.n_experts = weights, n_experts
        self.layers = tuple(l for l in range(n_layers) if f"blk.{l}.ffn_gate_exps.weight" in weights)

    def stacked(self, layer: int) -> tuple[RawTensor, RawTensor, RawTensor]:
        """The 3-D (ggml shape (in, out, E)) gate, up and down tensors of one layer."""
        return tuple(self.weights.raw(f"blk.{layer}.ffn_{p}_exps.weight") for p in PROJECTIONS)

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        if not 0 <= expert < self.n_experts:
            raise IndexError(f"expert {expert} of {self.n_experts}")
        parts = []
        for t in self.stacked(layer):
            cols, rows, _ = t.shape
            parts.append(ExpertTensor(t.data[expert], t.type_name, t.ggml_type, (rows, cols)))
        return ExpertWeights(*parts)

    def dequantize(self, layer: int, expert: int, dtype=torch.float32, device="cpu"):
        """(gate [I, D], up [I, D], down [D, I]) of one expert as torch tensors."""
        w = self.expert(layer, expert)
        return tuple(t.to_torch(dtype, device) for t in (w.gate, w.up, w.down))


# ---- default backends -------------------------------------------------------------------


class GgmlExperts:
    """Every routed expert on the CPU with ggml's kernels on the GGUF's quantized bytes
    (ggml_mul_mat_id: only the selected experts' rows are read). The measured-fastest CPU
    route, and llama.cpp's own numerics. Q4_0 experts are repacked into ggml's interleaved
    layout at load (1.5x faster GEMV here) and their mapped pages released, so RSS stays
    one copy of the experts."""

    def __init__(self, store: ExpertStore, cpu: CpuBackend):
        self.store = store
        self.layers = {}
        for l in store.layers:
            weights = []
            for t in store.stacked(l):
                mapped = t.quant_weight()
                w = maybe_repack(mapped)
                if w is not mapped:
                    store.weights.release(t.name)  # the repacked copy replaces the mapped pages
                weights.append(w)
            self.layers[l] = QuantExperts(*weights, cpu)

    def moe_forward(self, layer, hidden, expert_ids, gate_weights):
        # weighting and the in-order sum over the active experts run in the same ggml graph,
        # as in llama.cpp; the CPU path's float32 CPU tensors pass through without a copy
        # (a GPU model's activations — the Fiddler engine's calibration — come and go back)
        x = hidden.float().cpu().numpy()
        y = self.layers[layer](x, expert_ids.cpu().numpy(), gate_weights.float().cpu().numpy())
        return torch.from_numpy(y).to(hidden.device, hidden.dtype)  # [T, D]

    def close(self):
        for q in self.layers.values():
            q.close()


class TorchExperts:
    """Every routed expert dequantized once into `dtype` on `device` (a GPU when the experts
    fit there; also runs on the CPU, slowly). Per-expert weights: gate/up [E, I, D], down [E, D, I]."""

    def __init__(self, store: ExpertStore, device="cpu", dtype=torch.float32, layers=None):
        self.store, self.device, self.dtype = store, device, dtype
        self.w = {}
        for l in store.layers if layers is None else layers:
            self.w[l] = tuple(t.to_torch(dtype, device) for t in store.stacked(l))  # [E, out, in]

    def moe_forward(self, layer, hidden, expert_ids, gate_weights):
        gate, up, down = self.w[layer]
        x = hidden.to(self.dtype)
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        ids = expert_ids.to(hidden.device)
        gw = gate_weights.to(hidden.device)
        for e in torch.unique(ids).tolist():  # each expert once, on the tokens routed to it
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            h = F.silu(x[tok] @ gate[e].T) * (x[tok] @ up[e].T)  # [t, I]
            y = (h @ down[e].T).float()  # [t, D]
            out.index_add_(0, tok, y * gw[tok, slot, None])
        return out.to(hidden.dtype)


class TracingExperts:
    """Wraps a backend and records each call's (layer, expert_ids, gate_weights): the routing
    an engine sees (used by tests and by cache-policy experiments on traces)."""

    def __init__(self, inner: ExpertBackend):
        self.inner, self.trace = inner, []

    def moe_forward(self, layer, hidden, expert_ids, gate_weights):
        self.trace.append((layer, expert_ids.clone(), gate_weights.clone()))
        return self.inner.moe_forward(layer, hidden, expert_ids, gate_weights)
