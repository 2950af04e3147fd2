"""Groupwise low-bit copies of expert weights (HOBBIT's low precision) and the torch
kernel that computes from them.

Each row is cut into groups of G input columns; a group stores b-bit codes q and an fp16
scale s and minimum m (asymmetric min-max), so w ≈ m + s·q. int4 with G = 32 costs
4 + 32/32 = 5 bits per weight (3.2× fewer bytes than F16); int2 costs 3 bits. Codes are
packed little-end first, 8/b per byte. Axes: O output rows, I input columns, T tokens.

The kernel dequantizes the packed copy on the device it lives on and multiplies; on a GPU
that is a few elementwise kernels plus one GEMM (memory traffic: the packed bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32


@dataclass(slots=True)
class LowBitWeight:
    codes: torch.Tensor  # [O, I·b/8] uint8, packed
    scale: torch.Tensor  # [O, I/G] float16
    minimum: torch.Tensor  # [O, I/G] float16
    bits: int
    shape: tuple[int, int]  # (O, I)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.minimum))

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale, self.minimum]

    def with_tensors(self, tensors: list[torch.Tensor]) -> "LowBitWeight":
        return LowBitWeight(tensors[0], tensors[1], tensors[2], self.bits, self.shape)

    def to(self, device) -> "LowBitWeight":
        return self.with_tensors([t.to(device, non_blocking=True) for t in self.tensors()])


def quantize_groupwise(w: torch.Tensor, bits: int, group: int = GROUP) -> LowBitWeight:
    """w [O, I] float -> packed b-bit groupwise copy (bits 2, 4 or 8)."""
    assert bits in (2, 4, 8)
    out_dim, in_dim = w.shape
    assert in_dim % group == 0, f"input dim {in_dim} is not a multiple of group {group}"
    g = w.float().reshape(out_dim, in_dim // group, group)  # [O, I/G, G]
    lo, hi = g.amin(-1), g.amax(-1)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    scale16, lo16 = scale.half(), lo.half()  # quantize against the stored fp16 values
    q = ((g - lo16.float()[..., None]) / scale16.float()[..., None]).round().clamp(0, levels)
    codes = _pack(q.to(torch.uint8).reshape(out_dim, in_dim), bits)
    return LowBitWeight(codes, scale16, lo16, bits, (out_dim, in_dim))


def dequantize_groupwise(lw: LowBitWeight, dtype=torch.float32) -> torch.Tensor:
    """-> [O, I] in `dtype`, on the device the copy lives on."""
    out_dim, in_dim = lw.shape
    q = _unpack(lw.codes, lw.bits, in_dim).to(dtype)  # [O, I]
    q = q.view(out_dim, lw.scale.shape[1], -1)  # [O, I/G, G]
    w = lw.minimum.to(dtype)[..., None] + lw.scale.to(dtype)[..., None] * q
    return w.view(out_dim, in_dim)


def lowbit_linear(x: torch.Tensor, lw: LowBitWeight) -> torch.Tensor:
    """x [T, I] -> [T, O]."""
    return x @ dequantize_groupwise(lw, x.dtype).T


def lowbit_expert(x: torch.Tensor, gate: LowBitWeight, up: LowBitWeight, down: LowBitWeight
                  ) -> torch.Tensor:
    """SwiGLU expert from low-bit weights: x [T, D] -> [T, D]."""
    return lowbit_linear(torch.nn.functional.silu(lowbit_linear(x, gate)) * lowbit_linear(x, up), down)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    q = q.view(q.shape[0], -1, per)  # [O, I/per, per]
    out = torch.zeros(q.shape[:2], dtype=torch.uint8, device=q.device)
    for i in range(per):
        out |= q[..., i] << (bits * i)
    return out


def _unpack(codes: torch.Tensor, bits: int, in_dim: int) -> torch.Tensor:
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(codes >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).view(codes.shape[0], in_dim)
