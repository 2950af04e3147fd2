"""ggml's op graphs over GGUF weights read in place: y = W @ x, RMSNorm with the products that
read it, and the MoE experts op; each graph is built once per (n_tokens, ...) and re-run.
Also the random valid blocks and the matvec rate the tests and the profiler measure with.

Why by hand: these are the few graphs the torch runtime needs from ggml's CPU kernels (see
kernels/ggml.py for the ctypes route and its traps); no library exposes them to Python.

Axis legend: T tokens, D input dim (ne0), N output rows (ne1), E experts, A active experts.
"""

from __future__ import annotations

import time

import numpy as np

from moechat.kernels.ggml import (
    GGML_TYPE_F32, GGML_TYPE_I32, CpuBackend, PackedWeight, QuantWeight, _Graph, aligned_empty, ggml_type_id,
)


# ---- y = W @ x --------------------------------------------------------------------------


class _MatmulGraph(_Graph):
    def __init__(self, backend: CpuBackend, weight: QuantWeight, n_tokens: int):
        super().__init__(backend)
        d, n = weight.shape
        x = self._new(GGML_TYPE_F32, d, n_tokens)  # [T, D] row-major
        y = self.lib.ggml_mul_mat(self.ctx, self._weight(weight), x)  # [T, N]
        self._finish(y)
        self.x, self.y = self._view(x, (n_tokens, d)), self._view(y, (n_tokens, n))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        np.copyto(self.x, x)
        self._run()
        return self.y.copy()


