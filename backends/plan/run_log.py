"""Real runs measured beside what the plan predicted, and the corrections drawn from them.

Every real reply long enough to time (`ask`, the chat app) is stored with the cost model's
prediction for the same model, engine and placement on the profile it was made with. From the
last few runs of one model and placement the planner takes a correction factor (the median of
measured / predicted), so a profile measured on a busy machine stops misleading the plan after
a few replies; and when the last runs of *any* model all missed by more than DRIFT, the profile
itself is stale and is re-measured when the machine is idle (`profile_drifted`): by `plan`,
`profile` and the idle chat app (`remeasure_if_drifted`); `ask`, one-shot and scripted, only
says so, once per profile (`stale_profile_hint`).

Runs count only against the profile they were predicted with (its `measured_at`): a re-measured
profile starts without corrections. The store is SQLite in the cache dir (safe to delete).
Why by hand: a few rows in the standard library's sqlite3; no library keeps this.
"""

from __future__ import annotations

import sqlite3
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

FILE_NAME = "runs.sqlite3"
CORRECTION_RUNS = 3  # the last this-many runs of a model and placement make its correction
MIN_DECODE_TOKENS = 16  # shorter replies are mostly warm-up: not stored
MIN_PREFILL_TOKENS = 32  # prompts shorter than this say little about batch prefill speed
DRIFT = 0.25  # predictions off by more than this on DRIFT_RUNS runs: re-measure the profile
DRIFT_RUNS = 3
KEEP_ROWS = 2000

SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    model TEXT NOT NULL,
    placement TEXT NOT NULL,
    profile TEXT NOT NULL,
    threads INTEGER,
    prompt_tokens INTEGER NOT NULL,
    decode_tokens INTEGER NOT NULL,
    predicted_prefill REAL NOT NULL,
    predicted_decode REAL NOT NULL,
    measured_prefill REAL NOT NULL,
    measured_decode REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS run_key ON run (model, placement, profile);
CREATE TABLE IF NOT EXISTS stale_hint (profile TEXT PRIMARY KEY, at REAL NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Run:
    model: str  # model_key()
    placement: str  # placement_key()
    profile: str  # the profile's measured_at
    threads: int | None
    prompt_tokens: int  # prompt tokens evaluated (not reused from the KV cache)
    decode_tokens: int
    predicted_prefill: float
    predicted_decode: float
    measured_prefill: float
    measured_decode: float
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class Correction:
    decode: float  # multiply the cost model's decode tok/s by this
    prefill: float  # and its prefill tok/s by this (1.0 without long enough prompts)
    runs: int  # runs it was drawn from
    last: Run  # the latest of them

    def describe(self) -> str:
        return f"x{self.decode:.2f} from {self.runs} run{'s' if self.runs != 1 else ''}"


def model_key(card) -> str:
    """A model file by name and size (a re-downloaded or re-quantized file is a new model)."""
    path = Path(card.path)
    try:
        size = path.stat().st_size
    except OSError:
        size = card.tensor_bytes
    return f"{path.name}:{size}"


def placement_key(engine: str, placement: str, n_cpu_moe: int | None) -> str:
    return f"{engine}|{placement}|{n_cpu_moe if n_cpu_moe is not None else ''}"


class RunLog:
    def __init__(self, path: Path | None = None):
        if path is None:
            import os

            from moechat.backends.paths import cache_dir

            override = os.environ.get("MOECHAT_RUN_LOG")  # tests keep theirs out of the user's
            path = Path(override) if override else cache_dir() / FILE_NAME
        self.path = path
        self._db = sqlite3.connect(path, timeout=10)
        self._db.executescript(SCHEMA)

    def add(self, run: Run) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO run (at, model, placement, profile, threads, prompt_tokens, decode_tokens,"
                " predicted_prefill, predicted_decode, measured_prefill, measured_decode)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (run.at or time.time(), run.model, run.placement, run.profile, run.threads,
                 run.prompt_tokens, run.decode_tokens, run.predicted_prefill, run.predicted_decode,
                 run.measured_prefill, run.measured_decode))
            self._db.execute("DELETE FROM run WHERE id <= (SELECT MAX(id) FROM run) - ?", (KEEP_ROWS,))

    def recent(self, profile: str, model: str | None = None, placement: str | None = None,
               n: int = CORRECTION_RUNS) -> list[Run]:
        """The last n runs against this profile (of one model and placement, if given), newest first."""
        where, args = ["profile = ?"], [profile]
        if model is not None:
            where.append("model = ?")
            args.append(model)
        if placement is not None:
            where.append("placement = ?")
            args.append(placement)
        rows = self._db.execute(
            "SELECT model, placement, profile, threads, prompt_tokens, decode_tokens, predicted_prefill,"
            " predicted_decode, measured_prefill, measured_decode, at FROM run WHERE "
            + " AND ".join(where) + " ORDER BY id DESC LIMIT ?", (*args, n)).fetchall()
        return [Run(*row) for row in rows]

    def first_hint(self, profile: str) -> bool:
        """True the first time this is asked for `profile` (the stale-profile hint is said once)."""
        with self._db:
            return self._db.execute("INSERT OR IGNORE INTO stale_hint (profile, at) VALUES (?, ?)",
                                    (profile, time.time())).rowcount == 1

    def close(self) -> None:
        self._db.close()


