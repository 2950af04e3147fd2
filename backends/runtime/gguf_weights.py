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
    def __init__(self, path: str):
        import gguf

        self.path = path
        # copy-on-write map: torch can wrap the arrays without a read-only warning; we never
        # write, so every page stays file-backed
        reader = gguf.GGUFReader(path, "c")
        # Keep the metadata values, not the reader's per-field numpy parts: the vocabulary
        # alone is ~50k tiny arrays (~140 MB of Python objects). Tokens come from llama.cpp.
        self.metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
        self.tensors: dict[str, RawTensor] = {}
        for t in reader.tensors:
            self.tensors[t.name] = RawTensor(
                name=t.name,
                type_name=t.tensor_type.name,
                ggml_type=int(t.tensor_type),
                shape=tuple(int(d) for d in t.shape),
                data=t.data,  # a view: keeps the memory map alive
            )

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
