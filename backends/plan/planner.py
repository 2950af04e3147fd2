"""The planner: every way to run this model on this machine, predicted, and the fastest that fits.

Candidates (docs/cost-model.md): llama.cpp CPU only; all on the GPU; a plain layer split
(`-ngl G`, the most layers that fit); MoE-aware with the experts of N layers in RAM for every
N that fits; Fiddler- and HOBBIT-style (predicted even while those engines are not built,
marked unavailable). The choice is the fitting, available candidate with the highest
predicted decode speed (prefill breaks ties); nothing fitting is a one-line refusal.

With `corrections` (run_log.corrections_for: this model's real runs on this profile), a
candidate's prediction is the cost model's times the measured/predicted ratio of its last runs,
and it says so (`correction`, `cost_model_decode_tok_s`).
"""

from __future__ import annotations

from dataclasses import dataclass

from moechat.backends.plan import cost_model as cm
from moechat.backends.plan import error_bands
from moechat.backends.errors import MoechatError

GIB = 1024**3
BUILT_ENGINES = ("llama.cpp",)  # engines this build can run; the others are predicted only
OFFLOAD_AUTO = False  # whether "auto" may pick the Fiddler/HOBBIT engines (see _candidates)
BUILT_LLAMA_PLACEMENTS = ("cpu", "gpu", "moe", "split")  # LlamaCppPlacement kinds the engine accepts


@dataclass(frozen=True)
class Candidate:
    engine: str
    placement: str  # "cpu", "gpu", "layers", "moe", "experts cached on GPU", ...
    n_cpu_moe: int | None
    prefill_tok_s: float
    decode_tok_s: float
    ram_bytes: int
    vram_bytes: int
    fits: bool
    available: bool
    note: str
    # decode tok/s range from the error measured on published runs of this kind of placement
    # (backends/plan/error_bands.py); None when no published run backs it
    decode_range: tuple[float, float] | None = None
    range_backed_by: str = ""
    split: tuple[int, ...] = ()  # placement "split": layers here, then on each worker (plan/workers.py)
    workers: tuple[str, ...] = ()  # placement "split": the workers' endpoints, in split order
    correction: object = None  # run_log.Correction applied to the cost model's figures, if any
    cost_model_decode_tok_s: float = 0.0  # before the correction (= decode_tok_s without one)
    cost_model_prefill_tok_s: float = 0.0

    def to_dict(self) -> dict:
        d = {
            "engine": self.engine, "placement": self.placement, "n_cpu_moe": self.n_cpu_moe,
            "prefill_tok_s": round(self.prefill_tok_s, 2), "decode_tok_s": round(self.decode_tok_s, 2),
            "ram_bytes": self.ram_bytes, "vram_bytes": self.vram_bytes,
            "fits": self.fits, "available": self.available, "note": self.note,
            "decode_tok_s_range": [round(x, 2) for x in self.decode_range] if self.decode_range else None,
            "decode_range_backed_by": self.range_backed_by,
        }
        if self.split:
            d.update(layers_here=self.split[0], tensor_split=list(self.split[1:]), workers=list(self.workers))
        if self.correction is not None:
            c = self.correction
            d["correction"] = {
                "decode_factor": round(c.decode, 3), "prefill_factor": round(c.prefill, 3),
                "runs": c.runs, "cost_model_decode_tok_s": round(self.cost_model_decode_tok_s, 2),
                "cost_model_prefill_tok_s": round(self.cost_model_prefill_tok_s, 2),
                "last_measured_decode_tok_s": round(c.last.measured_decode, 2),
                "last_measured_prefill_tok_s": round(c.last.measured_prefill, 2),
            }
        return d


@dataclass(frozen=True)
class Plan:
    choice: Candidate
    candidates: tuple[Candidate, ...]
    reason: str

    def to_dict(self) -> dict:
        return {"choice": self.choice.to_dict(), "candidates": [c.to_dict() for c in self.candidates],
                "reason": self.reason}


class NoFitError(MoechatError):
    """Nothing fits: the message says by how much; the candidates are kept for the table."""

    def __init__(self, message: str, candidates: tuple[Candidate, ...]):
        super().__init__(message)
        self.candidates = candidates


