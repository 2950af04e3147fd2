"""qwen3moe: llama with experts plus RMSNorm of each query and key head before RoPE
(`attn_q_norm`/`attn_k_norm`, [Dh]); NEOX RoPE; top-k gate weights renormalised (config)."""

from __future__ import annotations

from moechat.backends.runtime import llama
from moechat.backends.runtime.layers import rms_norm


class Model(llama.Model):
    def load_extra(self, i):
        return {"q_norm": self.tensor(f"blk.{i}.attn_q_norm.weight"),
                "k_norm": self.tensor(f"blk.{i}.attn_k_norm.weight")}

    def qk_norm(self, layer, q, k):  # q [T, H, Dh], k [T, Hkv, Dh]: per head
        eps = self.args.norm_eps
        return rms_norm(q, layer.extra["q_norm"], eps), rms_norm(k, layer.extra["k_norm"], eps)
