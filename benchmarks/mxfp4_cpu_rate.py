"""CPU matvec rate of MXFP4 (gpt-oss's expert type) against the types ggml repacks, per thread.

    .venv/bin/python benchmarks/mxfp4_cpu_rate.py [--rounds 6] [--threads 1] [--mib N] [--types Q4_K,Q2_K,...]

ggml's mul_mat at batch 1 through kernels/ggml.py (the ggml llama.cpp loads), on a 4096-wide
weight of 4 x LLC (or --mib): Q4_0 and Q4_K repacked, Q8_0 and MXFP4 in the plain layout (ggml
does repack MXFP4 on AVX2 too, kernels/ggml.py REPACK_TYPES; the plain rate is what a GPU
build's CPU experts run at, see docs/cost-model.md). Rounds alternate
the types; the best round per type is kept (STREAM's rule: the machine is shared). The
MXFP4 rate per thread is what backends/plan/cost_model.py assumes for MXFP4 experts on the
CPU when a profile has not measured MXFP4 (MXFP4_CPU_GBS_PER_THREAD). `--types` times other
ggml types the same way (the K-quants other than Q4_K in their plain layout; issue 20 part C).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TYPES = ("Q4_0", "Q4_K", "Q8_0", "MXFP4")  # the default; --types picks from the profile's probe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mib", type=int, help="weight size (default: 4 x the last-level cache)")
    ap.add_argument("--types", help=f"comma-separated, from the profile's probe types (default: {','.join(TYPES)})")
    args = ap.parse_args()

    from moechat.backends.plan import cpu_probes
    from moechat.kernels import ggml

    chosen = tuple(args.types.split(",")) if args.types else TYPES
    unknown = [q for q in chosen if q not in cpu_probes.MATVEC_QTYPES]
    if unknown:
        print(f"error: unknown type(s) {', '.join(unknown)} (choose from {', '.join(cpu_probes.MATVEC_QTYPES)})",
              file=sys.stderr)
        return 2
    cpu_probes.MATVEC_QTYPES = chosen  # this script's own run of the profile's probe
    target = (args.mib << 20) if args.mib else cpu_probes._stream_bytes(cpu_probes.cpu_facts().llc_bytes)
    best: dict[str, float] = {}
    for r in range(args.rounds):
        rates = cpu_probes._ggml_matvec_gbs(ggml, target, 4096, args.threads, 1.0 * len(chosen), "best")
        best = {q: max(best.get(q, 0.0), v) for q, v in rates.items()}
        print(f"round {r + 1}: " + ", ".join(f"{q} {v:.2f}" for q, v in rates.items()), file=sys.stderr)
    ref = "Q4_0" if "Q4_0" in best else next(iter(best))
    print(f"| type | best GB/s at {args.threads} thread(s) | per thread | G weights/s | vs {ref} (bytes/s) |")
    print("| --- | --- | --- | --- | --- |")
    for q, v in best.items():
        block, block_bytes = cpu_probes.quant_block(q.removesuffix(cpu_probes.PLAIN))
        bits = 8 * block_bytes / block
        print(f"| {q} | {v:.2f} | {v / args.threads:.2f} | {v * 8 / bits:.1f} | {v / best[ref]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
