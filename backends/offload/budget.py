"""`--vram-budget`: a size ("6GiB", "6G", "600M", "1500000000") or a share of all routed
experts' bytes ("50%"). Standard library only: the CLI parses it before anything loads."""

from __future__ import annotations

import re

UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "kib": 1024, "mib": 1024**2,
         "gib": 1024**3, "tib": 1024**4, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}


def parse_budget(text: str) -> tuple[str, float]:
    """-> ("bytes", n) or ("share", fraction in (0, 1]). Raises ValueError with a reason."""
    s = text.strip().lower().replace(" ", "")
    if s.endswith("%"):
        try:
            share = float(s[:-1]) / 100
        except ValueError:
            raise ValueError(f"not a percentage: {text}") from None
        if not 0 <= share <= 1:
            raise ValueError(f"a share must be 0–100%, got {text}")
        return "share", share
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", s)
    if not m or m.group(2) not in UNITS:
        raise ValueError(f"not a size: {text} (try 6GiB, 600M or 50%)")
    return "bytes", float(m.group(1)) * UNITS[m.group(2)]


def budget_bytes(spec: tuple[str, float], all_expert_bytes: int) -> int:
    kind, value = spec
    return int(value * all_expert_bytes) if kind == "share" else int(value)
