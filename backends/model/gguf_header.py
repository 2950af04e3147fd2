"""Parse a GGUF header — key/value metadata and the tensor-info table — from a byte stream.

No tensor data is touched, so the same parser serves a local file (`read_model_card`) and
the first few MB of a remote file fetched with HTTP range requests (`hub.read_remote_card`).
Layout (GGUF v2/v3, little endian): magic, version u32, n_tensors u64, n_kv u64, the KV
pairs, the tensor infos (name, n_dims u32, dims u64 x n_dims, type u32, offset u64), then
padding to `general.alignment`; tensor offsets count from the end of that padding.

Big arrays (tokenizer vocabularies, merges, scores) are walked but not kept: a model card
needs scalars and short per-layer arrays only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_KEPT_ARRAY = 4096  # longer arrays are skipped (value None): vocabularies, merges
MAX_STRING = 1 << 30

# GGUF value type -> struct format of one item (8 = string and 9 = array handled apart)
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
                   10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class HeaderError(ValueError):
    """The bytes are not a well-formed GGUF header (message is one line, no path)."""


class NeedMoreBytes(HeaderError):
    """The stream ended inside the header (a truncated file, or a too-short prefix)."""


@dataclass(frozen=True, slots=True)
class RawTensor:
    name: str
    type_name: str  # GGML type, e.g. "Q4_K"
    shape: tuple[int, ...]  # GGUF order: ne0 (innermost) first
    n_bytes: int
    offset: int  # absolute offset of the data in the file


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    version: int
    metadata: dict  # key -> int | float | bool | str | list | None (None: long array skipped)
    tensors: tuple[RawTensor, ...]
    data_offset: int  # where tensor data starts = bytes of header + padding


def parse_header(read: Callable[[int], bytes], max_tensors: int = 1_000_000,
                 max_kv: int = 100_000) -> GGUFHeader:
    """Parse a GGUF header from `read(n)`, which returns up to n bytes (fewer only at the end)."""
    stream = _Stream(read)
    if stream.take(4) != GGUF_MAGIC:
        raise HeaderError("bad magic")
    version, n_tensors, n_kv = stream.unpack("<IQQ")
    if version not in (2, 3):
        raise HeaderError(f"unsupported GGUF version {version}")
    if n_tensors > max_tensors or n_kv > max_kv:
        raise HeaderError(f"claims {n_tensors:,} tensors and {n_kv:,} metadata keys")

    metadata = {}
    for _ in range(n_kv):
        key = stream.string()
        (value_type,) = stream.unpack("<I")
        metadata[key] = stream.value(value_type)

    import gguf  # type tables; imported here because it pulls numpy

    infos = []
    for _ in range(n_tensors):
        name = stream.string()
        (n_dims,) = stream.unpack("<I")
        if n_dims > 8:
            raise HeaderError(f"tensor {name!r} has {n_dims} dimensions")
        shape = stream.unpack(f"<{n_dims}Q")
        type_id, offset = stream.unpack("<IQ")
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise HeaderError(f"tensor {name!r} has unknown type {type_id}") from None
        n_elements = 1
        for dim in shape:
            n_elements *= dim
        if n_elements % block:
            raise HeaderError(f"tensor {name!r}: {n_elements} elements is not whole {qtype.name} blocks")
        infos.append((name, qtype.name, tuple(shape), n_elements // block * type_size, offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise HeaderError(f"bad general.alignment {alignment!r}")
    data_offset = -(-stream.position // alignment) * alignment
    tensors = tuple(RawTensor(name, type_name, shape, n_bytes, data_offset + offset)
                    for name, type_name, shape, n_bytes, offset in infos)
    return GGUFHeader(version, metadata, tensors, data_offset)


class _Stream:
    def __init__(self, read: Callable[[int], bytes]):
        self._read = read
        self.position = 0

    def take(self, n: int) -> bytes:
        data = self._read(n)
        if len(data) < n:
            raise NeedMoreBytes(f"header ends early (at byte {self.position + len(data):,})")
        self.position += n
        return data

    def skip(self, n: int) -> None:
        # read in slices so a corrupt length cannot allocate gigabytes at once
        while n > 0:
            step = min(n, 1 << 20)
            self.take(step)
            n -= step

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        if length > MAX_STRING:
            raise HeaderError(f"string of {length:,} bytes")
        return self.take(length).decode("utf-8", errors="replace")

    def value(self, value_type: int):
        if value_type in _SCALAR_FORMATS:
            return self.unpack("<" + _SCALAR_FORMATS[value_type])[0]
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.unpack("<IQ")
            return self._array(item_type, count)
        raise HeaderError(f"unknown metadata value type {value_type}")

    def _array(self, item_type: int, count: int):
        if item_type in _SCALAR_FORMATS:
            fmt = "<" + _SCALAR_FORMATS[item_type]
            n_bytes = struct.calcsize(fmt) * count
            if count > MAX_KEPT_ARRAY:
                self.skip(n_bytes)
                return None
            return list(struct.unpack(f"<{count}{fmt[1]}", self.take(n_bytes)))
        if item_type == _STRING:
            if count > MAX_KEPT_ARRAY:
                for _ in range(count):
                    (length,) = self.unpack("<Q")
                    if length > MAX_STRING:
                        raise HeaderError(f"string of {length:,} bytes")
                    self.skip(length)
                return None
            return [self.string() for _ in range(count)]
        if item_type == _ARRAY:
            items = [self.value(_ARRAY) for _ in range(count)]
            return items if count <= MAX_KEPT_ARRAY else None
        raise HeaderError(f"unknown array item type {item_type}")
