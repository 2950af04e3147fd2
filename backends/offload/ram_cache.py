"""Pure: which expert of a layer lives in which RAM slot, and which one to evict.

The disk tier keeps, per MoE layer, S fixed slots (byte-identical in size: every expert of
a layer has the same shape), so a layer's cached experts form one stacked buffer that
ggml's mul_mat_id reads with slot ids. This module only decides: lookups, slot choice on a
miss (a free slot, else the lowest-priority unprotected expert), use counters.

Policies: "lru" (the baseline) and "hobbit": HOBBIT's priority
p = w_lru·R/T + w_lfu·F/T + w_lhu·H/T + w_fld·(layer-distance term), from hobbit_cache.py.
With one slot pool per layer the distance term is the same for every candidate and drops
out; every use is high precision, so H = F. Counters reset per sequence (reply).
"""

from __future__ import annotations

from moechat.backends.offload.hobbit_cache import DEFAULT_WEIGHTS, PriorityWeights, UseCounters, priority

POLICIES = ("lru", "hobbit")


class SlotCache:
    def __init__(self, n_layers: int, slots: int, policy: str = "hobbit",
                 weights: PriorityWeights = DEFAULT_WEIGHTS):
        if policy not in POLICIES:
            raise ValueError(f"unknown cache policy {policy!r} (choose from {', '.join(POLICIES)})")
        assert slots > 0
        self.n_layers, self.slots, self.policy, self.weights = n_layers, slots, policy, weights
        self.where: list[dict[int, int]] = [{} for _ in range(n_layers)]  # expert -> slot
        self.owner: list[list[int]] = [[-1] * slots for _ in range(n_layers)]  # slot -> expert
        self.counters: dict[tuple[int, int], UseCounters] = {}
        self.now = 0.0

    def begin_sequence(self) -> None:
        self.counters.clear()
        self.now = 0.0

    def advance(self, token: int, layer: int) -> None:
        """Time moves in tokens, with layers as fractions (so recency orders within a token)."""
        self.now = token + 1 + layer / self.n_layers

    def slot_of(self, layer: int, expert: int) -> int | None:
        return self.where[layer].get(expert)

    def touch(self, layer: int, expert: int) -> None:
        c = self.counters.setdefault((layer, expert), UseCounters())
        c.last_use = self.now
        c.uses += 1
        c.high_uses += 1

    def assign(self, layer: int, expert: int, protected: frozenset[int] | set[int] = frozenset()) -> tuple[int, int]:
        """A slot for `expert` (not cached): a free one, else the victim's. `protected`
        experts (this step's other selections, reads in flight) are never evicted.
        Returns (slot, evicted expert or -1)."""
        owners = self.owner[layer]
        assert expert not in self.where[layer], "already cached"
        free = [s for s, e in enumerate(owners) if e < 0]
        if free:
            slot, victim = free[0], -1
        else:
            candidates = [s for s, e in enumerate(owners) if e not in protected]
            if not candidates:
                raise RuntimeError(f"layer {layer}: all {self.slots} slots are protected")
            slot = min(candidates, key=lambda s: self._priority(layer, owners[s]))
            victim = owners[slot]
            del self.where[layer][victim]
        owners[slot] = expert
        self.where[layer][expert] = slot
        return slot, victim

    def forget(self, layer: int, expert: int) -> None:
        """Drop an entry whose read failed (its slot holds garbage)."""
        slot = self.where[layer].pop(expert, None)
        if slot is not None:
            self.owner[layer][slot] = -1

    def _priority(self, layer: int, expert: int) -> float:
        c = self.counters.get((layer, expert))
        if c is None:
            return -1.0  # never used in this sequence: first to go
        if self.policy == "lru":
            return c.last_use
        return priority(self.weights, c, self.now, layer, layer, self.n_layers)
