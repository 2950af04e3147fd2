"""The llama.cpp engine with some layers on `moechat worker`s, run in a child process.

Why a child: when a worker dies mid-reply, ggml's RPC client aborts the whole process
(GGML_ABORT "Remote RPC server crashed", SIGABRT) from its dispatcher thread; there is no
error return to catch. The child holds llama.cpp, the RPC devices and the model; this side
streams its Events over a pipe. If the child dies, the reply ends with an error Event (the
text already streamed is kept) and the engine is closed. The chat app and `ask` never know
the difference: this class implements the same Engine protocol.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection
from dataclasses import dataclass
from typing import Iterator

from moechat.backends.engines.engine import Message, Sampling
from moechat.backends.engines.events import Event
from moechat.backends.engines.llamacpp_timing import time_llama
from moechat.backends.errors import MoechatError
from moechat.backends.model.model_card import ModelCard

START_TIMEOUT_S = 600.0  # loading sends every remote layer's weights over the link


@dataclass(frozen=True, slots=True)
class RpcSpec:
    model_path: str
    workers: tuple[str, ...]  # probed endpoints, one RPC device each, in tensor_split order
    split: tuple[int, ...]  # layers on each worker (the first layers stay here)
    n_ctx: int
    threads: int | None


class RpcLlamaCppEngine:
    name = "llama.cpp"

    def __init__(self, card: ModelCard, workers: tuple[str, ...], split: tuple[int, ...],
                 n_ctx: int, threads: int | None = None):
        if len(workers) != len(split):
            raise MoechatError("one layer count per worker is needed")
        self.card, self.workers, self.n_ctx = card, workers, n_ctx
        # a fresh interpreter (never fork a process that holds ggml threads), talking pickles
        # over a socket pair: multiprocessing's spawn would re-run the caller's __main__
        self._log = tempfile.NamedTemporaryFile(prefix="moechat-rpc-", suffix=".log", delete=False)
        parent_sock, child_sock = socket.socketpair()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moechat.backends.engines.rpc_engine", str(child_sock.fileno())],
            pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self._log, env={**os.environ, "GGML_NO_BACKTRACE": "1"})
        child_sock.close()
        self._conn = Connection(parent_sock.detach())
        self._conn.send(RpcSpec(card.path, workers, split, n_ctx, threads))
        reply = self._receive(START_TIMEOUT_S)
        if reply is None or reply[0] != "ready":
            message = reply[1] if reply else self._death("while loading the model")
            self.close()
            raise MoechatError(message)
        self.placement = reply[1]

    def generate(self, messages: list[Message], sampling: Sampling,
                 cancel: threading.Event | None = None) -> Iterator[Event]:
        if self._proc is None:
            raise MoechatError("the llama.cpp process has ended (a worker stopped); open the model again")
        self._conn.send(("generate", messages, sampling))
        cancel_sent, finished = False, False
        try:
            while True:
                if cancel is not None and cancel.is_set() and not cancel_sent:
                    self._conn.send(("cancel",))
                    cancel_sent = True
                reply = self._receive(None, poll_s=0.05)
                if reply is None:  # the child died: keep what was streamed, end with an error
                    finished = True
                    error = self._death("mid-reply")
                    self.close()
                    yield Event(finish_reason="error", error=error)
                    return
                kind, value = reply
                if kind == "error":
                    finished = True
                    raise MoechatError(value)
                finished = value.done
                yield value
                if finished:
                    return
        finally:
            if not finished and self._proc is not None:  # the caller stopped reading: stop the
                self._conn.send(("cancel",))  # child and drain its reply, so the next starts clean
                while (reply := self._receive(None, poll_s=0.05)) is not None and not (
                        reply[0] == "error" or reply[1].done):
                    pass

    def time_llama(self, n_prompt: int, n_decode: int, statistic: str = "mean") -> tuple[float, float]:
        """(prefill tok/s, decode tok/s) measured in the child (llamacpp_timing.time_llama there)."""
        self._conn.send(("time", n_prompt, n_decode, statistic))
        reply = self._receive(None)
        if reply is None:
            raise MoechatError(self._death("while timing"))
        if reply[0] == "error":
            raise MoechatError(reply[1])
        return reply[1]

    def close(self) -> None:
        proc, self._proc = getattr(self, "_proc", None), None
        if proc is not None:
            try:
                self._conn.send(("close",))
            except OSError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._conn.close()
        if getattr(self, "_log", None) is not None:
            self._log.close()
            try:
                os.unlink(self._log.name)
            except OSError:
                pass
            self._log = None

    # ---- helpers ----------------------------------------------------------------------------
    def _receive(self, timeout: float | None, poll_s: float = 1.0):
        """The child's next message, or None if it died (or said nothing within timeout)."""
        try:
            while not self._conn.poll(poll_s):
                if self._proc.poll() is not None:
                    return None
                if timeout is not None:
                    timeout -= poll_s
                    if timeout <= 0:
                        return None
            return self._conn.recv()
        except (EOFError, OSError):
            return None

    def _death(self, when: str) -> str:
        """One line: which worker is gone (probed now) or what ggml said before it aborted."""
        from moechat.backends.plan.rpc_probe import probe_worker

        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for endpoint in self.workers:
            try:
                probe_worker(endpoint, measure_link=False)
            except MoechatError:
                return f"worker {endpoint} stopped {when}; the reply so far is kept"
        last = ""
        try:
            with open(self._log.name, errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
            last = next((line for line in reversed(lines) if "error" in line.lower() or "abort" in line.lower()),
                        lines[-1] if lines else "")
        except OSError:
            pass
        code = self._proc.returncode
        return f"the llama.cpp process ended {when} (exit {code}){': ' + last if last else ''}"


def _child_main(fd: int) -> None:
    """The child: register the workers, load the model split across them, serve requests.
    A reader thread takes "cancel" at any time; other requests queue for the main loop."""
    from moechat.backends.engines.llamacpp_engine import LlamaCppEngine, LlamaCppPlacement
    from moechat.backends.engines.rpc import register_workers
    from moechat.backends.model.model_card import read_model_card

    conn = Connection(fd)
    spec: RpcSpec = conn.recv()
    try:
        n_devices = register_workers(spec.workers)
        if n_devices != len(spec.workers):
            raise MoechatError(f"expected {len(spec.workers)} RPC devices, llama.cpp has {n_devices}")
        card = read_model_card(spec.model_path)
        engine = LlamaCppEngine(card, LlamaCppPlacement("split", split=spec.split), n_ctx=spec.n_ctx,
                                threads=spec.threads)
    except MoechatError as err:
        conn.send(("error", str(err)))
        return
    cancel, requests = threading.Event(), queue.Queue()
    threading.Thread(target=_read_requests, args=(conn, cancel, requests), daemon=True).start()
    conn.send(("ready", engine.placement))
    while (request := requests.get())[0] != "close":
        try:
            if request[0] == "generate":
                for event in engine.generate(request[1], request[2], cancel=cancel):
                    conn.send(("event", event))
            elif request[0] == "time":
                conn.send(("timed", time_llama(engine.llm, *request[1:])))
        except MoechatError as err:
            conn.send(("error", str(err)))
    engine.close()


def _read_requests(conn, cancel: threading.Event, requests: queue.Queue) -> None:
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            request = ("close",)
        if request[0] == "cancel":
            cancel.set()
            continue
        if request[0] == "generate":
            cancel.clear()  # here, in order: a cancel sent after this request is never lost
        requests.put(request)
        if request[0] == "close":
            return


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))
