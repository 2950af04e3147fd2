"""The one protocol every engine implements; front ends never branch on the engine."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator, Protocol, TypedDict

from moechat.backends.engines.events import Event


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class Sampling:
    max_tokens: int = 512
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 40
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self):
        assert self.max_tokens > 0 and self.temperature >= 0 and 0 < self.top_p <= 1


class Engine(Protocol):
    name: str  # "llama.cpp", "torch", "fiddler", "hobbit"
    placement: str  # human-readable, e.g. "experts of 12/32 layers in RAM"

    def generate(
        self, messages: list[Message], sampling: Sampling, cancel: threading.Event | None = None
    ) -> Iterator[Event]:
        """Stream a reply to `messages`; checks `cancel` once per token."""
        ...

    def close(self) -> None: ...
