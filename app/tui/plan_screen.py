"""The "show the plan" screen: what the planner would pick for this model on this machine
and why. The planner ships separately; without it the screen says so."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from moechat.app.tui.bindings import MODAL_BINDINGS
from moechat.app.tui.planner_bridge import plan_text


class PlanScreen(ModalScreen[None]):
    BINDINGS = [*MODAL_BINDINGS, Binding("q", "cancel", "Close")]

    def __init__(self, card) -> None:
        super().__init__()
        self.card = card

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog wide"):
            yield Static("Plan", classes="title")
            yield Static("working out the plan (the first time, this measures the machine)…",
                         id="plan-text", markup=False)
            yield Static("Esc or q closes this.", classes="hint")

    def on_mount(self) -> None:
        self._compute()

    @work(thread=True, exclusive=True)
    def _compute(self) -> None:
        try:
            text = plan_text(self.card)
        except Exception as err:  # shown, not raised: the chat must survive a planner bug
            text = f"the planner failed: {type(err).__name__}: {err}"
        self.app.call_from_thread(self.query_one("#plan-text", Static).update, text)

    def action_cancel(self) -> None:
        self.dismiss(None)
