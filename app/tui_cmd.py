"""`moechat [MODEL]`: the chat app (Textual). Routed here by app/cli.py when no subcommand
is given. Top-level imports are standard library only; textual loads in `run`."""

from __future__ import annotations

import argparse

HELP = "open the chat app"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moechat.app.engine_flags import add_engine_arguments

    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="GGUF path or models.toml name (default: the built-in demo MoE)")
    parser.add_argument("-m", "--model", dest="model_option", metavar="MODEL",
                        help="the same as MODEL (as `moechat ask` takes it)")
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from moechat.app.history import History
    from moechat.backends.errors import MoechatError

    if args.model_option is not None:
        if args.model is not None and args.model != args.model_option:
            raise MoechatError(f"two models given ({args.model} and --model {args.model_option}): "
                               "name one")
        args.model = args.model_option

    if args.model:  # a bad path is a one-line error before the screen opens
        from moechat.backends.model.model_card import read_model_card
        from moechat.backends.model.model_resolve import resolve_model

        card = read_model_card(resolve_model(args.model))
        # refused before the app opens: a model this machine (or its cgroup) cannot hold;
        # with --workers, open_engine plans the split instead
        if not args.force and not args.workers:
            from moechat.backends.manager import check_openable, default_context

            check_openable(card, args.ctx or default_context(card), args.engine, args.n_cpu_moe)
    history = History()  # likewise an unreadable history file

    from moechat.app.tui.app import MoechatApp
    from moechat.app.tui.model_loader import EngineOptions

    app = MoechatApp(args.model, EngineOptions.from_args(args),
                     history=history)
    try:
        app.run()
    finally:
        app.shutdown()
    return app.return_code or 0
