"""Stop sequences over streamed text: release text as soon as it cannot be the start of a stop.

The engines stop on the model's end token only; OpenAI's `stop` and ollama's `options.stop`
are strings that may span several tokens, so the tail that could still become one is held
back until the next token decides it.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Text to release now; after a stop is found, the text before it and nothing more."""
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        self.held += text
        cut = min((i for i in (self.held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.held = self.held[:cut], ""
            return out
        keep = max((_overlap(self.held, s) for s in self.stops), default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
