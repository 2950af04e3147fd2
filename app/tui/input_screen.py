"""A small modal that asks for one line of text (rename, system prompt, model, numbers)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label

from moechat.app.tui.bindings import MODAL_BINDINGS


class InputScreen(ModalScreen[str | None]):
    BINDINGS = MODAL_BINDINGS

    def __init__(self, question: str, value: str = "", placeholder: str = "") -> None:
        super().__init__(classes="modal")
        self.question, self.value, self.placeholder = question, value, placeholder

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question)
            yield Input(self.value, placeholder=self.placeholder)
            yield Label("Enter to accept · Esc to cancel", classes="hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)
