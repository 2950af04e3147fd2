"""A GGUF file's tensors, read in place through the gguf reader's memory map.

Nothing is copied at load: each tensor is a numpy view on the mapped file. Quantized bytes
go to ggml's kernels as they lie; small dense tensors (norms, biases) are dequantized to
torch on request. The pages the OS maps in are file-backed (shared with the page cache),
so resident memory stays near the file size however often we read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moechat.backends.model.gguf_header import parse_header
from moechat.kernels import dequant
from moechat.kernels.ggml import QuantWeight


@dataclass(frozen=True)
class RawTensor:
    name: str
    type_name: str  # "Q4_0", "F16", ...
    ggml_type: int
    shape: tuple[int, ...]  # ggml order: ne0 (input dim) first
    data: np.ndarray  # view on the memory map (uint8 blocks, or float values for F32/F16)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    def quant_weight(self) -> QuantWeight:
        return QuantWeight(self.data, self.ggml_type, self.shape)

    def to_torch(self, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return dequant.dequantize(self.data, self.type_name, self.torch_shape, dtype=dtype, device=device)


class GGUFWeights:
    """The tensors of a GGUF file as views on one read-only memory map, plus its metadata.

    The header is parsed by backends/model/gguf_header.py, not gguf.GGUFReader: the reader turns every
    vocabulary entry into numpy arrays (seconds and ~140 MB for a 49k vocabulary) while we
    only need the scalars; tokens come from llama.cpp itself."""

    def __init__(self, path: str):
        import gguf

        self.path = str(path)
        # copy-on-write map: torch can wrap the arrays without a read-only warning; we never
        # write, so every page stays file-backed
        self.map = np.memmap(self.path, dtype=np.uint8, mode="c")
        with open(self.path, "rb") as f:
            header = parse_header(f.read)
        # long arrays (the vocabulary) come back as None: tokens come from llama.cpp itself
        self.metadata = {k: v for k, v in header.metadata.items() if v is not None}
        self.tensors: dict[str, RawTensor] = {}
        for info in header.tensors:
            name, shape = info.name, info.shape
            qtype = gguf.GGMLQuantizationType[info.type_name]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            row_bytes = shape[0] // block * size
            n_rows = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
            start = info.offset
            raw = self.map[start : start + row_bytes * n_rows]
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                raw = raw.view(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
                data = raw.reshape(tuple(reversed(shape)))
            else:
                data = raw.reshape(tuple(reversed(shape[1:])) + (row_bytes,))
            self.tensors[name] = RawTensor(name, qtype.name, int(qtype), shape, data)

    def release(self, name: str) -> None:
        """Drop this tensor's pages from our mapping (after copying it elsewhere, e.g. into a
        repacked ggml buffer): they stop counting in our RSS and stay in the OS page cache,
        so a later read of the bytes faults them back in from there."""
        import mmap

        t = self.tensors[name]
        start = t.data.ctypes.data - self.map.ctypes.data
        page = mmap.PAGESIZE
        lo, hi = start // page * page, -(-(start + t.data.nbytes) // page) * page
        self.map._mmap.madvise(mmap.MADV_DONTNEED, lo, min(hi, self.map.nbytes) - lo)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def raw(self, name: str) -> RawTensor:
        return self.tensors[name]

    def get(self, name: str) -> RawTensor | None:
        return self.tensors.get(name)

    def dense(self, name: str, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return self.tensors[name].to_torch(dtype, device)

    def rows(self, name: str, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Rows `ids` of a 2-D tensor, dequantized (the embedding lookup): [T] -> [T, D]."""
        t = self.tensors[name]
        picked = t.data[ids.cpu().numpy()]
        return dequant.dequantize(picked, t.type_name, (len(ids), t.shape[0]), dtype=dtype)
