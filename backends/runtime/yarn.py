"""YaRN RoPE tables as ggml computes them (ggml_rope_yarn_corr_dims and rope_yarn in
ggml-cpu), for the rotations a Rope applies: per rotated pair i, the angle blends the
interpolated (pos·θ_i·freq_scale) and the original (pos·θ_i) angle by a ramp over the pairs
between the two correction dims, and cos/sin are multiplied by mscale.

    low, high = floor/ceil(n_dims · ln(n_ctx_orig / (β · 2π)) / (2 ln base)), β = 32 / 1
    ramp_i    = 1 - clamp((i - low) / max(0.001, high - low), 0, 1)
    θ         = θ_interp·(1 - ramp_i) + θ_extrap·ramp_i        (ext_factor 1)
    mscale    = attn_factor · (1 + 0.1 ln(1 / freq_scale))

llama.cpp passes attn_factor already divided by that (1 + 0.1 ln(1/freq_scale)) (its
yarn_attn_factor_adjust), so the tables carry the file's own attention factor (1 unless it
states `rope.scaling.attn_factor`); DeepSeek-V2's extra softmax scale (mscale² with the
yarn_log_multiplier) is the caller's.
"""

from __future__ import annotations

import math

import numpy as np
import torch

BETA_FAST, BETA_SLOW = 32.0, 1.0  # llama.cpp's defaults (cparams.yarn_beta_fast / _slow)


def corr_dims(n_dims: int, n_ctx_orig: int, base: float) -> tuple[float, float]:
    def dim(beta: float) -> float:
        return n_dims * math.log(n_ctx_orig / (beta * 2 * math.pi)) / (2 * math.log(base))

    return max(0.0, math.floor(dim(BETA_FAST))), min(n_dims - 1.0, math.ceil(dim(BETA_SLOW)))


def yarn_tables(n_dims: int, base: float, max_pos: int, factor: float, n_ctx_orig: int,
                attn_factor: float = 1.0, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [max_pos, n_dims/2] float32, mscale included."""
    half = n_dims // 2
    freq_scale = np.float32(1.0 / factor)
    theta_scale = np.float32(base) ** np.float32(-2.0 / n_dims)
    theta = np.arange(max_pos, dtype=np.float32)
    extrap = np.empty((max_pos, half), dtype=np.float32)
    for i in range(half):  # float32 running product, as ggml_rope_cache_init
        extrap[:, i] = theta
        theta = theta * theta_scale
    low, high = corr_dims(n_dims, n_ctx_orig, base)
    pair = np.arange(half, dtype=np.float32)
    ramp = 1.0 - np.clip((pair - low) / max(0.001, high - low), 0.0, 1.0).astype(np.float32)
    interp = freq_scale * extrap
    angles = (interp * (1 - ramp) + extrap * ramp).astype(np.float32).astype(np.float64)
    adjust = np.float32(1.0 + 0.1 * math.log(1.0 / freq_scale))
    mscale = np.float32(attn_factor) / adjust * adjust  # llama.cpp divides, ggml's rope_yarn multiplies
    cos = torch.from_numpy((np.cos(angles) * mscale).astype(np.float32)).to(device)
    sin = torch.from_numpy((np.sin(angles) * mscale).astype(np.float32)).to(device)
    return cos, sin
