"""Shown while a model loads (in a worker): an indeterminate bar and the current stage."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar


class LoadProgress(Horizontal):
    def compose(self) -> ComposeResult:
        yield ProgressBar(total=None, show_eta=False, show_percentage=False)
        yield Label("", id="load-stage")

    def show_stage(self, stage: str) -> None:
        self.query_one("#load-stage", Label).update(stage)
        self.display = True
