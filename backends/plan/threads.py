"""How many CPU threads an engine uses by default: one per physical core."""

from __future__ import annotations


def default_threads() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
