"""One message of the conversation: a role line, the Markdown body, a footer of numbers."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Markdown, Static

from moechat.app.tui.status_bar import prompt_summary

ROLE_LABELS = {"user": "You", "assistant": "Assistant", "system": "System"}
# "streaming" in the history means its writer died mid-reply (a crash or kill)
STATUS_NOTES = {"stopped": "⏹ stopped", "error": "⚠ error", "streaming": "… interrupted"}


def reply_footer(stats: dict) -> str:
    """The line under a reply: tokens, speed, engine (from the stats saved with it)."""
    if not stats:
        return ""
    parts = []
    if stats.get("tokens"):
        parts.append(f"{stats['tokens']} tokens")
    if stats.get("decode_tok_s"):
        parts.append(f"{stats['decode_tok_s']:.1f} tok/s")
    if stats.get("engine"):
        parts.append(str(stats["engine"]))
    if prompt_summary(stats):
        parts.append(prompt_summary(stats))
    return " · ".join(parts)


class MessageItem(Vertical):
    def __init__(self, role: str, text: str = "", status: str = "done", footer: str = "",
                 mid: int | None = None) -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.text = text
        self.status = status
        self.mid = mid  # row id in the history
        self._footer = footer
        self._stream = None

    def compose(self) -> ComposeResult:
        yield Static(ROLE_LABELS.get(self.role, self.role), classes="role")
        yield Markdown(self.text, classes="body")
        footer = Static(self._footer_text(), classes="footer")
        footer.display = bool(self._footer_text())
        yield footer

    def _footer_text(self) -> str:
        note = STATUS_NOTES.get(self.status, "")
        return " · ".join(part for part in (note, self._footer) if part)

    # ---- streaming (assistant replies) --------------------------------------------------
    async def append(self, delta: str) -> None:
        if not delta:
            return
        if self._stream is None:
            self._stream = Markdown.get_stream(self.query_one(Markdown))
        self.text += delta
        await self._stream.write(delta)

    async def finish(self, text: str, status: str, footer: str = "") -> None:
        """Stop the stream, then render the whole text once (so code fences render)."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.text, self.status, self._footer = text, status, footer
        await self.query_one(Markdown).update(text)
        self.set_status(status, footer)

    def set_status(self, status: str, footer: str = "") -> None:
        self.status, self._footer = status, footer
        footer = self.query_one(".footer", Static)
        footer.update(self._footer_text())
        footer.display = bool(self._footer_text())
        self.set_class(status == "stopped", "stopped")
        self.set_class(status == "error", "error")
