"""Open a model for the TUI (runs in a worker thread): resolve the spec, read its card,
open the engine through the backend manager, reporting each stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True, slots=True)
class EngineOptions:
    engine: str = "auto"
    n_cpu_moe: int | None = None
    ctx: int | None = None
    threads: int | None = None
    force: bool = False
    vram_budget: str | None = None
    hobbit_low: str = "auto"
    skip: bool = False
    workers: str | None = None
    ram_budget: str | None = None

    @classmethod
    def from_args(cls, args) -> "EngineOptions":
        """From the flags app/engine_flags.py defines (every one: a flag the chat app took
        but did not pass on, or one this class lacked, would break `moechat` itself)."""
        from moechat.app.engine_flags import engine_kwargs

        kw = engine_kwargs(args)
        kw["ctx"] = kw.pop("n_ctx")
        return cls(**kw)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    engine: Any  # an Engine (backends/engines/engine.py)
    name: str
    card: Any = None  # the ModelCard, for the plan screen


def open_model(spec: str | None, options: EngineOptions,
               progress: Callable[[str], None]) -> LoadedModel:
    from moechat.backends.manager import open_engine
    from moechat.backends.model.model_card import read_model_card
    from moechat.backends.model.model_resolve import resolve_model

    progress(f"finding {spec}" if spec else
             "preparing the demo model (built once on first run, about 20 s)")
    path = resolve_model(spec, progress=False)
    progress(f"reading {path.name}")
    card = read_model_card(path)
    progress(f"loading {card.name} ({options.engine} engine)")
    engine = open_engine(card, options.engine, n_cpu_moe=options.n_cpu_moe, n_ctx=options.ctx,
                         threads=options.threads, force=options.force, vram_budget=options.vram_budget,
                         hobbit_low=options.hobbit_low, skip=options.skip, workers=options.workers,
                         ram_budget=options.ram_budget, ui=True)
    return LoadedModel(engine, card.name, card)
