"""The model catalogue: `models.toml`, curated MoE models and where their GGUFs live.

    [models.NAME]                       family, architecture, params, context, license, source
    [models.NAME.quants.QUANT]          repo, files (split GGUFs: every shard), source,
                                        size_bytes / sha256 only where confirmed

`load_catalogue()` finds the file (MOECHAT_CATALOGUE, the source checkout, or the copy
packaged with moechat), validates every entry, and fails with a one-line error naming the
entry at fault. `find(spec)` turns `NAME[:QUANT]` into an entry and quant; an unknown name
gets the closest names suggested.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from moechat.backends.errors import MoechatError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CATALOGUE_FILE = "models.toml"
MODEL_KEYS = {"family", "architecture", "params_total_b", "params_active_b", "context_length",
              "license", "source", "default_quant", "quants", "notes"}
QUANT_KEYS = {"repo", "files", "source", "size_bytes", "sha256", "approx_size_gb"}


@dataclass(frozen=True, slots=True)
class QuantFiles:
    quant: str
    repo: str
    files: tuple[str, ...]  # every shard of a split GGUF, in order
    source: str  # the public page where repo and file names were checked
    size_bytes: int | None  # whole model, only when confirmed
    sha256: tuple[str, ...] | None  # one per file, only when confirmed
    approx_size_gb: float | None  # as shown on the source page (informative)


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    name: str
    family: str
    architecture: str  # GGUF general.architecture
    params_total_b: float
    params_active_b: float
    context_length: int
    license: str
    source: str
    default_quant: str
    quants: dict  # quant name -> QuantFiles, in file order
    notes: str = ""

    def quant(self, quant: str | None) -> QuantFiles:
        if quant is None:
            return self.quants[self.default_quant]
        for name, files in self.quants.items():
            if name.lower() == quant.lower():
                return files
        raise MoechatError(
            f"{self.name} has no quant {quant!r} (offered: {', '.join(self.quants)})"
        )


def catalogue_path() -> Path:
    override = os.environ.get("MOECHAT_CATALOGUE")
    if override:
        return Path(override)
    checkout = Path(__file__).resolve().parents[2] / CATALOGUE_FILE  # source / editable
    if checkout.exists():
        return checkout
    from importlib.resources import files  # a wheel: packaged next to moechat/__init__.py

    return Path(str(files("moechat").joinpath(CATALOGUE_FILE)))


def load_catalogue(path: Path | None = None) -> dict[str, CatalogueEntry]:
    path = path or catalogue_path()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise MoechatError(f"model catalogue not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise MoechatError(f"{path}: not valid TOML ({err})") from None
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise MoechatError(f"{path}: no [models.NAME] tables")
    return {name: _entry(path, name, table) for name, table in models.items()}


def find(spec: str, catalogue: dict[str, CatalogueEntry] | None = None
         ) -> tuple[CatalogueEntry, QuantFiles] | None:
    """`NAME[:QUANT]` -> (entry, quant files), or None when NAME is not in the catalogue."""
    catalogue = load_catalogue() if catalogue is None else catalogue
    name, _, quant = spec.partition(":")
    entry = catalogue.get(name) or next(
        (e for n, e in catalogue.items() if n.lower() == name.lower()), None
    )
    if entry is None:
        return None
    return entry, entry.quant(quant or None)


def suggest(spec: str, catalogue: dict[str, CatalogueEntry] | None = None, n: int = 3) -> list[str]:
    """The catalogue names closest to `spec` (for "did you mean")."""
    catalogue = load_catalogue() if catalogue is None else catalogue
    name = spec.partition(":")[0].lower()
    names = {n.lower(): n for n in catalogue}
    close = difflib.get_close_matches(name, list(names), n=n, cutoff=0.4)
    if not close:  # a fragment such as "qwen" or "oss": substring matches
        close = [k for k in names if name and name in k][:n]
    return [names[k] for k in close]


def unknown_model_error(spec: str, catalogue: dict[str, CatalogueEntry] | None = None) -> MoechatError:
    close = suggest(spec, catalogue)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `moechat models`"
    return MoechatError(f"unknown model {spec!r}{hint}")


# ---- validation -----------------------------------------------------------------------------


def _entry(path: Path, name: str, table: dict) -> CatalogueEntry:
    where = f"{path}: [models.{name}]"
    if not isinstance(table, dict):
        raise MoechatError(f"{where} is not a table")
    unknown = set(table) - MODEL_KEYS
    if unknown:
        raise MoechatError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    quants_table = table.get("quants")
    if not isinstance(quants_table, dict) or not quants_table:
        raise MoechatError(f"{where}: no [models.{name}.quants.QUANT] tables")
    quants = {q: _quant(where, q, t) for q, t in quants_table.items()}
    default = table.get("default_quant", next(iter(quants)))
    if default not in quants:
        raise MoechatError(f"{where}: default_quant {default!r} is not one of its quants")
    return CatalogueEntry(
        name=name,
        family=_get(where, table, "family", str),
        architecture=_get(where, table, "architecture", str),
        params_total_b=float(_get(where, table, "params_total_b", (int, float))),
        params_active_b=float(_get(where, table, "params_active_b", (int, float))),
        context_length=_get(where, table, "context_length", int),
        license=_get(where, table, "license", str),
        source=_get(where, table, "source", str),
        default_quant=default,
        quants=quants,
        notes=table.get("notes", ""),
    )


def _quant(where: str, quant: str, table: dict) -> QuantFiles:
    where = f"{where} quant {quant}"
    if not isinstance(table, dict):
        raise MoechatError(f"{where} is not a table")
    unknown = set(table) - QUANT_KEYS
    if unknown:
        raise MoechatError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    files = _get(where, table, "files", list)
    if not files or not all(isinstance(f, str) and f.endswith(".gguf") for f in files):
        raise MoechatError(f"{where}: files must be a list of .gguf names")
    repo = _get(where, table, "repo", str)
    if repo.count("/") != 1:
        raise MoechatError(f"{where}: repo must be org/name, got {repo!r}")
    sha = table.get("sha256")
    if sha is not None and (not isinstance(sha, list) or len(sha) != len(files)):
        raise MoechatError(f"{where}: sha256 must list one digest per file")
    size = table.get("size_bytes")
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise MoechatError(f"{where}: size_bytes must be a positive integer")
    approx = table.get("approx_size_gb")
    return QuantFiles(quant=quant, repo=repo, files=tuple(files),
                      source=_get(where, table, "source", str), size_bytes=size,
                      sha256=tuple(sha) if sha else None,
                      approx_size_gb=float(approx) if approx is not None else None)


def _get(where: str, table: dict, key: str, kind):
    if key not in table:
        raise MoechatError(f"{where}: missing {key!r}")
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MoechatError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value
