"""Pure: which (layer, expert) lives in which RAM slot, and which one to evict.

The disk tier keeps one pool of fixed-size slots for every MoE layer whose experts share a
shape and type (all of them, in most files): each slot holds one expert's bytes exactly as
they lie in the file, and the pool is one stacked buffer ggml's mul_mat_id reads with slot
ids. Sharing the pool across layers is what lets a model run with room for a single
layer's selected experts (top-k slots), and lets popular experts of any layer stay.
This module only decides: lookups, slot choice on a miss (a free slot, else the
lowest-priority unprotected entry), use counters.

Policies: "lru" (the baseline) and "hobbit": HOBBIT's priority
p = w_lru·R/T + w_lfu·F/T + w_lhu·H/T + w_fld·(1 − ((l − l_now + L) mod L)/L)
from hobbit_cache.py (every use is high precision here, so H = F). Counters reset per
sequence (reply).
"""

from __future__ import annotations

from moechat.backends.offload.hobbit_cache import DEFAULT_WEIGHTS, PriorityWeights, UseCounters, priority

POLICIES = ("lru", "hobbit")
Key = tuple[int, int]  # (layer, expert)


class SlotCache:
    def __init__(self, n_layers: int, slots: int, policy: str = "hobbit",
                 weights: PriorityWeights = DEFAULT_WEIGHTS):
        if policy not in POLICIES:
            raise ValueError(f"unknown cache policy {policy!r} (choose from {', '.join(POLICIES)})")
        assert slots > 0
        self.n_layers, self.slots, self.policy, self.weights = n_layers, slots, policy, weights
        self.where: dict[Key, int] = {}  # (layer, expert) -> slot
        self.owner: list[Key | None] = [None] * slots  # slot -> (layer, expert)
        self.counters: dict[Key, UseCounters] = {}
        self.now, self.now_layer = 0.0, 0

    def begin_sequence(self) -> None:
        self.counters.clear()
        self.now = 0.0

    def advance(self, token: int, layer: int) -> None:
        """Time moves in tokens, with layers as fractions (so recency orders within a token)."""
        self.now = token + 1 + layer / self.n_layers
        self.now_layer = layer

    def slot_of(self, key: Key) -> int | None:
        return self.where.get(key)

    def touch(self, key: Key) -> None:
        c = self.counters.setdefault(key, UseCounters())
        c.last_use = self.now
        c.uses += 1
        c.high_uses += 1

    def assign(self, key: Key, protected=frozenset()) -> tuple[int, Key | None]:
        """A slot for `key` (not cached): a free one, else the victim's. `protected` keys
        (this step's other selections, reads in flight) are never evicted; RuntimeError
        when every slot is protected. Returns (slot, evicted key or None)."""
        assert key not in self.where, "already cached"
        try:
            slot, victim = self.owner.index(None), None
        except ValueError:
            candidates = [s for s, k in enumerate(self.owner) if k not in protected]
            if not candidates:
                raise RuntimeError(f"all {self.slots} slots are protected") from None
            slot = min(candidates, key=lambda s: self._priority(self.owner[s]))
            victim = self.owner[slot]
            del self.where[victim]
        self.owner[slot] = key
        self.where[key] = slot
        return slot, victim

    def free_slots(self, protected) -> int:
        """Slots a new entry could take without evicting a protected one."""
        return sum(1 for k in self.owner if k is None or k not in protected)

    def forget(self, key: Key) -> None:
        """Drop an entry whose read failed (its slot holds garbage)."""
        slot = self.where.pop(key, None)
        if slot is not None:
            self.owner[slot] = None

    def _priority(self, key: Key) -> float:
        c = self.counters.get(key)
        if c is None:
            return -1.0  # never used in this sequence: first to go
        if self.policy == "lru":
            return c.last_use
        return priority(self.weights, c, self.now, key[0], self.now_layer, self.n_layers)
