"""CPU and RAM probes for the hardware profile: facts from py-cpuinfo and psutil, and the
speeds the cost model divides by, measured (never looked up): multi-threaded RAM read (STREAM
rules), ggml's quantized matvec per type on expert-sized matrices, ggml's per-op cost, and a
float32 matmul rate. Why by hand: these are the llama.cpp-shaped figures no library measures.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

from moechat.backends.plan.cost_model import PLAIN
from moechat.backends.plan.hardware_profile import CpuInfo

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
             "amx_int8", "neon", "asimd", "sve")
MIN_STREAM_BYTES = 256 * 1024**2
MIN_MATVEC_BYTES = 128 * 1024**2
MATVEC_SHAPE = (14336, 4096)  # one Mixtral-8x7B expert projection: rows x cols
# MXFP4: gpt-oss's experts. The other K-quants: their kernels run at their own weights a second
# (Q2_K about Q4_K's, Q3_K and Q5_K two thirds of it), so at few cores they read other bytes a
# second than Q4_K (issue 20 part C). Q5_0 and Q4_1: ggml does not repack them, so they run
# well below Q4_0's repacked rate (0.62 and 0.51 of its bytes a second at 2 threads here);
# the quantizer writes Q5_0 for K-quant tensors whose rows are not a multiple of 256
# (DeepSeek-V2-Lite's experts in its Q4_K_M file)
MATVEC_QTYPES = ("Q4_0", "Q8_0", "Q4_K", "F16", "MXFP4", "Q2_K", "Q3_K", "Q5_K", "Q6_K", "Q5_0", "Q4_1")


def quant_block(type_name: str) -> tuple[int, int]:
    """(weights, bytes) of one block of a ggml type, from gguf's table."""
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]


def cpu_facts() -> CpuInfo:
    import psutil

    flags = _cpu_flags()
    try:
        usable = len(psutil.Process().cpu_affinity())
    except (AttributeError, OSError):  # macOS has no affinity
        usable = psutil.cpu_count() or 1
    logical = psutil.cpu_count() or 1
    return CpuInfo(
        model=_cpu_model(),
        physical_cores=psutil.cpu_count(logical=False) or logical,
        logical_cores=logical,
        usable_cores=usable,
        isa=tuple(f for f in ISA_FLAGS if f in flags),
        llc_bytes=_llc_bytes(),
    )


