"""The engine flags every command that opens a model takes (ask, the chat app, and next serve):
one definition, so that a new flag (a RAM budget, workers) reaches them all at once."""

from __future__ import annotations

import argparse


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    from moechat.app.arg_types import non_negative_int, positive_int
    from moechat.backends.manager import ENGINES

    parser.add_argument("--engine", choices=ENGINES, default="auto")
    parser.add_argument("--n-cpu-moe", type=non_negative_int, metavar="N",
                        help="keep the experts of the first N layers in RAM (llama.cpp engine)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: physical cores)")
    parser.add_argument("--ctx", type=positive_int, metavar="N", help="context length in tokens")
    parser.add_argument("--vram-budget", metavar="SIZE",
                        help="GPU memory for experts, e.g. 6GiB or 50%% of the experts "
                             "(fiddler, hobbit engines; default: what is free)")
    parser.add_argument("--ram-budget", metavar="SIZE|PCT",
                        help="memory the whole process may use, e.g. 2GiB or 50%% of RAM (or of "
                             "the memory cgroup's limit); the stream engine sizes its expert "
                             "cache to it (default: what is available, minus headroom)")
    parser.add_argument("--hobbit-low", choices=("auto", "int4", "int2"), default="auto",
                        help="low-precision expert format (hobbit engine; auto: int2 if the "
                             "file is already <= 4-bit, else int4)")
    parser.add_argument("--skip", action="store_true",
                        help="skip the least important experts on a cache miss (hobbit engine)")
    parser.add_argument("--force", action="store_true", help="load even if it seems not to fit")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The parsed engine flags as keyword arguments of manager.open_engine (minus the card)."""
    return dict(engine=args.engine, n_cpu_moe=args.n_cpu_moe, n_ctx=args.ctx, threads=args.threads,
                force=args.force, vram_budget=args.vram_budget, hobbit_low=args.hobbit_low,
                skip=args.skip, ram_budget=args.ram_budget)
