"""Turn what the user typed into a GGUF path: nothing -> the built-in demo, or a local file.

The model catalogue (models.toml names, hub `repo:file`) plugs in here as well.
"""

from __future__ import annotations

from pathlib import Path

from moechat.backends.errors import MoechatError


def resolve_model(spec: str | None, progress: bool = True) -> Path:
    if not spec:
        from moechat.backends.demo_model import demo_model_path

        return demo_model_path(progress=progress)
    path = Path(spec).expanduser()
    if path.exists() or path.suffix == ".gguf" or "/" in spec:
        return path  # read_model_card reports a missing or bad file
    raise MoechatError(f"{spec}: no such model file")


def resolve_card(spec: str | None, allow_remote: bool = False):
    """The model card for `spec`. With allow_remote, a catalogue model that is not downloaded
    yet is read from its GGUF header over HTTP range requests (for `plan` before `pull`)."""
    from moechat.backends.model_card import read_model_card

    return read_model_card(resolve_model(spec))
