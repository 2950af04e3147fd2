"""The chat app's commands: what the keys and the command palette do to conversations
(new, delete, rename, search, regenerate, edit), to settings (system prompt, temperature,
max tokens, model) and to the text shown (copy, export, plan, help).

A mixin of MoechatApp (app.py), which holds the state these read and the workers (model
loading, generation) they start; kept apart so that each file holds one concept.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Iterable

from textual.app import SystemCommand
from textual.screen import Screen

from moechat.app.history import export_markdown
from moechat.app.tui.confirm_screen import ConfirmScreen
from moechat.app.tui.help_screen import HelpScreen
from moechat.app.tui.input_screen import InputScreen
from moechat.app.tui.plan_screen import PlanScreen

CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)


class ChatCommands:
    """Actions of MoechatApp; `self` is the app."""

    async def action_new_chat(self) -> None:
        if not self._busy():
            await self.open_conversation(None)
            self.prompt.focus()

    def action_search(self) -> None:
        self.query_one("#search").focus()

    def request_delete(self, cid: int | None) -> None:
        cid = cid if cid is not None else self.cid
        conversation = self.history.conversation(cid) if cid is not None else None
        if conversation is None or (cid == self.cid and self._busy()):
            return

        async def answered(yes: bool | None) -> None:
            if yes:
                self.history.delete_conversation(cid)
                if cid == self.cid:
                    await self.open_conversation(None)
                else:
                    await self.refresh_sidebar()

        self.push_screen(ConfirmScreen(f"Delete “{conversation.title}”?"), answered)

    def action_delete_chat(self) -> None:
        self.request_delete(None)

    def action_rename(self) -> None:
        conversation = self.history.conversation(self.cid) if self.cid is not None else None
        if conversation is None:
            self.notify("nothing to rename yet: send a message first")
            return

        async def answered(title: str | None) -> None:
            if title and title.strip():
                self.history.rename(conversation.id, title.strip())
                await self.refresh_sidebar()

        self.push_screen(InputScreen("Rename this chat", conversation.title), answered)

    # ---- regenerate / edit --------------------------------------------------------------
    async def action_regenerate(self) -> None:
        if self._busy() or self.engine is None or self.cid is None:
            return
        stored = self.history.messages(self.cid)
        if stored and stored[-1].role == "assistant":
            await self._forget(stored[-1:])
            stored = stored[:-1]
        if not stored:
            return
        await self.start_reply()

    async def action_edit_last(self) -> None:
        if self._busy() or self.cid is None:
            return
        stored = self.history.messages(self.cid)
        users = [i for i, m in enumerate(stored) if m.role == "user"]
        if not users:
            return
        last_user = stored[users[-1]]
        await self._forget(stored[users[-1]:])
        self.prompt.text = last_user.content
        self.prompt.move_cursor(self.prompt.document.end)
        self.prompt.focus()

    async def _forget(self, stored) -> None:
        """Delete messages from the history and from the screen."""
        gone = {m.id for m in stored}
        for m in stored:
            self.history.delete_message(m.id)
        for item in self.chat.items():
            if item.mid in gone:
                await item.remove()

    # ---- settings -----------------------------------------------------------------------
    def action_system_prompt(self) -> None:
        conversation = self.history.conversation(self.cid) if self.cid is not None else None
        current = conversation.system_prompt if conversation else self.system_prompt_for_new

        def answered(text: str | None) -> None:
            if text is None:
                return
            if conversation is not None:
                self.history.set_system_prompt(conversation.id, text.strip())
            else:
                self.system_prompt_for_new = text.strip()
            self.notify("system prompt set" if text.strip() else "system prompt cleared")

        self.push_screen(InputScreen("System prompt for this chat (empty: none)", current),
                         answered)

    def action_temperature(self) -> None:
        self._ask_number("Temperature (0 = greedy)", "temperature", float, lambda v: v >= 0)

    def action_max_tokens(self) -> None:
        self._ask_number("Max tokens per reply", "max_tokens", int, lambda v: v > 0)

    def _ask_number(self, question: str, field: str, kind, valid) -> None:
        def answered(text: str | None) -> None:
            if text is None:
                return
            try:
                value = kind(text)
            except ValueError:
                value = None
            if value is None or not valid(value):
                self.notify(f"{field.replace('_', ' ')}: not a valid value: {text}",
                            severity="error")
                return
            self.sampling = dataclasses.replace(self.sampling, **{field: value})
            self.notify(f"{field.replace('_', ' ')} = {value}")

        self.push_screen(InputScreen(question, str(getattr(self.sampling, field))), answered)

    def action_switch_model(self) -> None:
        if self._busy():
            return
        if self.loading:
            self.notify("a model is loading: wait for it first")
            return

        def answered(spec: str | None) -> None:
            if spec is not None and not self.generating and not self.loading:
                self.model_spec = spec.strip() or None
                self.load_model(self.model_spec)

        self.push_screen(InputScreen(
            "Model: a GGUF path or a models.toml name (empty: the built-in demo)",
            self.model_spec or "", placeholder="~/models/model.gguf"), answered)

    # ---- copy / export / plan / help ----------------------------------------------------
    def _last_reply_text(self) -> str:
        reply = self.chat.last("assistant")
        return reply.text if reply is not None else ""

    def action_copy_reply(self) -> None:
        text = self._last_reply_text()
        if text:
            self.copy_to_clipboard(text)
            self.notify("copied the last reply")

    def action_copy_code(self) -> None:
        blocks = CODE_BLOCK.findall(self._last_reply_text())
        if blocks:
            self.copy_to_clipboard(blocks[-1])
            self.notify("copied the last code block")
        else:
            self.notify("no code block in the last reply")

    def action_export(self) -> None:
        if self.cid is None:
            self.notify("nothing to export yet")
            return
        path = Path.cwd() / f"moechat-chat-{self.cid}.md"
        try:
            path.write_text(export_markdown(self.history, self.cid), encoding="utf-8")
        except OSError as err:
            self.notify(f"could not write {path}: {err}", severity="error")
            return
        self.notify(f"exported to {path}")

    def action_show_plan(self) -> None:
        self.push_screen(PlanScreen(self.card))

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        commands = [
            ("New chat", "start a new conversation", self.action_new_chat),
            ("Regenerate", "regenerate the last reply", self.action_regenerate),
            ("Edit last message", "put the last message back in the box", self.action_edit_last),
            ("Stop", "stop the reply being generated", self.action_stop),
            ("System prompt", "set this chat's system prompt", self.action_system_prompt),
            ("Temperature", f"now {self.sampling.temperature}", self.action_temperature),
            ("Max tokens", f"now {self.sampling.max_tokens}", self.action_max_tokens),
            ("Switch model", "open another GGUF model", self.action_switch_model),
            ("Copy reply", "copy the last reply", self.action_copy_reply),
            ("Copy code block", "copy the last code block", self.action_copy_code),
            ("Export to Markdown", "write this chat to a .md file", self.action_export),
            ("Rename chat", "rename this conversation", self.action_rename),
            ("Delete chat", "delete this conversation", self.action_delete_chat),
            ("Search chats", "search conversations by text", self.action_search),
            ("Show the plan", "what the planner picks for this model", self.action_show_plan),
            ("Keys", "show every key", self.action_help),
        ]
        for title, help_text, callback in commands:
            yield SystemCommand(title, help_text, callback)

