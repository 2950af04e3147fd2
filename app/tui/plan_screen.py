"""The "show the plan" screen: what the planner would pick for this model on this machine
and why. The planner ships separately; without it the screen says so."""

from __future__ import annotations

import dataclasses

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from moechat.app.tui.bindings import MODAL_BINDINGS

PLANNER_MODULES = ("moechat.backends.planner", "moechat.app.hardware_profile")


def plan_text(card) -> str:
    """The plan as text, or why there is none. Runs in a worker (profiling can be slow)."""
    try:
        from moechat.app.hardware_profile import load_profile
        from moechat.backends.planner import make_plan
    except ModuleNotFoundError as err:
        if err.name in PLANNER_MODULES:
            return "planner not available in this build"
        raise
    if card is None:
        return "no model card for the loaded model"
    plan = make_plan(card, load_profile())
    for method in ("explain", "describe", "to_text"):
        if callable(getattr(plan, method, None)):
            return str(getattr(plan, method)())
    if dataclasses.is_dataclass(plan):
        return "\n".join(f"{f.name}: {getattr(plan, f.name)}" for f in dataclasses.fields(plan))
    return str(plan)


class PlanScreen(ModalScreen[None]):
    BINDINGS = [*MODAL_BINDINGS, Binding("q", "cancel", "Close")]

    def __init__(self, card) -> None:
        super().__init__()
        self.card = card

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog wide"):
            yield Static("Plan", classes="title")
            yield Static("working out the plan…", id="plan-text", markup=False)
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
