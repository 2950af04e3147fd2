"""The chat app: owns the engine, the history and the conversation shown.

Two thread workers do the slow work: `_load` opens a model, `_generate` streams a reply.
The generator hands the engine a threading.Event (`cancel`) that the engine checks once
per token, so Esc stops the engine itself, not just the display. Both workers talk to the
UI only through Messages (messages.py); the history is written from the generator thread
(the user message before it starts, the reply while it streams). A streaming reply reaches
the screen through a ReplyBuffer drained every UPDATE_S (coalesce.py), not token by token.
The keys' and the palette's commands are in commands.py; re-measuring a drifted hardware
profile while the app sits idle is profile_refresh.py.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable

from textual import work
from textual.app import App, ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer

from moechat.app.history import (
    History,
    ReplyWriter,
    chat_messages,
    reply_stats,
    title_from,
)
from moechat.app.tui.bindings import APP_BINDINGS
from moechat.app.tui.chat_view import ChatView
from moechat.app.tui.commands import ChatCommands
from moechat.app.tui.coalesce import UPDATE_S, ReplyBuffer
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
from moechat.app.tui.planner_bridge import predicted_decode_tok_s
from moechat.app.tui.profile_refresh import IDLE_S, ProfileRefresh
from moechat.app.tui.prompt_input import PromptInput
from moechat.app.tui.sidebar import Sidebar
from moechat.app.tui.status_bar import StatusBar
from moechat.backends.engines.engine import Sampling
from moechat.backends.errors import MoechatError
from moechat.backends.manager import record_reply

OpenModel = Callable[[str | None, EngineOptions, Callable[[str], None]], LoadedModel]


class MoechatApp(ChatCommands, ProfileRefresh, App):
    CSS_PATH = "moechat.tcss"
    TITLE = "moechat"
    BINDINGS = APP_BINDINGS

    def __init__(self, model_spec: str | None = None, options: EngineOptions = EngineOptions(),
                 open_model: OpenModel = open_model, history: History | None = None,
                 remeasure_idle_s: float | None = IDLE_S) -> None:
        super().__init__()
        self.remeasure_idle_s = remeasure_idle_s  # idle seconds before a drifted profile is re-measured
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
        self._updates = ReplyBuffer()  # the streaming reply's events, drained every UPDATE_S
        self._update_timer = None

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
        self.stop_remeasure()
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
        threads = getattr(message.engine, "threads", 0)  # said before the first reply too
        status.threads = threads if isinstance(threads, int) else 0
        self.query_one(LoadProgress).display = False
        self.arm_remeasure()
        if self.waiting_for_model:
            self.waiting_for_model = False
            await self.start_reply()

    def on_model_load_failed(self, message: ModelLoadFailed) -> None:
        self.loading = self.waiting_for_model = False
        self.status.note = ""
        self.query_one(LoadProgress).display = False
        self.status.model = "no model"
        self.arm_remeasure()
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
        self.stop_remeasure()  # the reply wants the cores; a profile measured beside it is wrong
        self._reply = await self.chat.add(MessageItem("assistant", status="generating"))
        self._cancel = threading.Event()
        self._idle.clear()
        self._updates = ReplyBuffer()
        self._update_timer = self.set_interval(UPDATE_S, self._show_new_text)
        self.generating = True
        self.status.note = "reading the prompt… (Esc stops)"
        self._generate(self.cid, messages, self._cancel)

    @work(thread=True, group="generate")
    def _generate(self, cid: int, messages: list[dict], cancel: threading.Event) -> None:
        engine, writer = self.engine, None
        last, n_tokens, status, error = None, 0, "done", None
        updates = self._updates
        try:
            writer = ReplyWriter(self.history, cid, model=self.model_name)
            for event in engine.generate(messages, self.sampling, cancel):
                writer.append(event.text)
                n_tokens += len(event.token_ids)
                last = event
                if updates.add(event):  # the first token: show the reply has started
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
            if status in ("done", "stopped"):  # measured beside predicted: corrects the plan
                record_reply(self.card, engine, last)
            self.post_message(ReplyFinished(writer.mid if writer else None,
                                            writer.text if writer else "", status, last, error,
                                            stats))
            self._idle.set()

    async def on_reply_delta(self, message: ReplyDelta) -> None:
        await self._show_new_text()

    async def _show_new_text(self) -> None:
        """What the generator added since the last screen update (on a UPDATE_S timer)."""
        batch = self._updates.take()
        if batch is None:
            return
        if self.status.note.startswith("reading"):
            self.status.note = "generating… (Esc stops)"
        if self._reply is not None:
            await self._reply.append(batch.text)
        self.status.show_event(batch.event)

    async def on_reply_finished(self, message: ReplyFinished) -> None:
        if self._update_timer is not None:
            self._update_timer.stop()
            self._update_timer = None
        await self._show_new_text()
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
        self.arm_remeasure()  # the run log has a new run: the profile may have drifted

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

    # ---- shutdown -----------------------------------------------------------------------
    async def action_quit(self) -> None:
        self.history.set_state("draft", self.prompt.text)  # nothing typed is lost
        self.exit()

    def shutdown(self, wait_s: float = 10.0) -> None:
        """After the app exits: stop any reply (its text is saved) or measurement, close engine
        and history."""
        self._cancel.set()
        if self._remeasure_cancel is not None:
            self._remeasure_cancel.set()
        self._idle.wait(wait_s)
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()
        self.history.close()

    async def wait_idle(self) -> None:
        """For tests: until no reply is being generated."""
        await asyncio.to_thread(self._idle.wait, 30)
