"""The conversation pane: a scrolling column of MessageItems that follows the stream
(anchored to the bottom until the user scrolls up)."""

from __future__ import annotations

from textual.containers import VerticalScroll

from moechat.app.tui.message_item import MessageItem


class ChatView(VerticalScroll):
    def on_mount(self) -> None:
        self.anchor()

    async def clear(self) -> None:
        await self.remove_children()

    async def add(self, item: MessageItem) -> MessageItem:
        await self.mount(item)
        self.anchor()
        return item

    def items(self) -> list[MessageItem]:
        return list(self.query(MessageItem))

    def last(self, role: str) -> MessageItem | None:
        return next((m for m in reversed(self.items()) if m.role == role), None)
