"""A scripted engine for TUI tests: implements the Engine protocol, replies from a script.

`hold_after=k` makes it block after its k-th token until someone sets the `cancel` event
it was given: the only way out is the stop reaching the engine itself. It then checks the
event (once per token, like the real engines) and finishes with "cancelled".
"""

from __future__ import annotations

import threading
from typing import Iterator

from moechat.app.tui.model_loader import LoadedModel
from moechat.backends.engines.engine import Message, Sampling
from moechat.backends.engines.events import Event

HOLD_TIMEOUT_S = 20  # a test that never presses Esc fails instead of hanging


class FakeEngine:
    name = "fake"
    placement = "experts of 3/4 layers in RAM"

    def __init__(self, replies: list[str], hold_after: int | None = None,
                 stats: dict | None = None):
        self.replies = list(replies)  # one per generate() call, cycled
        self.hold_after = hold_after
        self.stats = stats or {"gpu_hit_rate": 0.75, "cache_hits": 42}
        self.calls: list[list[Message]] = []
        self.sent_tokens = 0  # tokens yielded by the last call
        self.holding = threading.Event()  # set while blocked waiting for cancel
        self.closed = False

    def generate(self, messages: list[Message], sampling: Sampling,
                 cancel: threading.Event | None = None) -> Iterator[Event]:
        self.calls.append([dict(m) for m in messages])
        reply = self.replies[(len(self.calls) - 1) % len(self.replies)]
        tokens = reply.split(" ")
        tokens = [t + " " for t in tokens[:-1]] + tokens[-1:]
        self.sent_tokens = 0
        finish = "stop"
        for i, piece in enumerate(tokens):
            if self.hold_after is not None and i == self.hold_after:
                self.holding.set()
                assert cancel is not None and cancel.wait(HOLD_TIMEOUT_S), "never cancelled"
            if cancel is not None and cancel.is_set():  # once per token
                finish = "cancelled"
                break
            self.sent_tokens += 1
            yield Event(text=piece, token_ids=(i,), prompt_tokens=10, decode_tok_s=50.0 + i)
        yield Event(prompt_tokens=10, prefill_tok_s=400.0, decode_tok_s=55.5,
                    rss_bytes=300 * 1024**2, stats=self.stats, finish_reason=finish)

    def close(self) -> None:
        self.closed = True


def fake_loader(engine: FakeEngine, name: str = "fake-moe"):
    """An `open_model` for MoechatApp that hands out `engine`."""
    def open_model(spec, options, progress):
        progress("loading the fake model")
        return LoadedModel(engine, name, None)
    return open_model
