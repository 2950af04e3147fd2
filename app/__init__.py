"""Front ends only: the CLI subcommands (*_cmd.py), the Textual chat app (tui/) and the
conversation history. Everything else goes through moechat.backends.manager and its rooms;
nothing below imports this package."""
