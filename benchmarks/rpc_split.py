"""Issue 17: the cost of llama.cpp's RPC path, and splits of big MoEs on paper.

    python benchmarks/rpc_split.py [--model GGUF] [--rounds 3]   # local vs two loopback workers
    python benchmarks/rpc_split.py --paper                      # Qwen3-235B-A22B, DeepSeek-V3

Measured: prefill and decode tok/s of the model here alone and split across this process
and two `moechat worker`s on 127.0.0.1 (started and stopped here), alternating A and B every
round, each beside the plan's prediction. The workers share this machine's cores and RAM,
so the split can only be slower: the gap is the RPC path itself (graph serialisation, the
socket hops, the server's dispatch).

On paper: the planner's choice for each model on 2-4 recorded 128 GB desktops
(tests/profiles/clusters/desktop-128gb-ddr5.json) on 1, 2.5 and 10 GbE links.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPT, DECODE = 64, 32
LINKS = {"1 GbE": (0.117, 250e-6), "2.5 GbE": (0.29, 150e-6), "10 GbE": (1.15, 60e-6)}


def measured(args) -> None:
    from rpc_workers import workers

    from moechat.backends.engines.llamacpp_engine import LlamaCppEngine
    from moechat.backends.engines.rpc_engine import RpcLlamaCppEngine
    from moechat.backends.model.demo_model import demo_model_path
    from moechat.backends.model.model_card import read_model_card
    from moechat.backends.plan.hardware_profile import load_profile
    from moechat.backends.plan.planner import make_plan
    from moechat.backends.plan import workers as wk
    from moechat.backends.plan.rpc_probe import probe_worker
    from moechat.app.plan_cmd import time_llama

    card = read_model_card(args.model or demo_model_path(progress=False))
    import dataclasses

    profile = dataclasses.replace(load_profile(), threads=args.threads)
    third = card.n_layers // 3
    split = (card.n_layers - 2 * third, third, third)
    with workers(2, threads=args.threads) as pair:
        links = [probe_worker(w.endpoint) for w in pair]
        profiles = tuple(wk.WorkerProfile.from_link(link) for link in links)
        plan = make_plan(card, profile, n_ctx=512, workers=profiles)
        local_pred = next(c for c in plan.candidates if c.placement == "cpu")
        split_pred = wk.predict(card, profile, profiles, wk.Split(split, ""), n_ctx=512)
        local = LlamaCppEngine(card, n_ctx=512, threads=profile.threads)
        remote = RpcLlamaCppEngine(card, tuple(w.endpoint for w in pair), split[1:], n_ctx=512,
                                   threads=profile.threads)
        runs = {"local": [], "split": []}
        try:
            split_pids = [remote._proc.pid] + [w.proc.pid for w in pair]
            cpu = {"local": [], "split": []}
            for r in range(args.rounds):  # alternate A and B: the machine is shared and noisy
                runs["local"].append(time_llama(local.llm, PROMPT, DECODE, args.statistic))
                runs["split"].append(remote.time_llama(PROMPT, DECODE, args.statistic))
                # CPU seconds per decoded token, summed over every process of the run: on a
                # shared machine this shows the RPC path's own cost, which wall time cannot
                cpu["local"].append(_cpu_per_token(lambda: time_llama(local.llm, 1, DECODE), []))
                cpu["split"].append(_cpu_per_token(lambda: remote.time_llama(1, DECODE), split_pids))
                print(f"round {r + 1}: local {runs['local'][-1][1]:.1f}, split {runs['split'][-1][1]:.1f} decode tok/s",
                      file=sys.stderr)
        finally:
            local.close()
            remote.close()
    print(f"{card.name}, {card.n_layers} layers; split {split[0]} here + {split[1]} + {split[2]} on two "
          f"loopback workers (RTT {links[0].rtt_s * 1e6:.0f} us, {links[0].link_gbs:.2f} GB/s); "
          f"{profile.threads} threads, {args.rounds} rounds, {args.statistic}\n")
    print("| run | prefill tok/s | predicted | decode tok/s | predicted |\n|---|---|---|---|---|")
    for name, pred in (("local", (local_pred.prefill_tok_s, local_pred.decode_tok_s)),
                       ("split", (split_pred.prefill_tok_s, split_pred.decode_tok_s))):
        pre, dec = _summary(runs[name], args.statistic)
        print(f"| {name} | {pre:.1f} | {pred[0]:.1f} | {dec:.1f} | {pred[1]:.1f} |")
    cpu_local, cpu_split = min(cpu["local"]), min(cpu["split"])
    print(f"\nCPU per decoded token (all processes, best round): local {cpu_local * 1e3:.2f} ms, "
          f"split {cpu_split * 1e3:.2f} ms ({cpu_split / cpu_local:.2f}x)")
    loc, spl = _summary(runs["local"], args.statistic)[1], _summary(runs["split"], args.statistic)[1]
    print(f"split / local decode (wall) = {spl / loc:.2f}")


def _cpu_per_token(run, pids) -> float:
    """CPU seconds (user + system) that `run` costs this process and `pids`, per token."""
    import psutil

    procs = [psutil.Process()] + [psutil.Process(p) for p in pids]

    def total():
        return sum(sum(p.cpu_times()[:2]) for p in procs)

    before = total()
    run()
    return (total() - before) / (1 + DECODE)


def _summary(runs, statistic: str) -> tuple[float, float]:
    """(prefill, decode) over rounds: the best round ("best": STREAM's rule, robust to other
    work on a shared machine) or the mean."""
    if statistic == "best":
        return max(r[0] for r in runs), max(r[1] for r in runs)
    return sum(r[0] for r in runs) / len(runs), sum(r[1] for r in runs) / len(runs)


def paper() -> None:
    from fixtures.clusters import read_cluster

    from fixtures.random_geometry import geometry_card
    from moechat.backends.plan.planner import NoFitError, make_plan

    from moechat.backends.plan import cost_model as cm

    print("| model | machines | link | choice | layers per machine | prefill tok/s | decode tok/s | "
          "first load over the link |\n|---|---|---|---|---|---|---|---|")
    for geometry in ("qwen3-235b-a22b", "deepseek-v3"):
        card = geometry_card(geometry, qtype="Q4_K")
        for n in (2, 3, 4):
            for link_name, link in LINKS.items():
                here, workers = read_cluster("three-desktops-1gbe", link=link, n_workers=n - 1)
                name = f"{geometry} Q4_K ({card.tensor_bytes / 2**30:.0f} GiB)"
                try:
                    c = make_plan(card, here, n_ctx=4096, workers=workers).choice
                except NoFitError:
                    print(f"| {name} | {n} | {link_name} | does not fit | | | | |")
                    continue
                layers = " / ".join(map(str, c.split)) if c.split else str(card.n_layers)
                remote = sum(cm.layer_bytes(card, x) for x in range(c.split[0], card.n_layers)) if c.split else 0
                print(f"| {name} | {n} | {link_name} | {c.placement} | {layers} | {c.prefill_tok_s:.1f} | "
                      f"{c.decode_tok_s:.2f} | {remote / 1e9:.0f} GB, {remote / (link[0] * 1e9) / 60:.0f} min |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF (default: the demo model)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of this process and of each worker (default 1: on a shared "
                             "machine more threads than free cores make OpenMP spin and collapse)")
    parser.add_argument("--statistic", choices=("best", "mean"), default="best",
                        help="best (default): best token and best round; mean: throughput")
    parser.add_argument("--paper", action="store_true", help="print the on-paper table only")
    args = parser.parse_args()
    paper() if args.paper else measured(args)


if __name__ == "__main__":
    main()
