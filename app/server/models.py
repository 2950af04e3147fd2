"""The models a server offers: the ones named on its command line (the first is loaded at
start), then every model downloaded into the hub cache. A request may name any of them; one
that is not loaded replaces the loaded one (one resident at a time, as ollama does)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEMO_ID = "moechat-demo"


@dataclass(frozen=True, slots=True)
class ServedModel:
    id: str  # what /v1/models and /api/tags list, and requests name
    path: str  # the GGUF file
    created: int = 0  # file modification time (OpenAI `created`)
    size: int = 0


def served_model(spec: str | None, path: Path) -> ServedModel:
    stat = Path(path).stat()
    return ServedModel(spec or DEMO_ID, str(path), int(stat.st_mtime), stat.st_size)


class ModelSet:
    def __init__(self, named: list[ServedModel]):
        assert named, "a server offers at least the model it loads"
        self.named = named

    def available(self) -> list[ServedModel]:
        out, seen = list(self.named), {m.path for m in self.named}
        for model in _downloaded():
            if model.path not in seen:
                seen.add(model.path)
                out.append(model)
        return out

    def find(self, name: str) -> ServedModel | None:
        """The model a request names: its id (":latest" optional, as ollama names go), its
        path or its file name."""
        bare = name[: -len(":latest")] if name.endswith(":latest") else name
        for models in (self.named, self.available()):  # the hub cache is scanned only if need be
            for model in models:
                if bare in (model.id, model.path, Path(model.path).name):
                    return model
        return None


def _downloaded() -> list[ServedModel]:
    """Catalogue models and other GGUFs in the hub cache (offline: a directory scan)."""
    from moechat.backends.model import hub
    from moechat.backends.model.catalogue import load_catalogue

    out = []
    for entry in load_catalogue().values():
        for quant in entry.quants.values():
            path = hub.local_model(quant.repo, list(quant.files))
            if path is not None:
                out.append(served_model(f"{entry.name}:{quant.quant}", path))
    for repo, filename, path in hub.cached_ggufs():
        out.append(served_model(f"{repo}:{filename}", path))
    return out
