"""olmoe: llama with experts plus RMSNorm over the whole query and key projections (width
H*Dh and Hkv*Dh, not per head) before RoPE; NEOX RoPE; top-k gate weights not renormalised."""

from __future__ import annotations

from moechat.backends.runtime import llama
from moechat.backends.runtime.layers import rms_norm


class Model(llama.Model):
    def load_extra(self, i):
        return {"q_norm": self.tensor(f"blk.{i}.attn_q_norm.weight"),
                "k_norm": self.tensor(f"blk.{i}.attn_k_norm.weight")}

    def qk_norm(self, layer, q, k):  # q [T, H, Dh], k [T, Hkv, Dh]: over all heads at once
        eps = self.args.norm_eps
        q = rms_norm(q.flatten(1), layer.extra["q_norm"], eps).view(q.shape)
        k = rms_norm(k.flatten(1), layer.extra["k_norm"], eps).view(k.shape)
        return q, k
