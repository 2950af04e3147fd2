"""llama.cpp's `--n-cpu-moe N` for llama-cpp-python, which has no keyword for it.

llama.cpp keeps a tensor in a chosen buffer type when its name matches a regex in
`llama_model_params.tensor_buft_overrides` (a NULL-terminated array of
{const char *pattern; ggml_backend_buffer_type_t buft}). llama-cpp-python declares the field
as an opaque pointer and binds no ggml_backend_* function, so we:

1. take `ggml_backend_cpu_buffer_type` from the ggml that libllama itself loaded (through
   libllama's handle: the wheel ships separate copies of libggml-base, and a pointer from
   another copy does not compare equal inside the loader);
2. build the array (patterns `blk\\.{i}\\.ffn_(up|down|gate|gate_up)_(ch|)exps` for i < N,
   as llama.cpp's `llm_add_n_cpu_ffn_overrides` does) and keep it alive during the load;
3. wrap `llama_model_default_params` while `Llama(...)` runs, since `Llama.__init__` takes
   its params from that function and loads at once.
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Iterator

EXPERT_PATTERN = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


class _BuftOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def cpu_moe_patterns(n_cpu_moe: int) -> list[str]:
    """Regexes that keep the expert tensors of layers 0..n_cpu_moe-1 in system RAM."""
    return [rf"blk\.{i}{EXPERT_PATTERN}" for i in range(n_cpu_moe)]


def cpu_buffer_type() -> int:
    """Address of ggml's CPU buffer type, from the ggml copy libllama uses."""
    import llama_cpp.llama_cpp as lib

    fn = lib._lib.ggml_backend_cpu_buffer_type  # resolved through libllama's dependencies
    fn.restype = ctypes.c_void_p
    fn.argtypes = []
    return fn()


@contextlib.contextmanager
def tensor_overrides_to_cpu(patterns: list[str]) -> Iterator[None]:
    """While active, every `Llama(...)` built keeps tensors matching `patterns` in RAM."""
    import llama_cpp.llama_cpp as lib

    if not patterns:
        yield
        return
    if len(patterns) >= lib.llama_max_tensor_buft_overrides():
        raise ValueError(f"too many tensor overrides ({len(patterns)})")
    buft = cpu_buffer_type()
    pattern_bytes = [p.encode() for p in patterns]  # kept alive until the load has finished
    array = (_BuftOverride * (len(patterns) + 1))()  # last entry zeroed: the terminator
    for entry, pattern in zip(array, pattern_bytes):
        entry.pattern = pattern
        entry.buft = buft
    original = lib.llama_model_default_params

    def default_params_with_overrides():
        params = original()
        params.tensor_buft_overrides = ctypes.cast(array, ctypes.c_void_p).value
        return params

    lib.llama_model_default_params = default_params_with_overrides
    try:
        yield
    finally:
        lib.llama_model_default_params = original
        del pattern_bytes, array
