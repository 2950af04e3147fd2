"""Hugging Face Hub: download GGUFs into the hub's own cache, and read remote headers.

huggingface-hub does the HTTP (metadata, auth headers, redirects, retries) and owns the
cache layout (`models--org--name/{blobs,snapshots,refs}`), so other tools see our files.
We add what it lacks for multi-GB files that a user may interrupt:
  * resume across runs: the partial blob is kept as `blobs/<etag>.moechat-<file>.incomplete`
    and continued with a Range request (the library restarts from zero after a Ctrl-C);
  * verify: size, and sha256 when the hub's ETag is one (LFS files) or the catalogue has one;
  * split GGUFs: `x-00001-of-00003.gguf` brings all three shards;
  * header-only reads: the first MB of a file with Range requests, enough for a model card.
Every failure becomes a one-line MoechatError.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants, errors as hf_errors
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.file_download import http_get, repo_folder_name
from huggingface_hub.utils import WeakFileLock, build_hf_headers, get_session
from filelock import Timeout
from tqdm import tqdm

from moechat.backends.errors import MoechatError
from moechat.backends.model.model_card import SPLIT_NAME_RE, ModelCard, card_from_headers, split_shard_names

FIRST_HEADER_CHUNK = 256 * 1024  # grown by doubling until the header is parsed
MAX_REMOTE_HEADER = 64 * 1024 * 1024
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


@dataclass(frozen=True, slots=True)
class HubFile:
    """One file to fetch; size and sha256 are what the catalogue expects (None: trust the hub)."""

    repo: str
    filename: str
    size: int | None = None
    sha256: str | None = None


def model_files(filename: str) -> list[str]:
    """The files that make up a model named by its (first) file: all shards of a split GGUF."""
    folder, _, base = filename.rpartition("/")
    names = split_shard_names(base)
    if names is None:
        return [filename]
    return [f"{folder}/{name}" if folder else name for name in names]


def cache_root() -> Path:
    return Path(constants.HF_HUB_CACHE)


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


# ---- local (offline) -------------------------------------------------------------------


def local_path(repo: str, filename: str) -> Path | None:
    """The file in the hub cache, or None. Offline: reads only the cache."""
    found = try_to_load_from_cache(repo, filename, cache_dir=cache_root())
    if isinstance(found, str) and os.path.exists(found):
        return Path(found)
    return None


def local_model(repo: str, files: list[str]) -> Path | None:
    """Path of the first file when every file of the model is in the cache, else None."""
    paths = [local_path(repo, f) for f in files]
    return paths[0] if paths and all(paths) else None


def local_bytes(repo: str, files: list[str]) -> int:
    return sum(p.stat().st_size for p in (local_path(repo, f) for f in files) if p)


def cached_ggufs() -> list[tuple[str, str, Path]]:
    """(repo, file, path) for every complete GGUF model in the hub cache (first shards only)."""
    root = cache_root()
    found = []
    for repo_dir in sorted(root.glob("models--*")):
        repo = repo_dir.name[len("models--"):].replace("--", "/")
        ref = repo_dir / "refs" / "main"
        if not ref.is_file():
            continue
        snapshot = repo_dir / "snapshots" / ref.read_text().strip()
        for path in sorted(snapshot.rglob("*.gguf")):
            rel = path.relative_to(snapshot).as_posix()
            m = SPLIT_NAME_RE.search(rel)
            if m and int(m.group(1)) != 1:
                continue  # a later shard: listed with its first
            if local_model(repo, model_files(rel)):
                found.append((repo, rel, path))
    return found


def remove(repo: str, files: list[str]) -> int:
    """Delete a model's files (snapshot links, blobs, partial downloads); return bytes freed."""
    storage = cache_root() / repo_folder_name(repo_id=repo, repo_type="model")
    freed = 0
    for name in files:
        for partial in (storage / "blobs").glob(f"*.moechat-{_safe_name(name)}.incomplete"):
            freed += partial.stat().st_size
            partial.unlink()
        pointer = local_path(repo, name)
        if pointer is None:
            continue
        is_link = pointer.is_symlink()
        blob = pointer.resolve()
        if not is_link:  # a cache without symlinks (Windows): the file itself
            freed += pointer.stat().st_size
        pointer.unlink()
        if is_link and blob.exists() and not _other_links(storage, blob):
            freed += blob.stat().st_size
            blob.unlink()
    left = [p for folder in ("blobs", "snapshots") for p in (storage / folder).rglob("*") if p.is_file()]
    if storage.exists() and not left:
        shutil.rmtree(storage, ignore_errors=True)  # nothing of this repo is left
    return freed


