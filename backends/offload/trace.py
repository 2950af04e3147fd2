"""Routing traces: which experts every layer picked for every token, with their gate weights.

A trace is what the policies are tested and tuned on without a model. Axes:
N tokens (all sequences concatenated), L layers, A active experts per token, P prefetch depth.

Format (one .npz): expert_ids [N, L, A] int16, gate_weights [N, L, A] float32 (the
normalised weights the model mixes with, highest first), seq_starts [S] int64 (token index
where each sequence begins: per-sequence counters reset there), prefill [N] bool (token was
part of a prompt), optional predicted [N, L, P, A] int16 (the stacked-router guess made at
layer l for layers l+1..l+P, -1 past the last layer), and a JSON header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1


@dataclass(slots=True)
class RoutingTrace:
    n_experts: int
    expert_ids: np.ndarray  # [N, L, A] int16
    gate_weights: np.ndarray  # [N, L, A] float32
    seq_starts: np.ndarray  # [S] int64, first entry 0
    prefill: np.ndarray  # [N] bool
    predicted: np.ndarray | None = None  # [N, L, P, A] int16
    model: str = ""

    def __post_init__(self):
        assert self.expert_ids.ndim == 3 and self.expert_ids.shape == self.gate_weights.shape
        assert self.prefill.shape == (self.n_tokens,)
        assert len(self.seq_starts) >= 1 and self.seq_starts[0] == 0
        if self.predicted is not None:
            assert self.predicted.shape[:2] == self.expert_ids.shape[:2]
        assert self.n_tokens == 0 or int(self.expert_ids.max()) < self.n_experts

    @property
    def n_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def n_layers(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    def counts(self) -> np.ndarray:
        """How often each (layer, expert) was selected: [L, E] int64."""
        out = np.zeros((self.n_layers, self.n_experts), dtype=np.int64)
        for layer in range(self.n_layers):
            out[layer] = np.bincount(self.expert_ids[:, layer].ravel(), minlength=self.n_experts)
        return out

    def sequences(self) -> list[tuple[int, int]]:
        """[start, end) token ranges of the sequences."""
        ends = list(self.seq_starts[1:]) + [self.n_tokens]
        return [(int(s), int(e)) for s, e in zip(self.seq_starts, ends)]

    def split(self, fraction: float) -> tuple["RoutingTrace", "RoutingTrace"]:
        """Split at a sequence boundary near `fraction` of the tokens (fit / hold-out)."""
        seqs = self.sequences()
        cut = next((s for s, _ in seqs if s >= fraction * self.n_tokens and s > 0), seqs[-1][0])
        return self.slice(0, cut), self.slice(cut, self.n_tokens)

    def slice(self, start: int, end: int) -> "RoutingTrace":
        starts = [s - start for s in self.seq_starts if start <= s < end]
        if not starts or starts[0] != 0:
            starts = [0] + starts
        pred = None if self.predicted is None else self.predicted[start:end]
        return RoutingTrace(self.n_experts, self.expert_ids[start:end],
                            self.gate_weights[start:end], np.asarray(starts, dtype=np.int64),
                            self.prefill[start:end], pred, self.model)

    def decode_only(self) -> "RoutingTrace":
        """The generated tokens only (prompts dropped), sequences kept apart."""
        keep = ~self.prefill
        starts, n = [], 0
        for start, end in self.sequences():
            if n not in starts:
                starts.append(n)
            n += int(keep[start:end].sum())
        if starts and starts[-1] == n and n > 0:
            starts.pop()
        pred = None if self.predicted is None else self.predicted[keep]
        return RoutingTrace(self.n_experts, self.expert_ids[keep], self.gate_weights[keep],
                            np.asarray(starts or [0], dtype=np.int64), self.prefill[keep], pred,
                            self.model)

    def save(self, path: Path) -> None:
        header = json.dumps({"version": FORMAT_VERSION, "n_experts": self.n_experts,
                             "model": self.model})
        arrays = dict(expert_ids=self.expert_ids, gate_weights=self.gate_weights,
                      seq_starts=self.seq_starts, prefill=self.prefill,
                      header=np.frombuffer(header.encode(), dtype=np.uint8))
        if self.predicted is not None:
            arrays["predicted"] = self.predicted
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)


def load_trace(path: Path) -> RoutingTrace:
    with np.load(Path(path)) as data:
        header = json.loads(bytes(data["header"]).decode())
        if header.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: trace format {header.get('version')}, "
                             f"expected {FORMAT_VERSION}")
        return RoutingTrace(
            n_experts=int(header["n_experts"]),
            expert_ids=data["expert_ids"].astype(np.int16),
            gate_weights=data["gate_weights"].astype(np.float32),
            seq_starts=data["seq_starts"].astype(np.int64),
            prefill=data["prefill"].astype(bool),
            predicted=data["predicted"].astype(np.int16) if "predicted" in data else None,
            model=header.get("model", ""),
        )


class TraceRecorder:
    """Collects routing layer by layer during forwards; one `end_step()` per forward.

    Engines call `record(layer, expert_ids, gate_weights[, predicted])` from their expert
    hook; `begin_sequence()` marks a new conversation (counters reset there)."""

    def __init__(self, n_layers: int, n_experts: int, prefetch_depth: int = 0, model: str = ""):
        self.n_layers, self.n_experts, self.depth, self.model = n_layers, n_experts, prefetch_depth, model
        self._steps: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, bool]] = []
        self._layers: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        self._seq_starts: list[int] = [0]
        self._n = 0

    def begin_sequence(self) -> None:
        if self._n and self._seq_starts[-1] != self._n:
            self._seq_starts.append(self._n)

    def record(self, layer: int, expert_ids, gate_weights, predicted=None) -> None:
        """expert_ids, gate_weights [T, A]; predicted [T, P, A] (numpy or torch)."""
        ids = np.asarray(_to_numpy(expert_ids), dtype=np.int16)
        w = np.asarray(_to_numpy(gate_weights), dtype=np.float32)
        p = None if predicted is None else np.asarray(_to_numpy(predicted), dtype=np.int16)
        self._layers[layer] = (ids, w, p)

    def end_step(self, prefill: bool) -> None:
        if not self._layers:
            return
        assert sorted(self._layers) == list(range(self.n_layers)), "a layer was not recorded"
        ids = np.stack([self._layers[l][0] for l in range(self.n_layers)], axis=1)  # [T, L, A]
        w = np.stack([self._layers[l][1] for l in range(self.n_layers)], axis=1)
        p = None
        if self.depth:
            t, a = ids.shape[0], ids.shape[2]
            p = np.full((t, self.n_layers, self.depth, a), -1, dtype=np.int16)
            for l in range(self.n_layers):
                guess = self._layers[l][2]
                if guess is not None:
                    p[:, l, : guess.shape[1]] = guess
        self._steps.append((ids, w, p, prefill))
        self._n += ids.shape[0]
        self._layers = {}

    def trace(self) -> RoutingTrace:
        if not self._steps:
            empty = np.zeros((0, self.n_layers, 1), dtype=np.int16)
            return RoutingTrace(self.n_experts, empty, empty.astype(np.float32),
                                np.zeros(1, np.int64), np.zeros(0, bool), model=self.model)
        pred = None
        if self.depth:
            pred = np.concatenate([s[2] for s in self._steps])
        return RoutingTrace(
            n_experts=self.n_experts,
            expert_ids=np.concatenate([s[0] for s in self._steps]),
            gate_weights=np.concatenate([s[1] for s in self._steps]),
            seq_starts=np.asarray(self._seq_starts, dtype=np.int64),
            prefill=np.concatenate([np.full(len(s[0]), s[3]) for s in self._steps]),
            predicted=pred, model=self.model)


def _to_numpy(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return x
