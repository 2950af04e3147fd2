"""The planner against the world: predicted vs published decode speed on machines we do not have.

    .venv/bin/python benchmarks/plan_vs_world.py [--markdown] [--bands] [--implied]

For every run in tests/fixtures/external_runs/runs.csv (published llama.cpp measurements,
each with its URL and date), the cost model predicts exactly that run's placement on that
machine's spec-sheet profile (tests/fixtures/external_runs/profiles/) at the run's depth,
and the ratio predicted / measured is printed (the prediction taken as the run's test
measures it: llmfit `bench` figures include each request's prompt and round trip). Summaries per placement group (CPU only,
all on GPU, `--n-cpu-moe` split, unified memory) are given separately for the fit rows and
the hold-out rows (every third row of a group, fixed before any model change; nothing is
fitted on them). `--bands` prints the measured/predicted ranges per group that
backends/plan/error_bands.py holds (tests/test_world_runs.py checks they agree).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moechat.backends.plan import cost_model as cm  # noqa: E402
from moechat.backends.plan.error_bands import band_of_ratios  # noqa: E402
from tests.fixtures.world_runs import (  # noqa: E402
    GROUPS, LLMFIT_REQUEST_S, as_measured, load_runs, plan_inputs)

CPU_WEIGHTS = "weights in RAM (CPU)"  # the cost model's decode term for weights read by the CPU


def predict_run(run) -> cm.Prediction:
    card, profile, placement = plan_inputs(run)
    n_ctx = max(4096, run.n_past + 512)
    return cm.predict(card, profile, placement, n_ctx=n_ctx, n_past=run.n_past,
                      n_prompt=prompt_tokens(run.prefill_test))


def prompt_tokens(prefill_test: str) -> int:
    """The prompt length a prefill test ran: "pp512", "server (527-token prompt)", "~10-token"."""
    found = re.search(r"pp(\d+)|(\d+)-token", prefill_test or "")
    return int(found.group(1) or found.group(2)) if found else cm.N_UBATCH


def rows():
    """(run, prediction, predicted / measured), the prediction taken as the run's test measures
    it (llmfit bench rows include each request's prompt and round trip: world_runs.as_measured)."""
    for run in load_runs():
        p = predict_run(run)
        yield run, p, as_measured(run, p.decode_tok_s) / run.decode_tok_s


def summary(results, holdout: bool):
    out = []
    for group in GROUPS:
        ratios = [r for run, _, r in results if run.group == group and run.holdout == holdout]
        if ratios:
            errs = [abs(r - 1) for r in ratios]
            out.append((group, len(ratios), statistics.median(errs), statistics.median(ratios),
                        min(ratios), max(ratios)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    ap.add_argument("--bands", action="store_true", help="print the error bands per placement group")
    ap.add_argument("--implied", action="store_true",
                    help="per run with CPU weights (>= 10%% of its token): the CPU weight time its "
                         "measurement leaves, / the predicted one")
    args = ap.parse_args()
    results = list(rows())

    def line(cells):
        return (f"| {' | '.join(cells)} |" if args.markdown else "  ".join(cells))

    head = ["run", "group", "hold-out", "machine", "model", "placement", "depth", "predicted", "measured", "pred/meas",
            "prefill pred/meas"]
    print(line(head))
    if args.markdown:
        print(line(["---"] * len(head)))
    for run, p, r in results:
        place = run.placement if run.placement != "moe" else f"n-cpu-moe {run.n_cpu_moe}"
        prefill = f"{p.prefill_tok_s / run.prefill_tok_s:.2f} ({run.prefill_test})" if run.prefill_tok_s else ""
        print(line([run.id, run.group, "yes" if run.holdout else "", run.machine, f"{run.model} {run.quant}", place,
                    str(run.n_past), f"{as_measured(run, p.decode_tok_s):.1f}", f"{run.decode_tok_s:g}", f"{r:.2f}",
                    prefill]))
    for holdout in (False, True):
        print()
        print(("hold-out runs (never fitted on)" if holdout else "fit runs") + ":")
        head = ["group", "runs", "median abs(pred/meas - 1)", "median pred/meas", "min", "max"]
        print(line(head))
        if args.markdown:
            print(line(["---"] * len(head)))
        for group, n, err, med, lo, hi in summary(results, holdout):
            print(line([group, str(n), f"{err * 100:.0f}%", f"{med:.2f}", f"{lo:.2f}", f"{hi:.2f}"]))
    if args.bands:
        print()
        print("error bands (measured / predicted, all runs of the group):")
        for group in GROUPS:
            group_runs = [(run, r) for run, _, r in results if run.group == group]
            lo, hi = band_of_ratios([1 / r for _, r in group_runs])
            print(f"  {group}: ({lo:.2f}, {hi:.2f}) from {len(group_runs)} runs: "
                  + ",".join(run.id for run, _ in group_runs))
    if args.implied:
        print()
        print("CPU weight time implied by the measurement (measured token time less every other predicted term)"
              " / predicted:")
        for run, p, _ in results:
            cpu_s = p.decode_terms.get(CPU_WEIGHTS, 0.0)
            if cpu_s > 0.1 / p.decode_tok_s:  # runs whose CPU weights are at least a tenth of the token
                left = measured_token_s(run) - (1 / p.decode_tok_s - cpu_s)
                print(f"  {run.id}{' (hold-out)' if run.holdout else ''} {run.machine} {run.model} {run.quant}: "
                      f"{left / cpu_s:.2f} (predicted {cpu_s * 1e3:.1f} ms)")
    return 0


def measured_token_s(run) -> float:
    """Seconds a decoded token took in the run, its test's fixed part taken out (as_measured inverted)."""
    if run.decode_test.startswith("llmfit bench") and run.request_tokens:
        return 1 / run.decode_tok_s - LLMFIT_REQUEST_S / run.request_tokens
    return 1 / run.decode_tok_s


if __name__ == "__main__":
    raise SystemExit(main())
