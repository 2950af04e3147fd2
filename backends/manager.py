"""The backend manager: check that a model fits, pick an engine and placement, open it.

`open_engine` is what every front end calls; it never returns an engine that was not
checked against this machine's memory (unless the user passed --force).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from moechat.backends.plan.cost_model import RUNTIME_OVERHEAD_BYTES
from moechat.backends.errors import MoechatError
from moechat.backends.model.model_card import ModelCard

ENGINES = ("auto", "llama.cpp", "torch", "fiddler", "hobbit", "stream")
GIB = 1024**3


@dataclass(frozen=True, slots=True)
class Memory:
    ram_available: int  # the machine's available RAM or the memory cgroup's room, the smaller
    vram_free: int  # summed over GPUs; 0 without one
    ram_note: str = ""  # what bound ram_available, for messages ("" = the machine's RAM)


def available_memory() -> Memory:
    from moechat.backends.plan.memory import ram_budget

    ram = ram_budget()
    note = "" if ram.bound_by == "RAM" else f" (bound by the memory cgroup limit of {ram.cgroup_limit / GIB:.1f} GiB, {ram.bound_by})"
    return Memory(ram_available=ram.available, vram_free=_vram_free(), ram_note=note)


def _vram_free() -> int:
    if sys.platform == "linux" and not os.path.exists("/dev/nvidiactl"):
        return 0  # no NVIDIA driver loaded: skip importing NVML (start-up time)
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVIDIA driver or library: no GPU to count
        return 0
    try:
        return sum(
            pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).free
            for i in range(pynvml.nvmlDeviceGetCount())
        )
    finally:
        pynvml.nvmlShutdown()


def memory_needed(card: ModelCard, n_ctx: int) -> int:
    """Weights + KV cache for n_ctx tokens + a fixed runtime overhead."""
    return card.tensor_bytes + card.kv_bytes_per_token * n_ctx + RUNTIME_OVERHEAD_BYTES


def check_fits(card: ModelCard, n_ctx: int, memory: Memory | None = None) -> None:
    memory = memory or available_memory()
    need = memory_needed(card, n_ctx)
    have = memory.ram_available + memory.vram_free
    if need > have:
        where = "RAM + VRAM" if memory.vram_free else "RAM"
        raise MoechatError(
            f"{card.name} needs {need / GIB:.1f} GiB of {where} at context {n_ctx}; "
            f"{have / GIB:.1f} GiB is available{memory.ram_note} (--force tries anyway)"
        )


def default_context(card: ModelCard) -> int:
    return min(card.context_length, 4096)


def open_engine(
    card: ModelCard,
    engine: str = "auto",
    n_cpu_moe: int | None = None,
    n_ctx: int | None = None,
    threads: int | None = None,
    force: bool = False,
    vram_budget: str | None = None,
    hobbit_low: str = "auto",
    skip: bool = False,
    ui: bool = False,
    workers: str | None = None,
    ram_budget: str | None = None,
):
    """Open the engine the user asked for, or the planner's choice for this machine ("auto").

    With "auto" and no --n-cpu-moe, the plan (backends/plan/planner.py, on this machine's cached
    profile) picks engine and placement; `engine` or `n_cpu_moe` given by the user win.
    ui: a chat app's UI shares the CPU (the default thread count may leave it a core).
    `workers` ("host:port,..."): `moechat worker`s to split layers over (_open_with_workers)."""
    if engine not in ENGINES:
        raise MoechatError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
    n_ctx = n_ctx or default_context(card)
    if workers:
        return _open_with_workers(card, workers, engine, n_cpu_moe, n_ctx, threads, force)
    if engine == "stream":
        return _open_stream_engine(card, n_cpu_moe, n_ctx, threads, ram_budget, ui)
    if engine == "auto" and not force and _streams(card, n_ctx, n_cpu_moe):
        choice = planned_choice(card, n_ctx)  # the stream engine or llama.cpp over mmap
        if choice.engine == "stream":
            return _expecting(_open_stream_engine(card, n_cpu_moe, n_ctx, threads, ram_budget, ui), choice)
        return _expecting(engine_for_candidate(card, choice, n_ctx=n_ctx, threads=threads, ui=ui), choice)
    if not force:
        check_fits(card, n_ctx)
    if engine == "auto" and n_cpu_moe is None:
        choice = planned_choice(card, n_ctx, force=force)
        if choice is not None:
            return _expecting(engine_for_candidate(card, choice, n_ctx=n_ctx, threads=threads, ui=ui), choice)
    if engine in ("auto", "llama.cpp"):
        from moechat.backends.engines.llamacpp_engine import LlamaCppEngine, LlamaCppPlacement
        from moechat.backends.plan.gpu_probes import gpu_offload_supported

        if n_cpu_moe is not None:
            if not card.is_moe:
                raise MoechatError(f"--n-cpu-moe needs an MoE model; {card.name} has no experts")
            placement = LlamaCppPlacement("moe", n_cpu_moe)
        elif gpu_offload_supported():
            placement = LlamaCppPlacement("gpu")
        else:
            placement = LlamaCppPlacement("cpu")
        return LlamaCppEngine(card, placement, n_ctx=n_ctx, threads=threads, ui=ui)
    if engine == "torch":
        if n_cpu_moe is not None:
            raise MoechatError("--n-cpu-moe is a llama.cpp engine option; the torch engine places experts itself")
        from moechat.backends.engines.torch_engine import TorchEngine

        return TorchEngine(card, n_ctx=n_ctx, threads=threads, ui=ui)
    if engine in ("fiddler", "hobbit"):
        return _open_offload_engine(card, engine, n_cpu_moe, n_ctx, threads, vram_budget,
                                    hobbit_low, skip, ui)
    raise MoechatError(f"the {engine} engine is not available in this build yet")


def _expecting(opened, choice):
    """The engine the plan chose, told the plan's per-token time (a stall is far above it)."""
    if choice.decode_tok_s > 0 and hasattr(opened, "expected_token_s"):
        opened.expected_token_s = 1.0 / choice.decode_tok_s
    opened.planned = choice  # its prediction is what record_reply stores beside the measured
    return opened


