"""Per-thread CPU matvec rate of each weight type in both layouts llama.cpp uses on the CPU.

    .venv/bin/python benchmarks/cpu_layout_rate.py [--threads 1] [--mib 64] [--rounds 3]

ggml's mul_mat at batch 1 (kernels/ggml.py, the ggml llama.cpp loads) on a 4096-wide weight of
--mib MiB (beyond the last-level cache), for Q4_0, Q4_K, Q8_0 and MXFP4, each in the plain
layout (the GGUF's blocks as they lie: what a run that uses a GPU reads, since llama.cpp keeps
such a run's CPU weights in the GPU's host buffer or the file's map, never in the CPU repack
buffer) and, for the types ggml repacks here, in the repacked layout (what a CPU-only run
reads). Rounds alternate the types and layouts; the best round per entry is kept (STREAM's
rule: the machine is shared). The per-thread figures are what docs/cost-model.md uses to say
whether a many-core machine's matvec is bound by its memory or by the kernel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TYPES = {"Q4_0": (32, 18), "Q4_K": (256, 144), "Q8_0": (32, 34), "MXFP4": (32, 17)}  # block, bytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mib", type=int, default=64, help="weight size in MiB")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import numpy as np

    from moechat.backends.plan import cpu_probes
    from moechat.kernels import ggml, ggml_ops

    target, cols = args.mib << 20, 4096
    buf = ggml.aligned_empty(target)
    buf[:] = np.frombuffer(np.random.default_rng(0).bytes(target), np.uint8)
    halves = buf.view(np.uint16)
    halves &= 0x3FFF  # valid half-float scales everywhere, as cpu_probes does
    halves |= 0x1000
    backend = ggml.CpuBackend(args.threads)
    x = np.ones(cols, np.float32)
    best: dict[tuple[str, str], float] = {}
    try:
        for r in range(args.rounds):
            for q, (block, block_bytes) in TYPES.items():
                row_bytes = cols // block * block_bytes
                rows = target // row_bytes // ggml.REPACK_ROW_MULTIPLE * ggml.REPACK_ROW_MULTIPLE
                weight = ggml.QuantWeight(buf[: rows * row_bytes], ggml.ggml_type_id(q), (cols, rows))
                layouts = {"plain": weight}
                if ggml.can_repack(weight, ggml.REPACK_TYPES):
                    layouts["repacked"] = ggml.PackedWeight(weight)
                for name, w in layouts.items():
                    linear = ggml_ops.QuantLinear(w, backend)
                    try:
                        gbs = rows * row_bytes / cpu_probes._best_time(lambda: linear(x), 0.4, 5, "best") / 1e9
                    finally:
                        linear.close()
                    best[q, name] = max(best.get((q, name), 0.0), gbs)
                    print(f"round {r + 1}: {q} {name} {gbs:.2f} GB/s", file=sys.stderr)
    finally:
        backend.close()
    print(f"| type | layout | best GB/s at {args.threads} thread(s), {args.mib} MiB | per thread |")
    print("| --- | --- | --- | --- |")
    for (q, name), v in best.items():
        print(f"| {q} | {name} | {v:.2f} | {v / args.threads:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
