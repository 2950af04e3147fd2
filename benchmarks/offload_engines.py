"""Decode and prefill tok/s of the Fiddler-style and HOBBIT-style engines against llama.cpp
(best --n-cpu-moe for the same VRAM budget) and the plain torch engine, on one file.

    python benchmarks/offload_engines.py [--model GGUF] [--budgets 0.25 0.5] [--tokens 32]

Each engine answers the same prompt greedily; engines alternate over --rounds and the best
round counts. Without CUDA every "GPU" is the CPU standing in (both sides on the CPU), so
the figures show overheads, not the GPU speed-up; the GPU rows in docs/benchmarks.md need a
GPU machine. llama.cpp's --n-cpu-moe for a budget: the fewest layers whose experts must stay
in RAM so the rest fit in the budget.
"""

from __future__ import annotations

import argparse
import math
import sys

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]


def measure(engine, tokens: int):
    from moechat.backends.engines.engine import Sampling

    last = None
    for event in engine.generate(PROMPT, Sampling(max_tokens=tokens)):
        last = event
    return last


def main(argv=None) -> int:
    from moechat.backends.model.demo_model import demo_model_path
    from moechat.backends.engines.fiddler_engine import FiddlerEngine
    from moechat.backends.engines.hobbit_engine import HobbitEngine
    from moechat.backends.engines.llamacpp_engine import LlamaCppEngine, LlamaCppPlacement
    from moechat.backends.model.model_card import read_model_card
    from moechat.backends.engines.torch_engine import TorchEngine

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    card = read_model_card(args.model or demo_model_path())
    n_layers = len(card.expert_layers) or card.n_layers
    rows = []
    for share in args.budgets:
        n_cpu_moe = math.ceil((1 - share) * n_layers)  # experts of these layers stay in RAM
        makers = {
            f"llama.cpp --n-cpu-moe {n_cpu_moe}": lambda: LlamaCppEngine(
                card, LlamaCppPlacement("moe", n_cpu_moe), n_ctx=512, threads=args.threads),
            "torch (all experts on CPU)": lambda: TorchEngine(card, n_ctx=512, threads=args.threads),
            "fiddler": lambda: FiddlerEngine(card, n_ctx=512, threads=args.threads,
                                             vram_budget=("share", share), progress=False),
            "hobbit": lambda: HobbitEngine(card, n_ctx=512, threads=args.threads,
                                           vram_budget=("share", share), progress=False),
        }
        engines = {name: make() for name, make in makers.items()}
        best = {}
        try:
            for _ in range(args.rounds):
                for name, engine in engines.items():
                    ev = measure(engine, args.tokens)
                    old = best.get(name)
                    if old is None or ev.decode_tok_s > old.decode_tok_s:
                        best[name] = ev
        finally:
            for engine in engines.values():
                engine.close()
        ref = best[f"llama.cpp --n-cpu-moe {n_cpu_moe}"].decode_tok_s or 1
        for name, ev in best.items():
            rows.append((f"{share:.0%}", name, ev.prefill_tok_s, ev.decode_tok_s, ev.decode_tok_s / ref,
                         _summary(ev.stats)))
    print(f"model {card.path}")
    print(f"{'budget':>6} {'engine':<28} {'prefill tok/s':>13} {'decode tok/s':>12} {'vs llama.cpp':>12}  stats")
    for budget, name, pre, dec, ratio, stats in rows:
        print(f"{budget:>6} {name:<28} {pre:>13.1f} {dec:>12.2f} {ratio:>12.2f}  {stats}")
    return 0


def _summary(stats) -> str:
    keys = ("gpu_hit_rate", "experts_on_cpu", "bytes_copied", "high_hits", "low_hits", "misses",
            "prefetch_accuracy", "bytes_moved")
    return ", ".join(f"{k}={stats[k]}" for k in keys if k in stats)


if __name__ == "__main__":
    sys.exit(main())
