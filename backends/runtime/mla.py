"""Multi-head latent attention (DeepSeek-V2/V3) in its absorbed form, as llama.cpp runs it:
the latent cache and the attention over it.

Each token caches one "head" of R + Dr values: the RMS-normed compressed KV (R =
kv_lora_rank) and the rotated key part shared by every head (Dr rope dims). Queries are
turned into that space (q_nope·W_kb: "absorbed"), so attention is multi-query attention over
the latent; the values are the latent's first R entries (a view of the same cache, as
llama.cpp's K-only MLA cache), and each head's R-wide output is decompressed by W_vb after.
So the cache costs (R + Dr) x 2 bytes per token and layer in f16 — the model card's number.
(Older files without the split attn_k_b/attn_v_b run as plain multi-head attention: there
llama.cpp caches per-head K and V, and so does this.)

Legend: T new tokens, S cached + new tokens, H heads, R kv_lora_rank, Dr rope dims.
"""

from __future__ import annotations

import torch

from moechat.backends.runtime.kv_cache import KVCache
from moechat.backends.runtime.layers import per_query_heads


class LatentCache(KVCache):
    """Preallocated [L, Hkv, S_max, Dk] f16 keys per layer. MLA (absorbed): one "head" of
    R + Dr, and V is a view of its first R columns (value_dim=R, separate_values=False).
    Older deepseek2 files (unsplit attn_kv_b) attend as plain multi-head attention with K and
    V of different widths: then V has its own [L, Hkv, S_max, Dv] buffer, as in llama.cpp.
    KVCache's interface (advance / truncate / length are its own), and its saved states:
    `buffers` holds the keys alone when V is their view."""

    def __init__(self, n_layers: int, n_kv_heads: int, key_dim: int, value_dim: int, max_tokens: int,
                 dtype: torch.dtype = torch.float16, device="cpu", separate_values: bool = False):
        self.k = torch.zeros((n_layers, n_kv_heads, max_tokens, key_dim), dtype=dtype, device=device)
        self.v = (torch.zeros((n_layers, n_kv_heads, max_tokens, value_dim), dtype=dtype, device=device)
                  if separate_values else None)
        self.value_dim = value_dim
        self.max_tokens = max_tokens
        self.length = 0

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor | None = None):
        """Store k [T, Hkv, Dk] (and v [T, Hkv, Dv]) at start..start+T-1; return
        (k [Hkv, S, Dk], v [Hkv, S, Dv]) views."""
        if self.v is not None:
            return super().update(layer, start, k, v)
        end = start + k.shape[0]
        if end > self.max_tokens:
            raise ValueError(f"KV cache full: {end} tokens > {self.max_tokens}")
        self.k[layer, :, start:end] = k.transpose(0, 1)
        keys = self.k[layer, :, :end]
        return keys, keys[..., : self.value_dim]


def latent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """q [T, H, Dk] at positions start.., k [Hkv, S, Dk], v [Hkv, S, Dv] (f16 cache views;
    MLA: Hkv = 1, Dk = R + Dr, Dv = R) -> [T, H, Dv]. Rounded as llama.cpp's default CPU
    attention: q to the cache dtype before q·k, the softmax probabilities to the cache dtype
    before they weight the values. On the CPU each query alone over exactly the keys it sees
    (so a cached decode step equals a full forward, see layers.attention_per_query); on a GPU
    all queries in one masked product."""
    if q.device.type == "cpu":
        return latent_attention_per_query(q, k, v, start, scale)
    return latent_attention_batched(q, k, v, start, scale)


def latent_attention_per_query(q, k, v, start: int, scale: float) -> torch.Tensor:
    return per_query_heads(q, k, v, start, scale)  # the same loop and roundings as layers


def latent_attention_batched(q, k, v, start: int, scale: float) -> torch.Tensor:
    t, h, dk = q.shape
    hkv, s, dv = v.shape
    qg = q.to(k.dtype).float().view(t, hkv, h // hkv, dk)  # [T, Hkv, G, Dk]
    scores = torch.einsum("tkgd,ksd->tkgs", qg, k.float()) * scale  # [T, Hkv, G, S]
    if t > 1:  # query i sits at position start + i and sees keys 0..start+i
        future = torch.arange(s, device=q.device)[None, :] > (start + torch.arange(t, device=q.device))[:, None]
        scores = scores.masked_fill(future[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).float()
    return torch.einsum("tkgs,ksv->tkgv", probs, v.float()).reshape(t, h, dv)
