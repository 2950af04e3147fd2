"""The chat TUI (`moechat [MODEL]`): a Textual app. One widget per file; all custom
Messages in messages.py, all key bindings in bindings.py, all styles in moechat.tcss."""
