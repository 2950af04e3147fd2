"""This machine, measured: CPU, RAM, GPUs and the bandwidths the cost model divides by.

`load_profile()` returns the cached profile of this machine (measured on first use, ~10 s)
and `measure_profile()` measures afresh. Facts (core counts, ISA flags, memory sizes, GPU
names, PCIe links) are read from py-cpuinfo, psutil, nvidia-ml-py and torch; speeds are
measured, never looked up:

- `ram_read_gbs`: multi-threaded read of arrays >= 4x the last-level cache, best of N
  (STREAM rules; benchmarks/ram_bandwidth.py checks it against a compiled STREAM kernel).
- `cpu_matvec_gbs[qtype]`: weight bytes per second of ggml's quantized matrix-vector product
  on an expert-sized matrix (what llama.cpp runs per expert at batch 1), when the ggml binding
  is there; otherwise a float32 matvec stands in and the source says so.
- `cpu_gflops`: float32 matrix-multiply rate (prefill is compute-bound).
- with CUDA (torch): host->device bandwidth from pinned memory and device memory bandwidth.

A profile is plain data with a JSON round-trip, so profiles of other machines
(tests/profiles/*.json) plan exactly like this one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

PROFILE_VERSION = 1  # bump when measurements change meaning: cached profiles are re-measured
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
             "amx_int8", "neon", "asimd", "sve")
MIN_STREAM_BYTES = 256 * 1024**2
MIN_MATVEC_BYTES = 128 * 1024**2
MATVEC_SHAPE = (14336, 4096)  # one Mixtral-8x7B expert projection: rows x cols
MATVEC_QTYPES = ("Q4_0", "Q8_0", "Q4_K", "F16")
_QUANT_SIZES = {"Q4_0": (32, 18), "Q8_0": (32, 34), "Q4_K": (256, 144), "F16": (1, 2)}  # block, bytes


@dataclass(frozen=True)
class CpuInfo:
    model: str
    physical_cores: int
    logical_cores: int
    usable_cores: int  # CPUs this process may run on (affinity)
    isa: tuple[str, ...]  # the subset of ISA_FLAGS present
    llc_bytes: int  # last-level cache


@dataclass(frozen=True)
class RamInfo:
    total_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class GpuInfo:
    name: str
    backend: str  # "cuda", "rocm", "mps", "metal"
    vram_total_bytes: int
    vram_free_bytes: int
    pcie_gen: int = 0  # 0 when unknown or not PCIe (unified memory)
    pcie_width: int = 0
    h2d_gbs: float = 0.0  # measured host->device from pinned memory (0: not measured)
    mem_gbs: float = 0.0  # measured device memory bandwidth
    tflops: float = 0.0  # fp16 matmul rate (measured or from the spec sheet in data profiles)
    unified: bool = False  # memory shared with the CPU (Apple): VRAM and RAM are one pool


@dataclass(frozen=True)
class HardwareProfile:
    cpu: CpuInfo
    ram: RamInfo
    gpus: tuple[GpuInfo, ...]
    ram_read_gbs: float
    cpu_matvec_gbs: dict[str, float]  # qtype -> weight bytes/s of a batch-1 matvec, in GB/s
    cpu_gflops: float
    threads: int  # threads the measurements (and llama.cpp by default) used
    cpu_op_s: float = 2e-6  # ggml's cost per graph op at `threads` (dispatch + barrier), seconds
    gpu_offload: bool = False  # whether this llama.cpp build can use the GPUs
    machine: str = ""  # hostname-derived id (measured) or a description (data profiles)
    measured_at: str = ""  # ISO date
    version: int = PROFILE_VERSION
    sources: dict[str, str] = field(default_factory=dict)  # figure -> where it comes from

    @property
    def vram_free_bytes(self) -> int:
        return sum(g.vram_free_bytes for g in self.gpus if not g.unified)

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HardwareProfile":
        d = dict(d)
        cpu = dict(d.pop("cpu"))
        cpu["isa"] = tuple(cpu.get("isa", ()))
        return cls(
            cpu=CpuInfo(**cpu),
            ram=RamInfo(**d.pop("ram")),
            gpus=tuple(GpuInfo(**g) for g in d.pop("gpus", ())),
            **{k: v for k, v in d.items() if k in _FIELDS},
        )


_FIELDS = {f.name for f in dataclasses.fields(HardwareProfile)} - {"cpu", "ram", "gpus"}


def read_profile(path: str | os.PathLike) -> HardwareProfile:
    """A profile from a JSON file (`plan --profile FILE`); MoechatError if unreadable."""
    from moechat.backends.errors import MoechatError

    try:
        return HardwareProfile.from_dict(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise MoechatError(f"{path}: no such profile file") from None
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise MoechatError(f"{path}: not a moechat hardware profile ({type(err).__name__}: {err})") from None


def write_profile(profile: HardwareProfile, path: Path) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)


# ---- cache --------------------------------------------------------------------------------


def machine_id() -> str:
    """Stable per machine: host, CPU, RAM size, GPUs (a new GPU means a new profile)."""
    import psutil

    key = "|".join([platform.node(), _cpu_model(), str(psutil.virtual_memory().total // 2**30),
                    ",".join(g.name for g in _nvml_gpus())])
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def profile_path() -> Path:
    from moechat.backends.paths import cache_dir

    d = cache_dir() / "profiles"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{machine_id()}-v{PROFILE_VERSION}.json"


def load_profile(refresh: bool = False, progress=None, measure: bool = True) -> HardwareProfile:
    """This machine's profile: cached, or measured now (then cached) with refresh or on first
    use. Memory *available* is re-read every time (it changes); speeds come from the cache.
    With measure=False and no cache, the facts with nominal speeds (`facts_profile`)."""
    import psutil

    path = profile_path()
    if not refresh and path.exists():
        try:
            cached = read_profile(path)
            if cached.version == PROFILE_VERSION:
                vm = psutil.virtual_memory()
                return dataclasses.replace(
                    cached, ram=RamInfo(vm.total, vm.available), gpus=_refresh_free_vram(cached.gpus)
                )
        except Exception:  # a damaged cache file is re-measured, not fatal
            pass
    if not measure and not refresh:
        return facts_profile()
    profile = measure_profile(progress=progress)
    write_profile(profile, path)
    return profile


NOMINAL_RAM_GBS = 20.0  # dual-channel DDR4 achieved; only used until the machine is measured


def facts_profile() -> HardwareProfile:
    """This machine's facts (cores, memory, GPUs) without measuring speeds: enough to choose a
    placement by memory; `moechat profile` measures the speeds."""
    import psutil

    vm = psutil.virtual_memory()
    cpu = cpu_facts()
    return HardwareProfile(
        cpu=cpu, ram=RamInfo(vm.total, vm.available), gpus=tuple(gpu_facts(use_torch=False)),
        ram_read_gbs=NOMINAL_RAM_GBS, cpu_matvec_gbs={q: NOMINAL_RAM_GBS for q in MATVEC_QTYPES},
        cpu_gflops=50.0, threads=cpu.usable_cores, gpu_offload=_llama_gpu_offload(),
        machine=machine_id(), sources={"*": "nominal speeds: not measured yet (run `moechat profile`)"},
    )


# ---- measurement --------------------------------------------------------------------------


def measure_profile(threads: int | None = None, progress=None) -> HardwareProfile:
    """Measure this machine (about 10 s on 2 cores). `progress(message)` is told each step."""
    import psutil

    say = progress or (lambda message: None)
    cpu = cpu_facts()
    vm = psutil.virtual_memory()
    threads = threads or cpu.usable_cores
    sources = {}
    say("RAM read bandwidth")
    ram_gbs = measure_ram_read_gbs(threads, cpu.llc_bytes)
    sources["ram_read_gbs"] = f"measured: {threads}-thread read of {_stream_bytes(cpu.llc_bytes) >> 20} MiB, best of N"
    say("CPU matrix-vector rate")
    matvec, source = measure_cpu_matvec_gbs(threads)
    sources["cpu_matvec_gbs"] = source
    say("CPU per-op overhead")
    op_s = measure_cpu_op_s(threads)
    sources["cpu_op_s"] = f"measured: a ggml graph of 64 tiny dependent ops, {threads} threads, best time per op"
    say("CPU matmul rate")
    gflops = measure_cpu_gflops(threads)
    sources["cpu_gflops"] = "measured: float32 matmul 512x4096x4096 (numpy BLAS), best of N"
    gpus = gpu_facts()
    if gpus:
        say("GPU bandwidths")
        gpus = measure_gpus(gpus)
        sources["gpus"] = "nvidia-ml-py / torch; h2d_gbs and mem_gbs measured with torch when present"
    return HardwareProfile(
        cpu=cpu,
        ram=RamInfo(vm.total, vm.available),
        gpus=tuple(gpus),
        ram_read_gbs=round(ram_gbs, 2),
        cpu_matvec_gbs={k: round(v, 2) for k, v in matvec.items()},
        cpu_gflops=round(gflops, 1),
        threads=threads,
        cpu_op_s=op_s,
        gpu_offload=_llama_gpu_offload(),
        machine=machine_id(),
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        sources=sources,
    )


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
        return rates, (f"measured: ggml mul_mat (batch 1, llama.cpp's CPU repack layout) on {cols}-wide rows, {target >> 20} MiB "
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
        from moechat.app import ggml_probe
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


def _ggml_matvec_gbs(ggml, target: int, cols: int, threads: int, seconds: float, statistic: str = "best") -> dict[str, float]:
    """One buffer of `target` random bytes, read as each type in turn. Every 16-bit word is
    forced to a normal half float in [2^-11, 2): that makes F16 weights finite and, as every
    block's scale fields sit at even offsets, every Q4_0/Q8_0/Q4_K scale valid too (random
    scales would include NaN and denormals). Random, not constant, bytes: a hypervisor may
    merge identical pages. (kernels/ggml's own rate helper draws bytes with rng.integers,
    which takes seconds per type at this size.)"""
    import numpy as np

    buf = ggml.aligned_empty(target)
    buf[:] = np.frombuffer(np.random.default_rng(0).bytes(target), np.uint8)
    halves = buf.view(np.uint16)
    halves &= 0x3FFF  # clear the sign and the top exponent bit: exponent <= 15
    halves |= 0x1000  # set an exponent bit: exponent >= 4, a normal number
    backend = ggml.CpuBackend(threads)
    x = np.ones(cols, np.float32)
    rates = {}
    try:
        for q in MATVEC_QTYPES:
            block, block_bytes = _QUANT_SIZES[q]
            row_bytes = cols // block * block_bytes
            rows = target // row_bytes // ggml.REPACK_ROW_MULTIPLE * ggml.REPACK_ROW_MULTIPLE
            weight = ggml.QuantWeight(buf[: rows * row_bytes], ggml.ggml_type_id(q), (cols, rows))
            # the layout llama.cpp loads CPU weights into: repacked where it repacks
            linear = ggml.QuantLinear(ggml.maybe_repack(weight, ggml.REPACK_TYPES), backend)
            try:
                rates[q] = rows * row_bytes / _best_time(lambda: linear(x), seconds / len(MATVEC_QTYPES), 5, statistic) / 1e9
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


# ---- GPUs ---------------------------------------------------------------------------------


def gpu_facts(use_torch: bool = True) -> list[GpuInfo]:
    """GPUs from NVML (NVIDIA), else from torch (ROCm, MPS) when torch is installed and
    use_torch (importing torch takes seconds: one-shot commands skip it); [] without any."""
    gpus = _nvml_gpus()
    if gpus or not use_torch:
        return gpus
    return _torch_gpus()


def _nvml_gpus() -> list[GpuInfo]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVIDIA driver or library
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            out.append(GpuInfo(
                name=name.decode() if isinstance(name, bytes) else str(name),
                backend="cuda",
                vram_total_bytes=int(mem.total),
                vram_free_bytes=int(mem.free),
                pcie_gen=_nvml_int(pynvml.nvmlDeviceGetCurrPcieLinkGeneration, h),
                pcie_width=_nvml_int(pynvml.nvmlDeviceGetCurrPcieLinkWidth, h),
            ))
        return out
    finally:
        pynvml.nvmlShutdown()


def _nvml_int(fn, handle) -> int:
    try:
        return int(fn(handle))
    except Exception:  # not supported on this board (e.g. some laptops)
        return 0


def _torch_gpus() -> list[GpuInfo]:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    if torch.cuda.is_available():  # ROCm builds also answer here
        backend = "rocm" if getattr(torch.version, "hip", None) else "cuda"
        out = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append(GpuInfo(torch.cuda.get_device_name(i), backend, int(total), int(free)))
        return out
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        import psutil

        vm = psutil.virtual_memory()
        return [GpuInfo("Apple GPU (MPS)", "mps", vm.total, vm.available, unified=True)]
    return []


def _refresh_free_vram(gpus: tuple[GpuInfo, ...]) -> tuple[GpuInfo, ...]:
    if not gpus or gpus[0].backend != "cuda":
        return gpus
    now = _nvml_gpus()
    if len(now) != len(gpus):
        return gpus
    return tuple(dataclasses.replace(g, vram_free_bytes=n.vram_free_bytes) for g, n in zip(gpus, now))


def measure_gpus(gpus: list[GpuInfo]) -> list[GpuInfo]:
    """Host->device (pinned) and device memory bandwidth with torch, for CUDA/ROCm GPUs.
    Without torch the GPUs keep their facts and zero speeds (the cost model then uses the
    PCIe link's nominal rate and says so)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return gpus
    import torch

    if not torch.cuda.is_available():
        return gpus
    out = []
    for i, g in enumerate(gpus):
        if i >= torch.cuda.device_count():
            out.append(g)
            continue
        with torch.cuda.device(i):  # events, streams and the matmul all on that GPU
            out.append(dataclasses.replace(g, **_measure_cuda_device(torch, i)))
    return out


def _measure_cuda_device(torch, index: int) -> dict:
    device = torch.device("cuda", index)
    n = 256 * 1024**2
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    dev2 = torch.empty_like(dev)
    a = torch.randn(4096, 4096, dtype=torch.float16, device=device)

    def timed(fn, reps=5):
        best = float("inf")
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            best = min(best, start.elapsed_time(end) / 1e3)
        return best

    timed(lambda: dev.copy_(host, non_blocking=True), reps=1)
    h2d = n / timed(lambda: dev.copy_(host, non_blocking=True)) / 1e9
    mem = 2 * n / timed(lambda: dev2.copy_(dev)) / 1e9  # copy reads and writes n bytes
    tflops = 2 * 4096**3 / timed(lambda: a @ a) / 1e12
    del host, dev, dev2, a
    torch.cuda.empty_cache()
    return {"h2d_gbs": round(h2d, 2), "mem_gbs": round(mem, 1), "tflops": round(tflops, 1)}


def _llama_gpu_offload() -> bool:
    try:
        from moechat.backends.llamacpp_engine import gpu_offload_supported

        return gpu_offload_supported()
    except Exception:  # llama-cpp-python missing or broken: plan as if CPU only
        return False