def make_plan(card, profile, n_ctx: int | None = None, routing=None, workers=(), corrections=None) -> Plan:
    """Predict every candidate for `card` on `profile` (and, with `workers` — WorkerProfiles
    of `moechat worker`s — every layer split across them) and choose; NoFitError if none fits.
    corrections: {run_log.placement_key: Correction} from this model's measured runs."""
    n_ctx = n_ctx or min(card.context_length, 4096)
    candidates = tuple(_candidates(card, profile, n_ctx, routing))
    if workers:
        from moechat.backends.plan.workers import split_candidates

        candidates += tuple(split_candidates(card, profile, workers, n_ctx))
    candidates = tuple(_corrected(c, corrections) for c in candidates)
    usable = [c for c in candidates if c.fits and c.available]
    if not usable:
        raise NoFitError(_refusal(card, profile, n_ctx, candidates), candidates)
    choice = max(usable, key=lambda c: (round(c.decode_tok_s, 6), c.prefill_tok_s, -c.vram_bytes))
    return Plan(choice, candidates, _reason(card, profile, choice, candidates))


def _corrected(c: Candidate, corrections) -> Candidate:
    import dataclasses

    from moechat.backends.plan.run_log import placement_key

    found = (corrections or {}).get(placement_key(c.engine, c.placement, c.n_cpu_moe))
    if found is None:
        return dataclasses.replace(c, cost_model_decode_tok_s=c.decode_tok_s,
                                   cost_model_prefill_tok_s=c.prefill_tok_s)
    return dataclasses.replace(c, decode_tok_s=c.decode_tok_s * found.decode,
                               prefill_tok_s=c.prefill_tok_s * found.prefill, correction=found,
                               cost_model_decode_tok_s=c.decode_tok_s,
                               cost_model_prefill_tok_s=c.prefill_tok_s)


def placement_of(candidate: Candidate) -> cm.Placement:
    """The cost-model placement a candidate stands for (for re-prediction and the engine)."""
    if candidate.placement == "moe":
        return cm.Placement("moe", candidate.n_cpu_moe or 0)
    if candidate.placement.startswith("layers"):
        return cm.Placement("layers", int(candidate.placement.split(":")[1]))
    return cm.Placement(candidate.placement)


# ---- candidates ------------------------------------------------------------------------------


def _candidates(card, profile, n_ctx, routing):
    has_gpu = profile.has_gpu
    gpu_note = "" if has_gpu else "needs a GPU"
    llama_gpu = has_gpu and profile.gpu_offload
    if has_gpu and not profile.gpu_offload:
        gpu_note = "this llama.cpp build has no GPU support"

    yield _candidate(card, profile, "llama.cpp", cm.Placement("cpu"), n_ctx, routing, True, "")
    yield _candidate(card, profile, "llama.cpp", cm.Placement("gpu"), n_ctx, routing, llama_gpu, gpu_note)
    if card.is_moe and not _fits_in_memory(card, profile, n_ctx):
        yield from _over_ram_candidates(card, profile, n_ctx, routing)
    if not has_gpu:
        for engine, kind in (("fiddler", "fiddler"), ("hobbit", "hobbit")):
            if card.is_moe:
                yield _candidate(card, profile, engine, cm.Placement(kind, 0), n_ctx, routing, False,
                                 "needs a GPU")
        return

    # plain layer split: the most layers that fit in VRAM (what -ngl gives)
    L = card.n_layers
    split = next((g for g in range(L, 0, -1)
                  if _fits(profile, *cm.memory(card, cm.Placement("layers", g), n_ctx))), 0)
    if 0 < split < L:
        yield _candidate(card, profile, "llama.cpp", cm.Placement("layers", split), n_ctx, routing,
                         False, f"-ngl {split}; layer split not wired into the engine yet")

    if card.is_moe:
        layers = len(card.expert_layers) or L
        fitting = [n for n in range(1, layers + 1)
                   if _fits(profile, *cm.memory(card, cm.Placement("moe", n), n_ctx))]
        shown = fitting or [layers]  # none fits: show the smallest-VRAM one, marked
        for n in shown:
            yield _candidate(card, profile, "llama.cpp", cm.Placement("moe", n), n_ctx, routing,
                             llama_gpu, gpu_note or f"--n-cpu-moe {n}")
        # torch engines: as many experts per layer on the GPU as fit next to the dense weights
        per_layer = _resident_experts(card, profile, n_ctx)
        # The engines are built (--engine fiddler|hobbit) but their CUDA path has not been
        # measured on a GPU yet, so the plan predicts them without choosing them: flip
        # OFFLOAD_AUTO once docs/benchmarks.md has their GPU rows.
        offload = OFFLOAD_AUTO and offload_engines_available(profile)
        why = "" if offload else "; --engine to try it (not yet measured on a GPU)"
        yield _candidate(card, profile, "fiddler", cm.Placement("fiddler", per_layer), n_ctx, routing,
                         offload, f"{per_layer}/{card.n_experts} experts per layer on GPU{why}")
        yield _candidate(card, profile, "hobbit", cm.Placement("hobbit", per_layer), n_ctx, routing,
                         offload, f"GPU cache of {per_layer}/{card.n_experts} experts per layer{why}")


