"""Turn what the user typed into a model: nothing (the built-in demo), a local GGUF path, a
catalogue name `NAME[:QUANT]` (models.toml), or a hub file `org/repo:file.gguf`.

`lookup(spec)` works offline: it says which files the spec names and whether they are in
the hub cache. `resolve_model` needs the file on disk; `resolve_card` can instead read the
GGUF header over HTTP (plan before download).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from moechat.backends.errors import MoechatError

HUB_SPEC_RE = re.compile(r"^([\w.-]+/[\w.-]+):(.+\.gguf)$")


@dataclass(frozen=True, slots=True)
class ModelRef:
    spec: str
    local: Path | None  # the (first) GGUF file on disk, when there
    repo: str | None = None  # hub repo, for catalogue and repo:file specs
    files: tuple[str, ...] = ()  # every file of the model in that repo
    catalogue_name: str | None = None  # NAME:QUANT when it came from the catalogue
    sha256: tuple[str, ...] | None = None  # per file, when the catalogue confirms them
    size_bytes: int | None = None  # whole model, when the catalogue confirms it

    @property
    def on_hub(self) -> bool:
        return self.repo is not None


def lookup(spec: str) -> ModelRef:
    """What `spec` names (offline). Unknown names fail with the closest catalogue names."""
    path = Path(spec).expanduser()
    if path.exists():
        return ModelRef(spec, path)

    from moechat.backends.model import catalogue

    hub_spec = parse_hub_spec(spec)
    if hub_spec:
        from moechat.backends.model import hub

        repo, filename = hub_spec
        files = tuple(hub.model_files(filename))
        return ModelRef(spec, hub.local_model(repo, list(files)), repo, files)

    found = catalogue.find(spec)
    if found:
        from moechat.backends.model import hub

        entry, quant = found
        return ModelRef(spec, hub.local_model(quant.repo, list(quant.files)), quant.repo,
                        quant.files, f"{entry.name}:{quant.quant}", quant.sha256, quant.size_bytes)
    if path.suffix == ".gguf" or "/" in spec or "\\" in spec:
        return ModelRef(spec, path)  # read_model_card reports the missing file
    raise catalogue.unknown_model_error(spec)


def resolve_model(spec: str | None, progress: bool = True) -> Path:
    if not spec:
        from moechat.backends.model.demo_model import demo_model_path

        return demo_model_path(progress=progress)
    ref = lookup(spec)
    if ref.local is None:
        raise _not_downloaded(ref)
    return ref.local


def resolve_card(spec: str | None, allow_remote: bool = False):
    """The model card for `spec`. With allow_remote, a catalogue model that is not downloaded
    yet is read from its GGUF header over HTTP range requests (for `plan` before `pull`)."""
    from moechat.backends.model.model_card import read_model_card

    if not spec:
        return read_model_card(resolve_model(spec))
    ref = lookup(spec)
    if ref.local is not None:
        return read_model_card(ref.local)
    if not allow_remote:
        raise _not_downloaded(ref)
    from moechat.backends.model import hub

    return hub.read_remote_card(ref.repo, ref.files[0])


def _not_downloaded(ref: ModelRef) -> MoechatError:
    return MoechatError(f"{ref.spec} is not downloaded yet: run `moechat pull {ref.spec}`")


def parse_hub_spec(spec: str) -> tuple[str, str] | None:
    """`org/name:file.gguf` -> (repo, file); None when `spec` is not of that form."""
    m = HUB_SPEC_RE.match(spec)
    return (m.group(1), m.group(2)) if m else None
