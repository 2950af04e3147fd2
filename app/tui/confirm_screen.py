"""A yes/no modal (deleting a chat)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label

from moechat.app.tui.bindings import MODAL_BINDINGS


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [*MODAL_BINDINGS, Binding("y", "yes", "Yes"), Binding("n", "cancel", "No")]

    def __init__(self, question: str) -> None:
        super().__init__(classes="modal")
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question)
            yield Label("y: yes · n / Esc: no", classes="hint")

    def action_yes(self) -> None:
        self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)