def check_openable(card: ModelCard, n_ctx: int, engine: str = "auto", n_cpu_moe=None) -> None:
    """What open_engine would refuse for memory, said before a chat screen opens: a model that
    does not fit is refused, unless "auto"/"stream" can stream its experts from disk."""
    if engine in ("auto", "stream") and _streams(card, n_ctx, n_cpu_moe):
        planned_choice(card, n_ctx)  # NoFitError (one line) when not even streaming fits
        return
    check_fits(card, n_ctx)


def _streams(card: ModelCard, n_ctx: int, n_cpu_moe) -> bool:
    """auto: an MoE model that does not fit in RAM (+ VRAM) streams its experts from disk."""
    if not card.is_moe or n_cpu_moe is not None:
        return False
    try:
        check_fits(card, n_ctx)
    except MoechatError:
        return True
    return False


def _open_stream_engine(card, n_cpu_moe, n_ctx, threads, ram_budget, ui=False):
    """Experts streamed from disk into a RAM cache (backends/engines/stream_engine.py)."""
    from moechat.backends.offload.budget import parse_budget
    from moechat.backends.plan.streamed import share_base

    if n_cpu_moe is not None:
        raise MoechatError("--n-cpu-moe is a llama.cpp engine option; the stream engine places experts itself")
    if not card.is_moe:
        raise MoechatError(f"the stream engine streams experts; {card.name} has none")
    budget = None
    if ram_budget is not None:
        try:
            kind, value = parse_budget(ram_budget)
        except ValueError as err:
            raise MoechatError(f"--ram-budget: {err}") from None
        budget = int(value * share_base()) if kind == "share" else int(value)
    from moechat.backends.engines.stream_engine import StreamEngine

    return StreamEngine(card, n_ctx=n_ctx, threads=threads, ram_budget=budget, ui=ui)


def _open_offload_engine(card, engine, n_cpu_moe, n_ctx, threads, vram_budget, hobbit_low, skip,
                         ui=False):
    """The Fiddler-style and HOBBIT-style engines (torch runtime + expert offloading)."""
    from moechat.backends.offload.budget import parse_budget

    if n_cpu_moe is not None:
        raise MoechatError(f"--n-cpu-moe is a llama.cpp engine option; the {engine} engine places experts itself")
    if not card.is_moe:
        raise MoechatError(f"the {engine} engine offloads experts; {card.name} has none")
    if engine == "fiddler" and (skip or hobbit_low != "auto"):
        raise MoechatError("--skip and --hobbit-low are hobbit engine options")
    try:
        budget = parse_budget(vram_budget) if vram_budget is not None else None
    except ValueError as err:
        raise MoechatError(f"--vram-budget: {err}") from None
    if engine == "fiddler":
        from moechat.backends.engines.fiddler_engine import FiddlerEngine

        return FiddlerEngine(card, n_ctx=n_ctx, threads=threads, vram_budget=budget, ui=ui)
    from moechat.backends.engines.hobbit_engine import HobbitEngine

    return HobbitEngine(card, n_ctx=n_ctx, threads=threads, vram_budget=budget,
                        low_format=hobbit_low, skip=skip, ui=ui)


def probe_workers(workers: str) -> tuple:
    """Each worker of "host:port,..." probed (memory, link) as a planner WorkerProfile; a dead
    or mismatched worker is a MoechatError here, before ggml could abort on it."""
    from moechat.backends.plan.rpc_probe import parse_workers, probe_worker
    from moechat.backends.plan.workers import WorkerProfile

    return tuple(WorkerProfile.from_link(probe_worker(e)) for e in parse_workers(workers))


