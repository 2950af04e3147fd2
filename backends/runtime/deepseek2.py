"""deepseek2 (DeepSeek-V2, V2-Lite, V3-style files): multi-head latent attention over a
compressed KV cache (mla.py), leading dense layers, shared experts, and DeepSeek's gating
(gating.py) — mirroring llama.cpp's src/models/deepseek2.cpp graph: absorbed MLA for files
with the split attn_k_b/attn_v_b (what the converter writes today), plain multi-head attention
with per-head K/V decompressed by attn_kv_b for older files, each cached as llama.cpp does.

Per layer:  n  = rms(x) * attn_norm
            q  = Wq_b·(rms(Wq_a·n) * q_a_norm)          (V2-Lite: q = Wq·n)   [T, H, Dn+Dr]
            c, k_pe = Wkv_a·n                            latent [T, R], shared rope key [T, Dr]
            c  = rms(c) * kv_a_norm;  q_pe, k_pe rotated (adjacent pairs)
            Q  = [q_nope·W_kb, q_pe] [T, H, R+Dr];  K = [c, k_pe] (cached);  V = c
            h  = x + Wo·(W_vb·attention(Q, K, V))       per head W_vb: R -> Dv
            y  = h + ffn(n2),  n2 = rms(h) * ffn_norm
            ffn = SwiGLU (the first `leading_dense_block_count` layers) or
                  routed experts + shared experts (one SwiGLU of n_shared x I, always run)
The attention scale is 1/sqrt(Dn + Dr), times mscale² with YaRN (real V2/V2-Lite files;
the RoPE tables themselves are rope.py's, as for every architecture). On the CPU, attn_norm with Wq(_a) and
Wkv_a is one ggml graph, and Wo with the residual, ffn_norm, the router and the shared
experts' gate and up another (layers.normed_linears).

Axis legend: T tokens, D model dim, H heads, Dn/Dr/Dv no-rope, rope and value head dims,
R kv_lora_rank, E experts, A active experts, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moechat.backends.runtime import llama
from moechat.backends.runtime.gguf_weights import RawTensor
from moechat.backends.runtime.gating import GATING_SOFTMAX, route_grouped
from moechat.backends.runtime.layers import Linear, normed_linears, rms_norm, swiglu
from moechat.backends.runtime.mla import LatentCache, latent_attention
from moechat.backends.runtime.rope import Rope, Yarn, deepseek2_attn_factor
from moechat.kernels.ggml import CpuBackend
from moechat.kernels.ggml_heads import HeadwiseLinear


@dataclass(frozen=True, slots=True)
class MLAArgs:
    """What deepseek2 adds to ModelArgs, from the `deepseek2.*` keys llama.cpp reads."""

    kv_lora_rank: int  # R
    rope_dim: int  # Dr
    nope_dim: int  # Dn
    v_dim: int  # Dv
    n_dense_lead: int
    gating: int  # 1 softmax, 2 sigmoid
    n_groups: int  # expert groups (0/1: no group-limited top-k)
    n_groups_used: int
    absorbed: bool  # MLA over the latent (split attn_k_b/attn_v_b, *_mla keys: llama.cpp's
    #                 is_mla); False: older files, unsplit attn_kv_b, plain multi-head attention

    @classmethod
    def from_metadata(cls, meta: dict, head_dim: int) -> MLAArgs:
        a = "deepseek2"
        absorbed = f"{a}.attention.value_length_mla" in meta and f"{a}.attention.key_length_mla" in meta
        rope = int(meta[f"{a}.rope.dimension_count"])
        v_key = "attention.value_length_mla" if absorbed else "attention.value_length"
        return cls(
            kv_lora_rank=int(meta[f"{a}.attention.kv_lora_rank"]),
            rope_dim=rope,
            nope_dim=head_dim - rope,
            v_dim=int(meta[f"{a}.{v_key}"]),
            n_dense_lead=int(meta.get(f"{a}.leading_dense_block_count", 0)),
            gating=int(meta.get(f"{a}.expert_gating_func", 0) or GATING_SOFTMAX),
            n_groups=int(meta.get(f"{a}.expert_group_count", 0)),
            n_groups_used=int(meta.get(f"{a}.expert_group_used_count", 0)),
            absorbed=absorbed,
        )


class HeadProjection:
    """y[t, h] = W[h] @ x[t, h] for a stacked GGUF weight W [H, N, D] (torch order): ggml's
    batched product on the quantized bytes on the CPU (kernels/ggml_heads.py), the weight
    dequantized once into `dtype` otherwise."""

    def __init__(self, weight: RawTensor, device: str, dtype: torch.dtype, cpu: CpuBackend | None):
        self.ggml = HeadwiseLinear(weight.quant_weight(), cpu) if cpu is not None else None
        self.w = None if cpu is not None else weight.to_torch(dtype, device)  # [H, N, D]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [T, H, N]
        if self.ggml is not None:
            y = self.ggml(np.ascontiguousarray(x.transpose(0, 1).numpy()))  # [H, T, N]
            return torch.from_numpy(y).transpose(0, 1)
        return torch.einsum("thd,hnd->thn", x.to(self.w.dtype), self.w).float()


@dataclass
class MLALayer:
    attn_norm: torch.Tensor  # [D]
    wq: Linear | None  # D -> H*(Dn+Dr) (V2-Lite)
    wq_a: Linear | None  # D -> q_lora_rank
    q_a_norm: torch.Tensor | None  # [q_lora_rank]
    wq_b: Linear | None  # q_lora_rank -> H*(Dn+Dr)
    wkv_a: Linear  # D -> R + Dr
    kv_a_norm: torch.Tensor  # [R]
    k_b: HeadProjection | None  # [H, R, Dn]: absorbs q_nope into the latent space
    v_b: HeadProjection | None  # [H, Dv, R]: decompresses each head's attention output
    kv_b: Linear | None  # R -> H*(Dn+Dv): the unsplit form (older files, not absorbed)
    wo: Linear  # H*Dv -> D
    ffn_norm: torch.Tensor  # [D]
    router: Linear | None  # D -> E (MoE layers)
    ffn: tuple[Linear, Linear, Linear] | None  # dense gate, up, down (leading layers)
    extra: dict  # shared: (gate, up, down); exp_probs_b: [E] selection bias (V3)
    eps: float

    def __post_init__(self):
        first = self.wq if self.wq is not None else self.wq_a
        self.qkv = normed_linears(self.attn_norm, self.eps, [first, self.wkv_a])  # x -> [q or q_a, kv_a]
        self.q_b = None if self.wq is not None else normed_linears(self.q_a_norm, self.eps, [self.wq_b])
        if self.router is not None:
            reads_norm = [self.router, *self.extra["shared"][:2]]  # router, shared gate, shared up
        else:
            reads_norm = list(self.ffn[:2])
        self.post_attention = normed_linears(self.ffn_norm, self.eps, reads_norm, w_in=self.wo)


def yarn_softmax_scale(meta: dict, attn_factor: float, factor: float, key_dim: int) -> float:
    """llama.cpp's DeepSeek softmax scale with YaRN: mscale² / sqrt(Dk), mscale = attn_factor ·
    (1 + yarn_log_multiplier · ln(factor)). The converter writes 0.1 x the checkpoint's
    mscale_all_dim; llama.cpp's loader divides by 0.1 again and its graph multiplies by 0.1."""
    log_mul = float(meta.get("deepseek2.rope.scaling.yarn_log_multiplier", 0.0))
    mscale = np.float32(attn_factor) * np.float32(1.0 + 0.1 * np.float32(log_mul / 0.1) * np.log(factor))
    return float(mscale * mscale / np.float32(np.sqrt(key_dim)))


