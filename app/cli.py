"""`moechat` command line: `moechat [MODEL]` opens the chat TUI; subcommands do one thing each.

Each subcommand lives in its own module exposing `HELP`, `add_arguments(parser)` and
`run(args) -> int`. Those modules import only the standard library at top level, so that
`moechat --help` and `moechat ask` start fast (no numpy, torch or textual until needed).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from moechat import __version__
from moechat.backends.errors import MoechatError

# subcommand -> module (in moechat.app); the order is the order shown in --help
COMMANDS = {
    "ask": "ask_cmd",
    "profile": "profile_cmd",
    "plan": "plan_cmd",
    "bench": "bench_cmd",
    "models": "models_cmd",
    "pull": "pull_cmd",
    "rm": "rm_cmd",
    "worker": "worker_cmd",
    "cache": "cache_cmd",
    "serve": "serve_cmd",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags on one line with exit code 2 (argparse's own code)."""

    def error(self, message: str):
        raise MoechatError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moechat",
        description="Chat with Mixture-of-Experts models on your own hardware.",
        epilog="With no subcommand, opens the chat app (on the built-in demo model if no MODEL).",
    )
    parser.add_argument("--version", action="version", version=f"moechat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"moechat.app.{module_name}")
        sub_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in COMMANDS or any(a in ("-h", "--help", "--version") for a in argv[:1]):
            args = build_parser().parse_args(argv)
            if getattr(args, "run", None) is None:
                build_parser().print_help()
                return 0
            return int(args.run(args) or 0)
        return _run_tui(argv)
    except MoechatError as err:
        message = str(err)
        print(message if message.startswith("moechat") else f"moechat: {message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:  # `moechat ask ... | head`
        sys.stderr.close()
        return 0


def _run_tui(argv: list[str]) -> int:
    tui = importlib.import_module("moechat.app.tui_cmd")
    parser = _Parser(prog="moechat", description="Open the chat app.")
    tui.add_arguments(parser)
    return int(tui.run(parser.parse_args(argv)) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
