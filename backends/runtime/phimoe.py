"""phimoe (Phi-3.5-MoE): llama with experts, plus what llama.cpp's phi3 graph does
differently — every norm (attn_norm, ffn_norm, output_norm) has a bias added after its
weight, q/k/v, the attention output and the output head have biases, NEOX RoPE, the query
is scaled by 1/sqrt(Dh) before attention (which then scales by 1), and the top-2 softmax
gate weights are renormalised (config.NORM_TOPK_ARCHS). llama.cpp routes with plain
softmax top-k, not the sparsemixer of the Hugging Face code, so this does too. The real
Phi-3.5-MoE files carry LongRoPE factors (`long_rope`).

The norms' biases keep these layers off the fused norm-and-products ggml graph
(layers.normed_linears): each product is its own ggml call after a torch norm.

Axis legend: T tokens, D model dim, H heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses

import torch

from moechat.backends.errors import MoechatError
from moechat.backends.runtime import llama
from moechat.backends.runtime.layers import rms_norm
from moechat.backends.runtime.rope import Rope


def long_rope(args, weights, max_tokens: int, device) -> Rope:
    """Phi-3.5's LongRoPE as llama.cpp runs it (get_rope_factors, the phi3 graph): the rotation
    frequencies divided per pair by `rope_factors_long` when the context (here: the longest
    the tables cover, llama.cpp's n_ctx) exceeds the original training context, else by
    `rope_factors_short`; cos/sin times the file's `rope.scaling.attn_factor` (no YaRN ramp:
    the file states no scaling type, so ext_factor is 0)."""
    meta, arch = weights.metadata, args.arch
    name = meta.get("general.name", arch)
    original = int(meta.get(f"{arch}.rope.scaling.original_context_length", meta.get(f"{arch}.context_length", 0)))
    which = "long" if max_tokens > original else "short"
    factors = weights.get(f"rope_factors_{which}.weight")
    if factors is None or args.rope_yarn_orig_ctx:
        raise MoechatError(f"{name}: LongRoPE needs both rope_factors_long and rope_factors_short "
                           "and no other RoPE scaling; use --engine llama.cpp")
    attn_factor = float(meta.get(f"{arch}.rope.scaling.attn_factor", 1.0) or 1.0)
    return Rope(args.head_dim, args.rope_dims, args.rope_base, args.rope_neox, max_tokens, args.rope_scale,
                factors.data, device, attn_factor=attn_factor)


def biased_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(x, weight, eps) + bias  # ggml_rms_norm, * weight, + bias (build_norm)


class Model(llama.Model):
    def load_layer(self, i):
        layer = super().load_layer(i)
        p, eps = f"blk.{i}.", self.args.norm_eps
        attn_b, ffn_b = self.tensor(p + "attn_norm.bias"), self.tensor(p + "ffn_norm.bias")
        linears = [layer.wq, layer.wk, layer.wv]
        reads_norm = [layer.router] if layer.router is not None else list(layer.ffn[:2])

        def qkv(x):  # x [T, D] -> [q, k, v]
            n = biased_norm(x, layer.attn_norm, attn_b, eps)
            return [l(n) for l in linears]

        def post_attention(x, a):  # -> (h = x + Wo·a + bo, ffn_norm(h), [router logits])
            h = x + layer.wo(a)
            n = biased_norm(h, layer.ffn_norm, ffn_b, eps)
            return h, n, [l(n) for l in reads_norm]

        layer.qkv, layer.post_attention = qkv, post_attention
        return layer

    def __init__(self, args, weights, *rest):
        # llama.cpp scales the query by 1/sqrt(Dh) before attention and attends with scale 1
        self.query_scale = args.attn_scale
        super().__init__(dataclasses.replace(args, attn_scale=1.0), weights, *rest)
        if "rope_factors_long.weight" in weights or "rope_factors_short.weight" in weights:
            self.rope = long_rope(self.args, weights, self.max_tokens, self.device)

    def qk_norm(self, layer, q, k):  # before RoPE (a scalar commutes with the rotation)
        return q * self.query_scale, k

    def final_norm(self, x):
        return biased_norm(x, self.output_norm, self.tensor("output_norm.bias"), self.args.norm_eps)