class QuantLinear:
    """y = x @ W.T with W a GGUF weight (any ggml type) read in place; graphs cached per T."""

    def __init__(self, weight: QuantWeight, backend: CpuBackend):
        if len(weight.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight, got {weight.shape}")
        self.weight, self.backend = weight, backend
        self.in_features, self.out_features = weight.shape
        self._graphs: dict[tuple, _MatmulGraph] = {}  # decode's graph (T == 1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x [T, D] (or [D]) float32 -> [T, N] (or [N]) float32."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, weight expects {self.in_features}")
        x2 = x.reshape(-1, self.in_features)
        y = _cached_call(self._graphs, (x2.shape[0],), _MatmulGraph, self.backend, self.weight, x2.shape[0], inputs=(x2,))
        return y[0] if x.ndim == 1 else y

    def close(self) -> None:
        for g in self._graphs.values():
            g.close()
        self._graphs.clear()


def _cached_call(graphs: dict, key: tuple, build, *build_args, inputs: tuple) -> np.ndarray:
    """Run the graph `build(*build_args)` on `inputs`; key = (n_tokens, anything else the graph
    depends on). Decode's graphs (one token) are built once and kept per key; a prefill's is
    built, run and freed, so its large intermediates do not stay resident per layer."""
    g = graphs.get(key)
    if g is not None:
        return g(*inputs)
    g = build(*build_args)
    if key[0] == 1:
        graphs[key] = g
        return g(*inputs)
    try:
        return g(*inputs)
    finally:
        g.close()


# ---- around a layer's attention: RMSNorm and the products that read it, in one graph -------


class _NormedProductsGraph(_Graph):
    """h = x (+ W_in @ a);  n = rms_norm(h) * g;  ys = [W_i @ n]."""

    def __init__(self, backend: CpuBackend, norm: QuantWeight, eps: float, weights: list,
                 w_in, n_tokens: int):
        super().__init__(backend)
        d = norm.shape[0]
        x = self._new(GGML_TYPE_F32, d, n_tokens)  # [T, D]
        h, a = x, None
        if w_in is not None:
            a = self._new(GGML_TYPE_F32, w_in.shape[0], n_tokens)  # [T, Din]
            h = self.lib.ggml_add(self.ctx, x, self.lib.ggml_mul_mat(self.ctx, self._weight(w_in), a))  # [T, D]
        n = self.lib.ggml_mul(self.ctx, self.lib.ggml_rms_norm(self.ctx, h, eps), self._weight(norm))  # [T, D]
        ys = [self.lib.ggml_mul_mat(self.ctx, self._weight(w), n) for w in weights]  # [T, N_i]
        outs = ([h, n] if w_in is not None else []) + ys
        self._finish(*outs)
        self.x = self._view(x, (n_tokens, d))
        self.a = self._view(a, (n_tokens, w_in.shape[0])) if w_in is not None else None
        shapes = ([(n_tokens, d)] * 2 if w_in is not None else []) + [(n_tokens, w.shape[1]) for w in weights]
        self.outs = [self._view(t, shape) for t, shape in zip(outs, shapes)]

    def __call__(self, x: np.ndarray, a: np.ndarray | None) -> list[np.ndarray]:
        np.copyto(self.x, x)
        if self.a is not None:
            np.copyto(self.a, a)
        self._run()
        return [o.copy() for o in self.outs]


class NormedLinears:
    """One graph for each step around a layer's attention, as llama.cpp computes them:
    without `w_in`:  x -> [W_i @ (rms_norm(x) * g)]                    (the q, k, v products)
    with `w_in`:     (x, a) -> [h = x + W_in @ a, n = rms_norm(h) * g, W_i @ n ...]
                                     (output projection and residual, then the router or a
                                      dense FFN's gate and up products)
    x [T, D] float32; the norm weight g is an F32 (D, 1) QuantWeight; graphs cached per T."""

    def __init__(self, norm: QuantWeight, eps: float, weights: list, backend: CpuBackend, w_in=None):
        d = norm.shape[0]
        if norm.ggml_type != GGML_TYPE_F32 or norm.shape != (d, 1):
            raise ValueError(f"the norm weight must be F32 of shape (D, 1), got type {norm.ggml_type} {norm.shape}")
        if any(w.shape[0] != d or len(w.shape) != 2 for w in weights) or (w_in is not None and w_in.shape[1] != d):
            raise ValueError(f"weights do not fit D={d}: {[w.shape for w in weights]}, in {getattr(w_in, 'shape', None)}")
        self.norm, self.eps, self.weights, self.backend, self.w_in = norm, float(eps), weights, backend, w_in
        self.dim = d
        self._graphs: dict[tuple, _NormedProductsGraph] = {}  # decode's graph (T == 1)

    def __call__(self, x: np.ndarray, a: np.ndarray | None = None) -> list[np.ndarray]:
        x2 = x.reshape(-1, self.dim)
        if (a is None) != (self.w_in is None):
            raise ValueError("pass `a` exactly when the step has an input projection")
        return _cached_call(self._graphs, (x2.shape[0],), _NormedProductsGraph, self.backend, self.norm, self.eps,
                            self.weights, self.w_in, x2.shape[0], inputs=(x2, a))

    def close(self) -> None:
        for g in self._graphs.values():
            g.close()
        self._graphs.clear()


# ---- the MoE op: a gated FFN for the selected experts of stacked expert tensors -----------

# gpt-oss's clamped SwiGLU (llama.cpp's LLM_FFN_SWIGLU_OAI_MOE constants):
#   g' = min(g, limit), u' = clamp(u, -limit, limit), h = g' * sigmoid(alpha * g') * (u' + 1)
OAI_ALPHA, OAI_LIMIT = 1.702, 7.0
ACTIVATIONS = ("swiglu", "swiglu_oai")


class _ExpertsGraph(_Graph):
    """y[t, a] = down_e(act(gate_e(x_t), up_e(x_t))) for e = ids[t, a] (each product plus
    expert e's bias row when biases are given, ggml_add_id as llama.cpp does); with
    `weighted`, the output is instead sum_a w[t, a] * y[t, a], summed in slot order."""

    def __init__(self, backend, gate: QuantWeight, up: QuantWeight, down: QuantWeight, n_tokens: int,
                 n_used: int, weighted: bool, biases=None, activation: str = "swiglu"):
        super().__init__(backend)
        d, i, e = gate.shape
        lib, ctx = self.lib, self.ctx
        x = self._new(GGML_TYPE_F32, d, 1, n_tokens)  # [T, 1, D]
        ids = self._new(GGML_TYPE_I32, n_used, n_tokens)  # [T, A]
        b = [self._weight(t) for t in biases] if biases is not None else None  # [E, I], [E, I], [E, D]

        def product(w, inp, k):  # [T, A, N], plus bias row ids[t, a] of projection k
            y = lib.ggml_mul_mat_id(ctx, self._weight(w), inp, ids)
            return y if b is None else lib.ggml_add_id(ctx, y, b[k], ids)

        u = product(up, x, 1)  # [T, A, I]   (llama.cpp's order: up, then gate)
        g = product(gate, x, 0)  # [T, A, I]
        if activation == "swiglu_oai":
            h = lib.ggml_swiglu_oai(ctx, g, u, OAI_ALPHA, OAI_LIMIT)  # [T, A, I]
        else:
            h = lib.ggml_swiglu_split(ctx, g, u)  # silu(g) * u      [T, A, I]
        y = product(down, h, 2)  # [T, A, D]
        self.w = None
        if weighted:
            w = self._new(GGML_TYPE_F32, 1, n_used, n_tokens)  # [T, A, 1]
            y = lib.ggml_mul(ctx, y, w)  # [T, A, D], each slot times its gate weight
            row, slot = d * 4, d * n_used * 4  # strides of [T, A, D] float32 in bytes
            total = lib.ggml_view_2d(ctx, y, d, n_tokens, slot, 0)  # [T, D], slot 0
            for a in range(1, n_used):
                total = lib.ggml_add(ctx, total, lib.ggml_view_2d(ctx, y, d, n_tokens, slot, a * row))
            y = total if n_used > 1 else lib.ggml_cont(ctx, total)
        self._finish(y)
        self.x, self.ids = self._view(x, (n_tokens, d)), self._view(ids, (n_tokens, n_used), np.int32)
        if weighted:
            self.w = self._view(w, (n_tokens, n_used))
        self.y = self._view(y, (n_tokens, d) if weighted else (n_tokens, n_used, d))

    def __call__(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        np.copyto(self.x, x)
        np.copyto(self.ids, ids)
        if weights is not None:
            np.copyto(self.w, weights)
        self._run()
        return self.y.copy()


class QuantExperts:
    """The routed experts of one layer: y[t, a] = down_e(act(gate_e(x_t), up_e(x_t))),
    e = expert_ids[t, a], from stacked 3-D GGUF expert tensors (ggml_mul_mat_id): only the
    selected experts' bytes are read. `act` is SwiGLU, or gpt-oss's clamped variant; `biases`
    (gpt-oss) are F32 (I, E), (I, E), (D, E) weights added per selected expert. Weighting by
    the gate and the sum over A are done in the same graph when the gate weights are given,
    else left to the caller."""

    def __init__(self, gate: QuantWeight, up: QuantWeight, down: QuantWeight, backend: CpuBackend,
                 biases: tuple[QuantWeight, QuantWeight, QuantWeight] | None = None, activation: str = "swiglu"):
        d, i, e = gate.shape
        if up.shape != (d, i, e) or down.shape != (i, d, e):
            raise ValueError(f"expert shapes disagree: gate {gate.shape}, up {up.shape}, down {down.shape}")
        if biases is not None and (tuple(b.shape for b in biases) != ((i, e), (i, e), (d, e))
                                   or any(b.ggml_type != GGML_TYPE_F32 for b in biases)):
            raise ValueError(f"expert biases must be F32 (I, E), (I, E), (D, E); got {[b.shape for b in biases]}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown expert activation {activation!r} (choose from {', '.join(ACTIVATIONS)})")
        self.gate, self.up, self.down, self.backend = gate, up, down, backend
        self.biases, self.activation = biases, activation
        self.repacked = any(isinstance(w, PackedWeight) for w in (gate, up, down))
        self.dim, self.ffn_dim, self.n_experts = d, i, e
        self._graphs: dict[tuple, _ExpertsGraph] = {}  # decode's graphs (T == 1), per (A, weighted)

    def __call__(self, x: np.ndarray, expert_ids: np.ndarray, gate_weights: np.ndarray | None = None) -> np.ndarray:
        """x [T, D] float32, expert_ids [T, A] integer -> [T, A, D] float32; with gate_weights
        [T, A]: sum_a gate_weights[t, a] * y[t, a] -> [T, D]."""
        if x.ndim != 2 or x.shape[1] != self.dim or expert_ids.ndim != 2 or expert_ids.shape[0] != x.shape[0]:
            raise ValueError(f"x {x.shape} / expert_ids {expert_ids.shape} do not fit D={self.dim}")
        if gate_weights is not None and gate_weights.shape != expert_ids.shape:
            raise ValueError(f"gate weights {gate_weights.shape} do not match expert ids {expert_ids.shape}")
        if expert_ids.size and (expert_ids.min() < 0 or expert_ids.max() >= self.n_experts):
            raise ValueError(f"expert ids must be in [0, {self.n_experts})")
        if self.repacked and expert_ids.shape[1] > 1 and (np.diff(np.sort(expert_ids, 1), axis=1) == 0).any():
            # ggml's repacked mul_mat_id keeps at most T rows per expert: a token naming an
            # expert twice overflows that table (routing never does; refuse, not garbage)
            raise ValueError("expert ids repeat within a token (repacked experts need distinct ids)")
        n_tokens, n_used = expert_ids.shape
        weighted = gate_weights is not None
        inputs = (x, expert_ids) + ((gate_weights,) if weighted else ())
        return _cached_call(self._graphs, (n_tokens, n_used, weighted), _ExpertsGraph, self.backend,
                            self.gate, self.up, self.down, n_tokens, n_used, weighted, self.biases,
                            self.activation, inputs=inputs)

    def close(self) -> None:
        for g in self._graphs.values():
            g.close()
        self._graphs.clear()


# ---- measurement -------------------------------------------------------------------------


# Byte offsets of the half-float scale fields inside one block, per type (ggml-common.h).
_F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}


def random_blocks(qtype: int | str, n_rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random valid blocks of `qtype`, [n_rows, row_bytes] uint8, 32-byte aligned.

    Quantized types: random bytes with each half-float scale (MXFP4: its exponent) set to a
    small finite value (random bytes would hold NaN/Inf or huge scales). Float types: random small values."""
    import gguf

    qtype = gguf.GGMLQuantizationType(ggml_type_id(qtype))
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise ValueError(f"{qtype.name}: {cols} columns is not a multiple of {block}")
    row_bytes = cols // block * block_bytes
    data = aligned_empty(n_rows * row_bytes)
    if qtype == gguf.GGMLQuantizationType.F32:
        data.view(np.float32)[:] = rng.standard_normal(n_rows * cols, dtype=np.float32) * 0.05
    elif qtype == gguf.GGMLQuantizationType.F16:
        data.view(np.float16)[:] = rng.standard_normal(n_rows * cols, dtype=np.float32) * 0.05
    elif qtype == gguf.GGMLQuantizationType.BF16:
        f = rng.standard_normal(n_rows * cols, dtype=np.float32) * 0.05
        data.view(np.uint16)[:] = (f.view(np.uint32) >> 16).astype(np.uint16)
    else:
        data[:] = rng.integers(0, 256, data.size, dtype=np.uint8)
        blocks = data.reshape(-1, block_bytes)
        for off in _F16_FIELDS.get(qtype.name, ()):
            scale = rng.uniform(1e-3, 1e-2, blocks.shape[0]).astype(np.float16)
            blocks[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
        if qtype.name == "MXFP4":  # byte 0 is a power-of-two exponent (e8m0): 2^-9 .. 2^-4
            blocks[:, 0] = rng.integers(118, 124, blocks.shape[0], dtype=np.uint8)
    return data.reshape(n_rows, row_bytes)


def random_quant_weight(qtype: int | str, rows: int, cols: int, seed: int = 0) -> tuple[QuantWeight, np.ndarray]:
    """A random (rows x cols) weight in `qtype` and its dequantized float32 values."""
    import gguf

    qtype = gguf.GGMLQuantizationType(ggml_type_id(qtype))
    data = random_blocks(qtype, rows, cols, np.random.default_rng(seed))
    dense = gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(rows, cols)
    return QuantWeight(data, int(qtype), (cols, rows)), dense


def quantized_matvec_bytes_per_s(qtype: int | str, rows: int, cols: int, threads: int, repeats: int = 20) -> float:
    """Weight bytes read per second by ggml's matrix-vector product (batch 1), best of `repeats`.

    The weight is random blocks written straight as bytes (quantizing 100M floats in Python
    would take minutes); the rate depends on the shape and type, not the values."""
    import gguf

    qtype = gguf.GGMLQuantizationType(ggml_type_id(qtype))
    rng = np.random.default_rng(0)
    data = random_blocks(qtype, rows, cols, rng)
    nbytes = data.nbytes
    backend = CpuBackend(threads)
    linear = QuantLinear(QuantWeight(data, int(qtype), (cols, rows)), backend)
    x = rng.standard_normal(cols, dtype=np.float32)
    linear(x)  # warm-up: builds the graph, faults the pages in
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        linear(x)
        best = min(best, time.perf_counter() - t0)
    linear.close()
    backend.close()
    return nbytes / best
