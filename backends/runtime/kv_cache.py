"""The KV cache: one explicit object, a preallocated [L, Hkv, S_max, Dh] buffer per K and V.

Stored in float16 by default, as llama.cpp does (its default cache type is f16), so that the
attention sees the same rounded keys and values. On the CPU the buffer is allocated zeroed
and lazily (the OS maps pages on first write), so a long context costs memory only as it
fills; on a GPU the whole buffer is committed up front.
"""

from __future__ import annotations

import torch


class KVCache:
    savable = True  # export/load below serve instant resume (backends/engines/kv_states.py)

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_tokens: int,
                 dtype: torch.dtype = torch.float16, device="cpu"):
        shape = (n_layers, n_kv_heads, max_tokens, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_tokens = max_tokens
        self.length = 0  # positions 0..length-1 hold valid entries (every layer)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store k/v [T, Hkv, Dh] at positions start..start+T-1; return [Hkv, start+T, Dh] views."""
        end = start + k.shape[0]
        if end > self.max_tokens:
            raise ValueError(f"KV cache full: {end} tokens > {self.max_tokens}")
        self.k[layer, :, start:end] = k.transpose(0, 1)
        self.v[layer, :, start:end] = v.transpose(0, 1)
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, end: int) -> None:
        self.length = end

    def truncate(self, length: int) -> int:
        """Forget positions >= length (later writes overwrite them); returns the positions kept."""
        self.length = min(self.length, length)
        return self.length

    # ---- saved states (backends/engines/kv_states.py) -------------------------------------
    def buffers(self) -> list[torch.Tensor]:
        """The [L, Hkv, S_max, D] buffers a saved state holds: keys, then values if kept apart."""
        return [b for b in (self.k, self.v) if b is not None]

    def restorable(self, payload: bytearray, keep: int) -> bool:
        """Whether a state, once loaded, can be cut back to `keep` positions: always here."""
        return True

    def export(self, n_tokens: int) -> bytearray:
        """Positions 0..n_tokens-1 of each buffer, as raw bytes ([L, Hkv, n, D] each, in turn)."""
        out = bytearray()
        for buffer in self.buffers():
            part = buffer[:, :, :n_tokens].contiguous().cpu()
            out += part.view(torch.uint8).numpy().tobytes()
        return out

    def load(self, payload: bytearray, n_tokens: int) -> bool:
        """Fill positions 0..n_tokens-1 from `export`'s bytes; False (cache untouched) if the
        bytes do not have this cache's shape."""
        sizes = [b.shape[0] * b.shape[1] * n_tokens * b.shape[3] * b.element_size() for b in self.buffers()]
        if n_tokens > self.max_tokens or n_tokens < 1 or len(payload) != sum(sizes):
            return False
        raw, at = torch.frombuffer(payload, dtype=torch.uint8), 0
        for buffer, size in zip(self.buffers(), sizes):
            layers, heads, _, dim = buffer.shape
            part = raw[at:at + size].view(buffer.dtype).view(layers, heads, n_tokens, dim)
            buffer[:, :, :n_tokens] = part.to(buffer.device)
            at += size
        self.length = n_tokens
        return True
