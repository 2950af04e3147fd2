"""llama.cpp's own prefill/decode timing on a loaded Llama, shared by `plan --measure`, `bench`
and the worker-split engine's child process (which times itself beside the model)."""

from __future__ import annotations


def time_llama(llm, n_prompt: int, n_decode: int, statistic: str = "mean") -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one run: a prompt of n_prompt tokens in one batch, then
    n_decode single-token steps, each synchronized (llama.cpp's own tg timing; notes/llamacpp.md).

    Decode is n_decode / total time ("mean") or 1 / the best single-token time ("best":
    best-of-N over tokens, as STREAM takes the best pass)."""
    import time

    import llama_cpp

    n_vocab = llm.n_vocab()
    prompt = [(1000 + 7 * i) % n_vocab for i in range(n_prompt)]
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    llama_cpp.llama_synchronize(llm.ctx)
    prefill = n_prompt / (time.perf_counter() - t)
    best, start = float("inf"), time.perf_counter()
    for i in range(n_decode):
        t = time.perf_counter()
        llm.eval([(2000 + 13 * i) % n_vocab])
        llama_cpp.llama_synchronize(llm.ctx)
        best = min(best, time.perf_counter() - t)
    total = time.perf_counter() - start
    return prefill, (1.0 / best if statistic == "best" else n_decode / total)
