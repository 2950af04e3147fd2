"""Rotary position embedding as ggml computes it: one table builder for every RoPE the
runtime runs (plain, linear-scaled, per-frequency divided by `rope_freqs`, and YaRN, for
every architecture: gpt-oss, deepseek2, qwen3moe files with YaRN ...) and the rotation.

The tables follow ggml_rope_cache_init and rope_yarn (ggml-cpu), per position p and
rotated pair i of n dims:

    θ_extrap = p · base^(-2i/n) / ff_i        (the factor advanced by float32 products, as ggml)
    θ_interp = freq_scale · θ_extrap           (freq_scale = 1 / rope.scaling.factor)
    YaRN:    low, high = ggml_rope_yarn_corr_dims(n, n_ctx_orig, base, β_fast 32, β_slow 1)
             ramp_i    = 1 - clamp((i - low) / max(0.001, high - low), 0, 1)
             θ         = θ_interp · (1 - ramp_i) + θ_extrap · ramp_i          (ext_factor 1)
             mscale    = attn_factor · (1 + 0.1 ln(1 / freq_scale))
    else:    θ = θ_interp, mscale = attn_factor
    cos, sin = cos θ · mscale, sin θ · mscale

`attn_factor` is what llama.cpp hands ggml_rope_ext: 1 for gpt-oss and the llama-style
graphs; for deepseek2, the file's `rope.scaling.attn_factor` divided by that same
(1 + 0.1 ln(1/freq_scale)) (llama.cpp's yarn_attn_factor_adjust, `deepseek2_attn_factor`),
so its tables carry only the file's factor. DeepSeek's extra softmax scale (mscale² with
the yarn_log_multiplier) belongs to its attention (runtime/deepseek2.py).

Why by hand: the tables must round as ggml's do (float32 running product, its ramp) for
logit parity with llama.cpp; no library builds them that way.
Axis legend: T tokens, S positions, Dh head dim, Dr rotated dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class Yarn:
    """YaRN's parameters: the training context and the ramp's bounds (llama.cpp's defaults;
    its loader reads no key for the betas)."""

    orig_ctx: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0


def yarn_corr_dims(n_dims: int, yarn: Yarn, base: float) -> tuple[float, float]:
    """ggml_rope_yarn_corr_dims: the first and last rotated pair of the ramp."""
    def dim(n_rot: float) -> float:
        return n_dims * math.log(yarn.orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    return max(0.0, math.floor(dim(yarn.beta_fast))), min(n_dims - 1.0, math.ceil(dim(yarn.beta_slow)))


def yarn_ramp(n_dims: int, base: float, yarn: Yarn) -> np.ndarray:
    """rope_yarn_ramp per rotated pair, [n_dims/2] float32: 1 keeps the original angle,
    0 takes the interpolated one."""
    low, high = yarn_corr_dims(n_dims, yarn, base)
    y = (np.arange(n_dims // 2, dtype=np.float32) - np.float32(low)) / np.float32(max(0.001, high - low))
    return (1 - np.clip(y, 0, 1)).astype(np.float32)


def yarn_mscale(freq_scale: float) -> np.float32:
    """ggml's YaRN magnitude factor 1 + 0.1 ln(1 / freq_scale), in float32 as ggml computes it."""
    return np.float32(1.0) + np.float32(0.1) * np.float32(math.log(np.float32(1.0) / np.float32(freq_scale)))


def deepseek2_attn_factor(file_attn_factor: float, freq_scale: float) -> np.float32:
    """What llama.cpp passes ggml for deepseek2: the file's factor over yarn_mscale."""
    return np.float32(file_attn_factor) / yarn_mscale(freq_scale)


def rope_tables(n_dims: int, base: float, max_pos: int, freq_scale: float = 1.0,
                freq_factors: np.ndarray | None = None, yarn: Yarn | None = None,
                attn_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) [max_pos, n_dims/2] float32, mscale included (module docstring)."""
    half = n_dims // 2
    theta_scale = np.float32(base) ** np.float32(-2.0 / n_dims)
    theta = np.arange(max_pos, dtype=np.float32)  # [S]
    extrap = np.empty((max_pos, half), dtype=np.float32)  # [S, Dr/2]
    for i in range(half):  # float32 running product, as ggml_rope_cache_init
        extrap[:, i] = theta
        theta = theta * theta_scale
    if freq_factors is not None:
        extrap = extrap / freq_factors.astype(np.float32)[:half]
    interp = extrap * np.float32(freq_scale)
    mscale = np.float32(attn_factor)
    if yarn is not None:
        ramp = yarn_ramp(n_dims, base, yarn)  # [Dr/2]
        angles = interp * (1 - ramp) + extrap * ramp
        mscale = mscale * yarn_mscale(freq_scale)
    else:
        angles = interp
    angles = angles.astype(np.float64)
    return ((np.cos(angles) * mscale).astype(np.float32), (np.sin(angles) * mscale).astype(np.float32))


class Rope:
    """Rotates the first `rope_dims` of each head, in adjacent pairs (llama.cpp's NORM mode)
    or NEOX halves, by the tables of `rope_tables`; `scale` is freq_scale."""

    def __init__(self, head_dim: int, rope_dims: int, base: float, neox: bool, max_pos: int,
                 scale: float = 1.0, freq_factors: np.ndarray | None = None, device="cpu",
                 yarn: Yarn | None = None, attn_factor: float = 1.0):
        self.head_dim, self.dims, self.neox = head_dim, rope_dims, neox
        cos, sin = rope_tables(rope_dims, base, max_pos, scale, freq_factors, yarn, attn_factor)
        self.cos = torch.from_numpy(cos).to(device)  # [S, Dr/2]
        self.sin = torch.from_numpy(sin).to(device)
        # adjacent pairs rotating every dim are complex numbers times e^(i*angle): one op
        self.turn = torch.complex(self.cos, self.sin) if not neox and rope_dims == head_dim else None

    def __call__(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x [T, heads, Dh] -> rotated, positions start..start+T-1."""
        t = x.shape[0]
        if self.turn is not None and x.dtype == torch.float32:
            pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))  # [T, heads, Dh/2]
            return torch.view_as_real(pairs * self.turn[start : start + t, None, :]).flatten(-2)
        cos = self.cos[start : start + t, None, :]  # [T, 1, Dr/2]
        sin = self.sin[start : start + t, None, :]
        if x.dtype != cos.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        rot, rest = x[..., : self.dims], x[..., self.dims :]
        if self.neox:
            x0, x1 = rot[..., : self.dims // 2], rot[..., self.dims // 2 :]
            out = torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
        else:
            x0, x1 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
        return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)
