"""One saved KV state on disk: a self-describing file, written atomically, read with checks.

Layout: MAGIC (8 bytes), the header's length (u32, little-endian), the header (JSON: which
model and context it belongs to, how many tokens, the payload's length and CRC-32), the
tokens it covers (int32, little-endian), then the engine's payload (llama.cpp's sequence
state bytes, or the torch runtime's K/V tensors).

Why by hand: llama.cpp's `llama_state_seq_save_file` writes tokens + state with a magic and
version, but has no checksum (flipped bytes in the K/V data would load and give wrong
answers silently), no notion of which model file or context the state belongs to, and
writes in place (a kill mid-save leaves a torn file). This adds exactly those three things
and nothing else. Standard library only.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from array import array
from pathlib import Path

MAGIC = b"MOEKVS1\n"
SUFFIX = ".kvs"
MAX_HEADER = 1 << 20  # a header is a few hundred bytes; anything bigger is garbage


class StateFileError(Exception):
    """A state file that must not be used; str() is the reason, for one line on stderr."""


def _tokens_bytes(tokens) -> bytes:
    packed = array("i", tokens)
    if packed.itemsize != 4:  # pragma: no cover - every platform we run on has 4-byte int
        raise RuntimeError("array('i') is not 32-bit here")
    return packed.tobytes()


def write_state(path: Path, header: dict, tokens, payload) -> int:
    """Write atomically: a temporary file in the same directory, then a rename over `path`,
    so a killed process leaves either the previous file or the new one whole. No fsync: a
    kill does not lose the page cache, and the torn file a power cut might leave fails the
    length or checksum test on reading (measured: fsync of a 71 MB state cost ~1 s on the
    shared test machine, as much as the rest of a resumed `ask`). Returns the bytes written."""
    token_bytes = _tokens_bytes(tokens)
    header = {**header, "n_tokens": len(token_bytes) // 4, "payload_bytes": len(payload),
              "payload_crc32": zlib.crc32(payload), "tokens_crc32": zlib.crc32(token_bytes)}
    head = json.dumps(header, sort_keys=True).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(head)) + head)
            f.write(token_bytes)
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(MAGIC) + 4 + len(head) + len(token_bytes) + len(payload)


def read_header(path: Path) -> tuple[dict, list[int]]:
    """The header and the tokens (not the payload). Raises StateFileError."""
    try:
        with open(path, "rb") as f:
            return _read_header(f)
    except OSError as err:
        raise StateFileError(f"unreadable ({err.strerror or err})") from None


def _read_header(f) -> tuple[dict, list[int]]:
    start = f.read(len(MAGIC) + 4)
    if len(start) < len(MAGIC) + 4:
        raise StateFileError("truncated (no header)")
    if start[: len(MAGIC)] != MAGIC:
        raise StateFileError("not a moechat KV state file")
    (n,) = struct.unpack("<I", start[len(MAGIC):])
    if n > MAX_HEADER:
        raise StateFileError("corrupt header")
    raw = f.read(n)
    if len(raw) < n:
        raise StateFileError("truncated (in the header)")
    try:
        header = json.loads(raw)
        n_tokens, payload_bytes = int(header["n_tokens"]), int(header["payload_bytes"])
    except (ValueError, KeyError, TypeError):
        raise StateFileError("corrupt header") from None
    if n_tokens < 0 or payload_bytes < 0:
        raise StateFileError("corrupt header")
    token_bytes = f.read(4 * n_tokens)
    if len(token_bytes) < 4 * n_tokens:
        raise StateFileError("truncated (in the tokens)")
    if zlib.crc32(token_bytes) != header.get("tokens_crc32"):
        raise StateFileError("corrupt (token checksum mismatch)")
    tokens = array("i")
    tokens.frombytes(token_bytes)
    return header, tokens.tolist()


def read_state(path: Path) -> tuple[dict, list[int], bytearray]:
    """Header, tokens and the payload, checked for length and CRC-32. Raises StateFileError."""
    try:
        with open(path, "rb") as f:
            header, tokens = _read_header(f)
            payload = bytearray(header["payload_bytes"])
            got = f.readinto(payload)
            extra = f.read(1)
    except OSError as err:
        raise StateFileError(f"unreadable ({err.strerror or err})") from None
    if got < len(payload):
        raise StateFileError(f"truncated ({got} of {len(payload)} payload bytes)")
    if extra:
        raise StateFileError("corrupt (trailing bytes)")
    if zlib.crc32(payload) != header.get("payload_crc32"):
        raise StateFileError("corrupt (checksum mismatch)")
    return header, tokens, payload