def _fits_in_memory(card, profile, n_ctx) -> bool:
    need = card.tensor_bytes + cm.kv_bytes(card, n_ctx) + cm.RUNTIME_OVERHEAD_BYTES
    return need <= cm.ram_capacity_bytes(profile) + (cm.gpu_capacity_bytes(profile) if profile.has_gpu else 0)


def _over_ram_candidates(card, profile, n_ctx, routing):
    """Bigger than RAM (+ VRAM): llama.cpp over mmap, and experts streamed from disk
    (backends/plan/streamed.py)."""
    from moechat.backends.plan.streamed import PLACEMENT, over_ram

    for engine, placement, p in zip(("llama.cpp", "stream"), ("cpu over mmap", PLACEMENT),
                                    over_ram(card, profile, n_ctx, routing)):
        yield Candidate(engine, placement, None, p.prefill_tok_s, p.decode_tok_s, p.ram_bytes, 0,
                        p.fits, True, p.note)


def offload_engines_available(profile) -> bool:
    """The Fiddler- and HOBBIT-style engines run wherever torch is installed and the profile
    has a CUDA GPU (checked without importing torch: planning must stay fast)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None and any(
        g.backend == "cuda" for g in profile.gpus)


def _resident_experts(card, profile, n_ctx) -> int:
    """Experts per layer that fit in VRAM beside the dense weights, KV cache and buffers."""
    _, vram_dense = cm.memory(card, cm.Placement("fiddler", 0), n_ctx)
    per_expert_all_layers = card.bytes_per_expert * max(1, len(card.expert_layers))
    room = cm.gpu_capacity_bytes(profile) - vram_dense
    if per_expert_all_layers <= 0 or room <= 0:
        return 0
    return int(min(card.n_experts, room // per_expert_all_layers))


def _candidate(card, profile, engine, placement, n_ctx, routing, available, note) -> Candidate:
    p = cm.predict(card, profile, placement, routing, n_ctx)
    fits = _fits(profile, p.ram_bytes, p.vram_bytes)
    if placement.kind in ("gpu", "layers", "moe", "fiddler", "hobbit") and not profile.has_gpu:
        fits = False
    name = placement.kind
    if placement.kind == "layers":
        name = f"layers:{placement.n}"
    elif placement.kind == "fiddler":
        name = "experts on GPU + CPU"
    elif placement.kind == "hobbit":
        name = "GPU expert cache"
    available = available and (engine in BUILT_ENGINES or engine in ("fiddler", "hobbit")) and (
        engine != "llama.cpp" or placement.kind in BUILT_LLAMA_PLACEMENTS)
    band = error_bands.band_for(placement.kind, bool(profile.gpus and profile.gpus[0].unified))
    decode_range = band.around(p.decode_tok_s) if band and p.decode_tok_s else None
    return Candidate(
        engine=engine,
        placement=name,
        n_cpu_moe=placement.n if placement.kind == "moe" else None,
        prefill_tok_s=p.prefill_tok_s,
        decode_tok_s=p.decode_tok_s,
        ram_bytes=p.ram_bytes,
        vram_bytes=p.vram_bytes,
        fits=fits,
        available=available,
        note=note,
        decode_range=decode_range,
        range_backed_by=band.note if decode_range else "",
    )


def _fits(profile, ram: int, vram: int) -> bool:
    if vram and profile.gpus and profile.gpus[0].unified:  # one pool: both come out of RAM
        return vram <= cm.gpu_capacity_bytes(profile) and ram + vram <= cm.ram_capacity_bytes(profile)
    return ram <= cm.ram_capacity_bytes(profile) and vram <= cm.gpu_capacity_bytes(profile)


# ---- words -----------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _reason(card, profile, choice: Candidate, candidates) -> str:
    cpu = next(c for c in candidates if c.placement == "cpu")
    gain = f", {choice.decode_tok_s / cpu.decode_tok_s:.1f}x CPU only" if choice is not cpu else ""
    if choice.placement == "cpu":
        if not profile.has_gpu:
            why = "no GPU here"
        elif not profile.gpu_offload:
            why = "this llama.cpp build cannot use the GPU"
        else:
            why = "no GPU placement fits or is faster"
        return (f"{why}: llama.cpp on the CPU; decode is bound by reading "
                f"{card.active_bytes_per_token / 1e9:.2f} GB of weights per token at "
                f"{profile.ram_read_gbs:.0f} GB/s RAM bandwidth (predicted {choice.decode_tok_s:.1f} tok/s)")
    if choice.placement == "gpu":
        return (f"the whole model ({_gib(card.tensor_bytes)}) fits in {_gib(cm.gpu_capacity_bytes(profile))} "
                f"of free VRAM: everything on the GPU (predicted {choice.decode_tok_s:.1f} tok/s{gain})")
    if choice.placement == "moe":
        n, layers = choice.n_cpu_moe, len(card.expert_layers) or card.n_layers
        return (f"{_gib(card.tensor_bytes)} of weights do not fit in {_gib(cm.gpu_capacity_bytes(profile))} "
                f"of VRAM: attention and the experts of {layers - n} layers on the GPU, the experts of "
                f"the first {n} layer{'s' if n != 1 else ''} in RAM (the fewest that fit; predicted {choice.decode_tok_s:.1f} tok/s{gain})")
    if choice.placement == "split":
        here = next((c for c in candidates if c.placement == "cpu" and c.fits), None)
        why = (f"predicted faster than here alone ({here.decode_tok_s:.1f} tok/s)" if here else
               f"{_gib(card.tensor_bytes)} of weights do not fit in this machine's {_gib(cm.ram_capacity_bytes(profile))}")
        return (f"{why}: {choice.split[0]} layers here, " + ", ".join(
            f"{n} on {w}" for n, w in zip(choice.split[1:], choice.workers)) + f" (predicted {choice.decode_tok_s:.1f} tok/s)")
    return f"{choice.engine} {choice.placement} is predicted fastest ({choice.decode_tok_s:.1f} tok/s{gain})"


def _refusal(card, profile, n_ctx, candidates) -> str:
    splits = [c for c in candidates if c.placement == "split"]
    if splits:
        return (f"{card.name} does not fit: {_gib(card.tensor_bytes)} of weights at context {n_ctx}, more "
                f"than this machine ({_gib(cm.ram_capacity_bytes(profile))}) and its "
                f"{len(splits[0].workers)} worker(s) can hold together (add a worker, or try a smaller quantization)")
    need = min(c.ram_bytes + c.vram_bytes for c in candidates)
    have_ram = cm.ram_capacity_bytes(profile)
    have_vram = cm.gpu_capacity_bytes(profile) if profile.has_gpu and not profile.gpus[0].unified else 0
    where = f"{_gib(have_ram)} RAM + {_gib(have_vram)} VRAM" if have_vram else f"{_gib(have_ram)} RAM"
    bound = getattr(profile.ram, "bound_by", "")
    bound = f" ({bound})" if bound else ""
    return (f"{card.name} does not fit: it needs at least {_gib(need)} at context {n_ctx}, "
            f"this machine has {where} to spare{bound} (try a smaller quantization or --ctx)")
