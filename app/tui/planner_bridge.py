"""The planner, seen from the chat app: the plan as text for the plan screen, and the decode
speed the cost model predicts for the engine and placement actually loaded (shown next to
the measured one)."""

from __future__ import annotations

import dataclasses

def plan_text(card) -> str:
    """The plan as text, or why there is none. Slow the first time (it measures the machine):
    run it in a worker."""
    from moechat.backends.plan.hardware_profile import load_profile
    from moechat.backends.errors import MoechatError
    from moechat.backends.plan.planner import make_plan

    if card is None:
        return "no model card for the loaded model"
    try:
        plan = make_plan(card, load_profile())
    except MoechatError as err:  # e.g. nothing fits: the planner's own one-line reason
        return str(err)
    return format_plan(plan)


def format_plan(plan) -> str:
    if hasattr(plan, "reason") and hasattr(plan, "candidates"):
        lines = [f"Choice: {_describe(plan.choice)}", "", plan.reason, "",
                 f"{'engine':<10} {'placement':<24} {'decode':>12} {'prefill':>12}  note"]
        for c in plan.candidates:
            mark = "*" if c == plan.choice else " "
            where = c.placement + (f" {c.n_cpu_moe}" if c.n_cpu_moe is not None else "")
            lines.append(f"{mark}{c.engine:<9} {where:<24} {c.decode_tok_s:>6.1f} tok/s "
                         f"{c.prefill_tok_s:>6.0f} tok/s  {c.note}")
        return "\n".join(lines)
    if dataclasses.is_dataclass(plan):
        return "\n".join(f"{f.name}: {getattr(plan, f.name)}" for f in dataclasses.fields(plan))
    return str(plan)


def _describe(candidate) -> str:
    return (f"{candidate.engine} · {candidate.placement}"
            + (f" (--n-cpu-moe {candidate.n_cpu_moe})" if candidate.n_cpu_moe is not None else "")
            + f" · predicted {candidate.decode_tok_s:.1f} tok/s decode")


def predicted_decode_tok_s(card, engine) -> float | None:
    """The cost model's decode speed for the loaded engine and placement, from the measured
    hardware profile in the cache (never measures: this runs while the model loads). None if
    unknown, or if the machine was never measured (nominal speeds would mislead)."""
    from moechat.backends.plan.hardware_profile import load_profile, profile_path
    from moechat.backends.errors import MoechatError
    from moechat.backends.plan.planner import make_plan

    from moechat.backends.plan.run_log import corrections_for

    if card is None or not profile_path().exists():
        return None
    profile = load_profile(measure=False)
    try:
        plan = make_plan(card, profile, corrections=corrections_for(card, profile))
    except MoechatError as err:  # nothing fits by the planner's reckoning: its candidates stay
        candidates = getattr(err, "candidates", ())
    else:
        candidates = plan.candidates
    spec = getattr(engine, "placement_spec", None)
    for c in candidates:
        if c.engine != engine.name:
            continue
        if spec is None or (c.placement == spec.kind and
                            (spec.kind != "moe" or c.n_cpu_moe == spec.n_cpu_moe)):
            return c.decode_tok_s
    return None
