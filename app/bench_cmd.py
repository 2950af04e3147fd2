"""`moechat bench MODEL`: measured speed of the chosen (or a given) engine, against the roofline.

Prints prefill and decode tok/s, time to first token, peak RAM/VRAM, and achieved bandwidth:
active weight bytes per token x decode tok/s, as a fraction of the profile's measured RAM
read bandwidth (the CPU roofline; docs/cost-model.md). `--record` appends a row to
docs/benchmarks.md with the machine, model, numbers, date and the command.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HELP = "measure prefill/decode speed, time to first token, memory and %% of the bandwidth roofline"


def add_arguments(parser) -> None:
    from moechat.app.arg_types import non_negative_int, positive_int, thread_count
    from moechat.backends.manager import ENGINES

    parser.add_argument("model", nargs="?", help="GGUF path or catalogue name (default: the demo model)")
    parser.add_argument("--engine", choices=ENGINES, default="auto", help="engine (default: the plan's choice)")
    parser.add_argument("--n-cpu-moe", type=non_negative_int, metavar="N", help="keep the experts of the first N layers in RAM")
    parser.add_argument("--prompt-tokens", type=positive_int, default=128, help="prompt length (default 128)")
    parser.add_argument("--tokens", type=positive_int, default=64, help="tokens to decode (default 64)")
    parser.add_argument("--rounds", type=positive_int, default=3, help="runs; the best is reported (default 3)")
    parser.add_argument("--threads", type=thread_count, help="CPU threads (default: physical cores)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--record", nargs="?", const="", metavar="FILE",
                        help="append a row to docs/benchmarks.md (or FILE)")
    from moechat.app.engine_flags import add_workers_argument

    add_workers_argument(parser)


def run(args) -> int:
    import resource

    from moechat.backends.plan.hardware_profile import load_profile
    from moechat.app.plan_cmd import time_llama
    from moechat.backends.errors import MoechatError
    from moechat.backends.manager import open_engine
    from moechat.backends.model.model_resolve import resolve_card

    card = resolve_card(args.model)
    profile = load_profile(progress=None if args.json else (lambda m: print(f"measuring {m}...", file=sys.stderr)))
    n_ctx = args.prompt_tokens + args.tokens + 16
    vram_before = _vram_used()
    t_load = time.perf_counter()
    engine = open_engine(card, args.engine, n_cpu_moe=args.n_cpu_moe, n_ctx=n_ctx, threads=args.threads,
                         workers=args.workers)
    load_s = time.perf_counter() - t_load
    try:
        if hasattr(engine, "time_llama"):  # llama.cpp split over workers, timed in its process
            runs = [engine.time_llama(args.prompt_tokens, args.tokens) for _ in range(args.rounds)]
        elif not hasattr(engine, "llm"):
            raise MoechatError(f"bench supports the llama.cpp engine for now, not {engine.name}")
        else:
            runs = [time_llama(engine.llm, args.prompt_tokens, args.tokens) for _ in range(args.rounds)]
    finally:
        vram = max(0, _vram_used() - vram_before)
        engine.close()
    prefill = max(r[0] for r in runs)
    decode = max(r[1] for r in runs)
    active = card.active_bytes_per_token
    roofline = profile.ram_read_gbs * 1e9 / active if active else 0.0
    result = {
        "model": card.name,
        "path": card.path,
        "engine": engine.name,
        "placement": engine.placement,
        "prefill_tok_s": round(prefill, 2),
        "decode_tok_s": round(decode, 2),
        "ttft_s": round(args.prompt_tokens / prefill + 1 / decode, 3),
        "load_s": round(load_s, 2),
        "peak_ram_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_vram_bytes": vram,
        "active_bytes_per_token": active,
        "achieved_gbs": round(decode * active / 1e9, 2),
        "ram_read_gbs": profile.ram_read_gbs,
        "roofline_tok_s": round(roofline, 2),
        "roofline_fraction": round(decode / roofline, 3) if roofline else 0.0,
        "rounds": args.rounds,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
    if args.record is not None:
        path = record(result, profile, args.record or None)
        print(f"recorded in {path}", file=sys.stderr)
    return 0


def render(r: dict) -> str:
    gib = 2**30
    return "\n".join([
        f"model      {r['model']}  ({r['engine']} · {r['placement']})",
        f"prefill    {r['prefill_tok_s']:.1f} tok/s",
        f"decode     {r['decode_tok_s']:.1f} tok/s",
        f"first tok  {r['ttft_s'] * 1e3:.0f} ms  (load {r['load_s']:.1f} s)",
        f"peak RAM   {r['peak_ram_bytes'] / gib:.2f} GiB   peak VRAM {r['peak_vram_bytes'] / gib:.2f} GiB",
        f"bandwidth  {r['achieved_gbs']:.1f} GB/s of weights = {r['roofline_fraction'] * 100:.0f}% of the "
        f"roofline ({r['active_bytes_per_token'] / 1e9:.3f} GB/token at {r['ram_read_gbs']:.1f} GB/s "
        f"-> {r['roofline_tok_s']:.1f} tok/s)",
    ])


def default_benchmarks_md() -> Path:
    repo = Path(__file__).resolve().parents[1]  # the checkout (editable install)
    candidate = repo / "docs" / "benchmarks.md"
    return candidate if candidate.exists() else Path("docs") / "benchmarks.md"


def record(r: dict, profile, path: str | None) -> Path:
    target = Path(path) if path else default_benchmarks_md()
    target.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{profile.cpu.model}, {profile.cpu.usable_cores} cores, {profile.ram.total_bytes / 2**30:.0f} GiB"
    if profile.gpus:
        machine += ", " + ", ".join(g.name for g in profile.gpus)
    command = "moechat " + " ".join(sys.argv[1:]) if sys.argv and "moechat" in sys.argv[0] else "moechat bench"
    row = (f"| {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} | {machine} | {r['model']} | "
           f"{r['engine']} · {r['placement']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
           f"{r['ttft_s'] * 1e3:.0f} | {r['peak_ram_bytes'] / 2**30:.2f} | {r['roofline_fraction'] * 100:.0f}% | "
           f"`{command}` |\n")
    header = ("\n## moechat bench rows\n\n| date (UTC) | machine | model | engine · placement | prefill tok/s | "
              "decode tok/s | TTFT ms | peak RAM GiB | % roofline | command |\n|---|---|---|---|---|---|---|---|---|---|\n")
    text = target.read_text() if target.exists() else "# Benchmarks\n"
    if "## moechat bench rows" not in text:
        text += header
    target.write_text(text + row)
    return target


def _vram_used() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVIDIA GPU: nothing to count
        return 0
    try:
        return sum(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used
                   for i in range(pynvml.nvmlDeviceGetCount()))
    finally:
        pynvml.nvmlShutdown()
