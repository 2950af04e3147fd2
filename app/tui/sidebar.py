"""The list of conversations with a search box (matches titles and message text)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Input, Label, ListItem, ListView

from moechat.app.history import Conversation
from moechat.app.tui.bindings import SIDEBAR_BINDINGS
from moechat.app.tui.messages import ConversationPicked, SearchChanged


class ConversationItem(ListItem):
    def __init__(self, conversation: Conversation) -> None:
        super().__init__(Label(conversation.title, markup=False))
        self.cid = conversation.id


class Sidebar(Vertical):
    BINDINGS = SIDEBAR_BINDINGS

    def compose(self) -> ComposeResult:
        yield Input(placeholder="search chats", id="search")
        yield ListView(id="conversations")

    async def show(self, conversations: list[Conversation], current: int | None) -> None:
        view = self.query_one(ListView)
        await view.clear()
        await view.extend([ConversationItem(c) for c in conversations])
        ids = [c.id for c in conversations]
        if current in ids:
            view.index = ids.index(current)

    def selected_cid(self) -> int | None:
        item = self.query_one(ListView).highlighted_child
        return item.cid if isinstance(item, ConversationItem) else None

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        event.stop()
        if isinstance(event.item, ConversationItem):
            self.post_message(ConversationPicked(event.item.cid))

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.post_message(SearchChanged(event.value))

    def action_delete_selected(self) -> None:
        self.app.request_delete(self.selected_cid())
