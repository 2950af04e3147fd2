"""`moechat plan MODEL`: every way to run MODEL here, predicted; the choice and why.

`--measure` then runs each fitting candidate briefly and prints measured speeds next to the
predicted ones. Machines shared with other work vary minute to minute, so it alternates:
each round re-measures this machine's bandwidths (RAM read, CPU matvec) and then times every
candidate, and the predictions are recomputed from the re-measured profile. `--statistic`
says how rounds are summarised: "mean" (default) = throughput over all rounds on both sides,
which stays consistent when other work takes CPU time; "best" = best round/pass/token on
both sides (STREAM's rule; right on a quiet machine).
"""

from __future__ import annotations

import json
import sys

HELP = "predict every engine/placement for a model on this machine and pick the fastest"
MEASURE_ROUNDS = 3
MEASURE_PROMPT_TOKENS = 64
MEASURE_DECODE_TOKENS = 32


def add_arguments(parser) -> None:
    from moechat.app.arg_types import positive_int, thread_count

    parser.add_argument("model", nargs="?", help="GGUF path or catalogue name (default: the demo model)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--profile", metavar="FILE", help="plan for the machine in this profile JSON")
    parser.add_argument("--ctx", type=positive_int, metavar="N", help="context length to plan for (default: min(model, 4096))")
    parser.add_argument("--measure", action="store_true",
                        help="run each fitting candidate briefly here and show predicted vs measured")
    parser.add_argument("--rounds", type=positive_int, default=MEASURE_ROUNDS, help="measurement rounds (best kept)")
    parser.add_argument("--statistic", choices=("mean", "best"), default="mean",
                        help="with --measure: summarise rounds by throughput (mean) or best run")
    parser.add_argument("--threads", type=thread_count, metavar="N",
                        help="with --measure: CPU threads for the engines and the re-measured bandwidths "
                             "(default: the profile's)")
    from moechat.app.engine_flags import add_workers_argument

    add_workers_argument(parser)


def run(args) -> int:
    from moechat.backends.plan.hardware_profile import load_profile, read_profile
    from moechat.backends.errors import MoechatError
    from moechat.backends.model.model_resolve import resolve_card
    from moechat.backends.plan.planner import NoFitError, make_plan
    from moechat.backends.plan.run_log import corrections_for

    if args.threads is not None and not args.measure:
        raise MoechatError("--threads goes with --measure")
    if args.measure and args.profile:
        raise MoechatError("--measure runs here; it cannot be combined with --profile")
    card = resolve_card(args.model, allow_remote=True)
    if args.profile:
        profile = read_profile(args.profile)
    else:
        progress = None if args.json else (lambda m: print(f"measuring {m}...", file=sys.stderr))
        profile = None if args.measure else _remeasured_if_drifted(progress)
        profile = profile or load_profile(refresh=args.measure, progress=progress)
    corrections = {} if args.profile else corrections_for(card, profile)
    workers = ()
    if args.workers:
        from moechat.backends.manager import probe_workers

        if args.measure:
            raise MoechatError("--measure times candidates here; it does not run splits over --workers yet")
        workers = probe_workers(args.workers)
    try:
        plan = make_plan(card, profile, n_ctx=args.ctx, workers=workers, corrections=corrections)
    except NoFitError as err:
        if not args.json:
            print(render_table(err.candidates, None))
        raise
    measured = {}
    if args.measure:
        import dataclasses

        from moechat.backends.plan.hardware_profile import profile_path, write_profile

        threads_changed = args.threads and args.threads != profile.threads
        if threads_changed:
            profile = dataclasses.replace(profile, threads=args.threads)
        measured, profile = measure_candidates(card, plan, profile, args)
        if not threads_changed:  # a profile for another thread count is not this machine's default
            write_profile(profile, profile_path())
        remeasured = make_plan(card, profile, n_ctx=args.ctx)  # a new profile: no runs yet
        by_key = {_key(c): c for c in remeasured.candidates}
        measured = {by_key[_key(c)]: m for c, m in measured.items() if _key(c) in by_key}
        plan = remeasured
    if args.json:
        out = plan.to_dict()
        if measured:
            for entry, cand in zip(out["candidates"], plan.candidates):
                m = measured.get(cand)
                if m:
                    entry["measured_prefill_tok_s"], entry["measured_decode_tok_s"] = m
        print(json.dumps(out, indent=2))
        return 0
    print(f"{card.name} ({card.tensor_bytes / 2**30:.1f} GiB) on {_machine(profile)}")
    print(render_table(plan.candidates, plan.choice, measured))
    print(f"\nchoice: {plan.choice.engine} · {_placement_text(plan.choice)}")
    print(f"why: {plan.reason}")
    for line in _correction_lines(plan.candidates):
        print(line)
    if measured:
        fastest = max(measured, key=lambda c: measured[c][1])
        verdict = "yes" if fastest == plan.choice else f"no (measured fastest: {_placement_text(fastest)})"
        print(f"choice is the measured fastest: {verdict}")
    return 0


