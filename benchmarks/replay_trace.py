"""Record expert routing on a model, then replay it through LRU, LFU and HOBBIT's policy.

    python benchmarks/replay_trace.py record [--model GGUF] [--decode 32] OUT.npz
    python benchmarks/replay_trace.py replay TRACE.npz [--budget 0.25] [--fit] [--skip]
    python benchmarks/replay_trace.py fiddler TRACE.npz [--profiles P.json ...]

`record` runs the torch runtime over varied prompts (prefill, then greedy decode) and
saves every layer's expert ids, gate weights and stacked-router guesses. `replay` prints,
side by side, hit rates and bytes moved for each policy at a VRAM budget given as a
fraction of all experts' high-precision bytes; `--fit` first fits HOBBIT's priority
weights on the first half of the trace and replays the second half.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

RECORD_PROMPTS = (
    "Write a short poem about the sea at night.",
    "Explain how a hash table works, with a small Python example.",
    "What were the main causes of the First World War?",
    "Give me three tips for learning to play the guitar.",
    "Translate into French: The weather is lovely today and we are going to the park.",
    "Compute 17 * 23 step by step.",
    "Describe the water cycle for a school report.",
    "Write a SQL query that finds duplicate email addresses in a users table.",
)


def record(args) -> int:
    import torch
    from llama_cpp import Llama

    from moechat.backends.model.demo_model import demo_model_path
    from moechat.backends.offload.recording import RecordingExperts
    from moechat.backends.runtime import load_model

    path = args.model or str(demo_model_path())
    model = load_model(path)
    vocab = Llama(model_path=path, vocab_only=True, verbose=False)
    a = model.args
    rec = RecordingExperts(model.expert_backend, model.routers(), a.n_experts, a.n_experts_used,
                           model=Path(path).name)
    model.expert_backend = rec
    start = time.perf_counter()
    for i, prompt in enumerate(RECORD_PROMPTS[: args.prompts]):
        text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        tokens = torch.tensor(vocab.tokenize(text.encode(), add_bos=False, special=True))
        cache = model.new_cache(len(tokens) + args.decode + 1)
        rec.recorder.begin_sequence()
        logits = model.forward(tokens, cache, 0, all_logits=False)
        rec.recorder.end_step(prefill=True)
        pos = len(tokens)
        for _ in range(args.decode):
            nxt = logits[-1].argmax().view(1)
            logits = model.forward(nxt, cache, pos, all_logits=False)
            rec.recorder.end_step(prefill=False)
            pos += 1
        print(f"[{i + 1}/{args.prompts}] {pos} tokens, {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
    trace = rec.recorder.trace()
    trace.save(Path(args.out))
    print(f"wrote {args.out}: {trace.n_tokens} tokens, {trace.n_layers} layers, "
          f"{trace.n_experts} experts, top-{trace.top_k}")
    return 0


def replay_cmd(args) -> int:
    from moechat.backends.offload.hobbit_cache import DEFAULT_WEIGHTS
    from moechat.backends.offload.replay import CachePlan, compare_policies, fit_weights, predictor_accuracy
    from moechat.backends.offload.trace import load_trace

    trace = load_trace(Path(args.trace))
    if args.decode_only:
        trace = trace.decode_only()
    high = args.expert_bytes
    low = round(high * args.low_ratio)
    plan = CachePlan(budget_bytes=int(args.budget * high * trace.n_layers * trace.n_experts),
                     high_bytes=high, low_bytes=low, high_fraction=args.high_fraction)
    weights, evaluate = DEFAULT_WEIGHTS, trace
    if args.fit:
        fit, evaluate = trace.split(0.5)
        weights, _, fraction = fit_weights(fit, plan, step=args.step,
                                           high_fractions=(0.5, 0.75, 0.9, 1.0))
        plan = CachePlan(plan.budget_bytes, plan.high_bytes, plan.low_bytes, fraction)
        print(f"fitted on {fit.n_tokens} tokens: w_lru={weights.lru:.2f} w_lfu={weights.lfu:.2f} "
              f"w_lhu={weights.lhu:.2f} w_fld={weights.fld:.2f}, high tier {fraction:.0%} of the "
              f"budget; replaying the other {evaluate.n_tokens}")
    print(f"trace {args.trace}: {evaluate.n_tokens} tokens × {evaluate.n_layers} layers, "
          f"{evaluate.n_experts} experts top-{evaluate.top_k}; budget {args.budget:.0%} of experts "
          f"({plan.budget_bytes / 1e6:.1f} MB), expert {high / 1e6:.2f} MB high / {low / 1e6:.2f} MB low")
    if trace.predicted is not None:
        acc = predictor_accuracy(evaluate)
        print("stacked-router guess accuracy by depth: " + ", ".join(f"+{d + 1}: {a:.1%}" for d, a in enumerate(acc)))
    rows = compare_policies(evaluate, plan, weights, allow_skip=args.skip, t1=args.t1)
    base = rows[0].bytes_moved or 1
    print(f"{'policy':<16} {'hit rate':>8} {'high hits':>9} {'low hits':>8} {'misses':>7} {'skips':>6} "
          f"{'MB moved':>9} {'vs LRU':>7} {'prefetch acc':>12}")
    for r in rows:
        print(f"{r.policy:<16} {r.hit_rate:>8.1%} {r.high_hits:>9} {r.low_hits:>8} {r.misses:>7} "
              f"{r.skips:>6} {r.bytes_moved / 1e6:>9.1f} {r.bytes_moved / base:>7.2f} "
              f"{(f'{r.prefetch_accuracy:.1%}' if r.prefetched else '-'):>12}")
    return 0


def fiddler_cmd(args) -> int:
    """Fiddler's placement and decisions on a trace, for each machine profile: calibrate on
    the first half, replay the second, Mixtral-8x7B-sized Q4_0 experts."""

    import numpy as np

    from moechat.backends.offload.fiddler_policy import (
        ExpertShape, crossover_tokens, hit_rate, place_experts, popularity_ranking, replay_costs,
        replay_fiddler)
    from moechat.backends.plan.hardware_profile import read_profile
    from moechat.backends.offload.trace import load_trace

    trace = load_trace(Path(args.trace))
    calib, held = trace.split(0.5)
    shape = ExpertShape(weight_bytes=3 * 4096 * 14336 * 9 // 16, params=3 * 4096 * 14336, hidden=4096)
    decode = held.decode_only()
    print(f"trace {args.trace}: calibrate on {calib.n_tokens} tokens, replay {held.n_tokens} "
          f"({decode.n_tokens} decoded); experts sized as Mixtral-8x7B Q4_0 ({shape.weight_bytes / 1e6:.0f} MB)")
    print(f"{'machine':<48} {'budget':>6} {'hit rate':>8} {'reverse':>8} {'copy from n':>11} "
          f"{'decode ms/tok':>13} {'all-CPU ms/tok':>14} {'prefill copies':>14}")
    for path in args.profiles:
        costs = replay_costs(read_profile(path))
        for share in (0.25, 0.5):
            budget = int(share * trace.n_layers * trace.n_experts)
            placement = place_experts(popularity_ranking(calib.counts()), 1, budget)
            reverse = place_experts(popularity_ranking(-calib.counts()), 1, budget)
            ones = np.ones(decode.n_tokens, int)
            run = replay_fiddler(decode, placement, costs, shape, "cost", step_tokens=ones)
            cpu_only = replay_fiddler(decode, frozenset(), costs, shape, "cpu", step_tokens=ones)
            prefill = replay_fiddler(held, placement, costs, shape, "cost",
                                     step_tokens=np.diff([*held.seq_starts, held.n_tokens]))
            print(f"{costs.name[:48]:<48} {share:>6.0%} {hit_rate(held.counts(), placement):>8.1%} "
                  f"{hit_rate(held.counts(), reverse):>8.1%} {crossover_tokens(costs, shape):>11} "
                  f"{1000 * run.overlapped_seconds / decode.n_tokens:>13.2f} "
                  f"{1000 * cpu_only.overlapped_seconds / decode.n_tokens:>14.2f} {prefill.experts_copied:>14}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out")
    r.add_argument("--model")
    r.add_argument("--decode", type=int, default=32)
    r.add_argument("--prompts", type=int, default=len(RECORD_PROMPTS))
    p = sub.add_parser("replay")
    p.add_argument("trace")
    p.add_argument("--budget", type=float, default=0.25, help="fraction of all experts' bytes")
    p.add_argument("--expert-bytes", type=int, default=5_308_416, help="one expert, high precision")
    p.add_argument("--low-ratio", type=float, default=5 / 16, help="low / high bytes (int4 g32 vs F16)")
    p.add_argument("--high-fraction", type=float, default=0.75)
    p.add_argument("--fit", action="store_true")
    p.add_argument("--step", type=float, default=0.1)
    p.add_argument("--skip", action="store_true")
    p.add_argument("--t1", type=float, default=0.6, help="HOBBIT's T1 (high-precision threshold)")
    p.add_argument("--decode-only", action="store_true")
    f = sub.add_parser("fiddler")
    f.add_argument("trace")
    f.add_argument("--profiles", nargs="+", default=sorted(
        str(p) for p in (Path(__file__).resolve().parents[1] / "tests/profiles").glob("*.json")))
    args = parser.parse_args(argv)
    return {"record": record, "replay": replay_cmd, "fiddler": fiddler_cmd}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
