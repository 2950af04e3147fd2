"""A KV cache whose sliding-window layers hold only their window (gpt-oss's even layers).

Full-attention layers keep a preallocated [Hkv, S_max, Dh] buffer as KVCache does. A
sliding layer with window W needs, for a query at position p, only the keys of positions
p-W+1..p, so it keeps a ring of `W + slack` slots (position p lives in slot p mod size):
llama.cpp's own SWA cache is likewise n_swa + one micro-batch of cells. Memory per sliding
layer is then constant in the context length. f16 like KVCache.

A step's new keys are attended together with the older ones in the ring *before* they are
written (a prefill longer than the ring would otherwise overwrite keys its own earlier
queries still need). Truncating (reusing a conversation's prefix) works as long as the ring
still holds the window before the new end; otherwise `truncate` keeps nothing and says so,
and the engine re-evaluates the prompt — what llama.cpp does with its SWA cache too.

Saved states (instant resume, backends/engines/kv_states.py) hold a full layer's first n
positions and a sliding layer's whole ring (its slots are positions mod size), after the
first position the rings still hold.
"""

from __future__ import annotations

import struct

import torch

from moechat.backends.model.model_card import SWA_CACHE_SLACK

SLACK = SWA_CACHE_SLACK  # extra ring slots: room to step back (prefix reuse) without re-evaluating


class SlidingKVCache:
    savable = True  # export/load below

    def __init__(self, windows: list[int], n_kv_heads: int, head_dim: int, max_tokens: int,
                 dtype: torch.dtype = torch.float16, device="cpu"):
        """windows[l]: layer l's sliding window in tokens, 0 for full attention."""
        self.windows, self.max_tokens = list(windows), max_tokens
        self.sizes = [min(max_tokens, w + SLACK) if w else max_tokens for w in windows]
        self.k = [torch.zeros(n_kv_heads, s, head_dim, dtype=dtype, device=device) for s in self.sizes]
        self.v = [torch.zeros(n_kv_heads, s, head_dim, dtype=dtype, device=device) for s in self.sizes]
        self.length = 0  # positions 0..length-1 hold valid entries (every layer)
        self.oldest = 0  # the first position every ring still holds

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store k/v [T, Hkv, Dh] at positions start..start+T-1. Returns (keys, values, first):
        [Hkv, S, Dh] for positions first..start+T-1 — all of them for a full layer (first 0),
        for a sliding one from the window of the step's first query on."""
        t = k.shape[0]
        end = start + t
        if end > self.max_tokens:
            raise ValueError(f"KV cache full: {end} tokens > {self.max_tokens}")
        window, size = self.windows[layer], self.sizes[layer]
        kb, vb = self.k[layer], self.v[layer]
        if not window or size >= self.max_tokens:  # a plain buffer (the ring never wraps)
            kb[:, start:end] = k.transpose(0, 1)
            vb[:, start:end] = v.transpose(0, 1)
            first = 0 if not window else max(0, start - window + 1)
            return kb[:, first:end], vb[:, first:end], first
        first = max(0, start - window + 1)
        if first < self.oldest:
            raise ValueError(f"sliding KV cache no longer holds position {first}")
        old = torch.arange(first, start, device=kb.device) % size  # slots of the cached part
        keys = torch.cat([kb[:, old], k.transpose(0, 1).to(kb.dtype)], dim=1)  # [Hkv, end-first, Dh]
        values = torch.cat([vb[:, old], v.transpose(0, 1).to(vb.dtype)], dim=1)
        keep = min(t, size)  # only the last `size` new positions can stay
        slots = torch.arange(end - keep, end, device=kb.device) % size
        kb[:, slots] = keys[:, -keep:]
        vb[:, slots] = values[:, -keep:]
        return keys, values, first

    def advance(self, end: int) -> None:
        self.length = end
        for w, size in zip(self.windows, self.sizes):
            if w and size < self.max_tokens:
                self.oldest = max(self.oldest, end - size)

    def truncate(self, length: int) -> int:
        """Forget positions >= length; returns how many positions stay usable (0 when a
        sliding ring no longer holds the window before `length`)."""
        length = min(self.length, length)
        if not self._holds(length, self.oldest):
            length = 0
        if length == 0:
            self.oldest = 0
        self.length = length
        return length

    def _holds(self, length: int, oldest: int) -> bool:
        """Whether rings whose first held position is `oldest` still hold the window before
        `length` (every sliding layer's keys a query at `length` needs)."""
        lowest_needed = min((max(0, length - w + 1) for w in self.windows if w), default=0)
        return not length or lowest_needed >= oldest

    # ---- saved states -----------------------------------------------------------------------
    def restorable(self, payload: bytearray, keep: int) -> bool:
        """Whether `export`'s bytes, once loaded, still hold the window before `keep` (checked
        before loading, so that a state too far ahead does not replace a live cache)."""
        return len(payload) >= 8 and self._holds(keep, struct.unpack_from("<q", payload)[0])

    def _saved(self, n_tokens: int) -> list[tuple[torch.Tensor, int]]:
        """(buffer, positions saved) per buffer: a plain buffer's first n, a ring whole."""
        out = []
        for layer, size in enumerate(self.sizes):
            keep = size if self.windows[layer] and size < self.max_tokens else n_tokens
            out += [(self.k[layer], keep), (self.v[layer], keep)]
        return out

    def export(self, n_tokens: int) -> bytearray:
        """The first position the rings hold (8 bytes), then each layer's K and V
        ([Hkv, n or ring size, Dh] each)."""
        out = bytearray(struct.pack("<q", self.oldest))
        for buffer, keep in self._saved(n_tokens):
            out += buffer[:, :keep].contiguous().cpu().view(torch.uint8).numpy().tobytes()
        return out

    def load(self, payload: bytearray, n_tokens: int) -> bool:
        """Fill the cache from `export`'s bytes for n_tokens positions; False (cache
        untouched) if the bytes do not have this cache's shape."""
        saved = self._saved(n_tokens)
        sizes = [b.shape[0] * keep * b.shape[2] * b.element_size() for b, keep in saved]
        if not 0 < n_tokens <= self.max_tokens or len(payload) != 8 + sum(sizes):
            return False
        (oldest,) = struct.unpack_from("<q", payload)
        if not 0 <= oldest < n_tokens:
            return False
        raw, at = torch.frombuffer(payload, dtype=torch.uint8, offset=8), 0
        for (buffer, keep), size in zip(saved, sizes):
            part = raw[at:at + size].view(buffer.dtype).view(buffer.shape[0], keep, buffer.shape[2])
            buffer[:, :keep] = part.to(buffer.device)
            at += size
        self.length, self.oldest = n_tokens, oldest
        return True
