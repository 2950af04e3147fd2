"""gpt-oss (llama.cpp's LLM_ARCH_OPENAI_MOE, src/models/openai-moe.cpp): llama with experts
plus

- biases on q/k/v, the output projection and the router (picked up by Linear);
- attention sinks: one learned logit per head that joins every softmax's denominator
  (the probabilities over the real keys then sum to less than 1);
- alternating attention: even layers see a sliding window of the last W tokens, odd
  layers everything; the sliding layers' KV cache holds only its window (swa_cache.py);
- NEOX RoPE, YaRN-scaled in the released models (config + rope.py);
- the norm before the experts is called `post_attention_norm`;
- gating: top-A of the router logits, softmax over just those A (route_softmax_selected);
- experts with a bias on each product and the clamped SwiGLU (alpha 1.702, limit 7) —
  MXFP4 in the released files; ggml runs them with ggml_add_id and ggml_swiglu_oai.

Per layer:  h = x + Wo·attn_sinks(rope(Wq·n1(x)+bq), rope(Wk·n1(x)+bk), Wv·n1(x)+bv) + bo
            y = h + sum_a softmax(top-A logits)_a · expert_a(n2(h))

Axis legend: T new tokens, S keys seen, D model dim, H heads, Hkv kv heads, G = H/Hkv,
Dh head dim, E experts, A active experts.
"""

from __future__ import annotations

import torch

from moechat.backends.errors import MoechatError
from moechat.backends.runtime import llama
from moechat.backends.runtime.experts import route_softmax_selected
from moechat.backends.runtime.swa_cache import SlidingKVCache


class Model(llama.Model):
    FFN_NORM = "post_attention_norm.weight"

    def __init__(self, args, weights, *rest, **kw):
        meta, arch = weights.metadata, args.arch
        base_swa = meta.get(f"{arch}.rope.freq_base_swa")
        if base_swa is not None and float(base_swa) != args.rope_base:
            raise MoechatError(f"{arch}: a separate RoPE base for sliding layers is not supported yet")
        self.windows = sliding_windows(args.n_layers, args.sliding_window,
                                       meta.get(f"{arch}.attention.sliding_window_pattern"))
        super().__init__(args, weights, *rest, **kw)

    def load_extra(self, i):
        return {"sinks": self.tensor(f"blk.{i}.attn_sinks.weight")}  # [H]

    def attention(self, i, layer, x, cache, start):
        a, t = self.args, x.shape[0]
        q, k, v = layer.qkv(x)  # biases included
        q = q.view(t, a.n_heads, a.head_dim)  # [T, H, Dh]
        k = k.view(t, a.n_kv_heads, a.head_dim)  # [T, Hkv, Dh]
        v = v.view(t, a.n_kv_heads, a.head_dim)
        qk = self.rope(torch.cat([q, k], dim=1), start)  # [T, H+Hkv, Dh]
        q, k = qk[:, : a.n_heads], qk[:, a.n_heads :]
        keys, values, first = cache.update(i, start, k, v)  # [Hkv, S, Dh] from position `first`
        return sink_attention(q, keys, values, start, first, a.attn_scale, layer.extra["sinks"], self.windows[i])

    def routed_experts(self, i, x, router_logits):
        expert_ids, gate_weights = route_softmax_selected(router_logits, self.args.n_experts_used)  # [T, A]
        return self.expert_backend.moe_forward(i, x, expert_ids, gate_weights)  # [T, D]

    def new_cache(self, max_tokens: int, dtype: torch.dtype = torch.float16) -> SlidingKVCache:
        a = self.args
        return SlidingKVCache(self.windows, a.n_kv_heads, a.head_dim, max_tokens, dtype, self.device)


def sliding_windows(n_layers: int, window: int, pattern=None) -> list[int]:
    """Each layer's window (0: full attention), as llama.cpp's load_swa_pattern(ml, 2): the
    file's per-layer pattern array if it has one, else every `pattern`-th layer (default 2)
    is full and the others slide."""
    if not window:
        return [0] * n_layers
    if isinstance(pattern, list):
        return [window if bool(p) else 0 for p in pattern[:n_layers]]
    n = int(pattern) if pattern is not None else 2
    return [window if n == 0 or i % n < n - 1 else 0 for i in range(n_layers)]


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, first: int, scale: float,
                   sinks: torch.Tensor, window: int, batched: bool | None = None) -> torch.Tensor:
    """q [T, H, Dh] at positions start.., k/v [Hkv, S, Dh] at positions first..start+T-1,
    sinks [H] -> [T, H*Dh]. Query p sees keys max(0, p-W+1)..p (W = window, 0: all); each
    head's sink logit (unscaled) joins the softmax's denominator only.

    Rounded as llama.cpp's default CPU attention (layers.attention): q and the probabilities
    to the cache dtype, one query at a time on the CPU (so a cached decode step equals a full
    forward), all at once with a mask on a GPU (`batched` overrides the choice)."""
    t, h, dh = q.shape
    hkv, s, _ = k.shape
    g = h // hkv
    qg = q.to(k.dtype).float().view(t, hkv, g, dh)  # [T, Hkv, G, Dh]
    kf, vf = k.float(), v.float()  # [Hkv, S, Dh]
    sink = sinks.float().view(hkv, g, 1)  # [Hkv, G, 1]
    if batched if batched is not None else q.device.type != "cpu":
        pos = start + torch.arange(t, device=q.device)[:, None]  # [T, 1] query positions
        key_pos = first + torch.arange(s, device=q.device)[None, :]  # [1, S]
        hidden = (key_pos > pos) | ((pos - key_pos >= window) if window else False)  # [T, S]
        scores = torch.einsum("thgd,hsd->thgs", qg, kf) * scale  # [T, Hkv, G, S]
        scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
        probs = _softmax_with_sink(scores, sink.expand(t, hkv, g, 1)).to(v.dtype).float()
        return torch.einsum("thgs,hsd->thgd", probs, vf).reshape(t, h * dh).to(q.dtype)
    out = torch.empty(t, hkv, g, dh, device=q.device)
    for i in range(t):
        p = start + i
        lo = max(0, p - window + 1) - first if window else 0
        hi = p - first + 1
        scores = torch.bmm(qg[i], kf[:, lo:hi].transpose(1, 2)).mul_(scale)  # [Hkv, G, seen]
        probs = _softmax_with_sink(scores, sink).to(v.dtype).float()
        torch.bmm(probs, vf[:, lo:hi], out=out[i])  # [Hkv, G, Dh]
    return out.view(t, h * dh).to(q.dtype)


def _softmax_with_sink(scores: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """softmax over [scores, sink] along the last dim, the sink's column dropped (ggml's
    soft_max with sinks: the max includes the sink, its exp joins the sum)."""
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
