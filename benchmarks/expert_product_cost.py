"""Does an expert product cost a fixed time on top of its bytes in ggml's CPU mul_mat_id?

    .venv/bin/python benchmarks/expert_product_cost.py [--threads 2] [--calls 300] [--rounds 2]

Two sets of Q4_0 experts that read the same bytes per call: many small ones (8 of 128 experts,
768 x 2048: Qwen3-30B-A3B's shape, 24 products a call) and few big ones (1 of 16, 6144 x 2048:
3 products), both 340 MB in all so every call reads from RAM. Each set runs in the plain layout
(a GPU build's CPU experts) and in ggml's repacked one (a CPU-only run), through
kernels/ggml_ops.QuantExperts with random distinct expert ids per call. A call's time is the
20th percentile of `--calls` calls (the first 50 dropped), best of `--rounds` alternating rounds;
the fixed cost per product is (many - few) / 21. The cost model counts none (issue 20 part C,
docs/cost-model.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

D = 2048
SETS = {"8 of 128 x 768": (768, 128, 8), "1 of 16 x 6144": (6144, 16, 1)}  # (ffn width, experts, used)


def experts(ggml_ops, ggml, width: int, n_experts: int, rng):
    shapes = ((D, width, n_experts), (D, width, n_experts), (width, D, n_experts))  # gate, up, down
    return [ggml.QuantWeight(ggml_ops.random_blocks(ggml.GGML_TYPE_Q4_0, s[1] * s[2], s[0], rng),
                             ggml.GGML_TYPE_Q4_0, s) for s in shapes]


def call_seconds(ggml_ops, backend, weights, n_experts: int, n_used: int, calls: int, rng) -> float:
    import numpy as np

    ex = ggml_ops.QuantExperts(*weights, backend)
    x = rng.standard_normal((1, D)).astype(np.float32)
    times = []
    try:
        for _ in range(calls):
            ids = np.sort(rng.choice(n_experts, size=n_used, replace=False))[None, :].astype(np.int32)
            t = time.perf_counter()
            ex(x, ids)
            times.append(time.perf_counter() - t)
    finally:
        ex.close()
    return float(np.percentile(times[50:], 20))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.calls <= 50 or args.threads < 1 or args.rounds < 1:
        print("error: --calls must be over 50, --threads and --rounds at least 1", file=sys.stderr)
        return 2

    import numpy as np

    from moechat.kernels import ggml, ggml_ops

    rng = np.random.default_rng(0)
    backend = ggml.CpuBackend(args.threads)
    plain = {name: experts(ggml_ops, ggml, w, e, rng) for name, (w, e, _) in SETS.items()}
    layouts = {"plain": plain,
               "repacked": {name: [ggml.maybe_repack(w, (ggml.GGML_TYPE_Q4_0,)) for w in ws]
                            for name, ws in plain.items()}}
    best: dict[tuple[str, str], float] = {}
    for r in range(args.rounds):
        for layout, sets in layouts.items():
            for name, (width, n_experts, n_used) in SETS.items():
                s = call_seconds(ggml_ops, backend, sets[name], n_experts, n_used, args.calls, rng)
                best[layout, name] = min(best.get((layout, name), s), s)
                print(f"round {r + 1}: {layout} {name}: {s * 1e6:.1f} us", file=sys.stderr)
    print(f"| layout | experts a call | products | us a call | GB/s | fixed cost a product (us) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for layout in layouts:
        many, few = best[layout, "8 of 128 x 768"], best[layout, "1 of 16 x 6144"]
        for name, (width, _, n_used) in SETS.items():
            s = best[layout, name]
            nbytes = 3 * n_used * width * D * 18 / 32
            extra = f"{(many - few) / 21 * 1e6:.2f}" if n_used > 1 else ""
            print(f"| {layout} | {name} | {3 * n_used} | {s * 1e6:.1f} | {nbytes / s / 1e9:.1f} | {extra} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