def _remeasured_if_drifted(progress):
    from moechat.backends.plan.run_log import DRIFT, DRIFT_RUNS, remeasure_if_drifted

    def say(step):
        if progress:
            progress(step)

    profile = remeasure_if_drifted(progress=say)
    if profile is not None:
        print(f"(the profile's predictions missed the last {DRIFT_RUNS} real runs by more than "
              f"{DRIFT:.0%}: re-measured it while the machine was idle)", file=sys.stderr)
    return profile


def _correction_lines(candidates) -> list[str]:
    """predicted · last measured · how the prediction was corrected, per corrected candidate."""
    lines = []
    for c in candidates:
        if c.correction is None:
            continue
        last = c.correction.last
        lines.append(
            f"corrected: {c.engine} · {_placement_text(c)}: cost model {c.cost_model_decode_tok_s:.1f} "
            f"tok/s decode, last measured {last.measured_decode:.1f}, "
            f"{c.correction.describe()} (median measured/predicted) -> {c.decode_tok_s:.1f} tok/s")
    return lines


def _machine(profile) -> str:
    gpu = ", ".join(g.name for g in profile.gpus) or "no GPU"
    return (f"{profile.cpu.model} ({profile.cpu.usable_cores} cores), "
            f"{profile.ram.total_bytes / 2**30:.0f} GiB RAM at {profile.ram_read_gbs:.0f} GB/s, {gpu}")


def _placement_text(c) -> str:
    if c.placement == "moe":
        layers = "layer" if c.n_cpu_moe == 1 else "layers"
        return f"experts of {c.n_cpu_moe} {layers} in RAM (--n-cpu-moe {c.n_cpu_moe})"
    if c.placement == "split":
        return f"{c.split[0]} layers here + " + " + ".join(
            f"{n} on {w}" for n, w in zip(c.split[1:], c.workers))
    return {"cpu": "CPU only", "gpu": "all on GPU"}.get(c.placement, c.placement)


def render_table(candidates, choice, measured=None) -> str:
    measured = measured or {}
    head = ["", "engine", "placement", "prefill tok/s", "decode tok/s", "decode range", "RAM GiB", "VRAM GiB",
            "fits", "note"]
    corrected = any(getattr(c, "correction", None) is not None for c in candidates)
    if measured:
        head[6:6] = ["measured prefill", "measured decode", "decode error"]
    if corrected:  # predicted by the cost model, the last real run, the correction between
        head[6:6] = ["cost model decode", "last run decode", "correction"]
    rows = [head]
    for c in candidates:
        row = [
            "*" if c == choice else "",
            c.engine,
            _placement_text(c),
            f"{c.prefill_tok_s:.1f}" if c.prefill_tok_s else "-",
            f"{c.decode_tok_s:.1f}" if c.decode_tok_s else "-",
            f"{c.decode_range[0]:.1f}-{c.decode_range[1]:.1f}" if c.decode_range else "-",
            f"{c.ram_bytes / 2**30:.2f}",
            f"{c.vram_bytes / 2**30:.2f}",
            "yes" if c.fits else "no",
            c.note if c.available or not c.note else f"unavailable: {c.note}",
        ]
        if measured:
            m = measured.get(c)
            row[6:6] = ([f"{m[0]:.1f}", f"{m[1]:.1f}", f"{(c.decode_tok_s / m[1] - 1) * 100:+.0f}%"]
                        if m else ["", "", ""])
        if corrected:
            k = c.correction
            row[6:6] = ([f"{c.cost_model_decode_tok_s:.1f}", f"{k.last.measured_decode:.1f}", k.describe()]
                        if k is not None else ["", "", ""])
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)
    return table + range_legend(candidates)