class Model(llama.Model):
    def __init__(self, args, weights, *rest):
        self.mla = MLAArgs.from_metadata(weights.metadata, args.head_dim)
        super().__init__(args, weights, *rest)
        a, m = args, self.mla
        # RoPE rotates only the Dr-wide parts, in adjacent pairs (llama.cpp's NORM mode)
        meta = weights.metadata
        yarn = Yarn(a.rope_yarn_orig_ctx, a.rope_yarn_beta_fast, a.rope_yarn_beta_slow) if a.rope_yarn_orig_ctx else None
        file_attn_factor = float(meta.get("deepseek2.rope.scaling.attn_factor", 1.0) or 1.0)
        # llama.cpp hands ggml the file's factor over YaRN's own mscale (rope.py)
        attn_factor = deepseek2_attn_factor(file_attn_factor, a.rope_scale) if yarn else 1.0
        self.rope = Rope(m.rope_dim, m.rope_dim, a.rope_base, False, self.max_tokens, a.rope_scale,
                         None, self.device, yarn, attn_factor)
        self.attn_scale = a.attn_scale
        if yarn is not None:
            factor = float(meta["deepseek2.rope.scaling.factor"])
            self.attn_scale = yarn_softmax_scale(meta, file_attn_factor, factor, m.nope_dim + m.rope_dim)

    def load_layer(self, i: int) -> MLALayer:
        p = f"blk.{i}."
        moe = f"{p}ffn_gate_inp.weight" in self.weights
        lite = f"{p}attn_q.weight" in self.weights
        return MLALayer(
            attn_norm=self.tensor(p + "attn_norm.weight"),
            wq=self.linear(p + "attn_q.weight") if lite else None,
            wq_a=None if lite else self.linear(p + "attn_q_a.weight"),
            q_a_norm=None if lite else self.tensor(p + "attn_q_a_norm.weight"),
            wq_b=None if lite else self.linear(p + "attn_q_b.weight"),
            wkv_a=self.linear(p + "attn_kv_a_mqa.weight"),
            kv_a_norm=self.tensor(p + "attn_kv_a_norm.weight"),
            k_b=self.heads(p + "attn_k_b.weight") if self.mla.absorbed else None,  # [H, R, Dn]
            v_b=self.heads(p + "attn_v_b.weight") if self.mla.absorbed else None,  # [H, Dv, R]
            kv_b=None if self.mla.absorbed else self.linear(p + "attn_kv_b.weight"),
            wo=self.linear(p + "attn_output.weight"),
            ffn_norm=self.tensor(p + "ffn_norm.weight"),
            router=self.linear(p + "ffn_gate_inp.weight") if moe else None,
            ffn=None if moe else tuple(self.linear(f"{p}ffn_{n}.weight") for n in ("gate", "up", "down")),
            extra=self.load_extra(i) if moe else {},
            eps=self.args.norm_eps,
        )

    def heads(self, name: str) -> HeadProjection:
        return HeadProjection(self.weights.raw(name), self.device, self.dtype, self.cpu)

    def load_extra(self, i: int) -> dict:
        p = f"blk.{i}."
        return {"shared": tuple(self.linear(f"{p}ffn_{n}_shexp.weight") for n in ("gate", "up", "down")),
                "exp_probs_b": self.optional(f"{p}exp_probs_b.bias")}  # [E] or None

    def attention(self, i, layer, x, cache, start):
        """x [T, D] -> attention output [T, H*Dv], before Wo."""
        a, m, t = self.args, self.mla, x.shape[0]
        q, kv = layer.qkv(x)
        if layer.q_b is not None:
            (q,) = layer.q_b(q)
        q = q.view(t, a.n_heads, m.nope_dim + m.rope_dim)  # [T, H, Dn+Dr]
        latent = rms_norm(kv[:, : m.kv_lora_rank], layer.kv_a_norm, a.norm_eps)  # [T, R]
        pe = torch.cat([q[:, :, m.nope_dim :], kv[:, None, m.kv_lora_rank :]], dim=1)  # [T, H+1, Dr]
        pe = self.rope(pe.contiguous(), start)
        q_pe, k_pe = pe[:, : a.n_heads], pe[:, a.n_heads :]  # [T, H, Dr], [T, 1, Dr]
        q_nope = q[:, :, : m.nope_dim]  # [T, H, Dn]
        if m.absorbed:  # MQA over the latent: Q = [q_nope·W_kb, q_pe], K = [c, k_pe], V = c
            queries = torch.cat([layer.k_b(q_nope), q_pe], dim=-1)  # [T, H, R+Dr]
            k_all, v_all = cache.update(i, start, torch.cat([latent[:, None], k_pe], dim=-1))  # [1, S, R+Dr], [1, S, R]
            out = latent_attention(queries, k_all, v_all, start, self.attn_scale)  # [T, H, R]
            out = layer.v_b(out)  # [T, H, Dv]
        else:  # per-head K and V decompressed from the latent, cached as multi-head attention
            kv = layer.kv_b(latent).view(t, a.n_heads, m.nope_dim + m.v_dim)  # [T, H, Dn+Dv]
            keys = torch.cat([kv[..., : m.nope_dim], k_pe.expand(t, a.n_heads, m.rope_dim)], dim=-1)  # [T, H, Dn+Dr]
            k_all, v_all = cache.update(i, start, keys, kv[..., m.nope_dim :])  # [H, S, Dn+Dr], [H, S, Dv]
            out = latent_attention(torch.cat([q_nope, q_pe], dim=-1), k_all, v_all, start, self.attn_scale)
        return out.reshape(t, a.n_heads * m.v_dim)

    def feed_forward(self, i, layer, x, reads_x):
        if layer.router is None:
            gate, up = reads_x
            return layer.ffn[2](swiglu(gate, up))
        router_logits, shared_gate, shared_up = reads_x
        routed = self.routed_experts(i, x, router_logits, layer.extra["exp_probs_b"])  # [T, D]
        return routed + layer.extra["shared"][2](swiglu(shared_gate, shared_up))

    def routed_experts(self, i, x, router_logits, bias=None):
        a, m = self.args, self.mla
        expert_ids, gate_weights = route_grouped(router_logits, a.n_experts_used, m.gating, bias, m.n_groups,
                                                 m.n_groups_used, a.norm_topk, a.expert_weights_scale)
        return self.expert_backend.moe_forward(i, x, expert_ids, gate_weights)  # [T, D]

    def new_cache(self, max_tokens: int, dtype: torch.dtype = torch.float16) -> LatentCache:
        a, m = self.args, self.mla
        if m.absorbed:
            return LatentCache(a.n_layers, 1, m.kv_lora_rank + m.rope_dim, m.kv_lora_rank, max_tokens,
                               dtype, self.device)
        return LatentCache(a.n_layers, a.n_heads, m.nope_dim + m.rope_dim, m.v_dim, max_tokens, dtype,
                           self.device, separate_values=True)
