"""Multi-head latent attention (DeepSeek-V2/V3) in its absorbed form, as llama.cpp runs it:
the latent cache and the attention over it.

Each token caches one "head" of R + Dr values: the RMS-normed compressed KV (R =
kv_lora_rank) and the rotated key part shared by every head (Dr rope dims). Queries are
turned into that space (q_nope·W_kb: "absorbed"), so attention is multi-query attention over
the latent; the values are the latent's first R entries (a view of the same cache, as
llama.cpp's K-only MLA cache), and each head's R-wide output is decompressed by W_vb after.
So the cache costs (R + Dr) x 2 bytes per token and layer in f16 — the model card's number.

Legend: T new tokens, S cached + new tokens, H heads, R kv_lora_rank, Dr rope dims.
"""

from __future__ import annotations

import torch


class LatentCache:
    """Preallocated [L, 1, S_max, R + Dr] f16 latent per layer; V is a view of its first R
    columns. Same interface as KVCache (update / advance / truncate / length)."""

    def __init__(self, n_layers: int, latent_dim: int, value_dim: int, max_tokens: int,
                 dtype: torch.dtype = torch.float16, device="cpu"):
        self.k = torch.zeros((n_layers, 1, max_tokens, latent_dim), dtype=dtype, device=device)
        self.value_dim = value_dim  # R: the values are k[..., :R]
        self.max_tokens = max_tokens
        self.length = 0

    def update(self, layer: int, start: int, latent: torch.Tensor, _v=None):
        """Store latent [T, 1, R + Dr] at start..start+T-1; return (k [1, S, R+Dr], v [1, S, R])."""
        end = start + latent.shape[0]
        if end > self.max_tokens:
            raise ValueError(f"KV cache full: {end} tokens > {self.max_tokens}")
        self.k[layer, :, start:end] = latent.transpose(0, 1)
        k = self.k[layer, :, :end]
        return k, k[..., : self.value_dim]

    def advance(self, end: int) -> None:
        self.length = end

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


def latent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """q [T, H, R+Dr] at positions start.., k [1, S, R+Dr], v [1, S, R] (f16 cache views)
    -> [T, H, R]. Rounded as llama.cpp's default CPU attention: q to the cache dtype before
    q·k, the softmax probabilities to the cache dtype before they weight the values. On the
    CPU each query alone over exactly the keys it sees (so a cached decode step equals a full
    forward, see layers.attention_per_query); on a GPU all queries in one masked product."""
    t, h, _ = q.shape
    qh = q.to(k.dtype).float()  # [T, H, R+Dr]
    kf, vf = k[0].float(), v[0].float()  # [S, R+Dr], [S, R]
    if q.device.type == "cpu":
        out = torch.empty(t, h, vf.shape[-1], device=q.device)
        for i in range(t):
            seen = start + i + 1
            scores = torch.mm(qh[i], kf[:seen].T).mul_(scale)  # [H, seen]
            probs = torch.softmax(scores, dim=-1).to(v.dtype).float()
            torch.mm(probs, vf[:seen], out=out[i])  # [H, R]
        return out
    s = kf.shape[0]
    scores = torch.einsum("thd,sd->ths", qh, kf) * scale  # [T, H, S]
    if t > 1:
        future = torch.arange(s, device=q.device)[None, :] > (start + torch.arange(t, device=q.device))[:, None]
        scores = scores.masked_fill(future[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).float()
    return torch.einsum("ths,sr->thr", probs, vf)  # [T, H, R]