def _other_links(storage: Path, blob: Path) -> bool:
    return any(p.is_symlink() and p.resolve() == blob for p in (storage / "snapshots").rglob("*"))


# ---- download ---------------------------------------------------------------------------


def download(files: list[HubFile], progress: bool = True, token: str | bool | None = None) -> list[Path]:
    """Fetch every file (resuming partial downloads), verify it, link it into the cache."""
    paths = []
    for item in files:
        with _hub_errors(item.repo, item.filename):
            url = hf_hub_url(item.repo, item.filename, endpoint=endpoint())
            meta = get_hf_file_metadata(url, token=token)
            if meta.commit_hash is None or meta.etag is None:
                raise MoechatError(f"{endpoint()} does not answer like the Hugging Face Hub")
            if item.size is not None and meta.size is not None and item.size != meta.size:
                raise MoechatError(
                    f"{item.repo}:{item.filename} is {meta.size:,} bytes on the hub, the catalogue "
                    f"says {item.size:,}; the catalogue entry is out of date"
                )
            storage = cache_root() / repo_folder_name(repo_id=item.repo, repo_type="model")
            blob = storage / "blobs" / meta.etag
            if not blob.exists():
                _fetch_blob(item, meta, url, blob, progress, token)
            # the blob is in place: the library links it into snapshots/ and records refs/main
            path = hf_hub_download(item.repo, item.filename, cache_dir=cache_root(),
                                   endpoint=endpoint(), token=token)
            paths.append(Path(path))
    return paths


def _fetch_blob(item: HubFile, meta, url: str, blob: Path, progress: bool, token) -> None:
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock = cache_root() / ".locks" / "moechat" / f"{blob.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        with WeakFileLock(lock, timeout=1):
            _fetch_locked(item, meta, url, blob, progress, token)
    except Timeout:
        raise MoechatError(f"{item.repo}:{item.filename} is being downloaded by another process") from None


def _fetch_locked(item: HubFile, meta, url: str, blob: Path, progress: bool, token) -> None:
    """Append to the partial blob from where it stopped, verify it, move it into place."""
    partial = blob.with_name(f"{blob.name}.moechat-{_safe_name(item.filename)}.incomplete")
    have = partial.stat().st_size if partial.exists() else 0
    if meta.size is not None and have > meta.size:
        partial.unlink()
        have = 0
    if meta.size is not None:
        free = shutil.disk_usage(blob.parent).free
        if meta.size - have > free:
            raise MoechatError(
                f"disk full: {item.filename} needs {_gb(meta.size - have)} more, "
                f"only {_gb(free)} free in {blob.parent}"
            )
    headers = build_hf_headers(token=token)
    if urlparse(meta.location).netloc != urlparse(url).netloc:
        headers.pop("authorization", None)  # signed CDN URLs must not get the hub token
    try:
        with open(partial, "ab") as f:
            http_get(meta.location, f, resume_size=have, headers=headers, expected_size=meta.size,
                     displayed_filename=Path(item.filename).name, tqdm_class=_bar_class(progress))
    except OSError as err:
        if err.errno in DISK_FULL_ERRNOS:
            raise MoechatError(
                f"disk full while writing {partial} ({err.strerror}); "
                "free some space and run pull again to resume"
            ) from None
        if isinstance(err, hf_errors.HfHubHTTPError) or "Consistency check failed" not in str(err):
            raise
        partial.unlink(missing_ok=True)
        raise MoechatError(f"{item.filename}: download incomplete (size mismatch); deleted, run pull again") from None
    _verify(partial, item, meta.etag, progress)
    os.replace(partial, blob)


def _verify(path: Path, item: HubFile, etag: str, progress: bool) -> None:
    expected = [h.lower() for h in (item.sha256, etag) if h and SHA256_RE.match(h.lower())]
    if not expected:
        return  # a small git file: its size was checked by the download itself
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, disable=not progress,
                                      desc=f"verifying {Path(item.filename).name}", leave=False) as bar:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            bar.update(len(chunk))
    actual = digest.hexdigest()
    if any(actual != h for h in expected):
        path.unlink()
        raise MoechatError(
            f"{item.repo}:{item.filename}: corrupted download (sha256 {actual[:12]}… expected "
            f"{expected[0][:12]}…); deleted it, run pull again"
        )


