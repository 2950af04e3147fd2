"""The chat app: owns the engine, the history and the conversation shown.

Two thread workers do the slow work: `_load` opens a model, `_generate` streams a reply.
The generator hands the engine a threading.Event (`cancel`) that the engine checks once
per token, so Esc stops the engine itself, not just the display. Both workers talk to the
UI only through Messages (messages.py); the history is written from the generator thread
(the user message before it starts, the reply while it streams).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import threading
from pathlib import Path
from typing import Callable, Iterable

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer

from moechat.app.history import (
    History,
    ReplyWriter,
    chat_messages,
    export_markdown,
    reply_stats,
    title_from,
)
from moechat.app.tui.bindings import APP_BINDINGS
from moechat.app.tui.chat_view import ChatView
from moechat.app.tui.confirm_screen import ConfirmScreen
from moechat.app.tui.help_screen import HelpScreen
from moechat.app.tui.input_screen import InputScreen
from moechat.app.tui.load_progress import LoadProgress
from moechat.app.tui.message_item import MessageItem, reply_footer
from moechat.app.tui.messages import (
    ConversationPicked,
    ModelLoaded,
    ModelLoadFailed,
    ModelLoadProgress,
    PromptSubmitted,
    ReplyDelta,
    ReplyFinished,
    SearchChanged,
)
from moechat.app.tui.model_loader import EngineOptions, LoadedModel, open_model
from moechat.app.tui.plan_screen import PlanScreen
from moechat.app.tui.planner_bridge import predicted_decode_tok_s
from moechat.app.tui.prompt_input import PromptInput
from moechat.app.tui.sidebar import Sidebar
from moechat.app.tui.status_bar import StatusBar
from moechat.backends.engines.engine import Sampling
from moechat.backends.errors import MoechatError

CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)
OpenModel = Callable[[str | None, EngineOptions, Callable[[str], None]], LoadedModel]


class MoechatApp(App):
    CSS_PATH = "moechat.tcss"
    TITLE = "moechat"
    BINDINGS = APP_BINDINGS

    def __init__(self, model_spec: str | None = None, options: EngineOptions = EngineOptions(),
                 open_model: OpenModel = open_model, history: History | None = None) -> None:
        super().__init__()
        self.model_spec = model_spec
        self.options = options
        self._open_model = open_model
        self.history = history or History()
        self.sampling = Sampling()  # the same defaults as `moechat ask` (greedy, 512 tokens)
        self.engine = None
        self.model_name = ""
        self.card = None
        self.cid: int | None = None  # the conversation shown; None until the first message
        self.system_prompt_for_new = ""
        self.generating = False
        self.loading = False
        self.waiting_for_model = False  # a message was sent while the model loaded
        self._cancel = threading.Event()
        self._idle = threading.Event()  # set while no generator thread runs
        self._idle.set()
        self._reply: MessageItem | None = None

    # ---- layout -------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            yield Sidebar()
            with Vertical(id="chat-column"):
                yield ChatView()
                yield LoadProgress()
                yield PromptInput(id="prompt")
        yield StatusBar()
        yield Footer()

    @property
    def chat(self) -> ChatView:
        return self.query_one(ChatView)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one(PromptInput)

    @property
    def status(self) -> StatusBar:
        return self.query_one(StatusBar)

    async def on_mount(self) -> None:
        last = self.history.last_conversation_id()
        if last is not None:
            await self.open_conversation(last)
        else:
            await self.refresh_sidebar()
        self.prompt.text = self.history.get_state("draft")  # typed before the last quit
        self.prompt.move_cursor(self.prompt.document.end)
        self.prompt.focus()
        self.load_model(self.model_spec)

    # ---- model loading ------------------------------------------------------------------
    def load_model(self, spec: str | None) -> None:
        old, self.engine = self.engine, None
        self.loading = True
        self.status.model, self.status.engine, self.status.placement = spec or "demo", "", ""
        self.query_one(LoadProgress).show_stage("loading…")
        self._load(spec, old)

    @work(thread=True, exclusive=True, group="load")
    def _load(self, spec: str | None, old_engine) -> None:
        if old_engine is not None:
            old_engine.close()  # free its memory before the next model loads
        try:
            loaded = self._open_model(spec, self.options,
                                      lambda stage: self.post_message(ModelLoadProgress(stage)))
        except MoechatError as err:
            self.post_message(ModelLoadFailed(str(err)))
            return
        except Exception as err:  # shown in the app: a bad file must not kill the chat
            self.post_message(ModelLoadFailed(f"{type(err).__name__}: {err}"))
            return
        self.post_message(ModelLoaded(loaded.engine, loaded.name, loaded.card,
                                      self._predict(loaded)))

    def _predict(self, loaded: LoadedModel) -> float | None:
        try:
            return predicted_decode_tok_s(loaded.card, loaded.engine)
        except Exception as err:  # a planner bug costs the comparison, never the chat
            self.call_from_thread(self.notify, f"no speed prediction: {err}", severity="warning")
            return None

    def on_model_load_progress(self, message: ModelLoadProgress) -> None:
        self.query_one(LoadProgress).show_stage(message.stage)

    async def on_model_loaded(self, message: ModelLoaded) -> None:
        import psutil

        self.loading = False
        self.engine, self.model_name, self.card = message.engine, message.model_name, message.card
        status = self.status
        status.model, status.engine = message.model_name, message.engine.name
        status.placement = message.engine.placement
        status.rss_bytes = psutil.Process().memory_info().rss
        status.prefill_tok_s = status.decode_tok_s = 0.0
        status.predicted_decode_tok_s = message.predicted_decode_tok_s or 0.0
        self.query_one(LoadProgress).display = False
        if self.waiting_for_model:
            self.waiting_for_model = False
            await self.start_reply()

    def on_model_load_failed(self, message: ModelLoadFailed) -> None:
        self.loading = self.waiting_for_model = False
        self.status.note = ""
        self.query_one(LoadProgress).display = False
        self.status.model = "no model"
        self.notify(message.error, title="could not load the model", severity="error",
                    timeout=15)

    # ---- sending and streaming ----------------------------------------------------------
    async def on_prompt_submitted(self, message: PromptSubmitted) -> None:
        # Refusing leaves the text in the box: nothing typed is lost.
        if self.generating or self.waiting_for_model:
            self.notify("a reply is on its way: Esc stops it (your text stays in the box)")
            return
        if self.engine is None and not self.loading:
            self.notify("no model loaded: Ctrl+O opens one (your text stays in the box)")
            return
        text = message.text.strip("\n")
        if self.cid is None:
            self.cid = self.history.new_conversation(
                title_from(text), model=self.model_name, system_prompt=self.system_prompt_for_new)
            self.history.set_current(self.cid)
        mid = self.history.add_message(self.cid, "user", text)  # saved before generating
        self.prompt.clear()
        await self.chat.add(MessageItem("user", text, mid=mid))
        await self.refresh_sidebar()
        if self.engine is None:  # still loading: the reply starts when it is ready
            self.waiting_for_model = True
            self.status.note = "waiting for the model to load…"
            return
        await self.start_reply()

    async def start_reply(self) -> None:
        messages = chat_messages(self.history, self.cid)
        self._reply = await self.chat.add(MessageItem("assistant", status="generating"))
        self._cancel = threading.Event()
        self._idle.clear()
        self.generating = True
        self.status.note = "reading the prompt… (Esc stops)"
        self._generate(self.cid, messages, self._cancel)

    @work(thread=True, group="generate")
    def _generate(self, cid: int, messages: list[dict], cancel: threading.Event) -> None:
        engine, writer = self.engine, None
        last, n_tokens, status, error = None, 0, "done", None
        try:
            writer = ReplyWriter(self.history, cid, model=self.model_name)
            for event in engine.generate(messages, self.sampling, cancel):
                writer.append(event.text)
                n_tokens += len(event.token_ids)
                last = event
                self.post_message(ReplyDelta(event))
            if last is None:
                status, error = "error", "the engine produced nothing"
            elif last.finish_reason == "cancelled":
                status = "stopped"
            elif last.finish_reason == "error":
                status, error = "error", last.error or "the engine failed"
        except MoechatError as err:
            status, error = "error", str(err)
        except Exception as err:  # shown under the reply; the chat goes on
            status, error = "error", f"{type(err).__name__}: {err}"
        finally:
            stats = reply_stats(last, engine.name, n_tokens) if last is not None else {}
            if writer is not None:
                writer.finish(status, stats)
            self.post_message(ReplyFinished(writer.mid if writer else None,
                                            writer.text if writer else "", status, last, error,
                                            stats))
            self._idle.set()

    async def on_reply_delta(self, message: ReplyDelta) -> None:
        if self.status.note.startswith("reading"):
            self.status.note = "generating… (Esc stops)"
        if self._reply is not None:
            await self._reply.append(message.event.text)
        self.status.show_event(message.event)

    async def on_reply_finished(self, message: ReplyFinished) -> None:
        if message.last is not None:
            self.status.show_event(message.last)
        reply, self._reply = self._reply, None
        if reply is not None:
            reply.mid = message.mid
            footer = message.error or reply_footer(message.stats)
            await reply.finish(message.text, message.status, footer)
        self.generating = False
        self.status.note = "stopped" if message.status == "stopped" else ""
        if message.error:
            self.notify(message.error, title="generation failed", severity="error")
        await self.refresh_sidebar()

    def action_stop(self) -> None:
        if self.waiting_for_model:  # not started: the message stays, unanswered
            self.waiting_for_model = False
            self.status.note = ""
            return
        if self.generating and not self._cancel.is_set():
            self._cancel.set()  # the engine sees it before its next token
            self.status.note = "stopping…"

    # ---- conversations ------------------------------------------------------------------
    async def refresh_sidebar(self, search: str | None = None) -> None:
        if search is None:
            search = self.query_one("#search").value
        await self.query_one(Sidebar).show(self.history.conversations(search), self.cid)

    async def open_conversation(self, cid: int | None) -> None:
        self.cid = cid
        self.history.set_current(cid)  # `ask -c` and the next start continue this one
        await self.chat.clear()
        if cid is not None:
            items = [MessageItem(m.role, m.content, status=m.status, mid=m.id,
                                 footer=reply_footer(m.stats) if m.role == "assistant" else "")
                     for m in self.history.messages(cid)]
            await self.chat.mount_all(items)
            self.chat.scroll_end(animate=False)
        await self.refresh_sidebar()

    def _busy(self) -> bool:
        busy = self.generating or self.waiting_for_model
        if busy:
            self.notify("a reply is on its way: Esc stops it first")
        return busy

    async def on_conversation_picked(self, message: ConversationPicked) -> None:
        if message.cid != self.cid and not self._busy():
            await self.open_conversation(message.cid)
            self.prompt.focus()

    async def on_search_changed(self, message: SearchChanged) -> None:
        await self.refresh_sidebar(message.text)

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

    # ---- shutdown -----------------------------------------------------------------------
    async def action_quit(self) -> None:
        self.history.set_state("draft", self.prompt.text)  # nothing typed is lost
        self.exit()

    def shutdown(self, wait_s: float = 10.0) -> None:
        """After the app exits: stop any reply (its text is saved), close engine and history."""
        self._cancel.set()
        self._idle.wait(wait_s)
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()
        self.history.close()

    async def wait_idle(self) -> None:
        """For tests: until no reply is being generated."""
        await asyncio.to_thread(self._idle.wait, 30)
