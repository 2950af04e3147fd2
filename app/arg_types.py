"""argparse value types shared by every subcommand: a bad number is refused by argparse
itself, on one line with exit code 2, before any work starts."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def thread_count(text: str) -> int:
    """A CPU thread count: 1 .. the logical cores of this machine (more only oversubscribes:
    ggml's threads meet at a barrier after every op, so one waiting thread stalls them all)."""
    import os

    value = positive_int(text)
    cores = os.cpu_count() or 1
    if value > cores:
        raise argparse.ArgumentTypeError(f"{value} is more than this machine's {cores} logical cores")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text}") from None


def budget(text: str) -> str:
    """--vram-budget / --ram-budget: a size ("6GiB") or a share ("50%"), checked at parse time
    (kept as text: the engine resolves a share against what it holds)."""
    from moechat.backends.offload.budget import parse_budget

    try:
        parse_budget(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text