def _bar_class(progress: bool):
    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("mininterval", 0.25)
            kwargs["disable"] = not progress
            super().__init__(*args, **kwargs)

    return Bar


# ---- header-only remote read ---------------------------------------------------------------


def read_remote_card(repo: str, filename: str, token: str | bool | None = None) -> ModelCard:
    """The model card of a hub GGUF from its header alone (all shards' headers when split)."""
    from moechat.backends.model.gguf_header import HeaderError, parse_header

    headers, sizes = [], []
    for name in model_files(filename):
        with _hub_errors(repo, name):
            reader = _RangeReader(hf_hub_url(repo, name, endpoint=endpoint()), token)
            try:
                headers.append(parse_header(reader.read))
            except HeaderError as err:
                raise MoechatError(f"{repo}:{name}: corrupt or truncated GGUF ({err})") from None
            sizes.append(reader.total)
    return card_from_headers(f"{repo}:{filename}", headers, sizes)


class _RangeReader:
    """`read(n)` over a remote file, fetching growing byte ranges from its start on demand."""

    def __init__(self, url: str, token):
        self.url = url
        self.headers = build_hf_headers(token=token)
        self.buffer = bytearray()
        self.position = 0
        self.total: int | None = None

    def read(self, n: int) -> bytes:
        need = self.position + n
        while len(self.buffer) < need and (self.total is None or len(self.buffer) < self.total):
            chunk = max(need - len(self.buffer), len(self.buffer), FIRST_HEADER_CHUNK)
            if len(self.buffer) + chunk > MAX_REMOTE_HEADER:
                raise MoechatError(f"{self.url}: GGUF header larger than {_gb(MAX_REMOTE_HEADER)}")
            self._fetch(len(self.buffer), chunk)
        data = bytes(self.buffer[self.position:need])
        self.position += len(data)
        return data

    def _fetch(self, start: int, length: int) -> None:
        headers = dict(self.headers, Range=f"bytes={start}-{start + length - 1}")
        headers["Accept-Encoding"] = "identity"
        with get_session().stream("GET", self.url, headers=headers, follow_redirects=True,
                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
            from huggingface_hub.utils import hf_raise_for_status

            hf_raise_for_status(response)
            if response.status_code != 206:
                raise MoechatError(f"{self.url}: the server does not support range requests")
            self.total = int(response.headers["Content-Range"].rsplit("/", 1)[-1])
            got = 0
            for piece in response.iter_bytes():
                self.buffer += piece[: length - got]
                got += len(piece)
                if got >= length:
                    break


# ---- errors ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _hub_errors(repo: str, filename: str):
    """Turn what huggingface-hub and httpx raise into one-line MoechatErrors."""
    import httpx2

    where = f"{repo}:{filename}"
    try:
        yield
    except hf_errors.OfflineModeIsEnabled:
        raise MoechatError(f"{where}: offline mode is on (HF_HUB_OFFLINE); cannot reach the hub") from None
    except hf_errors.GatedRepoError:
        raise MoechatError(
            f"{repo} is gated: accept its terms on its hub page, then log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise MoechatError(f"{repo}: no such repository on the hub (or it is private: log in)") from None
    except hf_errors.RemoteEntryNotFoundError:
        raise MoechatError(f"{repo} has no file {filename}") from None
    except hf_errors.RevisionNotFoundError:
        raise MoechatError(f"{where}: revision not found") from None
    except hf_errors.HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        raise MoechatError(f"{where}: the hub answered HTTP {status}") from None
    except (httpx2.ConnectError, httpx2.TimeoutException, httpx2.RemoteProtocolError,
            httpx2.ProxyError) as err:
        raise MoechatError(f"cannot reach {endpoint()} (no network?): {_first_line(err)}") from None
    except OSError as err:
        if err.errno in DISK_FULL_ERRNOS:
            raise MoechatError(f"disk full ({err.strerror}) while saving {where}") from None
        raise


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _safe_name(filename: str) -> str:
    return re.sub(r"[^\w.-]", "_", filename)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
