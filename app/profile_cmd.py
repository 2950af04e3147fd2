"""`moechat profile`: this machine's CPU, RAM, GPUs and measured bandwidths (cached)."""

from __future__ import annotations

import json
import sys

HELP = "measure this machine (CPU, RAM and GPU bandwidths) for the planner"


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the profile as JSON")
    parser.add_argument("--refresh", action="store_true", help="measure again instead of using the cache")


def run(args) -> int:
    from moechat.backends.plan.hardware_profile import load_profile, profile_path

    progress = None if args.json else (lambda m: print(f"measuring {m}...", file=sys.stderr))
    profile = None
    if not args.refresh:  # predictions that kept missing real runs: measure again, if idle now
        from moechat.backends.plan.run_log import remeasure_if_drifted

        profile = remeasure_if_drifted(progress=progress)
        if profile is not None and not args.json:
            print("(re-measured: the cached profile's predictions missed the last real runs "
                  "by more than 25%)", file=sys.stderr)
    profile = profile or load_profile(refresh=args.refresh, progress=progress)
    hint = cuda_build_hint(profile)
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2))
        if hint:
            print(hint, file=sys.stderr)
        return 0
    print(render(profile))
    if hint:
        print(f"\n{hint}")
    print(f"\n(cached in {profile_path()}; --refresh measures again)")
    return 0


def cuda_build_hint(p) -> str | None:
    """On an NVIDIA machine whose llama.cpp build is CPU-only: the exact command that rebuilds
    llama-cpp-python with CUDA (PyPI ships only a source package; its default build is CPU)."""
    if p.gpu_offload or not any(g.backend == "cuda" for g in p.gpus):
        return None
    import shlex
    from importlib.metadata import PackageNotFoundError, version

    try:
        pinned = f"llama-cpp-python=={version('llama-cpp-python')}"
    except PackageNotFoundError:
        pinned = "llama-cpp-python"
    return ("this llama.cpp build is CPU-only but the machine has an NVIDIA GPU; rebuild it with "
            f"CUDA (needs the CUDA toolkit, ~20 min):\n  CMAKE_ARGS=\"-DGGML_CUDA=on\" "
            f"{shlex.quote(sys.executable)} -m pip install --force-reinstall --no-cache-dir "
            f"--no-deps {pinned}")


def render(p) -> str:
    gib = 2**30
    rows = [
        ("CPU", f"{p.cpu.model}: {p.cpu.physical_cores} physical / {p.cpu.logical_cores} logical / "
                f"{p.cpu.usable_cores} usable cores, LLC {p.cpu.llc_bytes >> 20} MiB"),
        ("ISA", " ".join(p.cpu.isa) or "-"),
        ("RAM", f"{p.ram.total_bytes / gib:.1f} GiB total, {p.ram.available_bytes / gib:.1f} GiB available"),
        ("RAM read", f"{p.ram_read_gbs:.1f} GB/s ({p.threads} threads)"),
        ("CPU matvec", ", ".join(f"{q} {v:.1f}" for q, v in p.cpu_matvec_gbs.items()) + " GB/s of weights"),
        ("CPU matmul", f"{p.cpu_gflops:.0f} GFLOP/s (float32)"),
    ]
    if not p.gpus:
        rows.append(("GPU", "none"))
    for i, g in enumerate(p.gpus):
        link = f", PCIe {g.pcie_gen}.0 x{g.pcie_width}" if g.pcie_gen else ""
        speeds = ""
        if g.h2d_gbs or g.mem_gbs:
            speeds = f"; host->device {g.h2d_gbs:.1f} GB/s, memory {g.mem_gbs:.0f} GB/s, {g.tflops:.0f} TFLOP/s"
        rows.append((f"GPU {i}", f"{g.name} ({g.backend}) {g.vram_total_bytes / gib:.1f} GiB, "
                                 f"{g.vram_free_bytes / gib:.1f} GiB free{link}{speeds}"))
    rows.append(("llama.cpp", "GPU offload" if p.gpu_offload else "CPU-only build"))
    rows.append(("measured", p.measured_at or "-"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
