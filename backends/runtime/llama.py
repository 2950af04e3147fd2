"""llama: dense (the zero-expert case) and with experts (Mixtral) — the base the other
architectures' files adapt (qwen2moe.py, qwen3moe.py, olmoe.py).

Per layer:  h = x + Wo·attn(rope(Wq·n1(x)), rope(Wk·n1(x)), Wv·n1(x))
            y = h + ffn(n2(h)),  ffn = SwiGLU (dense) or the routed experts (MoE)
On the CPU, n1 with the q/k/v products, and Wo with the residual, n2 and the router (or the
dense gate and up products), each run as one ggml graph (layers.normed_linears).

Axis legend: T tokens, D model dim, H heads, Hkv kv heads, Dh head dim, E experts,
A active experts, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moechat.backends.runtime.config import ModelArgs
from moechat.backends.runtime.experts import ExpertBackend, ExpertStore, route
from moechat.backends.runtime.gguf_weights import GGUFWeights
from moechat.backends.runtime.kv_cache import KVCache
from moechat.backends.runtime.layers import Linear, attention, normed_linears, rms_norm, swiglu
from moechat.backends.runtime.rope import Rope, Yarn
from moechat.kernels.ggml import CpuBackend


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [D]
    wq: Linear  # D -> H*Dh
    wk: Linear  # D -> Hkv*Dh
    wv: Linear  # D -> Hkv*Dh
    wo: Linear  # H*Dh -> D
    ffn_norm: torch.Tensor  # [D]
    router: Linear | None  # D -> E (MoE layers)
    ffn: tuple[Linear, Linear, Linear] | None  # dense gate, up, down
    extra: dict  # architecture-specific tensors (q/k norms, shared expert ...)
    eps: float  # RMSNorm epsilon

    def __post_init__(self):
        # one ggml graph each on the CPU (normed_linears):
        # x -> [q, k, v] of attn_norm(x)
        self.qkv = normed_linears(self.attn_norm, self.eps, [self.wq, self.wk, self.wv])
        # (x, attention output) -> (h = x + Wo·attn, ffn_norm(h), [router logits] or [gate, up])
        reads_norm = [self.router] if self.router is not None else list(self.ffn[:2])
        self.post_attention = normed_linears(self.ffn_norm, self.eps, reads_norm, w_in=self.wo)


class Model:
    FFN_NORM = "ffn_norm.weight"  # the norm before the FFN (gpt-oss: post_attention_norm)

    def __init__(self, args: ModelArgs, weights: GGUFWeights, experts: ExpertStore,
                 expert_backend: ExpertBackend | None, device: str, dtype: torch.dtype,
                 cpu: CpuBackend | None, max_tokens: int):
        self.args, self.weights, self.experts = args, weights, experts
        self.expert_backend = expert_backend
        self.device, self.dtype, self.cpu = device, dtype, cpu
        self.max_tokens = max_tokens  # the longest context the RoPE tables cover
        self.layers = [self.load_layer(i) for i in range(args.n_layers)]
        self.output_norm = self.tensor("output_norm.weight")
        head = "output.weight" if "output.weight" in weights else "token_embd.weight"
        self.output = self.linear(head)
        factors = weights.get("rope_freqs.weight")
        yarn = Yarn(args.rope_yarn_orig_ctx, args.rope_yarn_beta_fast, args.rope_yarn_beta_slow) if args.rope_yarn_orig_ctx else None
        self.rope = Rope(args.head_dim, args.rope_dims, args.rope_base, args.rope_neox, max_tokens,
                         args.rope_scale, factors.data if factors is not None else None, device, yarn)

    # ---- loading --------------------------------------------------------------------------
    # Activations (the residual stream, norms, RoPE, attention) are float32 on every device,
    # as in llama.cpp; `dtype` is what dequantized matrices are stored and multiplied in
    # (float16 on a GPU). Small vectors (norm weights, biases) stay float32.
    def tensor(self, name: str) -> torch.Tensor:
        return self.weights.dense(name, torch.float32, self.device)

    def optional(self, name: str) -> torch.Tensor | None:
        return self.tensor(name) if name in self.weights else None

    def linear(self, name: str) -> Linear:
        bias = self.optional(name.replace(".weight", ".bias"))
        return Linear(self.weights.raw(name), bias, self.device, self.dtype, self.cpu, self.weights.release)

    def load_layer(self, i: int) -> LayerWeights:
        p = f"blk.{i}."
        moe = f"{p}ffn_gate_inp.weight" in self.weights
        return LayerWeights(
            attn_norm=self.tensor(p + "attn_norm.weight"),
            wq=self.linear(p + "attn_q.weight"),
            wk=self.linear(p + "attn_k.weight"),
            wv=self.linear(p + "attn_v.weight"),
            wo=self.linear(p + "attn_output.weight"),
            ffn_norm=self.tensor(p + self.FFN_NORM),
            router=self.linear(p + "ffn_gate_inp.weight") if moe else None,
            ffn=None if moe else tuple(self.linear(f"{p}ffn_{n}.weight") for n in ("gate", "up", "down")),
            extra=self.load_extra(i),
            eps=self.args.norm_eps,
        )

    def load_extra(self, i: int) -> dict:
        return {}

    def routers(self) -> list[torch.Tensor | None]:
        """Each layer's router weight [E, D] (None for dense layers): engines run the next
        layers' routers on the current hidden state to guess which experts to prefetch."""
        return [self.tensor(f"blk.{i}.ffn_gate_inp.weight") if l.router is not None else None
                for i, l in enumerate(self.layers)]

    # ---- forward --------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # [T] -> [T, D]
        return self.weights.rows("token_embd.weight", tokens).to(self.device)  # float32

    def forward(self, tokens: torch.Tensor, cache: KVCache, start: int, all_logits: bool = True) -> torch.Tensor:
        """tokens [T] at positions start..start+T-1 -> logits [T, V] (or [1, V], the last)."""
        x = self.embed(tokens)  # [T, D]
        for i, layer in enumerate(self.layers):
            attn = self.attention(i, layer, x, cache, start)  # [T, H*Dh]
            x, h, reads_h = layer.post_attention(x, attn)  # x + Wo·attn, ffn_norm of it, router or gate/up of that
            x = x + self.feed_forward(i, layer, h, reads_h)
        cache.advance(start + tokens.shape[0])
        if not all_logits:
            x = x[-1:]
        return self.output(self.final_norm(x)).float()  # [T, V]

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.output_norm, self.args.norm_eps)

    def attention(self, i: int, layer: LayerWeights, x: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """x [T, D] (the residual stream; attn_norm is applied with the q/k/v products) ->
        attention output [T, H*Dh], before the output projection."""
        a, t = self.args, x.shape[0]
        q, k, v = layer.qkv(x)
        q = q.view(t, a.n_heads, a.head_dim)  # [T, H, Dh]
        k = k.view(t, a.n_kv_heads, a.head_dim)  # [T, Hkv, Dh]
        v = v.view(t, a.n_kv_heads, a.head_dim)
        q, k = self.qk_norm(layer, q, k)
        qk = self.rope(torch.cat([q, k], dim=1), start)  # [T, H+Hkv, Dh]: one rotation for both
        q, k = qk[:, : a.n_heads], qk[:, a.n_heads :]
        k_all, v_all = cache.update(i, start, k, v)  # [Hkv, S, Dh]
        return attention(q, k_all, v_all, start, a.attn_scale)  # [T, H*Dh]

    def qk_norm(self, layer: LayerWeights, q: torch.Tensor, k: torch.Tensor):
        return q, k

    def feed_forward(self, i: int, layer: LayerWeights, x: torch.Tensor, reads_x: list[torch.Tensor]) -> torch.Tensor:
        """x [T, D] (ffn_norm applied), reads_x: [router logits [T, E]] (MoE) or [gate(x), up(x)]
        (dense), computed with the norm -> [T, D]."""
        if layer.router is None:
            gate, up = reads_x
            return layer.ffn[2](swiglu(gate, up))
        return self.routed_experts(i, x, reads_x[0])

    def routed_experts(self, i: int, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        a = self.args
        expert_ids, gate_weights = route(router_logits, a.n_experts_used, a.norm_topk,
                                         a.expert_weights_scale)  # [T, A], [T, A]
        return self.expert_backend.moe_forward(i, x, expert_ids, gate_weights)  # [T, D]

    def new_cache(self, max_tokens: int, dtype: torch.dtype = torch.float16) -> KVCache:
        a = self.args
        return KVCache(a.n_layers, a.n_kv_heads, a.head_dim, max_tokens, dtype, self.device)
