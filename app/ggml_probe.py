"""A batch-1 matvec on weights in ggml's CPU *repack* buffer, as llama.cpp runs them.

llama.cpp loads CPU weights of some types (Q4_0, Q4_K, IQ4_NL ... on AVX2/AVX-512 and ARM)
into the "CPU_REPACK" buffer type, which interleaves rows (e.g. Q4_0 -> 8x8 blocks) for a
faster kernel. kernels/ggml.py wraps weights where they lie (plain CPU buffer, no repack),
which is right for reading a GGUF in place but measures a slower kernel for those types.
This small wrapper (on kernels/ggml.py's graph class) allocates the weight in the repack
buffer, so `moechat profile` measures the rate llama.cpp's decode actually gets. Types the
repack buffer does not handle are stored plainly, exactly as llama.cpp would.
"""

from __future__ import annotations

import ctypes
import functools

_p, _size = ctypes.c_void_p, ctypes.c_size_t
# Types the repack buffer interleaves on x86 with AVX2 (repack.cpp: Q4_0 -> 8x8, Q4_K -> 8x8)
# when the row count is a multiple of 8. For any other type or shape the buffer has no
# repack routine and ggml crashes on upload, so those are refused here.
REPACK_TYPES = ("Q4_0", "Q4_K")
ROW_MULTIPLE = 8


@functools.cache
def _repack_lib():
    from moechat.kernels import ggml

    lib = ggml.lib()
    try:  # ggml logs every repack at debug level; llama-cpp-python's logger prints all levels
        from llama_cpp import _logger  # until a Llama(verbose=...) sets its level

        if _logger.logger.level == 0:
            _logger.set_verbose(False)
    except (ImportError, AttributeError):
        pass
    # C++ symbol (ggml-cpu/repack.h), exported mangled: ggml_backend_cpu_repack_buffer_type()
    fn = getattr(lib, "_Z35ggml_backend_cpu_repack_buffer_typev")
    fn.restype, fn.argtypes = _p, []
    for name, restype, argtypes in (
        ("ggml_backend_buft_alloc_buffer", _p, [_p, _size]),
        ("ggml_backend_buft_get_alloc_size", _size, [_p, _p]),
        ("ggml_backend_buffer_get_base", _p, [_p]),
        ("ggml_backend_tensor_set", None, [_p, _p, _size, _size]),
    ):
        f = getattr(lib, name)
        f.restype, f.argtypes = restype, argtypes
    return lib, fn()


def available(type_name: str, rows: int) -> bool:
    """Whether llama.cpp would repack a weight of this type and row count on this CPU."""
    import platform

    from moechat.app.hardware_profile import cpu_facts

    if type_name not in REPACK_TYPES or rows % ROW_MULTIPLE:
        return False
    if platform.machine().lower() not in ("x86_64", "amd64") or "avx2" not in cpu_facts().isa:
        return False  # other CPUs repack differently (or not): measure the plain layout
    try:
        _repack_lib()
        return True
    except (AttributeError, ImportError, OSError):  # another llama.cpp build: no such symbol
        return False


def repacked_matvec(ggml, backend, data, ggml_type: int, cols: int, rows: int):
    """A callable x[cols] -> y[rows] whose weight (bytes `data`) lives in the repack buffer.
    Call `.close()` when done."""
    import numpy as np

    import gguf

    if not available(gguf.GGMLQuantizationType(ggml_type).name, rows):
        raise ValueError("llama.cpp does not repack this type/shape here")
    lib, buft = _repack_lib()

    class _Matvec(ggml._Graph):
        def __init__(self):
            super().__init__(backend)
            self.w = lib.ggml_new_tensor_2d(self.ctx, ggml_type, cols, rows)
            size = lib.ggml_backend_buft_get_alloc_size(buft, self.w)
            self.wbuf = lib.ggml_backend_buft_alloc_buffer(buft, size)
            if not self.wbuf:
                raise RuntimeError("could not allocate a repack buffer")
            self._wrapped.append(self.wbuf)  # freed with the graph
            if lib.ggml_backend_tensor_alloc(self.wbuf, self.w, lib.ggml_backend_buffer_get_base(self.wbuf)):
                raise RuntimeError("ggml_backend_tensor_alloc failed")
            assert data.nbytes == lib.ggml_nbytes(self.w)
            lib.ggml_backend_tensor_set(self.w, data.ctypes.data, 0, data.nbytes)  # repacks here
            self.x = self._new(ggml.GGML_TYPE_F32, cols, 1)
            self.y = lib.ggml_mul_mat(self.ctx, self.w, self.x)
            self._finish(self.y)

        def __call__(self, x):
            self._set(self.x, np.ascontiguousarray(x, dtype=np.float32))
            self._run()
            return self._get(self.y, (1, rows))[0]

    return _Matvec()


def op_chain(ggml, backend, n_ops: int = 64, width: int = 64):
    """A callable running a graph of n_ops tiny dependent ops (y = W @ y, F32 width x width):
    its time per op is ggml's per-op cost at this thread count — dispatch plus the thread
    barrier after every op — which is what a decode step of many small ops pays on top of
    reading weights. Call `.close()` when done."""
    import numpy as np

    class _Chain(ggml._Graph):
        MAX_TENSORS = n_ops * 2 + 8

        def __init__(self):
            super().__init__(backend)
            w = ggml.aligned_empty(width * width * 4, np.float32)
            w[:] = np.eye(width, dtype=np.float32).ravel() * 0.5
            self.w = self._weight(ggml.QuantWeight(w.view(np.uint8), ggml.GGML_TYPE_F32, (width, width)))
            self.x = self._new(ggml.GGML_TYPE_F32, width, 1)
            y = self.x
            for _ in range(n_ops):
                y = self.lib.ggml_mul_mat(self.ctx, self.w, y)
            self.y = y
            self._finish(self.y)
            self._set(self.x, np.ones(width, np.float32))

        def __call__(self):
            self._run()

    return _Chain()
