"""Decode time per token as the context grows: the torch runtime vs llama.cpp, same GGUF.

Each engine runs in its own subprocess: it fills its KV cache to each context length in
turn (512-token chunks, timed: the prefill rate from the previous length to this one), then
times `--steps` single-token decode steps there and rolls the cache back before the next
length. Engines alternate per round; the table shows medians.

    python benchmarks/long_context.py                    # demo model, Q8_0 experts
    python benchmarks/long_context.py --model X.gguf --contexts 128 2048 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

FILL_CHUNK = 512


def filler(n: int, offset: int) -> list[int]:
    return [100 + ((offset + i) * 37) % 5000 for i in range(n)]


def measure_llamacpp(path: str, contexts: list[int], steps: int, threads: int) -> dict[int, tuple[float, float]]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=max(contexts) + steps + 8, n_batch=FILL_CHUNK,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    memory = llama_cpp.llama_get_memory(llm.ctx)
    out = {}
    for context in contexts:
        filled, t0 = llm.n_tokens, time.perf_counter()
        while llm.n_tokens < context:
            llm.eval(filler(min(FILL_CHUNK, context - llm.n_tokens), llm.n_tokens))
        prefill_s = (time.perf_counter() - t0) / max(1, context - filled)
        t0 = time.perf_counter()
        for _ in range(steps):
            llm.eval([42])
        out[context] = (prefill_s, (time.perf_counter() - t0) / steps)
        llm.n_tokens -= steps  # roll back the timed steps
        llama_cpp.llama_memory_seq_rm(memory, -1, llm.n_tokens, -1)
    return out


def measure_torch(path: str, contexts: list[int], steps: int, threads: int) -> dict[int, tuple[float, float]]:
    import torch

    from moechat.backends.runtime import load_model

    torch.set_num_threads(1)  # as the torch engine does
    model = load_model(path, threads=threads, max_tokens=max(contexts) + steps + 8)
    cache = model.new_cache(max(contexts) + steps + 8)
    out, pos = {}, 0
    with torch.inference_mode():
        for context in contexts:
            filled, t0 = pos, time.perf_counter()
            while pos < context:
                n = min(FILL_CHUNK, context - pos)
                model.forward(torch.tensor(filler(n, pos)), cache, pos, all_logits=False)
                pos += n
            prefill_s = (time.perf_counter() - t0) / max(1, context - filled)
            t0 = time.perf_counter()
            for i in range(steps):
                model.forward(torch.tensor([42]), cache, pos + i, all_logits=False)
            out[context] = (prefill_s, (time.perf_counter() - t0) / steps)
            cache.truncate(pos)
    return out


def main() -> int:
    from moechat.backends.plan.threads import default_threads

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="GGUF path (default: the demo model with Q8_0 experts)")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 2048, 4096])
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per context length")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--child", choices=["llama.cpp", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    contexts = sorted(args.contexts)
    if args.child:
        run = measure_llamacpp if args.child == "llama.cpp" else measure_torch
        print(json.dumps(run(args.model, contexts, args.steps, args.threads)))
        return 0

    if args.model is None:
        from moechat.backends.model.demo_model import UpcycleRecipe, demo_model_path

        args.model = str(demo_model_path(UpcycleRecipe(expert_type="Q8_0"), progress=True))
    results: dict[str, list[dict]] = {"llama.cpp": [], "torch": []}
    for _ in range(args.rounds):
        for engine in results:
            cmd = [sys.executable, __file__, "--child", engine, "--model", args.model, "--steps", str(args.steps),
                   "--threads", str(args.threads), "--contexts", *map(str, contexts)]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            results[engine].append({int(k): tuple(v) for k, v in json.loads(out.strip().splitlines()[-1]).items()})
    print(f"{args.model}: threads {args.threads}, {args.steps} decode steps per length, {args.rounds} round(s), median")
    print("| context tokens | decode ms/token llama.cpp | torch | torch ÷ llama.cpp tok/s "
          "| prefill tok/s up to here llama.cpp | torch |")
    print("|---|---|---|---|---|---|")
    for c in contexts:
        prefill = {e: 1 / statistics.median(r[c][0] for r in rs) for e, rs in results.items()}
        ms = {e: statistics.median(r[c][1] for r in rs) * 1e3 for e, rs in results.items()}
        print(f"| {c} | {ms['llama.cpp']:.2f} | {ms['torch']:.2f} | {ms['llama.cpp'] / ms['torch']:.2f} "
              f"| {prefill['llama.cpp']:.0f} | {prefill['torch']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
