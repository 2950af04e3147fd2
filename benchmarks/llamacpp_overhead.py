"""moechat's llama.cpp engine vs raw llama-cpp-python on the same GGUF, alternating.

Both sides decode the same greedy continuation of the same prompt with the same thread
count; each repetition starts from an empty KV cache. Prefill and decode tok/s come from
llama.cpp's perf counters on both sides, so the ratio isolates moechat's own overhead
(chat-template rendering, incremental detokenisation, Event objects).

    python benchmarks/llamacpp_overhead.py [--model PATH] [--reps 5] [--tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import llama_cpp

from moechat.backends.engines.engine import Sampling
from moechat.backends.engines.llamacpp_engine import LlamaCppEngine
from moechat.backends.plan.threads import default_threads
from moechat.backends.model.model_card import read_model_card
from moechat.backends.model.model_resolve import resolve_model

MESSAGES = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


def run_moechat(engine: LlamaCppEngine, tokens: int) -> tuple[float, float, int]:
    engine.llm.reset()  # empty KV cache: measure a full prefill
    last = None
    for event in engine.generate(MESSAGES, Sampling(max_tokens=tokens)):
        last = event
    return last.prefill_tok_s, last.decode_tok_s, last.stats["decoded_tokens"]


def run_raw(llm: llama_cpp.Llama, prompt_tokens: list[int], tokens: int) -> tuple[float, float, int]:
    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    n = 0
    for token in llm.generate(prompt_tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.0,
                              repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        n += 1
        if n >= tokens:
            break
    llama_cpp.llama_synchronize(llm.ctx)
    perf = llama_cpp.llama_perf_context(llm.ctx)
    return perf.n_p_eval / perf.t_p_eval_ms * 1e3, perf.n_eval / perf.t_eval_ms * 1e3, perf.n_eval


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF path (default: the demo model)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=default_threads())
    args = parser.parse_args()

    card = read_model_card(resolve_model(args.model))
    engine = LlamaCppEngine(card, n_ctx=1024, threads=args.threads)
    raw = llama_cpp.Llama(card.path, n_ctx=1024, n_batch=512, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    prompt_tokens = engine.prompt_tokens(MESSAGES)
    run_moechat(engine, 8), run_raw(raw, prompt_tokens, 8)  # warm-up: page in the weights

    rows = []
    for rep in range(args.reps):
        order = [("moechat", lambda: run_moechat(engine, args.tokens)),
                 ("raw", lambda: run_raw(raw, prompt_tokens, args.tokens))]
        if rep % 2:
            order.reverse()  # alternate who goes first
        result = {name: fn() for name, fn in order}
        rows.append(result)
        m, r = result["moechat"], result["raw"]
        print(f"rep {rep}: moechat prefill {m[0]:7.1f} decode {m[1]:6.1f} ({m[2]} tok) | "
              f"raw prefill {r[0]:7.1f} decode {r[1]:6.1f} ({r[2]} tok) | "
              f"decode ratio {m[1] / r[1]:.3f}", flush=True)

    def med(side: str, i: int) -> float:
        return statistics.median(row[side][i] for row in rows)

    ratios = [row["moechat"][1] / row["raw"][1] for row in rows]
    pre_ratios = [row["moechat"][0] / row["raw"][0] for row in rows]
    print()
    print(f"model: {card.path} ({card.file_bytes / 1e9:.2f} GB), threads {args.threads}, "
          f"{args.tokens} tokens, {args.reps} reps (medians)")
    print("| side | prefill tok/s | decode tok/s |")
    print("|---|---|---|")
    print(f"| moechat llama.cpp engine | {med('moechat', 0):.1f} | {med('moechat', 1):.1f} |")
    print(f"| raw llama-cpp-python | {med('raw', 0):.1f} | {med('raw', 1):.1f} |")
    print(f"| ratio (median of per-rep ratios) | {statistics.median(pre_ratios):.3f} | "
          f"{statistics.median(ratios):.3f} |")
    engine.close()
    raw.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
