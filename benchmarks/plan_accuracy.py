"""Predicted vs measured decode speed for `moechat plan --measure`, on the demo model and on
random-weight models of real geometry (Mixtral-8x7B and Qwen3-30B-A3B shapes, few layers).

    .venv/bin/python benchmarks/plan_accuracy.py [--rounds 3] [--models demo,mixtral-8x7b:4:Q4_0]

For every model: the plan on this machine's profile, then `plan --measure`'s alternating
rounds (re-measure bandwidths, time each fitting candidate; best of rounds). Prints one row
per candidate run: predicted and measured decode tok/s, the error, and the predicted time
split (weights vs overheads) with the measured per-token time, from which the overhead
constants in backends/plan/cost_model.py were fitted (docs/cost-model.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def model_path(spec: str) -> Path:
    if spec == "demo":
        from moechat.backends.model.demo_model import demo_model_path

        return demo_model_path()
    from tests.fixtures.random_geometry import random_geometry_path

    geometry, layers, qtype = (spec.split(":") + ["4", "Q4_0"])[:3]
    return random_geometry_path(geometry, int(layers), qtype, progress=True)


def main() -> int:
    from moechat.backends.plan.hardware_profile import load_profile
    from moechat.app.plan_cmd import measure_candidates
    from moechat.backends.plan import cost_model as cm
    from moechat.backends.model.model_card import read_model_card
    from moechat.backends.plan.planner import make_plan, placement_of

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--statistic", choices=("mean", "best"), default="mean")
    parser.add_argument("--threads", type=int, help="threads for llama.cpp and the bandwidths (default: profile's)")
    parser.add_argument("--models", default="demo,mixtral-8x7b:4:Q4_0,qwen3-30b-a3b:4:Q4_0")
    args = parser.parse_args()
    profile = load_profile()
    if args.threads:
        import dataclasses

        profile = dataclasses.replace(profile, threads=args.threads)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {profile.cpu.model}, {profile.threads} threads, "
          f"{args.rounds} rounds, statistic {args.statistic}")
    header = (f"{'model':<34} {'placement':<10} {'pred tok/s':>10} {'meas tok/s':>10} {'error':>7} "
              f"{'weights ms':>10} {'overh ms':>8} {'meas ms':>8}  RAM GB/s  matvec GB/s")
    lines = [header]
    for spec in args.models.split(","):
        card = read_model_card(model_path(spec))
        plan = make_plan(card, profile)
        measured, best_profile = measure_candidates(card, plan, profile, SimpleNamespace(rounds=args.rounds, statistic=args.statistic))
        for cand, (_, decode) in measured.items():
            p = cm.predict(card, best_profile, placement_of(cand))
            weights = sum(v for k, v in p.decode_terms.items() if k != "overheads")
            over = p.decode_terms.get("overheads", 0.0)
            err = (p.decode_tok_s / decode - 1) * 100
            lines.append(
                f"{spec:<34} {cand.placement:<10} {p.decode_tok_s:10.1f} {decode:10.1f} {err:+6.0f}% "
                f"{weights * 1e3:10.2f} {over * 1e3:8.2f} {1e3 / decode:8.2f}  {best_profile.ram_read_gbs:8.1f}  "
                + " ".join(f"{q}={v:.0f}" for q, v in best_profile.cpu_matvec_gbs.items()))
        print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
