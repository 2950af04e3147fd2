"""The multi-line prompt: Enter sends, Shift+Enter or Ctrl+J inserts a newline."""

from __future__ import annotations

from textual import events
from textual.widgets import TextArea

from moechat.app.tui.bindings import NEWLINE_KEYS, SUBMIT_KEYS
from moechat.app.tui.messages import PromptSubmitted


class PromptInput(TextArea):
    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, tab_behavior="focus", show_line_numbers=False,
                         placeholder="Message (Enter sends · Shift+Enter/Ctrl+J new line · "
                                     "Esc stops · F1 help)", **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        if event.key in SUBMIT_KEYS:
            event.stop()
            event.prevent_default()
            if self.text.strip():
                # The App clears the box once it has taken the message: nothing typed is lost.
                self.post_message(PromptSubmitted(self.text))
            return
        if event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)
