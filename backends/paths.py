"""Where moechat keeps things: platformdirs, overridable by environment (tests use that)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Built demo models, hardware profiles, calibration data. Safe to delete."""
    return _dir("MOECHAT_CACHE_DIR", "user_cache_dir")


def data_dir() -> Path:
    """Conversation history. Not safe to delete."""
    return _dir("MOECHAT_DATA_DIR", "user_data_dir")


def state_dir() -> Path:
    """Logs (llama.cpp's own log lines). Safe to delete."""
    return _dir("MOECHAT_STATE_DIR", "user_state_dir")


def _dir(env: str, platform_dir: str) -> Path:
    """$env if set, else platformdirs' `platform_dir` for moechat; made if missing."""
    override = os.environ.get(env)
    if override:
        path = Path(override)
    else:
        import platformdirs

        path = Path(getattr(platformdirs, platform_dir)("moechat"))
    path.mkdir(parents=True, exist_ok=True)
    return path
