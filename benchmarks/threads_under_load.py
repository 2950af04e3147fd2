"""Does the default thread count survive a busy core? Decode speed with one busy process pinned
to core 0, at 1 thread, at one per physical core, and at the default (chosen from the load now,
stepping down if a reply stalls), alternating within each round; then the same without the busy
process. Prints a table; the target (issue 19) is default >= 0.8x the best fixed count.
`--engine torch`: the same for the torch runtime's engine (one engine, its thread count set
before each reply: three copies of its repacked weights would not fit beside the others').

    python benchmarks/threads_under_load.py [--engine llama.cpp|torch] [--model GGUF] [--tokens N] [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

PROMPT = [{"role": "user", "content": "Write a long story about a dragon"}]


class TorchAt:
    """The one torch engine, at a fixed thread count (or the default: None) for each reply."""

    def __init__(self, engine, threads: int | None):
        self.engine, self.threads = engine, threads

    def generate(self, messages, sampling):
        from moechat.backends.plan.threads import AdaptiveThreads

        count = AdaptiveThreads(self.threads)
        count.apply = self.engine._set_threads
        self.engine._set_threads(count.threads)
        self.engine.thread_count = count
        return self.engine.generate(messages, sampling)

    def close(self) -> None:
        if self.threads is None:
            self.engine.close()


def decode(engine, tokens: int) -> tuple[float, int]:
    from moechat.backends.engines.engine import Sampling

    last = None
    for last in engine.generate(PROMPT, Sampling(max_tokens=tokens)):
        pass
    return last.decode_tok_s, last.stats.get("threads", 0)


def run_rounds(engines: dict, rounds: int, tokens: int) -> dict:
    results = {name: [] for name in engines}
    names = list(engines)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
            results[name].append(decode(engines[name], tokens))
            print(f"round {r + 1}: {name}: {results[name][-1][0]:.1f} tok/s "
                  f"({results[name][-1][1]} threads)", file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("llama.cpp", "torch"), default="llama.cpp")
    parser.add_argument("--model", help="GGUF path (default: the demo MoE with Q8_0 experts)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import psutil

    from moechat.backends.engines.llamacpp_engine import LlamaCppEngine
    from moechat.backends.model.demo_model import UpcycleRecipe, demo_model_path
    from moechat.backends.model.model_card import read_model_card

    path = args.model or demo_model_path(UpcycleRecipe(expert_type="Q8_0"), progress=False)
    card = read_model_card(path)
    physical = psutil.cpu_count(logical=False) or 1
    if args.engine == "torch":
        from moechat.backends.engines.torch_engine import TorchEngine

        torch_engine = TorchEngine(card, n_ctx=1024, device="cpu")
        engines = {"1 thread": TorchAt(torch_engine, 1), f"{physical} threads": TorchAt(torch_engine, physical),
                   "default": TorchAt(torch_engine, None)}
    else:
        engines = {"1 thread": LlamaCppEngine(card, n_ctx=1024, threads=1),
                   f"{physical} threads": LlamaCppEngine(card, n_ctx=1024, threads=physical),
                   "default": LlamaCppEngine(card, n_ctx=1024)}
    print(f"model: {card.name} · {args.engine} · {args.tokens} tokens · {args.rounds} rounds · "
          f"{physical} physical cores · load average {psutil.getloadavg()[0]:.1f} at the start")
    try:
        busy = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1.0)
            loaded = run_rounds(engines, args.rounds, args.tokens)
        finally:
            busy.kill()
            busy.wait()
        time.sleep(1.0)
        quiet = run_rounds(engines, args.rounds, args.tokens)
    finally:
        for engine in engines.values():
            engine.close()
    for title, results in (("one busy process pinned to core 0", loaded), ("no busy process of ours", quiet)):
        print(f"\n{title}:")
        print("| round | " + " | ".join(f"{n} tok/s" for n in results) + " | default threads | default / best fixed |")
        print("|---" * (len(results) + 3) + "|")
        ratios = []
        for r in range(args.rounds):
            row = [results[n][r][0] for n in results]
            best_fixed = max(row[:-1])
            ratios.append(row[-1] / best_fixed)
            print(f"| {r + 1} | " + " | ".join(f"{v:.1f}" for v in row)
                  + f" | {results['default'][r][1]} | {ratios[-1]:.2f} |")
        medians = [statistics.median(v for v, _ in results[n]) for n in results]
        print(f"| median | " + " | ".join(f"{v:.1f}" for v in medians)
              + f" | | {medians[-1] / max(medians[:-1]):.2f} (of medians); {statistics.median(ratios):.2f} (median of rounds) |")


if __name__ == "__main__":
    main()
