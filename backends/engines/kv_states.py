"""The KV state cache: each conversation's evaluated prefix, kept so that going on with it,
in this process or a new one, evaluates only the new tokens.

A state is an engine's KV cache for one token sequence, keyed by the model file's identity
(path, size, mtime), the context size, the engine and its build/placement (`model_key`), and
the tokens it covers. Lookup takes the saved sequence that shares the longest prefix with
the new prompt (a state that runs past the point where they differ is still used: the
engine drops the positions after it), so the state saved after a reply serves going on,
regenerating it and editing the last message alike.

Two tiers: RAM (the last RAM_SLOTS sequences of this process, so a server alternating
between clients restores from memory) and disk (the user cache dir, LRU by file mtime under
a size cap: MOECHAT_KV_CACHE_SIZE, default DEFAULT_DISK_CAP; 0 turns the disk tier off).
Disk writes run in a background thread; `wait()` (the engine's close) joins them.

Why by hand: llama-cpp-python's LlamaRAMCache/LlamaDiskCache key by tokens alone (a state of
another model or context size would be restored), pickle whole LlamaState objects (with a
logits buffer of n_batch x n_vocab floats, ~100 MB for a 49k vocabulary), match only saved
sequences that are a prefix of the prompt, and the disk one needs the `diskcache` package
and has no checksum. The engines still use llama.cpp's own state API for the bytes.
Standard library only (ask imports it before the model loads).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from moechat.backends.engines.kv_ledger import Ledger
from moechat.backends.engines.kv_state_file import SUFFIX, StateFileError, read_header, read_state, write_state
from moechat.backends.errors import MoechatError

GIB = 1024**3
DEFAULT_DISK_CAP = 2 * GIB
RAM_SLOTS = 4  # sequences kept in memory (two clients alternating fit, with room)
RAM_CAP = 1 * GIB
MIN_RESTORE = 32  # restoring fewer tokens than this costs about what evaluating them does
PREFILL_SAVE_MIN = 256  # save right after a prefill that evaluated at least this many tokens
SAVE_MIN_NEW = 64  # a reply saves its state only if it adds this many tokens to a saved one
STALE_TMP_S = 3600  # a temporary file this old is from a killed save


def kv_cache_dir() -> Path:
    override = os.environ.get("MOECHAT_KV_CACHE_DIR")
    if override:
        return Path(override)
    from moechat.backends.paths import cache_dir

    return cache_dir() / "kv-states"


def disk_cap() -> int:
    """MOECHAT_KV_CACHE_SIZE ("4GiB", "500M", "0"), else DEFAULT_DISK_CAP."""
    from moechat.backends.offload.budget import parse_budget

    text = os.environ.get("MOECHAT_KV_CACHE_SIZE", "").strip()
    if not text:
        return DEFAULT_DISK_CAP
    try:
        kind, value = parse_budget(text)
    except ValueError as err:
        raise MoechatError(f"MOECHAT_KV_CACHE_SIZE: {err}") from None
    if kind != "bytes":
        raise MoechatError(f"MOECHAT_KV_CACHE_SIZE: a size, not a share ({text})")
    return int(value)


def model_key(path: str | Path, n_ctx: int, engine: str, variant: str = "") -> str:
    """What a state must match to be used: this model file (as it is now), this context
    size, this engine and its build/placement."""
    st = os.stat(path)
    identity = {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "n_ctx": n_ctx, "engine": engine, "variant": variant}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def entry_name(key: str, tokens) -> str:
    h = hashlib.sha256(key.encode())
    h.update(b",".join(str(t).encode() for t in tokens))
    return h.hexdigest()[:24]


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def warn(message: str) -> None:
    print(f"moechat: {message}", file=sys.stderr)


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    tokens: list[int]  # the sequence the state covers
    common: int  # tokens it shares with the prompt
    path: Path | None  # on disk (None: RAM only)


class KVStateStore:
    """The saved states of one model_key: lookup, restore, save, eviction."""

    def __init__(self, key: str, model_name: str = "", root: Path | None = None,
                 cap: int | None = None, ram_slots: int = RAM_SLOTS, ram_bytes: int = RAM_CAP):
        self.key = key
        self.model_name = model_name
        self.root = root or kv_cache_dir()
        self.dir = self.root / key
        self.cap = disk_cap() if cap is None else cap
        self.ram_slots, self.ram_bytes = ram_slots, ram_bytes
        self.ram: OrderedDict[str, tuple[list[int], bytearray]] = OrderedDict()
        self.ledger = Ledger(self.root)
        self._writer: threading.Thread | None = None

    # ---- lookup and restore ---------------------------------------------------------------
    def best(self, tokens: list[int]) -> Candidate | None:
        """The saved state sharing the longest prefix with `tokens` (None if nothing shares
        any)."""
        best: Candidate | None = None
        for name, (saved, _) in self.ram.items():
            best = _better(best, Candidate(name, saved, common_prefix(saved, tokens), None))
        for path in self._files():
            if path.stem in self.ram:
                continue
            try:
                header, saved = read_header(path)
            except StateFileError as err:
                self._discard(path, str(err))
                continue
            if not self._matches(path, header):
                continue
            best = _better(best, Candidate(path.stem, saved, common_prefix(saved, tokens), path))
        return best if best is not None and best.common > 0 else None

    def load(self, candidate: Candidate) -> bytearray | None:
        """The candidate's payload (checked), or None after one line on stderr."""
        if candidate.name in self.ram:
            self.ram.move_to_end(candidate.name)
            return self.ram[candidate.name][1]
        try:
            header, tokens, payload = read_state(candidate.path)
        except StateFileError as err:
            self._discard(candidate.path, str(err))
            return None
        if not self._matches(candidate.path, header) or tokens != candidate.tokens:
            return None
        os.utime(candidate.path)  # the LRU's clock
        self._remember(candidate.name, tokens, payload)
        return payload

    def pick(self, tokens: list[int], live: int) -> tuple[Candidate, bytearray] | None:
        """The state worth restoring for this prompt, given that the engine's context already
        holds its first `live` tokens: it must add MIN_RESTORE tokens or more (the prompt's
        last token is always evaluated, for its logits)."""
        candidate = self.best(tokens)
        gain = min(candidate.common, len(tokens) - 1) - live if candidate else 0
        if candidate is None or gain < MIN_RESTORE:
            if live == 0:
                self.missed()
            return None
        payload = self.load(candidate)
        return None if payload is None else (candidate, payload)

    def restored(self, candidate: Candidate, n_tokens: int) -> None:
        self.ledger.hit(candidate.name, n_tokens)

    def missed(self) -> None:
        self.ledger.miss()

    def reject(self, candidate: Candidate, reason: str) -> None:
        """The engine could not apply this state: never offer it again."""
        self.ram.pop(candidate.name, None)
        if candidate.path is not None:
            self._discard(candidate.path, reason)
        else:
            warn(f"ignoring a saved KV state in memory: {reason}; evaluating the prompt in full")

    # ---- save -----------------------------------------------------------------------------
    def covering(self, tokens: list[int]) -> str | None:
        """The name of a saved state that covers all but fewer than SAVE_MIN_NEW of these
        tokens: saving again would rewrite the whole state (tens of MB) to spare the next
        turn a prefill of a few dozen tokens."""
        best = self.best(tokens)
        if best is not None and len(tokens) - best.common < SAVE_MIN_NEW:
            return best.name
        return None

    def save(self, tokens: list[int], payload: bytearray, meta: dict | None = None) -> str:
        """Keep this state in RAM now and on disk in the background; returns its name."""
        tokens = list(tokens)
        name = entry_name(self.key, tokens)
        self._remember(name, tokens, payload)
        if self.cap > 0 and len(payload) < self.cap:
            self.wait()
            header = {"model_key": self.key, "model": self.model_name, "created": time.time(), **(meta or {})}
            self._writer = threading.Thread(target=self._write, args=(name, header, tokens, payload),
                                            name="kv-state-writer", daemon=True)
            self._writer.start()
        return name

    def wait(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join()

    def _write(self, name: str, header: dict, tokens: list[int], payload: bytearray) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_state(self.dir / f"{name}{SUFFIX}", header, tokens, payload)
        except OSError as err:
            warn(f"could not save a KV state in {self.dir}: {err.strerror or err}")
            return
        self.ledger.saved()
        self._drop_prefixes_on_disk(name, tokens)
        evict(self.root, self.cap)

    def _remember(self, name: str, tokens: list[int], payload: bytearray) -> None:
        """RAM tier: newest last; a sequence that another one extends is dropped (the longer
        one serves every prompt the shorter one did)."""
        for other in [n for n, (t, _) in self.ram.items() if _extends(tokens, t)]:
            del self.ram[other]
        self.ram[name] = (tokens, payload)
        self.ram.move_to_end(name)
        while self.ram and (len(self.ram) > self.ram_slots or
                            sum(len(p) for _, p in self.ram.values()) > self.ram_bytes):
            self.ram.popitem(last=False)

    def _drop_prefixes_on_disk(self, name: str, tokens: list[int]) -> None:
        for path in self._files():
            if path.stem == name:
                continue
            try:
                _, saved = read_header(path)
            except StateFileError:
                continue  # reported (and removed) by the next lookup
            if _extends(tokens, saved):
                path.unlink(missing_ok=True)

    # ---- checks ---------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        try:
            return sorted(p for p in self.dir.iterdir() if p.suffix == SUFFIX and not p.name.startswith("."))
        except FileNotFoundError:
            return []

    def _matches(self, path: Path, header: dict) -> bool:
        if header.get("model_key") == self.key:
            return True
        self._discard(path, "saved for another model, context size or build")
        return False

    def _discard(self, path: Path, reason: str) -> None:
        warn(f"ignoring saved KV state {path.name}: {reason}; evaluating the prompt in full")
        path.unlink(missing_ok=True)


def _better(best: Candidate | None, other: Candidate) -> Candidate:
    if best is None or other.common > best.common:
        return other
    if other.common == best.common and len(other.tokens) < len(best.tokens):
        return other  # same gain, less to read
    return best


def _extends(longer: list[int], shorter: list[int]) -> bool:
    return len(shorter) < len(longer) and longer[: len(shorter)] == shorter


# ---- the whole cache (every model): eviction, `moechat cache`, history deletion -----------
def _all_files(root: Path) -> list[Path]:
    return [p for p in root.glob(f"*/*{SUFFIX}") if not p.name.startswith(".")]


def evict(root: Path, cap: int) -> None:
    """Delete least recently used states until the cache fits `cap`; clear stale temporary
    files of killed saves and empty model folders."""
    now = time.time()
    for tmp in root.glob("*/.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
        except FileNotFoundError:
            pass
    files = []
    for path in _all_files(root):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        files.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in files)
    gone = []
    for _, size, path in sorted(files):
        if total <= cap:
            break
        path.unlink(missing_ok=True)
        total -= size
        gone.append(path.stem)
    if gone:
        Ledger(root).forget(gone)
    for folder in root.iterdir() if root.exists() else ():
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


@dataclass(frozen=True, slots=True)
class SavedState:
    name: str
    model: str
    n_tokens: int
    bytes: int
    hits: int
    last_used: float


def summary(root: Path | None = None) -> tuple[list[SavedState], dict[str, int]]:
    """Every saved state (most recently used first) and the ledger's totals."""
    root = root or kv_cache_dir()
    totals, hits = Ledger(root).read()
    states = []
    for path in _all_files(root):
        try:
            header, tokens = read_header(path)
            st = path.stat()
        except (StateFileError, FileNotFoundError):
            continue
        states.append(SavedState(path.stem, str(header.get("model", "?")), len(tokens), st.st_size,
                                 hits.get(path.stem, 0), st.st_mtime))
    states.sort(key=lambda s: -s.last_used)
    return states, totals


def clear(root: Path | None = None) -> tuple[int, int]:
    """Delete every saved state and the ledger -> (files, bytes) removed."""
    import shutil

    root = root or kv_cache_dir()
    files = [p for p in root.glob("*/*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    if root.exists():
        shutil.rmtree(root)
    return len([p for p in files if p.suffix == SUFFIX]), size


def drop(names, root: Path | None = None) -> int:
    """Delete the states with these names (e.g. a deleted conversation's) -> how many."""
    root = root or kv_cache_dir()
    names = set(names)
    gone = [p for p in _all_files(root) if p.stem in names]
    for path in gone:
        path.unlink(missing_ok=True)
    if names and root.exists():
        Ledger(root).forget(names)
    return len(gone)
