"""What a CPU-only decode step costs besides its weight bytes, split by what scales it.

    .venv/bin/python benchmarks/cpu_token_terms.py [--tokens 48] [--rounds 3]

llama.cpp (llama-cpp-python) at 1 thread decodes single tokens on models that differ in one
thing at a time: the demo upcycles at the same 30 layers with 1, 2 and 4 selected experts
(90, 180, 360 expert products a token) and a tiny 2-layer model (almost nothing but the
per-token cost). Each step is timed in *CPU time* of this process (one thread: the step's own
work, which other sessions' load on this shared machine does not add to; wall time is printed
beside it), median step of each round, best round. The cost model's terms for the same file
come from rates measured in this process at 1 thread just before (ggml matvec per type,
per-op cost); the residual (measured - weights - counted ops) is what
CPU_TOKEN_OVERHEAD_S + layers x CPU_LAYER_OVERHEAD_S stand for: docs/cost-model.md, 'Constants'.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CACHE = Path.home() / ".cache" / "moechat"
MODELS = ("fixtures/tiny-llama-f16-s0-v1.gguf", "demo/smollm2-135m-moe-e4-top1-q8_0-s1-v1.gguf",
          "demo/smollm2-135m-moe-e8-top2-q8_0-s0-v1.gguf", "demo/smollm2-135m-moe-e16-top4-q8_0-s2-v1.gguf")


def step_times(path: Path, tokens: int) -> tuple[float, float]:
    """(median CPU seconds, median wall seconds) of one synchronized single-token decode."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_threads=1, n_threads_batch=1, n_ctx=512, verbose=False)
    try:
        llm.eval(llm.tokenize(b"The capital of France is")[:8])
        llama_cpp.llama_synchronize(llm.ctx)
        cpu, wall = [], []
        token = 42
        for _ in range(tokens):
            c, w = time.process_time(), time.perf_counter()
            llm.eval([token])
            llama_cpp.llama_synchronize(llm.ctx)
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - w)
        return statistics.median(cpu), statistics.median(wall)
    finally:
        llm.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from moechat.backends.model.model_card import read_model_card
    from moechat.backends.plan import cost_model as cm
    from moechat.backends.plan import cpu_probes
    from moechat.backends.plan.hardware_profile import load_profile

    paths = [CACHE / m for m in MODELS if (CACHE / m).exists()]
    best = {p: (float("inf"), float("inf")) for p in paths}
    rates, op_s = {}, float("inf")
    for r in range(args.rounds):
        matvec, _ = cpu_probes.measure_cpu_matvec_gbs(1, 0.5)
        rates = {q: max(rates.get(q, 0.0), v) for q, v in matvec.items()}
        op_s = min(op_s, cpu_probes.measure_cpu_op_s(1))
        for p in paths:
            cpu, wall = step_times(p, args.tokens)
            best[p] = min(best[p], (cpu, wall))
            print(f"round {r + 1}: {p.name} cpu {cpu * 1e3:.3f} ms wall {wall * 1e3:.3f} ms", file=sys.stderr)
    profile = dataclasses.replace(load_profile(), threads=1, cpu_matvec_gbs=rates, cpu_op_s=op_s)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 1 thread, best of {args.rounds} rounds; "
          f"per-op {op_s * 1e6:.2f} us; matvec " + ", ".join(f"{q} {v:.1f}" for q, v in rates.items()) + " GB/s")
    print("| model | layers | expert products/token | weights ms | per-layer ops ms | measured CPU ms | wall ms "
          "| residual ms | model's token + layer overheads ms | predicted ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for p in paths:
        card = read_model_card(p)
        pred = cm.predict(card, profile, cm.Placement("cpu"))
        weights = pred.decode_terms.get("weights in RAM (CPU)", 0.0) + pred.decode_terms.get("KV cache", 0.0)
        ops = (cm.OPS_PER_TOKEN + card.n_layers * cm.OPS_PER_LAYER) * op_s
        projections = len({t.name for t in card.tensors if t.is_expert and t.name.endswith(".weight")
                           and t.layer == (card.expert_layers or (0,))[0]})
        n_products = len(card.expert_layers) * card.n_experts_used * projections
        cpu, wall = best[p]
        print(f"| {p.name} | {card.n_layers} | {n_products} | {weights * 1e3:.3f} | {ops * 1e3:.3f} "
              f"| {cpu * 1e3:.3f} | {wall * 1e3:.3f} | {(cpu - weights - ops) * 1e3:.3f} "
              f"| {(cm.CPU_TOKEN_OVERHEAD_S + card.n_layers * cm.CPU_LAYER_OVERHEAD_S) * 1e3:.3f} | {1e3 / pred.decode_tok_s:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
