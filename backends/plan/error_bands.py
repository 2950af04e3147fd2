"""How far the cost model's decode predictions fall from published measurements, per placement.

`plan` shows a range for each candidate: the prediction times the spread of measured /
predicted found for that kind of placement on the table of published runs
(tests/fixtures/external_runs/, benchmarks/plan_vs_world.py, docs/benchmarks.md), and says
which runs back it. The bands are data, copied from `plan_vs_world.py --bands`;
tests/test_world_runs.py recomputes them from the table and fails if they drift.

No library does this: it is a lookup of our own measured error, by our own placement kinds.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ErrorBand:
    low: float  # measured / predicted, 10th percentile of the group's runs
    high: float  # 90th percentile
    runs: tuple[str, ...]  # ids in tests/fixtures/external_runs/runs.csv

    def around(self, predicted: float) -> tuple[float, float]:
        return predicted * self.low, predicted * self.high

    @property
    def note(self) -> str:
        return f"{len(self.runs)} published runs ({self.runs[0]}..{self.runs[-1]})"


# group -> band; regenerate with `benchmarks/plan_vs_world.py --bands`
BANDS: dict[str, ErrorBand] = {
    "cpu": ErrorBand(0.7, 1.16, ("c01", "c02", "c03", "c04", "c05", "c06", "c07", "c08", "c09", "c10", "c11",
                                 "c12", "c13", "c14", "c15", "c16", "c17", "c18")),
    "gpu": ErrorBand(0.68, 1.25, ("g01", "g02", "g03", "g04", "g05", "g06", "g07", "g08", "g09", "g10", "g11",
                                  "g12")),
    "split": ErrorBand(0.78, 1.23, ("s01", "s02", "s03", "s04", "s05", "s06", "s07", "s08", "s09", "s10",
                                    "s11", "s12", "s13", "s14", "s15", "s16", "s17", "s18", "s19", "s20",
                                    "s21", "s22", "s23", "s24", "s25", "s26", "s27", "s28", "s29", "s30",
                                    "s31")),
    "unified": ErrorBand(0.62, 1.14, ("u01", "u02", "u03", "u04", "u05", "u06", "u07", "u08", "u09", "u10",
                                      "u11", "u12", "u13", "u14", "u15", "u16", "u17", "u18", "u19", "u20",
                                      "u21", "u22")),
}


def band_of_ratios(ratios: list[float]) -> tuple[float, float]:
    """(10th, 90th) percentile of measured/predicted ratios (inclusive method: with few runs
    the band reaches towards the extremes rather than past them)."""
    import statistics

    if len(ratios) == 1:
        return ratios[0], ratios[0]
    q = statistics.quantiles(sorted(ratios), n=10, method="inclusive")
    return round(q[0], 2), round(q[-1], 2)


def group_of(placement_kind: str, unified: bool) -> str | None:
    """Which table group backs a candidate's placement (None: no published runs of that kind)."""
    if placement_kind == "cpu":
        return "cpu"
    if placement_kind == "gpu":
        return "unified" if unified else "gpu"
    if placement_kind in ("moe", "layers"):
        return "split"
    return None


def band_for(placement_kind: str, unified: bool) -> ErrorBand | None:
    group = group_of(placement_kind, unified)
    return BANDS.get(group) if group else None
