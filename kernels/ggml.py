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
    "ggml_swiglu_oai": (_p, [_p, _p, _p, ctypes.c_float, ctypes.c_float]),
    "ggml_add_id": (_p, [_p, _p, _p, _p]),
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
    "ggml_cpu_has_avx512": (ctypes.c_int, []),
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
GGML_TYPE_MXFP4 = 39
GGML_TYPE_Q2_K = 10
REPACK_TYPES = (GGML_TYPE_Q4_0, GGML_TYPE_Q4_K, GGML_TYPE_MXFP4, GGML_TYPE_Q2_K)
REPACK_NEEDS_AVX512 = (GGML_TYPE_Q2_K,)  # Q2_K's 8x8 layout is ggml's AVX-512 path only
RUNTIME_REPACK_TYPES = (GGML_TYPE_Q4_0, GGML_TYPE_MXFP4)  # what the runtime repacks at load
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


def can_repack(w: QuantWeight, types: tuple[int, ...] = RUNTIME_REPACK_TYPES) -> bool:
    """Whether ggml's repack buffer takes this weight. Kept to cases whose rule is known
    (ggml_repack_get_optimal_repack_type on x86: Q4_0, Q4_K and MXFP4 -> 8x8 with AVX2, Q2_K
    -> 8x8 with AVX-512, rows a multiple of 8); any other would reach a null layout inside
    ggml and crash. The runtime repacks Q4_0 and MXFP4 (their 3-D expert paths are tested);
    the profiler measures Q4_0, Q4_K, MXFP4 and Q2_K, as llama.cpp loads them repacked."""
    if w.ggml_type not in types or w.ggml_type not in REPACK_TYPES or w.shape[1] % 8:
        return False
    if w.ggml_type in REPACK_NEEDS_AVX512:
        return bool(lib().ggml_cpu_has_avx512())
    return bool(lib().ggml_cpu_has_avx2())


def maybe_repack(w: QuantWeight, types: tuple[int, ...] = RUNTIME_REPACK_TYPES) -> QuantWeight | PackedWeight:
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
        self.lock = threading.Lock()  # one graph computes at a time on a backend
        self.set_threads(threads)

    def set_threads(self, threads: int) -> None:
        """Takes effect from the next graph computed (never during one: the lock)."""
        threads = max(1, int(threads))
        with self.lock:
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


# ---- measurement -------------------------------------------------------------------------


def aligned_empty(nbytes: int, dtype=np.uint8) -> np.ndarray:
    """A zeroed array whose data starts on a TENSOR_ALIGNMENT boundary (numpy gives 16)."""
    raw = np.zeros(nbytes + TENSOR_ALIGNMENT, dtype=np.uint8)
    start = (-raw.ctypes.data) % TENSOR_ALIGNMENT
    return raw[start : start + nbytes].view(dtype)