def correction(runs: list[Run]) -> Correction | None:
    """The median ratio measured / predicted over `runs` (newest first); None without runs."""
    if not runs:
        return None
    decode = statistics.median(r.measured_decode / r.predicted_decode for r in runs)
    long_prompts = [r for r in runs if r.prompt_tokens >= MIN_PREFILL_TOKENS and r.measured_prefill > 0]
    prefill = (statistics.median(r.measured_prefill / r.predicted_prefill for r in long_prompts)
               if long_prompts else 1.0)
    return Correction(decode=decode, prefill=prefill, runs=len(runs), last=runs[0])


def corrections_for(card, profile, log: RunLog | None = None) -> dict[str, Correction]:
    """placement_key -> Correction for this model on this profile (empty before any run)."""
    if not getattr(profile, "measured_at", ""):
        return {}
    own = log is None
    log = log or _open_quietly()
    if log is None:
        return {}
    try:
        key = model_key(card)
        placements = {r.placement for r in log.recent(profile.measured_at, key, n=100)}
        out = {}
        for placement in placements:
            found = correction(log.recent(profile.measured_at, key, placement))
            if found is not None:
                out[placement] = found
        return out
    finally:
        if own:
            log.close()


def profile_drifted(profile, log: RunLog | None = None) -> bool:
    """The last DRIFT_RUNS runs (any model) against this profile all missed by more than DRIFT."""
    if not profile.measured_at:
        return False
    own = log is None
    log = log or _open_quietly()
    if log is None:
        return False
    try:
        runs = log.recent(profile.measured_at, n=DRIFT_RUNS)
    finally:
        if own:
            log.close()
    return len(runs) == DRIFT_RUNS and all(
        abs(r.measured_decode / r.predicted_decode - 1) > DRIFT for r in runs)


def record_run(card, engine: str, placement: str, n_cpu_moe: int | None, n_ctx: int, last,
               log: RunLog | None = None, planned=None) -> Run | None:
    """Store one finished reply (`last`: its final Event) beside the cost model's uncorrected
    prediction on this machine's measured profile. Nothing is stored for short replies, or
    before the machine was ever measured (nominal speeds predict nothing worth correcting).
    `planned`: the candidate the engine was opened from, when the plan chose it — its
    prediction is the one to keep (a plan made now, with the model loaded, would see the
    memory the engine itself holds as taken: a streamed model would no longer "fit")."""
    from moechat.backends.plan.hardware_profile import load_profile, profile_path
    from moechat.backends.plan.planner import NoFitError, make_plan

    stats = dict(last.stats)
    decoded = int(stats.get("decoded_tokens", 0))
    if decoded < MIN_DECODE_TOKENS or last.decode_tok_s <= 0 or not profile_path().exists():
        return None
    profile = load_profile(measure=False)
    key = placement_key(engine, placement, n_cpu_moe)

    def same(c) -> bool:
        return placement_key(c.engine, c.placement, c.n_cpu_moe) == key and c.decode_tok_s > 0

    if planned is not None and same(planned):
        predicted = (planned.cost_model_prefill_tok_s or planned.prefill_tok_s,
                     planned.cost_model_decode_tok_s or planned.decode_tok_s)
    else:
        try:
            candidates = make_plan(card, profile, n_ctx=n_ctx).candidates
        except NoFitError as err:
            candidates = err.candidates
        match = next((c for c in candidates if same(c)), None)
        if match is None:
            return None
        predicted = (match.prefill_tok_s, match.decode_tok_s)
    run = Run(model=model_key(card), placement=key, profile=profile.measured_at,
              threads=stats.get("threads"), prompt_tokens=int(stats.get("prompt_tokens_evaluated", 0)),
              decode_tokens=decoded, predicted_prefill=predicted[0],
              predicted_decode=predicted[1], measured_prefill=last.prefill_tok_s,
              measured_decode=last.decode_tok_s, at=time.time())
    own = log is None
    log = log or _open_quietly()
    if log is None:
        return None
    try:
        log.add(run)
    finally:
        if own:
            log.close()
    return run


def _open_quietly() -> RunLog | None:
    """The store, or None if it cannot be opened (a read-only cache costs the correction only)."""
    try:
        return RunLog()
    except (OSError, sqlite3.Error):
        return None


IDLE_BUSY_CORES = 0.5  # other processes' CPU use below which the machine counts as idle


def stale_profile_hint() -> str | None:
    """One line for a command that does not re-measure (`ask`): this machine's profile drifted.
    Said once per profile (None after that, and when it did not drift or was never measured)."""
    from moechat.backends.plan.hardware_profile import load_profile, profile_path

    if not profile_path().exists():
        return None
    profile = load_profile(measure=False)
    log = _open_quietly()
    if log is None:
        return None
    try:
        if not profile_drifted(profile, log) or not log.first_hint(profile.measured_at):
            return None
    finally:
        log.close()
    return (f"moechat: profile is stale: moechat profile --refresh (its predictions missed the "
            f"last {DRIFT_RUNS} runs by more than {DRIFT:.0%})")


def remeasure_if_drifted(progress=None, cancel=None):
    """This machine's profile re-measured (and cached) when its predictions drifted and the
    machine is idle now; None when nothing was done (not drifted, never measured, or busy:
    a profile measured under load is what drifted in the first place). cancel: a
    threading.Event that stops the measurement (hardware_profile.MeasureCancelled)."""
    from moechat.backends.plan.hardware_profile import load_profile, profile_path
    from moechat.backends.plan.threads import LoadMeter

    if not profile_path().exists():
        return None
    profile = load_profile(measure=False)
    if not profile_drifted(profile):
        return None
    if LoadMeter().busy_cores(0.3) >= IDLE_BUSY_CORES:
        return None
    return load_profile(refresh=True, progress=progress, cancel=cancel)
