"""HOBBIT's sequence-level expert cache: separate high- and low-precision tiers with byte
budgets, evicting the entry of lowest priority

    p = w_lru·R/T + w_lfu·F/T + w_lhu·H/T + w_fld·(1 − ((l_e − l_now + L) mod L) / L)

R = the expert's last-use time, F = its uses and H = its high-precision uses in this
sequence, T = the current time (tokens into the sequence), l_now = the layer being computed,
L = layers. The last term keeps experts of the layers just ahead. Counters reset per
sequence. Protected keys (prefetched, not yet used) are never evicted.

The cache holds only keys and sizes; the engine keeps the tensors in a dict beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

Key = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True, slots=True)
class PriorityWeights:
    lru: float = 0.25
    lfu: float = 0.25
    lhu: float = 0.25
    fld: float = 0.25

    def __post_init__(self):
        assert min(self.lru, self.lfu, self.lhu, self.fld) >= 0
        assert abs(self.lru + self.lfu + self.lhu + self.fld - 1) < 1e-6, "weights sum to 1"


LRU = PriorityWeights(1.0, 0.0, 0.0, 0.0)
LFU = PriorityWeights(0.0, 1.0, 0.0, 0.0)
# Fitted by `benchmarks/replay_trace.py --fit` on the demo model's recorded traces
# (see docs/benchmarks.md); the paper's own fitted values were not published.
DEFAULT_WEIGHTS = PriorityWeights(lru=0.3, lfu=0.4, lhu=0.1, fld=0.2)


@dataclass(slots=True)
class UseCounters:
    last_use: float = 0.0  # R: time of last use, in tokens (+ layer fraction)
    uses: int = 0  # F
    high_uses: int = 0  # H


def priority(weights: PriorityWeights, c: UseCounters, now: float, layer: int,
             now_layer: int, n_layers: int) -> float:
    t = max(now, 1e-9)
    distance = (layer - now_layer + n_layers) % n_layers
    return (weights.lru * c.last_use / t + weights.lfu * c.uses / t
            + weights.lhu * c.high_uses / t + weights.fld * (1 - distance / n_layers))


class Tier:
    """One precision's cache: keys and their bytes within a budget."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.sizes: dict[Key, int] = {}

    @property
    def used(self) -> int:
        return sum(self.sizes.values())

    def __contains__(self, key: Key) -> bool:
        return key in self.sizes


class HobbitCache:
    """High and low tiers sharing per-sequence counters."""

    def __init__(self, high_budget: int, low_budget: int, n_layers: int,
                 weights: PriorityWeights = DEFAULT_WEIGHTS):
        self.high, self.low = Tier(high_budget), Tier(low_budget)
        self.n_layers, self.weights = n_layers, weights
        self.counters: dict[Key, UseCounters] = {}
        self.protected: set[Key] = set()
        self.now = 0.0  # tokens into the sequence (+ layer fraction)
        self.now_layer = 0

    def begin_sequence(self) -> None:
        """New sequence: counters restart (cached weights stay)."""
        self.counters.clear()
        self.protected.clear()
        self.now = 0.0

    def advance(self, token: int, layer: int) -> None:
        """Set the clock: `token` tokens into the sequence, now computing `layer`."""
        self.now = token + 1 + layer / self.n_layers
        self.now_layer = layer

    def tier(self, high: bool) -> Tier:
        return self.high if high else self.low

    def touch(self, key: Key, high: bool) -> None:
        c = self.counters.setdefault(key, UseCounters())
        c.last_use, c.uses = self.now, c.uses + 1
        c.high_uses += int(high)
        self.protected.discard(key)

    def priority(self, key: Key) -> float:
        c = self.counters.get(key) or UseCounters()
        return priority(self.weights, c, self.now, key[0], self.now_layer, self.n_layers)

    def insert(self, key: Key, high: bool, nbytes: int, protect: bool = False
               ) -> tuple[bool, list[Key]]:
        """Make room (evicting lowest priority first, never protected or `key`) and add.
        Returns (inserted, evicted keys). Not inserted when the budget cannot hold it."""
        tier = self.tier(high)
        if key in tier:
            return True, []
        if nbytes > tier.budget:
            return False, []
        evicted: list[Key] = []
        free = tier.budget - tier.used
        if free < nbytes:
            candidates = sorted((k for k in tier.sizes if k not in self.protected),
                                key=self.priority)
            if free + sum(tier.sizes[k] for k in candidates) < nbytes:
                return False, []  # everything that would have to go is protected
            for victim in candidates:
                if free >= nbytes:
                    break
                free += tier.sizes.pop(victim)
                evicted.append(victim)
        tier.sizes[key] = nbytes
        if protect:
            self.protected.add(key)
        return True, evicted

    def release_layer(self, layer: int) -> None:
        """The layer was computed: prefetches for it that went unused lose protection."""
        self.protected = {k for k in self.protected if k[0] != layer}
