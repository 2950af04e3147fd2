"""Every engine flag the chat app parses reaches open_engine (a flag added to
app/engine_flags.py but missing here once made `moechat` itself end in a TypeError)."""

from __future__ import annotations

import argparse

from moechat.app import tui_cmd
from moechat.app.tui import model_loader
from moechat.app.tui.model_loader import EngineOptions


def test_every_engine_flag_of_the_chat_app_reaches_open_engine(tiny_model, monkeypatch):
    parser = argparse.ArgumentParser()
    tui_cmd.add_arguments(parser)
    path = tiny_model("qwen2moe", "Q8_0")
    args = parser.parse_args([str(path), "--engine", "stream", "--ctx", "512", "--threads", "1",
                              "--ram-budget", "2GiB", "--vram-budget", "1GiB", "--workers", "h:1",
                              "--hobbit-low", "none", "--skip", "--force", "--n-cpu-moe", "0"])
    options = EngineOptions.from_args(args)
    seen = {}
    monkeypatch.setattr("moechat.backends.manager.open_engine",
                        lambda card, engine, **kw: seen.update(engine=engine, **kw) or object())
    model_loader.open_model(str(path), options, progress=lambda _: None)
    assert seen == {"engine": "stream", "n_cpu_moe": 0, "n_ctx": 512, "threads": 1, "force": True,
                    "vram_budget": "1GiB", "hobbit_low": "none", "skip": True, "workers": "h:1",
                    "ram_budget": "2GiB", "ui": True}
