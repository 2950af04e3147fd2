"""One engine, many clients: a thread that runs requests one at a time in arrival order.

The engines are not re-entrant (one KV cache, one llama.cpp context), so every generation
goes through this worker. The queue of waiting requests is bounded: when it is full,
`submit` refuses at once with a 503 instead of letting clients pile up. Each job carries a
threading.Event that the engine checks once per token, so a client that goes away stops
its generation within one token and the next job starts at once. Consecutive turns of one
conversation reuse the KV cache for their shared prefix because the same engine serves
them (the engines compare the new prompt with what they evaluated).
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

from moechat.backends.errors import MoechatError

from moechat.app.server.errors import ApiError
from moechat.app.server.models import ServedModel
from moechat.app.server.requests import GenerationRequest
from moechat.app.server.stops import StopMatcher

RETRY_AFTER_S = 1


@dataclass(frozen=True, slots=True)
class Piece:
    """What a route receives: text deltas, then one piece with finish_reason set."""
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    moechat: dict = field(default_factory=dict)  # engine's own numbers, final piece only


DONE = object()  # after the final piece (or an ApiError): nothing more comes


class Job:
    def __init__(self, request: GenerationRequest, model: ServedModel, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.model = model
        self.cancel = threading.Event()
        self._loop = loop
        self._out: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        """From the worker thread: hand a Piece, an ApiError or DONE to the route."""
        self._loop.call_soon_threadsafe(self._out.put_nowait, item)

    async def next(self):
        return await self._out.get()


class EngineWorker:
    def __init__(self, engine, model: ServedModel, open_model: Callable[[ServedModel], object],
                 queue_size: int = 16):
        self.engine = engine
        self.loaded = model
        self._open_model = open_model
        self._jobs: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._running: Job | None = None
        self.finished: dict[str, int] = {}  # finish reason (or "error") -> requests
        self.last: dict[str, dict] = {}  # finish reason -> the last such request's token counts
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="moechat-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest, model: ServedModel) -> Job:
        if self._stopping.is_set():
            raise ApiError(503, "the server is shutting down", "shutting_down", retry_after=RETRY_AFTER_S)
        job = Job(request, model, asyncio.get_running_loop())
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the server is busy ({self._jobs.maxsize} requests are waiting); "
                                "retry later", "queue_full", retry_after=RETRY_AFTER_S) from None
        return job

    def status(self) -> dict:
        """What GET /moechat/status reports: the loaded model, the queue, what has finished."""
        return {"model": self.loaded.id, "engine": getattr(self.engine, "name", None),
                "placement": getattr(self.engine, "placement", None), "waiting": self._jobs.qsize(),
                "running": self._running is not None, "finished": dict(self.finished), "last": dict(self.last)}

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the running job, refuse the waiting ones, join the thread, close the engine."""
        self._stopping.set()
        running = self._running
        if running is not None:
            running.cancel.set()
        self._thread.join(timeout)
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            job.put(ApiError(503, "the server is shutting down", "shutting_down", retry_after=RETRY_AFTER_S))
            job.put(DONE)
        if not self._thread.is_alive() and self.engine is not None:
            self.engine.close()
            self.engine = None

    # ---- the worker thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self._jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            self._running = job
            try:
                if not job.cancel.is_set():
                    self._run(job)
            except ApiError as err:
                self._record("error", 0)
                job.put(err)
            except MoechatError as err:
                self._record("error", 0)
                job.put(ApiError(400, str(err)))
            except Exception as err:  # an engine bug: one line on the console, a 500 to the client
                self._record("error", 0)
                print(f"moechat serve: request failed: {type(err).__name__}: {err}", file=sys.stderr)
                job.put(ApiError(500, "the engine failed on this request (see the server's console)"))
            finally:
                self._running = None
                job.put(DONE)

    def _run(self, job: Job) -> None:
        self._ensure_loaded(job.model)
        messages = list(job.request.messages)
        prompt_tokens = self._check_context(messages)
        stops = StopMatcher(job.request.stop)
        n_tokens, final = 0, None
        for event in self.engine.generate(messages, job.request.sampling, job.cancel):
            if event.done:
                final = event
                break
            n_tokens += len(event.token_ids)
            text = stops.push(event.text)
            if text:
                job.put(Piece(text))
            if stops.stopped:
                job.cancel.set()  # the engine stops before its next token
        if final is None or final.finish_reason == "error":
            raise ApiError(500, (final.error if final else None) or "the engine produced nothing")
        tail = stops.push(final.text) + stops.flush()
        finish = "stop" if stops.stopped else final.finish_reason
        self._record(finish, n_tokens)
        job.put(Piece(tail, finish, final.prompt_tokens or prompt_tokens, n_tokens, self._numbers(final)))

    def _record(self, finish: str, completion_tokens: int) -> None:
        self.finished[finish] = self.finished.get(finish, 0) + 1
        self.last[finish] = {"completion_tokens": completion_tokens}

    def _check_context(self, messages) -> int:
        tokenizer, n_ctx = getattr(self.engine, "tokenizer", None), getattr(self.engine, "n_ctx", None)
        if tokenizer is None or not n_ctx:
            return 0
        n = len(tokenizer.prompt_tokens(messages))
        if n >= n_ctx:
            raise ApiError(400, f"the prompt has {n} tokens; this model's context holds {n_ctx} "
                                "(generation included)", "context_length_exceeded", "messages")
        return n

    def _ensure_loaded(self, model: ServedModel) -> None:
        """Switch models: close the loaded one first (one resident at a time), and reopen it
        if the new one fails to open."""
        if model.path == self.loaded.path:
            return
        previous = self.loaded
        self.engine.close()
        self.engine = None
        try:
            self.engine, self.loaded = self._open_model(model), model
        except MoechatError as err:
            self.engine = self._open_model(previous)
            raise ApiError(500, f"could not load {model.id}: {err}", "model_load_failed") from None
        print(f"moechat serve: loaded {model.id} ({self.engine.name}, {self.engine.placement})",
              file=sys.stderr)

    def _numbers(self, final) -> dict:
        return {
            "engine": self.engine.name,
            "placement": self.engine.placement,
            "prefill_tok_s": round(final.prefill_tok_s, 2),
            "decode_tok_s": round(final.decode_tok_s, 2),
            "rss_bytes": final.rss_bytes,
            "vram_bytes": final.vram_bytes,
            "stats": dict(final.stats),
        }
