"""A fake Hugging Face Hub on 127.0.0.1 for offline tests, and small GGUFs to serve from it.

Serves `/{org}/{name}/resolve/{revision}/{file}` like the hub does for LFS files: a 302 to a
"CDN" on another host name (`localhost` instead of `127.0.0.1`, so the client must drop its
token) carrying `X-Repo-Commit`, `X-Linked-Etag` (the file's sha256) and `X-Linked-Size`;
the CDN answers HEAD and GET with `Accept-Ranges` and 206 answers to `Range: bytes=a-b`.
With `cdn=False` the resolve URL serves the bytes itself. It logs every request with the bytes it actually sent, so a
test can check that a resume asked for the right range or that a header read stayed small.
Knobs: `gated` repos (401 without a token, 403 with a wrong one), `corrupt` files (one byte
flipped, headers unchanged), and `rate` (bytes/s) to slow a download down enough to kill it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GOOD_TOKEN = "hf_good_token"


@dataclass
class Served:
    method: str
    repo: str
    filename: str
    status: int
    range_start: int | None
    sent: int = 0


@dataclass
class FakeHub:
    files: dict = field(default_factory=dict)  # (repo, filename) -> Path
    gated: set = field(default_factory=set)  # repos that need GOOD_TOKEN
    corrupt: set = field(default_factory=set)  # filenames served with one byte flipped
    rate: float | None = None  # bytes per second, None = as fast as possible
    cdn: bool = True  # redirect downloads to a CDN host, as the hub does for LFS files
    log: list = field(default_factory=list)

    def add(self, repo: str, filename: str, path: Path) -> None:
        self.files[(repo, filename)] = Path(path)

    def sha256(self, repo: str, filename: str) -> str:
        return _sha256(self.files[(repo, filename)])

    def bytes_sent(self, filename: str | None = None, method: str = "GET") -> int:
        return sum(r.sent for r in self.log if r.method == method and filename in (None, r.filename))

    def gets(self, filename: str) -> list[Served]:
        return [r for r in self.log if r.method == "GET" and r.filename == filename]

    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.port = self._server.server_address[1]
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


_SHA_CACHE: dict = {}


def _sha256(path: Path) -> str:
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _SHA_CACHE[key]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: FakeHub

    def log_message(self, *args):  # keep test output clean
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        state = self.state
        url_path = unquote(self.path.split("?")[0]).lstrip("/")
        if url_path.startswith("cdn/") and url_path.count("/") >= 3:
            org, name, filename = url_path[len("cdn/"):].split("/", 2)
            path = state.files.get((f"{org}/{name}", filename))
            if path is None or self.headers.get("Authorization"):  # the hub token must not leak here
                return self._error(403, "", f"{org}/{name}", filename)
            return self._send_file(f"{org}/{name}", filename, path, body, {})
        parts = url_path.split("/", 4)
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, "RepoNotFound", "", "")
        repo, filename = f"{parts[0]}/{parts[1]}", parts[4]
        if repo not in {r for r, _ in state.files}:
            return self._error(401, "RepoNotFound", repo, filename)
        if repo in state.gated:
            auth = self.headers.get("Authorization", "")
            if not auth:
                return self._error(401, "GatedRepo", repo, filename)
            if auth != f"Bearer {GOOD_TOKEN}":
                return self._error(403, "GatedRepo", repo, filename)
        path = state.files.get((repo, filename))
        if path is None:
            return self._error(404, "EntryNotFound", repo, filename)
        hub_headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_sha256(path)}"'}
        if state.cdn:
            state.log.append(Served("REDIRECT", repo, filename, 302, None))
            self.send_response(302)
            for key, value in hub_headers.items():
                self.send_header(key, value)
            self.send_header("X-Linked-Etag", f'"{_sha256(path)}"')
            self.send_header("X-Linked-Size", str(path.stat().st_size))
            self.send_header("Location", f"http://localhost:{state.port}/cdn/{repo}/{filename}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send_file(repo, filename, path, body, hub_headers)

    def _send_file(self, repo: str, filename: str, path: Path, body: bool, extra: dict):
        state = self.state
        size = path.stat().st_size
        start, end = 0, size - 1
        status = 200
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes="):
            first, _, last = wanted[len("bytes="):].partition("-")
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
            if start >= size:
                return self._error(416, "", repo, filename)
            status = 206
        record = Served(self.command, repo, filename, status, start if status == 206 else None)
        state.log.append(record)
        self.send_response(status)
        for key, value in extra.items():
            self.send_header(key, value)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        flip = size // 2 if filename in state.corrupt else None
        with open(path, "rb") as f:
            f.seek(start)
            position, t0 = start, time.monotonic()
            while position <= end:
                chunk = bytearray(f.read(min(64 * 1024, end - position + 1)))
                if flip is not None and position <= flip < position + len(chunk):
                    chunk[flip - position] ^= 0xFF
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                position += len(chunk)
                record.sent += len(chunk)
                if state.rate:
                    ahead = record.sent / state.rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)

    def _error(self, status: int, code: str, repo: str, filename: str):
        self.state.log.append(Served(self.command, repo, filename, status, None))
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        if code == "EntryNotFound":
            self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", "0")
        self.end_headers()


# ---- small GGUFs ------------------------------------------------------------------------------


def write_tiny_moe(path: Path, *, n_layers: int = 2, hidden: int = 256, expert_ffn: int = 1024,
                   n_experts: int = 4, n_used: int = 2, vocab: int = 2000, split_max_tensors: int = 0,
                   seed: int = 0) -> list[Path]:
    """A Mixtral-style (llama arch) MoE in F16 with random weights; returns its file(s).

    With the defaults: about 13 MB of tensor data behind a header of about 50 KB, so a
    header-only read is a small fraction of the file. split_max_tensors > 0 writes shards."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    writer.add_name("tiny-moe")
    writer.add_block_count(n_layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(expert_ffn)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_expert_count(n_experts)
    writer.add_expert_used_count(n_used)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(vocab)])

    def tensor(name, *shape):  # numpy order: outermost first
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float16))

    tensor("token_embd.weight", vocab, hidden)
    for i in range(n_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", hidden // 2, hidden)
        tensor(f"blk.{i}.attn_v.weight", hidden // 2, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        tensor(f"blk.{i}.ffn_gate_inp.weight", n_experts, hidden)
        tensor(f"blk.{i}.ffn_gate_exps.weight", n_experts, expert_ffn, hidden)
        tensor(f"blk.{i}.ffn_up_exps.weight", n_experts, expert_ffn, hidden)
        tensor(f"blk.{i}.ffn_down_exps.weight", n_experts, hidden, expert_ffn)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        return sorted(Path(path).parent.glob(Path(path).stem + "-0*-of-*.gguf"))
    return [Path(path)]
