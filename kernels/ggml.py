"""ggml's own CPU kernels, called on a GGUF's quantized bytes in place (ctypes).

Why: at batch 1 an expert's matrix-vector product is memory-bound, and ggml's quantized
dot products read the GGUF's blocks at the memory limit (~27 GB/s here on Q4_0) where torch
manages ~13 GB/s on bf16 and far less with its int4/int8 weight-only ops. ggml quantizes the
activation (Q8_0/Q8_K, or F16 for F16 weights) before the dot product, exactly as llama.cpp
does, so using it also gives llama.cpp's numerics. See shared/notes/ggml-kernels.md.

Route: symbols come through libllama's own handle (`llama_cpp.llama_cpp._lib`), so this is
the very ggml copy llama.cpp uses. Every ggml object is an opaque pointer; weights are wrapped
where they lie (`ggml_backend_cpu_buffer_from_ptr`), everything else (inputs, intermediates,
outputs) is allocated by ggml once per graph. A graph is built once per (shape, n_tokens)
and re-run with new input values.

Traps handled here: ggml aborts the process on a failed assertion, so shapes, types, byte
counts, expert ids and 32-byte alignment are checked in Python first; every wrapped array is
kept alive by the object whose graph points at it.

Axis legend: T tokens, D input dim (ne0), N output rows (ne1), E experts, A active experts.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import time
from dataclasses import dataclass

import numpy as np

TENSOR_ALIGNMENT = 32
GGML_TYPE_F32 = 0
GGML_TYPE_I32 = 26
GGML_STATUS_SUCCESS = 0

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_size = ctypes.c_size_t


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", _size), ("mem_buffer", _p), ("no_alloc", ctypes.c_bool)]


_SIGNATURES = {
    # name: (restype, argtypes)
    "ggml_init": (_p, [_InitParams]),
    "ggml_free": (None, [_p]),
    "ggml_tensor_overhead": (_size, []),
    "ggml_graph_overhead": (_size, []),
    "ggml_new_tensor_1d": (_p, [_p, ctypes.c_int, _i64]),
    "ggml_new_tensor_2d": (_p, [_p, ctypes.c_int, _i64, _i64]),
    "ggml_new_tensor_3d": (_p, [_p, ctypes.c_int, _i64, _i64, _i64]),
    "ggml_reshape_3d": (_p, [_p, _p, _i64, _i64, _i64]),
    "ggml_mul_mat": (_p, [_p, _p, _p]),
    "ggml_mul_mat_id": (_p, [_p, _p, _p, _p]),
    "ggml_swiglu_split": (_p, [_p, _p, _p]),
    "ggml_mul": (_p, [_p, _p, _p]),
    "ggml_add": (_p, [_p, _p, _p]),
    "ggml_cont": (_p, [_p, _p]),
    "ggml_rms_norm": (_p, [_p, _p, ctypes.c_float]),
    "ggml_view_2d": (_p, [_p, _p, _i64, _i64, _size, _size]),
    "ggml_new_graph": (_p, [_p]),
    "ggml_build_forward_expand": (None, [_p, _p]),
    "ggml_nbytes": (_size, [_p]),
    "ggml_get_data": (_p, [_p]),
    "ggml_row_size": (_size, [ctypes.c_int, _i64]),
    "ggml_blck_size": (_i64, [ctypes.c_int]),
    "ggml_backend_cpu_init": (_p, []),
    "ggml_backend_cpu_set_n_threads": (None, [_p, ctypes.c_int]),
    "ggml_backend_free": (None, [_p]),
    "ggml_backend_graph_compute": (ctypes.c_int, [_p, _p]),
    "ggml_backend_cpu_buffer_from_ptr": (_p, [_p, _size]),
    "ggml_backend_tensor_alloc": (ctypes.c_int, [_p, _p, _p]),
    "ggml_backend_alloc_ctx_tensors": (_p, [_p, _p]),
    "ggml_backend_buffer_free": (None, [_p]),
    "ggml_backend_buft_alloc_buffer": (_p, [_p, _size]),
    "ggml_backend_buft_get_alloc_size": (_size, [_p, _p]),
    "ggml_backend_buffer_get_base": (_p, [_p]),
    "ggml_backend_buffer_set_usage": (None, [_p, ctypes.c_int]),
    "ggml_backend_tensor_set": (None, [_p, _p, _size, _size]),
    "ggml_cpu_has_avx2": (ctypes.c_int, []),
    # C++ symbol (ggml-cpu's repack buffer type: weights stored in interleaved layouts that
    # ggml's faster GEMV/GEMM kernels read)
    "_Z35ggml_backend_cpu_repack_buffer_typev": (_p, []),
}


@functools.cache
def lib() -> ctypes.CDLL:
    """libllama's handle with ggml's signatures declared (dlsym searches its dependencies)."""
    import llama_cpp.llama_cpp as ll

    handle = ll._lib
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(handle, name)
        fn.restype, fn.argtypes = restype, argtypes
    return handle


# ---- weights ----------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantWeight:
    """A weight as it lies in the GGUF: raw bytes, ggml type id and ggml shape.

    `shape` is ggml order (ne0 = input dim first): (D, N) for a matrix, (D, N, E) for a stack
    of E expert matrices. `data` is any array whose buffer holds exactly those bytes (a view on
    the GGUF's memory map); it is kept alive by whoever holds this object.
    """

    data: np.ndarray
    ggml_type: int
    shape: tuple[int, ...]

    def __post_init__(self):
        check_weight(self)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def ggml_type_id(type_name_or_id: int | str) -> int:
    import gguf

    if isinstance(type_name_or_id, str):
        try:
            return int(gguf.GGMLQuantizationType[type_name_or_id])
        except KeyError:
            raise ValueError(f"unknown ggml type {type_name_or_id!r}") from None
    return int(gguf.GGMLQuantizationType(type_name_or_id))


def check_weight(w: QuantWeight) -> None:
    """Everything ggml would assert on, checked here so that it raises instead of aborting."""
    import gguf

    qtype = gguf.GGMLQuantizationType(w.ggml_type)  # ValueError on an unknown id
    if qtype not in gguf.GGML_QUANT_SIZES:
        raise ValueError(f"ggml type {qtype.name} has no block layout")
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if not 2 <= len(w.shape) <= 3 or min(w.shape) <= 0:
        raise ValueError(f"weight shape {w.shape}: need (D, N) or (D, N, E)")
    if w.shape[0] % block:
        raise ValueError(f"{qtype.name}: row length {w.shape[0]} is not a multiple of {block}")
    expected = int(lib().ggml_row_size(int(qtype), w.shape[0])) * int(np.prod(w.shape[1:]))
    if w.data.nbytes != expected:
        raise ValueError(f"{qtype.name} {w.shape}: {w.data.nbytes} bytes, expected {expected}")
    if not w.data.flags.c_contiguous:
        raise ValueError("weight bytes must be contiguous")
    if w.data.ctypes.data % TENSOR_ALIGNMENT:
        raise ValueError(f"weight bytes are not {TENSOR_ALIGNMENT}-byte aligned")


GGML_TYPE_Q4_0 = 2
GGML_TYPE_Q4_K = 12
REPACK_TYPES = (GGML_TYPE_Q4_0, GGML_TYPE_Q4_K)
REPACK_ROW_MULTIPLE = 8
BUFFER_USAGE_WEIGHTS = 1


class PackedWeight:
    """A weight copied into ggml's repacked CPU layout (e.g. Q4_0 as 8x8 interleaved blocks,
    read by a faster AVX2/AVX-512 GEMV), as llama.cpp does at load. Same bytes, same block
    values, same numerics; it lives in a ggml buffer, not in the file's map."""

    def __init__(self, w: QuantWeight):
        self.lib = lib()
        self.ggml_type, self.shape, self.nbytes = w.ggml_type, w.shape, w.nbytes
        buft = self.lib._Z35ggml_backend_cpu_repack_buffer_typev()
        ctx = self.lib.ggml_init(_InitParams(self.lib.ggml_tensor_overhead() * 2, None, True))
        try:
            make = self.lib.ggml_new_tensor_2d if len(w.shape) == 2 else self.lib.ggml_new_tensor_3d
            t = make(ctx, w.ggml_type, *w.shape)
            self.buffer = self.lib.ggml_backend_buft_alloc_buffer(buft, self.lib.ggml_backend_buft_get_alloc_size(buft, t))
            if not self.buffer:
                raise MemoryError(f"ggml could not allocate {w.nbytes:,} bytes for a repacked weight")
            self.lib.ggml_backend_buffer_set_usage(self.buffer, BUFFER_USAGE_WEIGHTS)
            self.base = self.lib.ggml_backend_buffer_get_base(self.buffer)
            if self.lib.ggml_backend_tensor_alloc(self.buffer, t, self.base) != GGML_STATUS_SUCCESS:
                raise RuntimeError("ggml_backend_tensor_alloc failed")
            with quiet_ggml_log():  # it logs one debug line per tensor
                self.lib.ggml_backend_tensor_set(t, w.data.ctypes.data, 0, w.nbytes)  # repacks
        finally:
            self.lib.ggml_free(ctx)

    def close(self):
        buf, self.buffer = getattr(self, "buffer", None), None
        if buf:
            self.lib.ggml_backend_buffer_free(buf)

    def __del__(self):
        self.close()


