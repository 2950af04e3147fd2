"""The one event type every engine yields and every front end consumes.

An engine's `generate()` yields one Event per decoded token (text may be empty while
a multi-byte character is incomplete) and a final Event whose `finish_reason` is set.
Rates are running figures: the final event carries the run's totals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True, slots=True)
class Event:
    text: str = ""  # text delta since the previous event
    token_ids: tuple[int, ...] = ()  # token ids decoded since the previous event
    prompt_tokens: int = 0  # tokens in the prompt (including any reused prefix)
    prefill_tok_s: float = 0.0  # prompt tokens evaluated per second
    decode_tok_s: float = 0.0  # generated tokens per second so far
    rss_bytes: int = 0  # resident memory of this process
    vram_bytes: int = 0  # GPU memory this engine holds, when known
    stats: Mapping[str, float | int | str] = field(default_factory=dict)  # engine-specific
    finish_reason: FinishReason | None = None  # set on the last event only
    error: str | None = None  # one line, with finish_reason == "error"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None
