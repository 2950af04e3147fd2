"""CPU prefill: llama.cpp's measured prompt rate against the cost model's prediction, and
against what a per-type GEMM rate would predict (the follow-up issue 20 left open).

    .venv/bin/python benchmarks/cpu_prefill_rate.py [--models demo,qwen3-30b-a3b:4:Q4_0] [--rounds 3] [--threads 2] [--shapes]

First ggml's quantized mul_mat at a 512-token batch (llama.cpp's micro-batch) through
kernels/ggml.py, per type, in the layout a CPU-only run loads (repacked where ggml repacks),
on a 4096-wide, 1024-row weight: GFLOPS. Then per model (plan_accuracy.py's models: the demo
or a random-weight file of real geometry): the cost model's CPU prefill prediction now
(flops / (0.6 x numpy float32 GEMM) + one weight read per micro-batch), the same with each
tensor's flops at its type's GEMM rate (`cpu_gemm_gflops`), and llama.cpp's prefill of a 512-token prompt
(`n_batch = n_ubatch = 512`, best of rounds). `--shapes` also times each model's own
distinct (type, shape) weights at the tokens a call sees (an expert: 512 x used / experts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_TOKENS, COLS, ROWS = 512, 4096, 1024


def gemm_gflops(threads: int, cases: list[tuple[str, int, int, int]], seconds: float = 0.5) -> list[float]:
    """GFLOPS of ggml's mul_mat for each (type, cols, rows, tokens), in a CPU-only run's layout."""
    import numpy as np

    from moechat.backends.plan import cpu_probes
    from moechat.kernels import ggml, ggml_ops

    backend = ggml.CpuBackend(threads)
    rates = []
    try:
        for q, cols, rows, tokens in cases:
            block, block_bytes = cpu_probes.quant_block(q)
            buf = cpu_probes.random_weight_bytes(ggml, rows * cols // block * block_bytes)
            weight = ggml.maybe_repack(ggml.QuantWeight(buf, ggml.ggml_type_id(q), (cols, rows)), ggml.REPACK_TYPES)
            linear = ggml_ops.QuantLinear(weight, backend)
            x = np.random.default_rng(1).standard_normal((tokens, cols)).astype(np.float32)
            try:
                t = cpu_probes._best_time(lambda: linear(x), seconds, 3)
            finally:
                linear.close()
            rates.append(2 * tokens * cols * rows / t / 1e9)
    finally:
        backend.close()
    return rates


def own_shapes(card) -> list[tuple[str, int, int, int]]:
    """The model's distinct 2-D matmul weights (type, cols, rows) at the tokens one call sees."""
    seen = {}
    for t in card.tensors:
        if len(t.shape) < 2 or t.name == "token_embd.weight" or t.type_name == "F32":
            continue
        tokens = max(1, N_TOKENS * card.n_experts_used // card.n_experts) if t.is_expert else N_TOKENS
        seen.setdefault((t.type_name, t.shape[0], t.shape[1], tokens), t.name)
    return list(seen)


def main() -> int:
    from moechat.app.arg_types import positive_int

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,qwen3-30b-a3b:4:Q4_0")
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--shapes", action="store_true", help="also time each model's own weight shapes")
    args = ap.parse_args()

    import llama_cpp

    from benchmarks.plan_accuracy import model_path
    from moechat.backends.engines.llamacpp_timing import time_llama
    from moechat.backends.model.model_card import read_model_card
    from moechat.backends.plan import cost_model as cm
    from moechat.backends.plan.hardware_profile import load_profile

    profile = load_profile()
    from moechat.backends.plan import cpu_probes

    types = cpu_probes.MATVEC_QTYPES
    rates = dict(zip(types, gemm_gflops(args.threads, [(q, COLS, ROWS, N_TOKENS) for q in types])))
    print(f"ggml mul_mat at {N_TOKENS} tokens, {args.threads} threads, GFLOPS: "
          + ", ".join(f"{q} {r:.0f}" for q, r in rates.items())
          + f"; the profile's numpy float32 GEMM: {profile.cpu_gflops:.0f} (x {cm.CPU_PREFILL_EFFICIENCY} in the model)")
    print("| model | predicted now | with per-type GEMM rates | measured (best of rounds) | now / measured | GEMM / measured |")
    print("| --- | --- | --- | --- | --- | --- |")
    for spec in args.models.split(","):
        try:
            card = read_model_card(model_path(spec))
        except ValueError as err:  # an unknown geometry or quant: say so in one line
            print(f"error: {spec}: {err}", file=sys.stderr)
            return 2
        now = cm.predict(card, profile, cm.Placement("cpu")).prefill_tok_s
        gemm = 1 / cm.prefill_seconds_per_token(card, profile, cm.Placement("cpu"), cpu_gemm_gflops=rates)
        llm = llama_cpp.Llama(model_path=str(card.path), n_ctx=2 * N_TOKENS, n_batch=N_TOKENS, n_ubatch=N_TOKENS,
                              n_threads=args.threads, verbose=False)
        try:
            measured = max(time_llama(llm, N_TOKENS, 2)[0] for _ in range(args.rounds))
        finally:
            llm.close()
        print(f"| {spec} | {now:.1f} | {gemm:.1f} | {measured:.1f} | {now / measured:.2f} | {gemm / measured:.2f} |")
        if args.shapes:
            cases = own_shapes(card)
            print("    its own shapes (type cols x rows @ tokens: GFLOPS): " + "; ".join(
                f"{q} {c}x{r} @ {n}: {g:.0f}" for (q, c, r, n), g in zip(cases, gemm_gflops(args.threads, cases))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