def range_legend(candidates) -> str:
    """Which published measurements back each kind of range (docs/benchmarks.md, issue 20)."""
    seen = {}
    for c in candidates:
        if c.decode_range:
            seen.setdefault(_placement_kind_text(c), c.range_backed_by)
        elif c.decode_tok_s:
            seen.setdefault(c.engine, "no published runs of this kind: no range")
    if not seen:
        return ""
    lines = [f"  {kind}: {backed}" for kind, backed in seen.items()]
    return ("\n\ndecode range = prediction x the spread of measured/predicted (10th-90th percentile) on "
            "published llama.cpp runs of that placement:\n" + "\n".join(lines))


def _placement_kind_text(c) -> str:
    if c.placement == "moe":
        return "--n-cpu-moe"
    return {"cpu": "CPU only", "gpu": "all on GPU"}.get(c.placement, c.placement)


def _key(c):
    return (c.engine, c.placement, c.n_cpu_moe, c.split)


def measure_candidates(card, plan, profile, args):
    """Alternating rounds of (re-measure the machine's speeds, time every fitting, available
    candidate); engines stay loaded between rounds. Returns ({candidate: (best prefill tok/s,
    best decode tok/s)}, the profile with the best speeds seen)."""
    import dataclasses

    from moechat.backends.plan import cpu_probes

    from moechat.backends.manager import engine_for_candidate

    chosen = [c for c in plan.candidates if c.fits and c.available]
    statistic = getattr(args, "statistic", "mean")
    keep = max if statistic == "best" else (lambda a, b: a + b)  # best, or sums for the mean
    engines = {}
    ram_sum, op_sum, matvec_sum = 0.0, 0.0, {}
    try:
        for c in chosen:
            print(f"loading {c.engine} · {_placement_text(c)}...", file=sys.stderr)
            engines[c] = engine_for_candidate(card, c, n_ctx=512, threads=profile.threads)
        runs = {c: (0.0, 0.0) for c in chosen}
        rounds = max(1, args.rounds)
        for r in range(rounds):
            ram = cpu_probes.measure_ram_read_gbs(profile.threads, profile.cpu.llc_bytes, 1.0, statistic)
            matvec, _ = cpu_probes.measure_cpu_matvec_gbs(profile.threads, 1.0, statistic)
            op_s = cpu_probes.measure_cpu_op_s(profile.threads)
            ram_sum, op_sum = keep(ram_sum, ram), min(op_sum or op_s, op_s)  # per-op cost: best round
            matvec_sum = {q: keep(matvec_sum.get(q, 0.0), v) for q, v in matvec.items()}
            print(f"round {r + 1}: RAM read {ram:.1f} GB/s, ggml op {op_s * 1e6:.1f} us, matvec "
                  + ", ".join(f"{q} {v:.1f}" for q, v in matvec.items()), file=sys.stderr)
            for c in chosen:
                prefill, decode = time_llama(engines[c].llm, statistic=statistic)
                runs[c] = (keep(runs[c][0], prefill), keep(runs[c][1], decode))
                print(f"round {r + 1}: {_placement_text(c)}: prefill {prefill:.1f}, decode {decode:.1f} tok/s",
                      file=sys.stderr)
    finally:
        for e in engines.values():
            e.close()
    n = 1 if statistic == "best" else rounds
    # mean of per-round rates; each round's rate is itself a throughput over >= 1 s of work
    measured = {c: (p / n, d / n) for c, (p, d) in runs.items()}
    profile = dataclasses.replace(
        profile, ram_read_gbs=round(ram_sum / n, 2), cpu_op_s=op_sum, cpu_matvec_gbs={q: round(v / n, 2) for q, v in matvec_sum.items()},
        sources={**profile.sources, "ram_read_gbs": f"measured: {statistic} of `plan --measure` rounds",
                 "cpu_matvec_gbs": f"measured: ggml matvec, {statistic} of `plan --measure` rounds"})
    return measured, profile


def time_llama(llm, n_prompt: int = MEASURE_PROMPT_TOKENS, n_decode: int = MEASURE_DECODE_TOKENS,
               statistic: str = "mean"):
    """(prefill tok/s, decode tok/s) of one run (backends/engines/llamacpp_timing.py)."""
    from moechat.backends.engines.llamacpp_timing import time_llama as timed

    return timed(llm, n_prompt, n_decode, statistic)
