"""Where moechat keeps things: platformdirs, overridable by environment (tests use that)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Built demo models, hardware profiles, calibration data. Safe to delete."""
    override = os.environ.get("MOECHAT_CACHE_DIR")
    if override:
        path = Path(override)
    else:
        import platformdirs

        path = Path(platformdirs.user_cache_dir("moechat"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """Conversation history. Not safe to delete."""
    override = os.environ.get("MOECHAT_DATA_DIR")
    if override:
        path = Path(override)
    else:
        import platformdirs

        path = Path(platformdirs.user_data_dir("moechat"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def state_dir() -> Path:
    """Logs (llama.cpp's own log lines). Safe to delete."""
    override = os.environ.get("MOECHAT_STATE_DIR")
    if override:
        path = Path(override)
    else:
        import platformdirs

        path = Path(platformdirs.user_state_dir("moechat"))
    path.mkdir(parents=True, exist_ok=True)
    return path
