"""GPU probes for the hardware profile: GPUs from NVML (NVIDIA) or torch (ROCm, MPS), free VRAM,
and the host->device and device-memory bandwidths measured with torch where CUDA is present."""

from __future__ import annotations

import dataclasses

from moechat.backends.plan.hardware_profile import GpuInfo


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


NOT_GPU_BACKENDS = ("CPU", "RPC", "BLAS")  # ggml backends that are no local GPU


def llama_backends() -> list[str]:
    """The ggml backends this llama-cpp-python build registered ("CPU", "CUDA", "RPC"...)."""
    import ctypes

    import llama_cpp.llama_cpp as ll

    lib = ll._lib
    lib.ggml_backend_reg_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_get.restype, lib.ggml_backend_reg_get.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    lib.ggml_backend_reg_name.restype, lib.ggml_backend_reg_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    return [lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)).decode() for i in range(lib.ggml_backend_reg_count())]


def gpu_offload_supported() -> bool:
    """Whether this llama-cpp-python build can use a GPU (CUDA, Metal, Vulkan, ROCm...).
    Not llama_supports_gpu_offload(): it is also true for a CPU build with RPC on."""
    return any(name not in NOT_GPU_BACKENDS for name in llama_backends())


def _llama_gpu_offload() -> bool:
    try:
        return gpu_offload_supported()
    except Exception:  # llama-cpp-python missing or broken: plan as if CPU only
        return False
