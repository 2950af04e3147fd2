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

from moechat.backends.runtime.gguf_weights import GGUFWeights, RawTensor
from moechat.backends.runtime.layers import glu
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


def route_softmax_selected(router_logits: torch.Tensor, n_used: int):
    """gpt-oss's gating (llama.cpp's SOFTMAX_WEIGHT): top-A of the raw logits, then the
    softmax over just those A: logits [T, E] -> (ids [T, A], weights [T, A])."""
    top_logits, expert_ids = torch.topk(router_logits.float(), n_used, dim=-1)  # [T, A]
    return expert_ids, torch.softmax(top_logits, dim=-1)


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
    activation: str = "swiglu"  # between the products: layers.glu's name
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # [I], [I], [D] (gpt-oss)

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes


def gated_ffn(x: torch.Tensor, gate, up, down, activation: str = "swiglu", bias=None,
              linear=lambda x, w: x @ w.T) -> torch.Tensor:
    """One expert: down(act(gate(x) + b_g, up(x) + b_u)) + b_d, x [T, D] -> [T, D]; `linear`
    applies a weight as it is held (a dense [N, D] matrix by default, or a low-bit copy).
    The biases are float32 [I], [I], [D] on x's device, or None."""
    g, u = linear(x, gate), linear(x, up)  # [T, I]
    if bias is not None:
        g, u = g + bias[0].to(g.dtype), u + bias[1].to(u.dtype)
    y = linear(glu(activation, g, u), down)  # [T, D]
    return y if bias is None else y + bias[2].to(y.dtype)


class ExpertStore:
    """Every routed expert of every layer, addressable as (layer, expert), read in place."""

    def __init__(self, weights: GGUFWeights, n_layers: int, n_experts: int, activation: str = "swiglu"):
        self.weights, self.n_experts, self.activation = weights, n_experts, activation
        self.layers = tuple(l for l in range(n_layers) if f"blk.{l}.ffn_gate_exps.weight" in weights)
        self._bias: dict[int, tuple | None] = {}

    def stacked(self, layer: int) -> tuple[RawTensor, RawTensor, RawTensor]:
        """The 3-D (ggml shape (in, out, E)) gate, up and down tensors of one layer."""
        return tuple(self.weights.raw(f"blk.{layer}.ffn_{p}_exps.weight") for p in PROJECTIONS)

    def stacked_biases(self, layer: int) -> tuple[RawTensor, RawTensor, RawTensor] | None:
        """The F32 (ggml shape (out, E)) per-expert biases of one layer, or None (no biases)."""
        names = [f"blk.{layer}.ffn_{p}_exps.bias" for p in PROJECTIONS]
        return tuple(self.weights.raw(n) for n in names) if all(n in self.weights for n in names) else None

    def biases(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Float32 [E, I], [E, I], [E, D] torch views of the per-expert biases (or None)."""
        if layer not in self._bias:
            raw = self.stacked_biases(layer)
            self._bias[layer] = None if raw is None else tuple(t.to_torch() for t in raw)
        return self._bias[layer]

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        if not 0 <= expert < self.n_experts:
            raise IndexError(f"expert {expert} of {self.n_experts}")
        parts = []
        for t in self.stacked(layer):
            cols, rows, _ = t.shape
            parts.append(ExpertTensor(t.data[expert], t.type_name, t.ggml_type, (rows, cols)))
        bias = self.biases(layer)
        return ExpertWeights(*parts, self.activation, None if bias is None else tuple(b[expert] for b in bias))

    def dequantize(self, layer: int, expert: int, dtype=torch.float32, device="cpu"):
        """(gate [I, D], up [I, D], down [D, I]) of one expert as torch tensors."""
        w = self.expert(layer, expert)
        return tuple(t.to_torch(dtype, device) for t in (w.gate, w.up, w.down))


# ---- default backends -------------------------------------------------------------------


class GgmlExperts:
    """Every routed expert on the CPU with ggml's kernels on the GGUF's quantized bytes
    (ggml_mul_mat_id: only the selected experts' rows are read). The measured-fastest CPU
    route, and llama.cpp's own numerics. Q4_0 and MXFP4 experts are repacked into ggml's interleaved
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
            biases = store.stacked_biases(l)
            biases = None if biases is None else tuple(b.quant_weight() for b in biases)
            self.layers[l] = QuantExperts(*weights, cpu, biases=biases, activation=store.activation)

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
        self.w, self.b = {}, {}
        for l in store.layers if layers is None else layers:
            self.w[l] = tuple(t.to_torch(dtype, device) for t in store.stacked(l))  # [E, out, in]
            bias = store.biases(l)
            self.b[l] = None if bias is None else tuple(b.to(device) for b in bias)  # [E, out] f32

    def moe_forward(self, layer, hidden, expert_ids, gate_weights):
        gate, up, down = self.w[layer]
        bias = self.b[layer]
        x = hidden.to(self.dtype)
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        ids = expert_ids.to(hidden.device)
        gw = gate_weights.to(hidden.device)
        for e in torch.unique(ids).tolist():  # each expert once, on the tokens routed to it
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            b = None if bias is None else tuple(p[e] for p in bias)
            y = gated_ffn(x[tok], gate[e], up[e], down[e], self.store.activation, b).float()  # [t, D]
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
