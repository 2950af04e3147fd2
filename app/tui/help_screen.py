"""F1 / ?: every key and command."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

from moechat.app.tui.bindings import APP_BINDINGS, EXTRA_HELP, MODAL_BINDINGS


def help_markdown() -> str:
    rows = [(key, what) for key, what in EXTRA_HELP]
    seen = set()
    for binding in APP_BINDINGS:
        if binding.action not in seen:
            seen.add(binding.action)
            keys = " / ".join(b.key.replace("question_mark", "?") for b in APP_BINDINGS
                              if b.action == binding.action)
            rows.append((keys, binding.description))
    table = "\n".join(f"| `{key}` | {what} |" for key, what in rows)
    return f"# moechat keys\n\n| key | does |\n|---|---|\n{table}\n\nEsc or q closes this."


class HelpScreen(ModalScreen[None]):
    BINDINGS = [*MODAL_BINDINGS, Binding("q", "cancel", "Close"), Binding("f1", "cancel", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog wide"):
            yield Markdown(help_markdown())

    def action_cancel(self) -> None:
        self.dismiss(None)
