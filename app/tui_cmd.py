"""`moechat [MODEL]`: the chat app (Textual). Routed here by app/cli.py when no subcommand
is given. Top-level imports are standard library only; textual loads in `run`."""

from __future__ import annotations

import argparse

HELP = "open the chat app"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moechat.app.arg_types import non_negative_int, positive_int
    from moechat.backends.manager import ENGINES

    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="GGUF path or models.toml name (default: the built-in demo MoE)")
    parser.add_argument("--engine", choices=ENGINES, default="auto")
    parser.add_argument("--n-cpu-moe", type=non_negative_int, metavar="N",
                        help="keep the experts of the first N layers in RAM (llama.cpp engine)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: physical cores)")
    parser.add_argument("--ctx", type=positive_int, metavar="N", help="context length in tokens")


def run(args: argparse.Namespace) -> int:
    from moechat.app.history import History

    if args.model:  # a bad path is a one-line error before the screen opens
        from moechat.backends.model.model_card import read_model_card
        from moechat.backends.model.model_resolve import resolve_model

        read_model_card(resolve_model(args.model))
    history = History()  # likewise an unreadable history file

    from moechat.app.tui.app import MoechatApp
    from moechat.app.tui.model_loader import EngineOptions

    app = MoechatApp(args.model, EngineOptions(args.engine, args.n_cpu_moe, args.ctx, args.threads),
                     history=history)
    try:
        app.run()
    finally:
        app.shutdown()
    return app.return_code or 0
