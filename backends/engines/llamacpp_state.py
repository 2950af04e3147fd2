"""The llama.cpp engine's side of the KV state cache (kv_states.py): its sequence state out
of and into a llama-cpp-python `Llama`, through llama.cpp's own state API.

`llama_state_seq_get_data`/`set_data` on sequence 0 — what llama-server's slot save/restore
uses — rather than `Llama.save_state()`: the sequence state is the K/V cells alone, while
`save_state` also copies llama-cpp-python's logits buffer (n_batch x n_vocab floats, ~100 MB
for a 49k vocabulary, unused when sampling runs in llama.cpp's sampler).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

SEQ = 0  # llama-cpp-python's Llama evaluates everything in sequence 0


def build_identity() -> str:
    """llama-cpp-python's version and the libllama file it loaded: another build may lay out
    its state differently."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    files = sorted(lib.glob("libllama*")) or sorted(lib.glob("*llama*"))
    stamp = ",".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files if p.is_file())
    return f"llama-cpp-python {llama_cpp.__version__} {stamp}"


def capture(llm) -> tuple[list[int], bytearray]:
    """The tokens the context holds and sequence 0's state bytes."""
    import llama_cpp

    n = int(llm.n_tokens)
    tokens = [int(t) for t in llm.input_ids[:n]]
    size = int(llama_cpp.llama_state_seq_get_size(llm.ctx, SEQ))
    payload = bytearray(size)
    written = int(llama_cpp.llama_state_seq_get_data(llm.ctx, _pointer(payload), size, SEQ))
    del payload[written:]
    return tokens, payload


def restore(llm, tokens: list[int], payload: bytearray, keep: int) -> bool:
    """Load a saved sequence state covering `tokens` and keep its first `keep` positions
    (`Llama.generate` drops the rest: it compares the prompt with `input_ids[:n_tokens]` and
    removes the KV cells after the shared prefix). False if llama.cpp refused the bytes;
    the context is then empty, as for a first prompt."""
    import llama_cpp

    memory = llama_cpp.llama_get_memory(llm.ctx)
    llama_cpp.llama_memory_seq_rm(memory, SEQ, -1, -1)
    llm.n_tokens = 0
    read = int(llama_cpp.llama_state_seq_set_data(llm.ctx, _pointer(payload), len(payload), SEQ))
    if read != len(payload):
        llama_cpp.llama_memory_seq_rm(memory, SEQ, -1, -1)
        return False
    llm.input_ids[:keep] = tokens[:keep]
    llm.n_tokens = keep
    return True


def _pointer(buffer: bytearray):
    return ctypes.cast((ctypes.c_uint8 * len(buffer)).from_buffer(buffer), ctypes.POINTER(ctypes.c_uint8))