def _cpu_flags() -> set[str]:
    """ISA flags: /proc/cpuinfo where there is one (instant), else py-cpuinfo (~1.5 s)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set(_cpuinfo().get("flags", ()))


def _cpuinfo() -> dict:
    try:
        import cpuinfo

        return cpuinfo.get_cpu_info()
    except Exception:  # py-cpuinfo can fail on unusual platforms: facts stay partial
        return {}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _cpuinfo().get("brand_raw") or platform.processor() or platform.machine()


def _llc_bytes() -> int:
    """Largest cache size in sysfs (cpuinfo's l3 figure is wrong on some VMs); 32 MiB if none."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * mult)
    return max(sizes, default=32 * 1024**2)


def _stream_bytes(llc_bytes: int) -> int:
    return max(MIN_STREAM_BYTES, 4 * llc_bytes)


def measure_ram_read_gbs(threads: int, llc_bytes: int, seconds: float = 2.0, statistic: str = "best") -> float:
    """Read bandwidth: `threads` workers each reduce (max) their own chunk of one array of
    >= 4x LLC; numpy releases the GIL inside the reduction. Best of N passes."""
    import numpy as np

    a = np.ones(_stream_bytes(llc_bytes) // 4, np.float32)
    chunks = np.array_split(a, threads)
    return a.nbytes / _best_time(lambda: _parallel(np.max, chunks), seconds, 5, statistic) / 1e9


def measure_cpu_gflops(threads: int, seconds: float = 1.0) -> float:
    import numpy as np

    m, k, n = 512, 4096, 4096
    x = np.random.default_rng(0).standard_normal((m, k), np.float32)
    w = np.random.default_rng(1).standard_normal((k, n), np.float32)
    return 2 * m * k * n / _best_time(lambda: x @ w, seconds, min_runs=3) / 1e9


def measure_cpu_matvec_gbs(threads: int, seconds: float = 1.0, statistic: str = "best") -> tuple[dict[str, float], str]:
    """Weight GB/s of a batch-1 matvec on expert-sized matrices (several, so that together they
    exceed the cache). ggml's own kernels on quantized bytes when the binding is available."""
    rows, cols = MATVEC_SHAPE
    try:
        from moechat.kernels import ggml

        ggml.lib()
    except Exception:  # no llama-cpp-python / ggml symbols: fall back below
        ggml = None
    if ggml is not None:
        target = max(MIN_MATVEC_BYTES, 4 * _llc_bytes())
        rates = _ggml_matvec_gbs(ggml, target, cols, threads, seconds, statistic)
        return rates, (f"measured: ggml mul_mat (batch 1, llama.cpp's CPU repack layout; ':plain' = unrepacked, "
                       f"as a GPU run keeps its CPU weights) on {cols}-wide rows, {target >> 20} MiB "
                       f"of weights per type, {threads} threads, best of N")
    import numpy as np

    rows, cols = MATVEC_SHAPE
    n_mats = max(2, _stream_bytes(_llc_bytes()) // (rows * cols * 4) + 1)
    mats = [np.full((rows // 4, cols), 0.5, np.float32) for _ in range(n_mats * 4)]
    x = np.ones(cols, np.float32)
    nbytes = sum(m.nbytes for m in mats)
    rate = nbytes / _best_time(lambda: [m @ x for m in mats], seconds, min_runs=3) / 1e9
    source = "measured: float32 matvec (numpy BLAS) stand-in, same rate for every qtype (no ggml binding)"
    return {q: rate for q in MATVEC_QTYPES}, source


def measure_cpu_op_s(threads: int, seconds: float = 0.5) -> float:
    """Seconds per op of a ggml graph of tiny ops at `threads` (best pass): the dispatch and
    thread barrier every op of a decode step pays. Best, not mean: on a loaded machine a
    barrier in this tight chain waits a whole time slice for a descheduled thread, far more
    often than llama.cpp's ops (which have work to overlap) do, so the mean overstates the
    cost (measured: 1.5 ms/op vs ~40 us/token-op in llama.cpp at load 7 on 2 cores).
    2 us if ggml is unavailable."""
    try:
        from moechat.backends.plan import ggml_probe
        from moechat.kernels import ggml

        ggml.lib()
    except Exception:  # no llama-cpp-python / ggml symbols
        return 2e-6
    n_ops = 64
    backend = ggml.CpuBackend(threads)
    chain = ggml_probe.op_chain(ggml, backend, n_ops)
    try:
        return _best_time(chain, seconds, 5, "best") / n_ops
    finally:
        chain.close()
        backend.close()


def random_weight_bytes(ggml, nbytes: int):
    """An aligned buffer of `nbytes` random bytes that reads as valid weights of any type
    probed here. Every 16-bit word is forced to a normal half float in [2^-11, 2): that makes
    F16 weights finite and, as every block's scale fields sit at even offsets, every block
    scale valid too (random scales would include NaN and denormals). Random, not constant,
    bytes: a hypervisor may merge identical pages. (kernels/ggml's own rate helper draws bytes
    with rng.integers, which takes seconds per type at this size.)"""
    import numpy as np

    buf = ggml.aligned_empty(nbytes)
    buf[:] = np.frombuffer(np.random.default_rng(0).bytes(nbytes), np.uint8)
    halves = buf.view(np.uint16)
    halves &= 0x3FFF  # clear the sign and the top exponent bit: exponent <= 15
    halves |= 0x1000  # set an exponent bit: exponent >= 4, a normal number
    return buf


def _ggml_matvec_gbs(ggml, target: int, cols: int, threads: int, seconds: float, statistic: str = "best") -> dict[str, float]:
    """One buffer of `target` random bytes (`random_weight_bytes`), read as each type in turn."""
    import numpy as np

    from moechat.kernels import ggml_ops

    buf = random_weight_bytes(ggml, target)
    backend = ggml.CpuBackend(threads)
    x = np.ones(cols, np.float32)
    rates = {}
    try:
        for q in MATVEC_QTYPES:
            block, block_bytes = quant_block(q)
            row_bytes = cols // block * block_bytes
            rows = target // row_bytes // ggml.REPACK_ROW_MULTIPLE * ggml.REPACK_ROW_MULTIPLE
            weight = ggml.QuantWeight(buf[: rows * row_bytes], ggml.ggml_type_id(q), (cols, rows))
            # the layout llama.cpp loads CPU weights into: repacked where it repacks (CPU-only
            # runs), and, for a type it repacks, the plain layout too: a run that uses a GPU
            # keeps its CPU weights in the GPU's host buffer, unrepacked (cost_model.PLAIN)
            layouts = {q: ggml.maybe_repack(weight, ggml.REPACK_TYPES)}
            if layouts[q] is not weight:
                layouts[q + PLAIN] = weight
            for key, w in layouts.items():
                linear = ggml_ops.QuantLinear(w, backend)
                try:
                    rates[key] = rows * row_bytes / _best_time(lambda: linear(x), seconds / len(MATVEC_QTYPES), 5,
                                                               statistic) / 1e9
                finally:
                    linear.close()
    finally:
        backend.close()
    return rates


def _parallel(fn, chunks):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(chunks)) as pool:
        return list(pool.map(fn, chunks))


def _best_time(fn, seconds: float, min_runs: int = 3, statistic: str = "best") -> float:
    """Seconds per call of fn: the best call ("best", STREAM's rule) or the mean ("mean":
    throughput under whatever else the machine is doing, as a long decode sees it)."""
    fn()  # warm-up: page faults, thread start
    best, start, runs = float("inf"), time.perf_counter(), 0
    while runs < min_runs or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        runs += 1
        if runs >= 50 and statistic == "best":
            break
    return best if statistic == "best" else (time.perf_counter() - start) / runs
