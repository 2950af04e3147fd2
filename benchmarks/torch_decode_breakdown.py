"""Where a torch-runtime decode step spends its time: ggml compute vs Python and torch ops.

Wraps the runtime's pieces with wall-clock timers (inclusive; nested pieces overlap), runs a
128-token prefill and `--tokens` greedy decode steps, and prints ms per token for each piece.
Cheaper and closer to the real timings than cProfile, which inflates Python-heavy code.

    python benchmarks/torch_decode_breakdown.py                 # demo model, Q8_0 experts
    python benchmarks/torch_decode_breakdown.py --model X.gguf --threads 1
"""

from __future__ import annotations

import argparse
import collections
import sys
import time


def timed(owner, name: str, label: str, totals: dict) -> None:
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - t0

    setattr(owner, name, wrapper)


def main() -> int:
    import torch

    from moechat.backends.plan.threads import default_threads
    from moechat.backends.runtime import experts, kv_cache, llama, load_model, rope
    from moechat.kernels import ggml

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="GGUF path (default: the demo model with Q8_0 experts)")
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    if args.model is None:
        from moechat.backends.model.demo_model import UpcycleRecipe, demo_model_path

        args.model = str(demo_model_path(UpcycleRecipe(expert_type="Q8_0"), progress=True))

    totals: dict[str, float] = collections.defaultdict(float)
    calls = collections.Counter()
    run = ggml._Graph._run

    def counted_run(self):
        calls["ggml"] += 1
        run(self)

    ggml._Graph._run = counted_run
    for owner, name, label in [
        (ggml._Graph, "_run", "ggml graph compute"),
        (llama.Model, "attention", "attention block (incl. its ggml)"),
        (llama.Model, "feed_forward", "feed-forward block (incl. its ggml)"),
        (llama, "attention", "  attention core (torch)"),
        (rope.Rope, "__call__", "  RoPE (torch)"),
        (kv_cache.KVCache, "update", "  KV-cache write (torch)"),
        (llama, "rms_norm", "RMSNorm (torch)"),
        (llama, "route", "routing (torch)"),
        (experts.GgmlExperts, "moe_forward", "  experts (incl. their ggml)"),
        (llama.Model, "embed", "embedding rows"),
    ]:
        timed(owner, name, label, totals)

    torch.set_num_threads(1)  # as the torch engine does
    model = load_model(args.model, threads=args.threads, max_tokens=128 + args.tokens + 8)
    n_layers = len(model.layers)
    cache = model.new_cache(128 + args.tokens + 8)
    prompt = [1] + [100 + (i * 37) % 5000 for i in range(127)]
    with torch.inference_mode():
        logits = model.forward(torch.tensor(prompt), cache, 0, all_logits=False)
        token, pos = int(logits[-1].argmax()), 128
        totals.clear()
        calls.clear()
        t0 = time.perf_counter()
        for _ in range(args.tokens):
            logits = model.forward(torch.tensor([token]), cache, pos, all_logits=False)
            token, pos = int(logits[-1].argmax()), pos + 1
        step = (time.perf_counter() - t0) / args.tokens
    print(f"{args.model}: {n_layers} layers, threads {args.threads}, {args.tokens} decode steps")
    print(f"decode step {step * 1e3:.2f} ms; ggml graph computes per step: {calls['ggml'] / args.tokens:.0f}")
    print("| piece | ms / token | share of the step |")
    print("|---|---|---|")
    for label, total in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {total / args.tokens * 1e3:.2f} | {total / args.tokens / step:.0%} |")
    outside = step - totals["ggml graph compute"] / args.tokens
    print(f"| everything but ggml compute | {outside * 1e3:.2f} | {outside / step:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
