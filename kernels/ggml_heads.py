"""Per-head products in one ggml graph: y[h] = W[h] @ x[h] for a stacked 3-D GGUF weight
(ggml shape (D, N, H)), the batched ggml_mul_mat llama.cpp runs for DeepSeek's MLA
(attn_k_b absorbing the queries, attn_v_b decompressing the outputs). ggml's kernels on the
quantized bytes in place: the activation is rounded to the weight's vec-dot type exactly as
in llama.cpp, and nothing is dequantized. (Why by hand: see kernels/ggml_ops.py.)

Axis legend: H heads, T tokens, D input dim (ne0), N output rows (ne1).
"""

from __future__ import annotations

import numpy as np

from moechat.kernels.ggml import GGML_TYPE_F32, CpuBackend, QuantWeight, _Graph
from moechat.kernels.ggml_ops import _cached_call


class _HeadsGraph(_Graph):
    def __init__(self, backend: CpuBackend, weight: QuantWeight, n_tokens: int):
        super().__init__(backend)
        d, n, h = weight.shape
        x = self._new(GGML_TYPE_F32, d, n_tokens, h)  # [H, T, D] row-major
        y = self.lib.ggml_mul_mat(self.ctx, self._weight(weight), x)  # [H, T, N]
        self._finish(y)
        self.x, self.y = self._view(x, (h, n_tokens, d)), self._view(y, (h, n_tokens, n))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        np.copyto(self.x, x)
        self._run()
        return self.y.copy()


class HeadwiseLinear:
    """x [H, T, D] float32 -> [H, T, N]: each head's slice of x times its own matrix."""

    def __init__(self, weight: QuantWeight, backend: CpuBackend):
        if len(weight.shape) != 3:
            raise ValueError(f"HeadwiseLinear needs a 3-D weight, got {weight.shape}")
        self.weight, self.backend = weight, backend
        self.in_features, self.out_features, self.n_heads = weight.shape
        self._graphs: dict[tuple, _HeadsGraph] = {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] != self.n_heads or x.shape[-1] != self.in_features:
            raise ValueError(f"input {x.shape} does not fit weight {self.weight.shape} (ggml order)")
        t = x.shape[1]
        return _cached_call(self._graphs, (t,), _HeadsGraph, self.backend, self.weight, t, inputs=(x,))

    def close(self) -> None:
        for g in self._graphs.values():
            g.close()
        self._graphs.clear()
