"""The runtime's building blocks: linear layers on GGUF weights, RMSNorm, RoPE, attention.

Axis legend: T new tokens, S cached + new tokens, D model dim, H query heads,
Hkv key/value heads, Dh head dim, N output features.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from moechat.backends.runtime.gguf_weights import RawTensor
from moechat.kernels.ggml import GGML_TYPE_F32, CpuBackend, QuantWeight, maybe_repack
from moechat.kernels.ggml_ops import OAI_ALPHA, OAI_LIMIT, NormedLinears, QuantLinear


class Linear:
    """y = x @ W.T (+ b) with W straight from the GGUF.

    With a ggml CPU backend, ggml's kernel runs on the quantized bytes in place (llama.cpp's
    speed and numerics, nothing dequantized) — or, for the types ggml has a faster
    interleaved layout for (Q4_0 on AVX2), on a repacked copy, as llama.cpp does. Otherwise (a GPU, or the CPU with
    kernels="torch"), W is dequantized once into `dtype` on `device`, and float32 activations
    are multiplied in that dtype and come back float32."""

    def __init__(self, weight: RawTensor, bias: torch.Tensor | None, device: str,
                 dtype: torch.dtype, cpu: CpuBackend | None, release=None):
        self.out_features = weight.shape[1]
        self.bias = bias
        if cpu is not None:
            mapped = weight.quant_weight()
            packed = maybe_repack(mapped)
            if packed is not mapped and release is not None:
                release(weight.name)  # the repacked copy replaces the mapped pages
            self.ggml, self.w = QuantLinear(packed, cpu), None
        else:
            self.ggml, self.w = None, weight.to_torch(dtype, device)  # [N, D]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, N]
        if self.ggml is not None:
            y = torch.from_numpy(self.ggml(x.numpy()))
        else:
            y = (x.to(self.w.dtype) @ self.w.T).to(x.dtype)  # stored (float16) x float32 activations
        return y if self.bias is None else y + self.bias


def normed_linears(norm: torch.Tensor, eps: float, linears: list[Linear], w_in: Linear | None = None):
    """A layer's step around its attention, as one function (one ggml graph on the CPU):
    without w_in:  x -> [l(rms_norm(x) * norm) for l in linears]               (q, k, v)
    with w_in:     (x, a) -> (h = x + w_in(a), n = rms_norm(h) * norm, [l(n) for l in linears])
    (output projection and residual, then the router or a dense FFN's gate and up)."""
    on_ggml = all(l.ggml is not None for l in linears) and (w_in is None or (w_in.ggml is not None and w_in.bias is None))
    if not on_ggml or norm.device.type != "cpu":
        def composed(x, a=None):
            h = x if w_in is None else x + w_in(a)
            n = rms_norm(h, norm, eps)
            ys = [l(n) for l in linears]
            return ys if w_in is None else (h, n, ys)

        return composed
    backend = (w_in or linears[0]).ggml.backend
    g = QuantWeight(norm.numpy(), GGML_TYPE_F32, (norm.shape[0], 1))  # keeps `norm` alive
    group = NormedLinears(g, eps, [l.ggml.weight for l in linears], backend, None if w_in is None else w_in.ggml.weight)

    def fused(x, a=None):
        outs = [torch.from_numpy(o) for o in group(x.numpy(), None if a is None else a.numpy())]
        ys = outs[len(outs) - len(linears):]
        ys = [y if l.bias is None else y + l.bias for y, l in zip(ys, linears)]
        return ys if w_in is None else (outs[0], outs[1], ys)

    return fused


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) * weight over the last dim, one fused op (float32: activations
    are float32 on every device)."""
    return F.rms_norm(x, weight.shape, weight, eps)


class Rope:
    """Rotary position embedding as ggml computes it: theta_i = pos * base^(-2i/n), the
    per-dimension factor advanced by float32 multiplication like ggml's rope cache, optional
    per-frequency divisors (`rope_freqs.weight`) and linear position scaling — or YaRN
    (`yarn` = (training context, beta_fast, beta_slow)): per dimension a ramp between the
    scaled and the unscaled angle, and cos/sin times 1 + 0.1 ln(1/scale), as ggml's rope_yarn
    with llama.cpp's attention factor (which cancels ggml's second application of it)."""

    def __init__(self, head_dim: int, rope_dims: int, base: float, neox: bool, max_pos: int,
                 scale: float = 1.0, freq_factors: np.ndarray | None = None, device="cpu",
                 yarn: tuple[int, float, float] | None = None):
        self.head_dim, self.dims, self.neox = head_dim, rope_dims, neox
        half = rope_dims // 2
        theta_scale = np.float32(base) ** np.float32(-2.0 / rope_dims)
        theta = np.arange(max_pos, dtype=np.float32)  # [S]
        angles = np.empty((max_pos, half), dtype=np.float32)
        for i in range(half):  # float32 running product, as ggml_rope_cache_init
            angles[:, i] = theta
            theta = theta * theta_scale
        if freq_factors is not None:
            angles = angles / freq_factors.astype(np.float32)[:half]
        mscale = 1.0
        if yarn is not None:
            ramp = _yarn_ramp(rope_dims, base, *yarn)  # [Dr/2]: 1 keeps the unscaled angle
            angles = (angles * np.float32(scale)) * (1 - ramp) + angles * ramp
            mscale = float(np.float32(1.0 + 0.1 * np.log(1.0 / scale)))
        else:
            angles = angles * np.float32(scale)
        angles = angles.astype(np.float64)
        self.cos = torch.from_numpy((np.cos(angles) * mscale).astype(np.float32)).to(device)  # [S, Dr/2]
        self.sin = torch.from_numpy((np.sin(angles) * mscale).astype(np.float32)).to(device)
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


def _yarn_ramp(dims: int, base: float, orig_ctx: int, beta_fast: float, beta_slow: float) -> np.ndarray:
    """ggml_rope_yarn_corr_dims and rope_yarn_ramp: [dims/2] float32 mix per rotated pair."""
    def corr_dim(n_rot):
        return dims * np.log(orig_ctx / (n_rot * 2 * np.pi)) / (2 * np.log(base))

    lo, hi = max(0.0, np.floor(corr_dim(beta_fast))), min(dims - 1.0, np.ceil(corr_dim(beta_slow)))
    y = (np.arange(dims // 2, dtype=np.float32) - np.float32(lo)) / np.float32(max(0.001, hi - lo))
    return (1 - np.clip(y, 0, 1)).astype(np.float32)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """q [T, H, Dh] at positions start.., k/v [Hkv, S, Dh] (S = start + T) -> [T, H*Dh].

    Rounded like llama.cpp's default CPU attention (f16 cache, no flash attention): the query
    is rounded to the cache dtype before q·k, the scores are softmaxed, and the probabilities
    are rounded to the cache dtype before they weight the values. On the CPU one query at a
    time (`attention_per_query`), on a GPU all at once (`attention_batched`)."""
    if q.device.type == "cpu":
        return attention_per_query(q, k, v, start, scale)
    return attention_batched(q, k, v, start, scale)


def attention_per_query(q, k, v, start: int, scale: float) -> torch.Tensor:
    """Each query on its own, over exactly the keys it sees: the products then have the same
    shapes — hence the same float32 rounding — whether the query comes in a prefill of many
    tokens or alone in a decode step, so a cached decode step gives what a full forward gives
    at that position (a batched product rounds differently per batch shape, and these models
    amplify ulp changes through the f16 roundings)."""
    t, h, dh = q.shape
    hkv = k.shape[0]
    qg = q.to(k.dtype).float().view(t, hkv, h // hkv, dh)  # [T, Hkv, G, Dh]
    kf, vf = k.float(), v.float()  # [Hkv, S, Dh]
    out = torch.empty(t, hkv, h // hkv, dh, device=q.device)
    for i in range(t):
        seen = start + i + 1
        scores = torch.bmm(qg[i], kf[:, :seen].transpose(1, 2)).mul_(scale)  # [Hkv, G, seen]
        probs = torch.softmax(scores, dim=-1).to(v.dtype).float()
        torch.bmm(probs, vf[:, :seen], out=out[i])  # [Hkv, G, Dh]
    return out.view(t, h * dh).to(q.dtype)


def attention_batched(q, k, v, start: int, scale: float) -> torch.Tensor:
    """All queries in one product per step, future keys masked: one kernel launch each."""
    t, h, dh = q.shape
    hkv, s, _ = k.shape
    qg = q.to(k.dtype).float().transpose(0, 1).reshape(hkv, h // hkv * t, dh)  # [Hkv, G*T, Dh]
    scores = torch.bmm(qg, k.float().transpose(1, 2)).view(hkv, h // hkv, t, s) * scale  # [Hkv, G, T, S]
    if t > 1:  # query i sits at position start + i and sees keys 0..start+i
        future = torch.arange(s, device=q.device)[None, :] > (start + torch.arange(t, device=q.device))[:, None]
        scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).float().view(hkv, -1, s)  # [Hkv, G*T, S]
    out = torch.bmm(probs, v.float()).view(h, t, dh)  # [H, T, Dh]
    return out.transpose(0, 1).reshape(t, h * dh).to(q.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu_oai(gate: torch.Tensor, up: torch.Tensor, alpha: float = OAI_ALPHA, limit: float = OAI_LIMIT) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU, as ggml_swiglu_oai: the gate clamped from above, the up
    projection to [-limit, limit], and a +1 on it."""
    g = gate.clamp(max=limit)
    return g * torch.sigmoid(alpha * g) * (up.clamp(-limit, limit) + 1)


def glu(activation: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated activation between an FFN's products, by name (kernels/ggml_ops.ACTIVATIONS)."""
    if activation == "swiglu_oai":
        return swiglu_oai(gate, up)
    return swiglu(gate, up)
