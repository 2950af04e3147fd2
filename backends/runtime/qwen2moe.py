"""qwen2moe: llama with experts plus q/k/v biases (picked up by Linear from `.bias`
tensors), NEOX RoPE, top-k gate weights not renormalised, and a shared expert added to
every token, scaled by a sigmoid gate:  y = experts(x) + sigmoid(w·x) * shared(x)."""

from __future__ import annotations

import torch

from moechat.backends.runtime import llama
from moechat.backends.runtime.layers import swiglu


class Model(llama.Model):
    def load_extra(self, i):
        p = f"blk.{i}."
        if f"{p}ffn_gate_shexp.weight" not in self.weights:
            return {}
        return {
            "shared": tuple(self.linear(f"{p}ffn_{n}_shexp.weight") for n in ("gate", "up", "down")),
            "shared_gate": self.tensor(f"{p}ffn_gate_inp_shexp.weight"),  # [D]
        }

    def feed_forward(self, i, layer, x, reads_x):
        out = super().feed_forward(i, layer, x, reads_x)  # routed experts [T, D]
        if "shared" in layer.extra:
            gate, up, down = layer.extra["shared"]
            shared = down(swiglu(gate(x), up(x)))  # [T, D]
            gate_logit = (x @ layer.extra["shared_gate"])[:, None]  # [T, 1]
            out = out + shared * torch.sigmoid(gate_logit)
        return out