@functools.cache
def _silent_log():
    """A llama.cpp/ggml log callback that drops everything (kept alive: ggml holds it)."""
    import llama_cpp

    return llama_cpp.llama_log_callback(lambda level, text, user_data: None)


class quiet_ggml_log:
    """Context manager: llama.cpp/ggml log lines are dropped inside it."""

    def __enter__(self):
        import llama_cpp

        llama_cpp.llama_log_set(_silent_log(), None)

    def __exit__(self, *exc):
        import llama_cpp
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, None)


def can_repack(w: QuantWeight, types: tuple[int, ...] = (GGML_TYPE_Q4_0,)) -> bool:
    """Whether ggml's repack buffer takes this weight. Kept to cases whose rule is known
    (ggml_repack_get_optimal_repack_type on AVX2: Q4_0 and Q4_K -> 8x8, rows a multiple of
    8); any other would reach a null layout inside ggml and crash. The runtime repacks Q4_0
    only (its 3-D expert path is tested with it); the profiler measures both, as llama.cpp
    loads both repacked."""
    return (
        w.ggml_type in types and w.ggml_type in REPACK_TYPES and w.shape[1] % 8 == 0
        and bool(lib().ggml_cpu_has_avx2())
    )


def maybe_repack(w: QuantWeight, types: tuple[int, ...] = (GGML_TYPE_Q4_0,)) -> QuantWeight | PackedWeight:
    return PackedWeight(w) if can_repack(w, types) else w


