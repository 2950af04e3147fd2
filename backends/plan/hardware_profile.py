"""This machine, measured: CPU, RAM, GPUs and the bandwidths the cost model divides by.

`load_profile()` returns the cached profile of this machine (measured on first use, ~10 s)
and `measure_profile()` measures afresh. Facts (core counts, ISA flags, memory sizes, GPU
names, PCIe links) are read from py-cpuinfo, psutil, nvidia-ml-py and torch; speeds are
measured, never looked up:

- `ram_read_gbs`: multi-threaded read of arrays >= 4x the last-level cache, best of N
  (STREAM rules; benchmarks/ram_bandwidth.py checks it against a compiled STREAM kernel).
- `cpu_matvec_gbs[qtype]`: weight bytes per second of ggml's quantized matrix-vector product
  on an expert-sized matrix (what llama.cpp runs per expert at batch 1), when the ggml binding
  is there; otherwise a float32 matvec stands in and the source says so. For the types ggml
  repacks, `"<qtype>:plain"` is the same product unrepacked: how a run that uses a GPU reads
  the weights it leaves in RAM (cost_model.cpu_rate_gbs).
- `cpu_gflops`: float32 matrix-multiply rate (prefill is compute-bound).
- with CUDA (torch): host->device bandwidth from pinned memory and device memory bandwidth.

This module holds the record, its JSON round-trip and the per-machine cache; the probes that
fill it are cpu_probes.py (CPU, RAM) and gpu_probes.py. A profile is plain data with a JSON round-trip, so profiles of other machines
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

from moechat.backends.plan.memory import ram_budget

PROFILE_VERSION = 1  # bump when measurements change meaning: cached profiles are re-measured


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
    available_bytes: int  # the machine's available RAM or the memory cgroup's room, the smaller
    bound_by: str = ""  # "" = the machine's RAM; else the cgroup limit, in words (memory.py)


def ram_info() -> RamInfo:
    """Total RAM, and what this process may still use right now (memory.ram_budget)."""
    import psutil

    budget = ram_budget()
    note = "" if budget.bound_by == "RAM" else budget.describe()
    return RamInfo(psutil.virtual_memory().total, budget.available, note)


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
        profile = HardwareProfile.from_dict(json.loads(Path(path).read_text()))
        rates = {"ram_read_gbs": profile.ram_read_gbs, **(profile.cpu_matvec_gbs or {})}
        bad = [k for k, v in rates.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0]
        if bad:
            raise ValueError(f"not a rate in GB/s: {', '.join(bad)}")
        return profile
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

    from moechat.backends.plan import cpu_probes, gpu_probes

    key = "|".join([platform.node(), cpu_probes._cpu_model(), str(psutil.virtual_memory().total // 2**30),
                    ",".join(g.name for g in gpu_probes._nvml_gpus())])
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def profile_path() -> Path:
    from moechat.backends.paths import cache_dir

    d = cache_dir() / "profiles"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{machine_id()}-v{PROFILE_VERSION}.json"


def load_profile(refresh: bool = False, progress=None, measure: bool = True,
                 cancel=None) -> HardwareProfile:
    """This machine's profile: cached, or measured now (then cached) with refresh or on first
    use. Memory *available* is re-read every time (it changes); speeds come from the cache.
    With measure=False and no cache, the facts with nominal speeds (`facts_profile`).
    cancel: a threading.Event that stops a measurement (MeasureCancelled; nothing is cached)."""
    import psutil

    from moechat.backends.plan import gpu_probes

    path = profile_path()
    if not refresh and path.exists():
        try:
            cached = read_profile(path)
            if cached.version == PROFILE_VERSION:
                return dataclasses.replace(
                    cached, ram=ram_info(), gpus=gpu_probes._refresh_free_vram(cached.gpus)
                )
        except Exception:  # a damaged cache file is re-measured, not fatal
            pass
    if not measure and not refresh:
        return facts_profile()
    profile = measure_profile(progress=progress, cancel=cancel)
    write_profile(profile, path)
    return profile


NOMINAL_RAM_GBS = 20.0  # dual-channel DDR4 achieved; only used until the machine is measured


def facts_profile() -> HardwareProfile:
    """This machine's facts (cores, memory, GPUs) without measuring speeds: enough to choose a
    placement by memory; `moechat profile` measures the speeds."""
    import psutil

    from moechat.backends.plan import cpu_probes, gpu_probes

    cpu = cpu_probes.cpu_facts()
    return HardwareProfile(
        cpu=cpu, ram=ram_info(), gpus=tuple(gpu_probes.gpu_facts(use_torch=False)),
        ram_read_gbs=NOMINAL_RAM_GBS, cpu_matvec_gbs={q: NOMINAL_RAM_GBS for q in cpu_probes.MATVEC_QTYPES},
        cpu_gflops=50.0, threads=cpu.usable_cores, gpu_offload=gpu_probes._llama_gpu_offload(),
        machine=machine_id(), sources={"*": "nominal speeds: not measured yet (run `moechat profile`)"},
    )


# ---- measurement --------------------------------------------------------------------------


WINDOWS = 3  # short measurement windows, spread in time: another job's burst spoils one, not all
WINDOW_GAP_S = 0.3


class MeasureCancelled(Exception):
    """A measurement stopped by its `cancel` event (the chat app: a reply started)."""


def _windows(measure, check=lambda: None) -> list:
    out = []
    for i in range(WINDOWS):
        if i:
            time.sleep(WINDOW_GAP_S)
            check()
        out.append(measure())
    return out


def measure_profile(threads: int | None = None, progress=None, cancel=None) -> HardwareProfile:
    """Measure this machine (about 10 s on 2 cores). `progress(message)` is told each step.
    `cancel` (a threading.Event), once set, stops it at the next step or window (about a
    second at most) with MeasureCancelled: a profile measured beside other work is wrong."""
    import psutil

    from moechat.backends.plan import cpu_probes, gpu_probes

    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise MeasureCancelled("the measurement was stopped")

    def say(message: str) -> None:
        check()
        if progress:
            progress(message)

    cpu = cpu_probes.cpu_facts()
    vm = psutil.virtual_memory()
    threads = threads or cpu.usable_cores
    sources = {}
    say("RAM read bandwidth")
    ram_gbs = max(_windows(lambda: cpu_probes.measure_ram_read_gbs(threads, cpu.llc_bytes, 0.6), check))
    sources["ram_read_gbs"] = (f"measured: {threads}-thread read of {cpu_probes._stream_bytes(cpu.llc_bytes) >> 20} MiB, "
                               f"best of N in each of {WINDOWS} windows {WINDOW_GAP_S} s apart, best window")
    say("CPU matrix-vector rate")
    runs = _windows(lambda: cpu_probes.measure_cpu_matvec_gbs(threads, 0.5), check)
    matvec = {q: max(rates[q] for rates, _ in runs) for q in runs[0][0]}
    sources["cpu_matvec_gbs"] = f"{runs[0][1]}; best of {WINDOWS} windows {WINDOW_GAP_S} s apart"
    say("CPU per-op overhead")
    op_s = cpu_probes.measure_cpu_op_s(threads)
    sources["cpu_op_s"] = f"measured: a ggml graph of 64 tiny dependent ops, {threads} threads, best time per op"
    say("CPU matmul rate")
    gflops = cpu_probes.measure_cpu_gflops(threads)
    sources["cpu_gflops"] = "measured: float32 matmul 512x4096x4096 (numpy BLAS), best of N"
    gpus = gpu_probes.gpu_facts()
    if gpus:
        say("GPU bandwidths")
        gpus = gpu_probes.measure_gpus(gpus)
        sources["gpus"] = "nvidia-ml-py / torch; h2d_gbs and mem_gbs measured with torch when present"
    check()
    return HardwareProfile(
        cpu=cpu,
        ram=ram_info(),
        gpus=tuple(gpus),
        ram_read_gbs=round(ram_gbs, 2),
        cpu_matvec_gbs={k: round(v, 2) for k, v in matvec.items()},
        cpu_gflops=round(gflops, 1),
        threads=threads,
        cpu_op_s=op_s,
        gpu_offload=gpu_probes._llama_gpu_offload(),
        machine=machine_id(),
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        sources=sources,
    )
