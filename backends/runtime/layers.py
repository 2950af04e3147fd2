"""The runtime's building blocks: linear layers on GGUF weights, RMSNorm, attention, the
gated activations (RoPE: rope.py).

Axis legend: T new tokens, S cached + new tokens, D model dim, H query heads,
Hkv key/value heads, Dh head dim, N output features.
"""

from __future__ import annotations

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
    t, h, _ = q.shape
    return per_query_heads(q, k, v, start, scale).view(t, -1).to(q.dtype)


def per_query_heads(q, k, v, start: int, scale: float) -> torch.Tensor:
    """attention_per_query's loop: q [T, H, Dk], k [Hkv, S, Dk], v [Hkv, S, Dv] -> float32
    [T, H, Dv] (MLA's latent attention uses it as is: one latent head, Dv < Dk)."""
    t, h, dk = q.shape
    hkv, _, dv = v.shape
    qg = q.to(k.dtype).float().view(t, hkv, h // hkv, dk)  # [T, Hkv, G, Dk]
    kf, vf = k.float(), v.float()  # [Hkv, S, Dk], [Hkv, S, Dv]
    out = torch.empty(t, hkv, h // hkv, dv, device=q.device)
    for i in range(t):
        seen = start + i + 1
        scores = torch.bmm(qg[i], kf[:, :seen].transpose(1, 2)).mul_(scale)  # [Hkv, G, seen]
        probs = torch.softmax(scores, dim=-1).to(v.dtype).float()
        torch.bmm(probs, vf[:, :seen], out=out[i])  # [Hkv, G, Dv]
    return out.view(t, h, dv)


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