# ---- backend ----------------------------------------------------------------------------


class CpuBackend:
    """One ggml CPU backend (its thread count and work buffer), shared by many graphs."""

    def __init__(self, threads: int):
        self.lib = lib()
        self.ptr = self.lib.ggml_backend_cpu_init()
        if not self.ptr:
            raise RuntimeError("ggml_backend_cpu_init failed")
        self.threads = 0
        self.set_threads(threads)
        self.lock = threading.Lock()  # one graph computes at a time on a backend

    def set_threads(self, threads: int) -> None:
        threads = max(1, int(threads))
        self.lib.ggml_backend_cpu_set_n_threads(self.ptr, threads)
        self.threads = threads

    def close(self) -> None:
        ptr, self.ptr = self.ptr, None
        if ptr:
            self.lib.ggml_backend_free(ptr)

    def __del__(self):
        self.close()


class _Graph:
    """A ggml context + graph whose weights point into caller-owned memory.

    Subclasses create weight tensors with `_weight()`, other leaf tensors with `_new()`, build
    the ops, call `_finish(*outs)`, take numpy views of their inputs and outputs with
    `_view()`, and then, for each call, write the inputs, `_run()` and copy the outputs.
    """

    MAX_TENSORS = 64

    def __init__(self, backend: CpuBackend):
        self.lib = backend.lib
        self.backend = backend
        overhead = self.lib.ggml_tensor_overhead() * self.MAX_TENSORS + self.lib.ggml_graph_overhead()
        self.ctx = self.lib.ggml_init(_InitParams(overhead, None, True))
        if not self.ctx:
            raise RuntimeError("ggml_init failed")
        self._keep: list[object] = []  # arrays our tensors point into
        self._wrapped: list[int] = []  # buffers wrapping caller memory
        self._buffer = None  # the buffer ggml allocated for everything else
        self.graph = None

    def _weight(self, w: QuantWeight | PackedWeight) -> int:
        shape = [int(s) for s in w.shape]
        if len(shape) == 2:
            t = self.lib.ggml_new_tensor_2d(self.ctx, w.ggml_type, *shape)
        else:
            t = self.lib.ggml_new_tensor_3d(self.ctx, w.ggml_type, *shape)
        if self.lib.ggml_nbytes(t) != w.nbytes:
            raise ValueError(f"ggml sizes {w.shape} as {self.lib.ggml_nbytes(t)} bytes, have {w.nbytes}")
        if isinstance(w, PackedWeight):  # already in its ggml buffer: point a tensor at it
            if self.lib.ggml_backend_tensor_alloc(w.buffer, t, w.base) != GGML_STATUS_SUCCESS:
                raise RuntimeError("ggml_backend_tensor_alloc failed")
            self._keep.append(w)
            return t
        ptr = w.data.ctypes.data
        buf = self.lib.ggml_backend_cpu_buffer_from_ptr(ptr, w.nbytes)
        self._wrapped.append(buf)
        if self.lib.ggml_backend_tensor_alloc(buf, t, ptr) != GGML_STATUS_SUCCESS:
            raise RuntimeError("ggml_backend_tensor_alloc failed")
        self._keep.append(w.data)
        return t

    def _new(self, ggml_type: int, *shape: int) -> int:
        make = {1: self.lib.ggml_new_tensor_1d, 2: self.lib.ggml_new_tensor_2d, 3: self.lib.ggml_new_tensor_3d}
        return make[len(shape)](self.ctx, ggml_type, *shape)

    def _finish(self, *outs: int) -> None:
        self.graph = self.lib.ggml_new_graph(self.ctx)
        for out in outs:
            self.lib.ggml_build_forward_expand(self.graph, out)
        self._buffer = self.lib.ggml_backend_alloc_ctx_tensors(self.ctx, self.backend.ptr)
        if not self._buffer:
            raise RuntimeError("ggml could not allocate the graph's tensors")

    def _view(self, t: int, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        """A numpy array on tensor t's memory inside ggml's buffer (valid while the graph
        lives): inputs are written into it and outputs copied out of it, without a ctypes
        call per access."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        assert nbytes == self.lib.ggml_nbytes(t), (shape, dtype)
        memory = (ctypes.c_char * nbytes).from_address(self.lib.ggml_get_data(t))
        return np.frombuffer(memory, dtype=dtype).reshape(shape)

    def _run(self) -> None:
        with self.backend.lock:
            status = self.lib.ggml_backend_graph_compute(self.backend.ptr, self.graph)
        if status != GGML_STATUS_SUCCESS:
            raise RuntimeError(f"ggml graph compute failed (status {status})")

    def close(self) -> None:
        if self._buffer:
            self.lib.ggml_backend_buffer_free(self._buffer)
            self._buffer = None
        for buf in self._wrapped:
            self.lib.ggml_backend_buffer_free(buf)  # frees the wrapper, not the memory
        self._wrapped.clear()
        if self.ctx:
            self.lib.ggml_free(self.ctx)
            self.ctx = None
        self._keep.clear()

    def __del__(self):
        self.close()


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


# ---- the MoE op: a SwiGLU FFN for the selected experts of stacked expert tensors ---------


class _ExpertsGraph(_Graph):
    """y[t, a] = down_e(silu(gate_e(x_t)) * up_e(x_t)) for e = ids[t, a]; with `weighted`,
    the output is instead sum_a w[t, a] * y[t, a], summed in slot order as llama.cpp does."""

    def __init__(self, backend, gate: QuantWeight, up: QuantWeight, down: QuantWeight, n_tokens: int,
                 n_used: int, weighted: bool):
        super().__init__(backend)
        d, i, e = gate.shape
        x = self._new(GGML_TYPE_F32, d, 1, n_tokens)  # [T, 1, D]
        ids = self._new(GGML_TYPE_I32, n_used, n_tokens)  # [T, A]
        g = self.lib.ggml_mul_mat_id(self.ctx, self._weight(gate), x, ids)  # [T, A, I]
        u = self.lib.ggml_mul_mat_id(self.ctx, self._weight(up), x, ids)  # [T, A, I]
        h = self.lib.ggml_swiglu_split(self.ctx, g, u)  # silu(g) * u      [T, A, I]
        y = self.lib.ggml_mul_mat_id(self.ctx, self._weight(down), h, ids)  # [T, A, D]
        self.w = None
        if weighted:
            w = self._new(GGML_TYPE_F32, 1, n_used, n_tokens)  # [T, A, 1]
            y = self.lib.ggml_mul(self.ctx, y, w)  # [T, A, D], each slot times its gate weight
            row, slot = d * 4, d * n_used * 4  # strides of [T, A, D] float32 in bytes
            total = self.lib.ggml_view_2d(self.ctx, y, d, n_tokens, slot, 0)  # [T, D], slot 0
            for a in range(1, n_used):
                total = self.lib.ggml_add(self.ctx, total, self.lib.ggml_view_2d(self.ctx, y, d, n_tokens, slot, a * row))
            y = total if n_used > 1 else self.lib.ggml_cont(self.ctx, total)
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
    """The routed experts of one layer: y[t, a] = down_e(silu(gate_e(x_t)) * up_e(x_t)),
    e = expert_ids[t, a], from stacked 3-D GGUF expert tensors (ggml_mul_mat_id): only the
    selected experts' bytes are read. Weighting by the gate and the sum over A are done in the
    same graph when the gate weights are given, else left to the caller."""

    def __init__(self, gate: QuantWeight, up: QuantWeight, down: QuantWeight, backend: CpuBackend):
        d, i, e = gate.shape
        if up.shape != (d, i, e) or down.shape != (i, d, e):
            raise ValueError(f"expert shapes disagree: gate {gate.shape}, up {up.shape}, down {down.shape}")
        self.gate, self.up, self.down, self.backend = gate, up, down, backend
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
        n_tokens, n_used = expert_ids.shape
        weighted = gate_weights is not None
        inputs = (x, expert_ids) + ((gate_weights,) if weighted else ())
        return _cached_call(self._graphs, (n_tokens, n_used, weighted), _ExpertsGraph, self.backend,
                            self.gate, self.up, self.down, n_tokens, n_used, weighted, inputs=inputs)

    def close(self) -> None:
        for g in self._graphs.values():
            g.close()
        self._graphs.clear()


# ---- measurement -------------------------------------------------------------------------


def aligned_empty(nbytes: int, dtype=np.uint8) -> np.ndarray:
    """A zeroed array whose data starts on a TENSOR_ALIGNMENT boundary (numpy gives 16)."""
    raw = np.zeros(nbytes + TENSOR_ALIGNMENT, dtype=np.uint8)
    start = (-raw.ctypes.data) % TENSOR_ALIGNMENT
    return raw[start : start + nbytes].view(dtype)


# Byte offsets of the half-float scale fields inside one block, per type (ggml-common.h).
_F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}


def random_blocks(qtype: int | str, n_rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random valid blocks of `qtype`, [n_rows, row_bytes] uint8, 32-byte aligned.

    Quantized types: random bytes with each half-float scale set to a small finite value
    (random bytes would hold NaN/Inf scales). Float types: random small values."""
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