def _open_with_workers(card, workers, engine, n_cpu_moe, n_ctx, threads, force):
    """"auto": the plan over this machine and the workers decides (a split only when the model
    does not fit here or the split is predicted faster); "llama.cpp": the best split, always."""
    from moechat.backends.plan.hardware_profile import load_profile
    from moechat.backends.plan.planner import NoFitError, make_plan

    if engine not in ("auto", "llama.cpp") or n_cpu_moe is not None:
        raise MoechatError("--workers splits layers with the llama.cpp engine; it goes with neither "
                           "--engine torch/fiddler/hobbit nor --n-cpu-moe")
    profiles = probe_workers(workers)
    try:
        plan = make_plan(card, load_profile(measure=False), n_ctx=n_ctx, workers=profiles)
        candidates, choice = plan.candidates, plan.choice
    except NoFitError as err:
        if not force:
            raise
        candidates, choice = err.candidates, None
    splits = [c for c in candidates if c.placement == "split" and (c.fits or force)]
    if engine == "llama.cpp" or choice is None:
        if not splits:
            raise MoechatError(f"{card.name} fits no split over these workers")
        choice = max(splits, key=lambda c: (c.fits, c.decode_tok_s))
    opened = engine_for_candidate(card, choice, n_ctx=n_ctx, threads=threads)
    if choice.placement != "split":
        opened.placement += " (the plan keeps it here: faster than any split over the workers)"
    return opened


def planned_choice(card: ModelCard, n_ctx: int, force: bool = False):
    """The plan's choice on this machine's cached profile (or, before `moechat profile` has run,
    its facts with nominal speeds: a chat never waits for a benchmark). A model that fits nowhere is refused
    unless force."""
    from moechat.backends.plan.hardware_profile import load_profile
    from moechat.backends.plan.planner import NoFitError, make_plan
    from moechat.backends.plan.run_log import corrections_for

    profile = load_profile(measure=False)
    try:
        return make_plan(card, profile, n_ctx=n_ctx, corrections=corrections_for(card, profile)).choice
    except NoFitError:
        if force:
            return None
        raise


def engine_for_candidate(card: ModelCard, candidate, n_ctx: int | None = None, threads: int | None = None,
                         ui: bool = False):
    """Open the engine a planner Candidate describes."""
    if candidate.engine == "stream":
        return _open_stream_engine(card, None, n_ctx or default_context(card), threads, None, ui)
    if candidate.engine in ("fiddler", "hobbit"):
        return _open_offload_engine(card, candidate.engine, None, n_ctx or default_context(card),
                                    threads, None, "auto", False, ui)
    if candidate.engine != "llama.cpp":
        raise MoechatError(f"the {candidate.engine} engine is not available in this build yet")
    if candidate.placement == "split":
        from moechat.backends.engines.rpc_engine import RpcLlamaCppEngine

        used = [(w, n) for w, n in zip(candidate.workers, candidate.split[1:]) if n > 0]
        return RpcLlamaCppEngine(card, tuple(w for w, _ in used), tuple(n for _, n in used),
                                 n_ctx=n_ctx or default_context(card), threads=threads)
    from moechat.backends.engines.llamacpp_engine import LlamaCppEngine, LlamaCppPlacement

    if candidate.placement == "moe":
        placement = LlamaCppPlacement("moe", candidate.n_cpu_moe or 0)
    elif candidate.placement in ("cpu", "gpu"):
        placement = LlamaCppPlacement(candidate.placement)
    elif candidate.placement == "cpu over mmap":  # pages faulted in from the file as needed
        placement = LlamaCppPlacement("cpu")
    else:
        raise MoechatError(f"llama.cpp placement {candidate.placement!r} is not wired into the engine yet")
    return LlamaCppEngine(card, placement, n_ctx=n_ctx or default_context(card), threads=threads,
                          ui=ui)


def record_reply(card: ModelCard, engine, last) -> None:
    """Store a finished reply's measured speeds beside the plan's prediction for the same
    placement (backends/plan/run_log.py), so the next plans are corrected by them: the
    llama.cpp engine's placements and the stream engine's (`plan_placement`, the planner's
    name for it); the others have no planner candidate on this machine yet. A failure here
    never costs the reply."""
    spec = getattr(engine, "placement_spec", None)
    if spec is not None:
        kind, n_cpu_moe = spec.kind, spec.n_cpu_moe if spec.kind == "moe" else None
    else:
        kind, n_cpu_moe = getattr(engine, "plan_placement", None), None
    if kind is None or last is None or last.finish_reason == "error":
        return
    from moechat.backends.plan.run_log import record_run

    try:
        record_run(card, engine.name, kind, n_cpu_moe,
                   getattr(engine, "n_ctx", None) or default_context(card), last,
                   planned=getattr(engine, "planned", None))
    except Exception as err:  # the store is a nicety: say so on stderr, keep the reply
        print(f"moechat: warning: could not record the run ({type(err).__name__}: {err})",
              file=sys.stderr)
