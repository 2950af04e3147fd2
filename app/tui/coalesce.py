"""A reply's engine events, coalesced into a few screen updates per second.

The engine yields one Event per token (75 a second on a small MoE); rendering each of them
(Markdown stream, status bar) on the same cores that llama.cpp's threads use cost a third of
the decode speed (issue 19). So the generator thread only appends each event here (a lock
and a list append: nothing on the engine's critical path waits for the screen), and the app
drains it on a timer, UPDATE_S apart: the text in between is joined, the numbers are the
latest event's. A stalled engine still has its last tokens shown, one tick later.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from moechat.backends.engines.events import Event

UPDATE_S = 0.2  # at most five screen updates a second while a reply streams


@dataclass(frozen=True, slots=True)
class Batch:
    text: str  # the text of every event since the last batch
    event: Event  # the latest event (its running rates are the ones to show)
    tokens: int  # tokens in the batch


class ReplyBuffer:
    """Events in from the generator thread, batches out to the UI thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: list[str] = []
        self._tokens = 0
        self._last: Event | None = None
        self._fresh = False  # anything added since the last take
        self.events = 0  # events added in all (the first one wakes the UI)

    def add(self, event: Event) -> bool:
        """Take one event; True for the reply's first (worth showing at once)."""
        with self._lock:
            self._parts.append(event.text)
            self._tokens += len(event.token_ids)
            self._last, self._fresh = event, True
            self.events += 1
            return self.events == 1

    def take(self) -> Batch | None:
        """Everything added since the last take, or None if nothing was."""
        with self._lock:
            if not self._fresh:
                return None
            batch = Batch("".join(self._parts), self._last, self._tokens)
            self._parts, self._tokens, self._fresh = [], 0, False
            return batch
