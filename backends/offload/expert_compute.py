"""Computing one routed expert from where it lives — shared by both engines.

"GPU side": the expert's raw GGUF bytes (or its low-bit copy) on the compute device,
dequantized there per call and multiplied (memory traffic ~ the stored bytes). Without a
GPU the CPU stands in for it, and a "resident" expert's bytes are computed with ggml's
expert kernel instead (`GgmlExpert`: the torch runtime's CPU path, which rounds the
activations to Q8 as llama.cpp does), so the CPU stand-in gives llama.cpp's output, not
that of float32 products on dequantized weights.
"CPU side": ggml's kernels on the memory-mapped quantized bytes (the runtime's fast CPU path).
Axes: T tokens, D model dim, I expert FFN dim, A active experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moechat.backends.runtime.experts import gated_ffn
from moechat.kernels import dequant
from moechat.kernels.ggml import GGML_TYPE_F32, CpuBackend, QuantWeight, aligned_empty, maybe_repack
from moechat.kernels.ggml_ops import QuantExperts
from moechat.kernels.lowbit import LowBitWeight, lowbit_linear


@dataclass(slots=True)
class DeviceExpert:
    """An expert's quantized bytes on the compute device: gate [I, D], up [I, D], down [D, I]."""

    raw: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # uint8 (or float for F16/F32 files)
    types: tuple[str, str, str]
    shapes: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    activation: str = "swiglu"
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # float32 [I], [I], [D] (gpt-oss)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.raw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D] in x's dtype."""
        gate, up, down = (_weight(r, ty, sh, x.dtype) for r, ty, sh in zip(self.raw, self.types, self.shapes))
        return gated_ffn(x, gate, up, down, self.activation, self.bias)


FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _weight(raw: torch.Tensor, type_name: str, shape, dtype) -> torch.Tensor:
    """Dequantize on raw's device; float files are a reinterpretation plus a cast."""
    if type_name in FLOAT_TYPES:
        return raw.contiguous().view(torch.uint8).view(FLOAT_TYPES[type_name]).view(shape).to(dtype)
    return dequant.dequantize(raw, type_name, shape, dtype=dtype)


def host_parts(weights) -> list[torch.Tensor]:
    """The runtime's ExpertWeights (numpy views on the map) as host torch tensors (no copy)."""
    return [torch.from_numpy(np.ascontiguousarray(t.data)) for t in (weights.gate, weights.up, weights.down)]


class GgmlExpert:
    """An expert's bytes on the CPU standing in for the GPU, computed with ggml's expert
    kernel (QuantExperts over a stack of one expert; Q4_0/MXFP4 repacked as the runtime
    repacks them): the numerics of the torch runtime's GgmlExperts and of llama.cpp."""

    def __init__(self, weights, parts: list[torch.Tensor], cpu: CpuBackend):
        ws = (weights.gate, weights.up, weights.down)
        self.nbytes = sum(p.numel() * p.element_size() for p in parts)
        self.parts = list(parts)  # the bytes ggml reads (unless repacked below)
        stack = []
        for part, w in zip(self.parts, ws):
            rows, cols = w.shape  # torch order: (out, in)
            stack.append(maybe_repack(QuantWeight(part.numpy(), w.ggml_type, (cols, rows, 1))))
        if not any(isinstance(q, QuantWeight) for q in stack):
            self.parts = []  # every projection was copied into ggml's repacked layout
        biases = None
        if weights.bias is not None:  # float32 [I], [I], [D] -> F32 (N, 1), 32-byte aligned
            biases = []
            for b in weights.bias:
                held = aligned_empty(b.numel() * 4, np.float32)
                held[:] = b.detach().float().cpu().numpy()
                biases.append(QuantWeight(held, GGML_TYPE_F32, (b.numel(), 1)))
        self.kernel = QuantExperts(*stack, cpu, biases=biases, activation=weights.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] float32 on the CPU -> [T, D] float32."""
        x_np = np.ascontiguousarray(x.detach().float().numpy())
        y = self.kernel(x_np, np.zeros((x_np.shape[0], 1), dtype=np.int32))  # [T, 1, D]
        return torch.from_numpy(y[:, 0])

    def close(self) -> None:
        self.kernel.close()


def device_expert(weights, parts: list[torch.Tensor], cpu: CpuBackend | None = None):
    """Wrap device tensors holding `weights`' bytes (from a copy or the staging buffer):
    on the CPU, given ggml's CPU backend, a GgmlExpert; else a DeviceExpert (dequantize +
    matmul, a GPU's path). A GgmlExpert made from staging views must be computed before the
    next staging load (it reads them in place), as a DeviceExpert must."""
    if cpu is not None and parts[0].device.type == "cpu":
        return GgmlExpert(weights, parts, cpu)
    ws = (weights.gate, weights.up, weights.down)
    bias = None if weights.bias is None else tuple(b.to(parts[0].device) for b in weights.bias)
    return DeviceExpert(tuple(parts), tuple(w.type_name for w in ws), tuple(w.shape for w in ws),
                        weights.activation, bias)


def low_expert_forward(x: torch.Tensor, low: tuple[LowBitWeight, LowBitWeight, LowBitWeight],
                       weights=None) -> torch.Tensor:
    """The low-bit copy of an expert; `weights` (the runtime's ExpertWeights of the same
    expert) brings its activation and biases — the biases stay full precision (tiny)."""
    activation, bias = ("swiglu", None) if weights is None else (weights.activation, weights.bias)
    if bias is not None:
        bias = tuple(b.to(x.device) for b in bias)
    return gated_ffn(x, *low, activation, bias, linear=lowbit_linear)


def combine(per_slot: torch.Tensor, gate_weights: torch.Tensor) -> torch.Tensor:
    """per_slot [T, A, D] expert outputs, gate_weights [T, A] -> [T, D], summed in slot
    order like llama.cpp (so the result matches the runtime's bit for bit where the
    expert outputs do)."""
    out = per_slot[:, 0] * gate_weights[:, :1]
    for a in range(1, per_slot.shape[1]):
        out = out + per_slot[:, a] * gate_weights[:, a : a + 1]
    return out


def token_groups(expert_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """expert_ids [T, A] -> {expert: (token indices, slot indices)} in ascending expert order."""
    groups = {}
    for e in torch.unique(expert_ids).tolist():
        tok, slot = torch.nonzero(expert_ids == e, as_tuple=True)
        groups[e] = (tok, slot)
    return groups
