"""The engine flags every command that opens a model takes (ask, the chat app, and next serve):
one definition, so that a new flag (a RAM budget, workers) reaches them all at once."""

from __future__ import annotations

import argparse


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    from moechat.app.arg_types import budget, non_negative_int, positive_int, thread_count
    from moechat.backends.manager import ENGINES

    parser.add_argument("--engine", choices=ENGINES, default="auto")
    parser.add_argument("--n-cpu-moe", type=non_negative_int, metavar="N",
                        help="keep the experts of the first N layers in RAM (llama.cpp engine)")
    parser.add_argument("--threads", type=thread_count,
                        help="CPU threads, at most the logical cores (default: the physical "
                             "cores not busy with other work right now)")
    parser.add_argument("--ctx", type=positive_int, metavar="N", help="context length in tokens")
    parser.add_argument("--vram-budget", type=budget, metavar="SIZE",
                        help="GPU memory for experts, e.g. 6GiB or 50%% of the experts "
                             "(fiddler, hobbit engines; default: what is free)")
    parser.add_argument("--ram-budget", type=budget, metavar="SIZE|PCT",
                        help="memory the whole process may use, e.g. 2GiB or 50%% of RAM (or of "
                             "the memory cgroup's limit); the stream engine sizes its expert "
                             "cache to it (default: what is available, minus headroom)")
    parser.add_argument("--hobbit-low", choices=("auto", "int4", "int2", "none"), default="auto",
                        help="low-precision expert format (hobbit engine; auto: none without a "
                             "GPU, on a GPU int2 if the file is already <= 4-bit, else int4; "
                             "none: no low tier)")
    parser.add_argument("--skip", action="store_true",
                        help="skip the least important experts on a cache miss (hobbit engine)")
    parser.add_argument("--force", action="store_true", help="load even if it seems not to fit")
    add_workers_argument(parser)


def add_workers_argument(parser: argparse.ArgumentParser) -> None:
    """--workers (also on plan and bench, which take no other engine flag)."""
    import os

    parser.add_argument("--workers", metavar="HOST:PORT,...", default=os.environ.get("MOECHAT_WORKERS") or None,
                        help="`moechat worker`s to split the model's layers over (llama.cpp RPC; "
                             "default: $MOECHAT_WORKERS); each is probed first")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The parsed engine flags as keyword arguments of manager.open_engine (minus the card)."""
    return dict(engine=args.engine, n_cpu_moe=args.n_cpu_moe, n_ctx=args.ctx, threads=args.threads,
                force=args.force, vram_budget=args.vram_budget, hobbit_low=args.hobbit_low,
                skip=args.skip, workers=args.workers, ram_budget=args.ram_budget)
