"""Check `moechat profile`'s RAM read bandwidth against an independent STREAM-style program.

    .venv/bin/python benchmarks/ram_bandwidth.py [--rounds 5] [--threads N]

Compiles benchmarks/stream_read.c (gcc -O3 -march=native -ffast-math -funroll-loops -fopenmp: OpenMP
threads, arrays of 512 MiB each, >= 4x LLC; best of 40 per kernel, then 200 more read-only
passes so that the read kernel gets as many samples as the profile's) and alternates it with
the profile's own measurement (numpy, threads reducing their own chunks), so both see the
same machine load. Prints every round and the best of each, and the ratio of bests.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def compile_stream() -> Path:
    exe = Path(tempfile.gettempdir()) / "moechat_stream_read"
    src = HERE / "stream_read.c"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O3", "-march=native", "-ffast-math", "-funroll-loops", "-fopenmp", str(src), "-o", str(exe)],
                       check=True)
    return exe


def run_stream(exe: Path, threads: int, elements: int, reps: int, read_only: bool) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))  # unpinned: pinned threads cannot dodge other load
    argv = [str(exe), str(elements), str(reps)] + (["read"] if read_only else [])
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    return {k: float(v) for k, v in (line.split() for line in out.stdout.splitlines()) if k.endswith("_gbs")}


def main() -> int:
    from moechat.backends.plan import cpu_probes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=cpu_probes.cpu_facts().usable_cores)
    args = parser.parse_args()
    llc = cpu_probes.cpu_facts().llc_bytes
    elements = max(64 << 20, 4 * llc // 8)  # doubles per array
    exe = compile_stream()
    rows, best = [], {"profile": 0.0, "read_gbs": 0.0, "copy_gbs": 0.0, "triad_gbs": 0.0}
    for r in range(args.rounds):
        prof = cpu_probes.measure_ram_read_gbs(args.threads, llc)
        stream = run_stream(exe, args.threads, elements, 40, read_only=False)
        stream["read_gbs"] = max(stream["read_gbs"], run_stream(exe, args.threads, elements, 200, True)["read_gbs"])
        rows.append((r + 1, prof, stream))
        best["profile"] = max(best["profile"], prof)
        for k, v in stream.items():
            best[k] = max(best[k], v)
    print(f"threads {args.threads}, LLC {llc >> 20} MiB, STREAM arrays {elements * 8 >> 20} MiB each")
    print(f"{'round':>5}  {'profile read':>12}  {'STREAM read':>11}  {'STREAM copy':>11}  {'STREAM triad':>12}   GB/s")
    for r, prof, s in rows:
        print(f"{r:>5}  {prof:12.1f}  {s['read_gbs']:11.1f}  {s['copy_gbs']:11.1f}  {s['triad_gbs']:12.1f}")
    print(f"{'best':>5}  {best['profile']:12.1f}  {best['read_gbs']:11.1f}  {best['copy_gbs']:11.1f}  {best['triad_gbs']:12.1f}")
    ratio = best["profile"] / best["read_gbs"]
    print(f"profile / STREAM read = {ratio:.2f} ({'within' if abs(ratio - 1) <= 0.30 else 'OUTSIDE'} ±30%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
