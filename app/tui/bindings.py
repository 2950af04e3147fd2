"""Every key binding of the TUI, in one place (shown by the help screen).

App keys avoid the prompt's own editing keys (TextArea: ctrl+a/e/k/u/w/x/c/v/z/y/d, f6, f7)."""

from __future__ import annotations

from textual.binding import Binding

# The prompt handles these itself (TextArea would insert a newline for Enter).
SUBMIT_KEYS = ("enter",)
NEWLINE_KEYS = ("shift+enter", "ctrl+j")

APP_BINDINGS = [
    Binding("escape", "stop", "Stop reply", show=False),
    Binding("ctrl+n", "new_chat", "New chat"),
    Binding("ctrl+r", "regenerate", "Regenerate"),
    Binding("ctrl+l", "edit_last", "Edit last"),
    Binding("ctrl+o", "switch_model", "Model"),
    Binding("f1", "help", "Help"),
    Binding("question_mark", "help", "Help", show=False),
    Binding("ctrl+t", "copy_reply", "Copy reply", show=False),
    Binding("f8", "copy_code", "Copy code block", show=False),
    Binding("ctrl+s", "export", "Export .md", show=False),
    Binding("f2", "rename", "Rename chat", show=False),
    Binding("f3", "system_prompt", "System prompt", show=False),
    Binding("f4", "temperature", "Temperature", show=False),
    Binding("f5", "max_tokens", "Max tokens", show=False),
    Binding("f9", "show_plan", "Show plan", show=False),
    Binding("ctrl+f", "search", "Search chats", show=False),
    Binding("ctrl+q", "quit", "Quit", priority=True),
]

SIDEBAR_BINDINGS = [
    Binding("delete", "delete_selected", "Delete chat"),
]

MODAL_BINDINGS = [
    Binding("escape", "cancel", "Cancel"),
]

# What the help screen lists, beyond APP_BINDINGS.
EXTRA_HELP = [
    ("enter", "send the message"),
    ("shift+enter / ctrl+j", "new line in the message"),
    ("ctrl+p", "command palette (every command)"),
    ("delete (in the chat list)", "delete the selected chat"),
]
