"""HOBBIT quality: teacher-forced next-token distributions of the mixed-precision engine
against full precision (the file's own expert weights), token by token as decode sees them.

    python benchmarks/hobbit_quality.py [--model GGUF] [--tokens 256] [--budget 0.25]

Prints, per configuration, the mean KL(full || mixed) in nats, the top-1 agreement and
how the experts were served. "full" is the same engine with T1 = 1 (every miss loads the
file's weights) and room for every expert.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def run(model, store, routers, tokens, low, budget_share, t1, t2, skip, full=False):
    import torch

    from moechat.backends.offload.devices import pick_devices
    from moechat.backends.engines.offload_engine import all_expert_bytes
    from moechat.backends.offload.hobbit_cache import DEFAULT_WEIGHTS, HobbitCache
    from moechat.backends.offload.hobbit_experts import HobbitExperts
    from moechat.backends.engines.hobbit_engine import HIGH_FRACTION

    a = model.args
    budget = int(all_expert_bytes(store) * (1.0 if full else budget_share))
    high = budget if full else int(budget * HIGH_FRACTION)
    cache = HobbitCache(high, budget - high, a.n_layers, DEFAULT_WEIGHTS)
    backend = HobbitExperts(store, pick_devices("cpu"), low, cache, routers, a.n_experts,
                            a.n_experts_used, model.dtype, allow_skip=skip, t1=t1, t2=t2)
    saved, model.expert_backend = model.expert_backend, backend
    kv = model.new_cache(len(tokens) + 1)
    out = []
    try:
        backend.begin_sequence()
        with torch.inference_mode():
            for i, tok in enumerate(tokens):
                backend.position = i
                out.append(model.forward(torch.tensor([tok]), kv, i)[0])
    finally:
        model.expert_backend = saved
    return torch.stack(out).double(), backend.stats


def main(argv=None) -> int:
    import torch

    from moechat.backends.model.demo_model import demo_model_path
    from moechat.backends.offload.calibration import CALIBRATION_PROMPTS
    from moechat.backends.offload.low_copies import load_or_build
    from moechat.backends.offload.prefetch import stack_routers
    from moechat.backends.engines.prompt import ChatTokenizer
    from moechat.backends.runtime import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--budget", type=float, default=0.25, help="cache as a share of all experts")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    path = args.model or str(demo_model_path())
    model = load_model(path, threads=args.threads, max_tokens=args.tokens + 8)
    tok = ChatTokenizer.open(path)
    text = "\n\n".join(CALIBRATION_PROMPTS[::-1])  # varied: prose, code, maths, French, lists
    tokens = tok.tokenize(text)[: args.tokens]
    store = model.experts
    routers = stack_routers(model.routers())
    lows = {4: load_or_build(path, 4), 2: load_or_build(path, 2)}
    t0 = time.perf_counter()
    ref, _ = run(model, store, routers, tokens, lows[4], 1.0, 1.0, 1.0, False, full=True)
    ref_logp = torch.log_softmax(ref, -1)
    configs = [
        ("T1=0.6 T2=0.9 int4 (paper)", 4, 0.6, 0.9, False),
        ("T1=0.6 T2=0.9 int4 --skip", 4, 0.6, 0.9, True),
        ("T1=0.5 int4 (every 2nd expert low)", 4, 0.5, 1.0, False),
        ("T1=0.5 int2 (every 2nd expert low)", 2, 0.5, 1.0, False),
        ("T1=T2=0.5 --skip (top-1 only)", 4, 0.5, 0.5, True),
    ]
    print(f"model {path}; {len(tokens)} teacher-forced tokens, decode path; cache {args.budget:.0%} "
          f"of experts (75% high tier); reference in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(f"{'configuration':<38} {'KL nats':>8} {'top-1 agree':>11} {'high hits':>9} {'low hits':>8} "
          f"{'misses':>7} {'skips':>6} {'MB moved':>9}")
    for name, bits, t1, t2, skip in configs:
        logits, s = run(model, store, routers, tokens, lows[bits], args.budget, t1, t2, skip)
        logp = torch.log_softmax(logits, -1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
        agree = (logits.argmax(-1) == ref.argmax(-1)).double().mean().item()
        print(f"{name:<38} {kl:>8.4f} {agree:>11.2%} {s.high_hits:>9} {s.low_hits:>8} {s.misses:>7} "
              f"{s.skips:>6} {s.bytes_copied / 1e6:>9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
