"""Every custom Message of the TUI. Posted from worker threads too (post_message is
thread-safe), always to the App, which owns the state."""

from __future__ import annotations

from typing import Any

from textual.message import Message

from moechat.backends.engines.events import Event


class ModelLoadProgress(Message):
    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage


class ModelLoaded(Message):
    def __init__(self, engine: Any, model_name: str, card: Any = None,
                 predicted_decode_tok_s: float | None = None) -> None:
        super().__init__()
        self.predicted_decode_tok_s = predicted_decode_tok_s  # the cost model's, if known
        self.engine = engine
        self.model_name = model_name
        self.card = card


class ModelLoadFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class ReplyDelta(Message):
    """New text while a reply streams: every event's text since the last update, and the
    latest event (coalesce.py: a few of these a second, not one per token)."""

    def __init__(self, event: Event, text: str | None = None) -> None:
        super().__init__()
        self.event = event
        self.text = event.text if text is None else text


class ReplyFinished(Message):
    def __init__(self, mid: int | None, text: str, status: str, last: Event | None,
                 error: str | None, stats: dict) -> None:
        super().__init__()
        self.mid = mid  # the reply's row in the history
        self.stats = stats
        self.text = text
        self.status = status  # "done" | "stopped" | "error"
        self.last = last
        self.error = error


class PromptSubmitted(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class ConversationPicked(Message):
    def __init__(self, cid: int) -> None:
        super().__init__()
        self.cid = cid


class SearchChanged(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class ProfileRemeasure(Message):
    """The idle re-measurement of a drifted profile (profile_refresh.py): "measuring" (detail:
    the step), then "done" (detail: how long), "unchanged", "stopped" or "failed" (detail: why)."""

    def __init__(self, state: str, detail: str = "", predicted_decode_tok_s: float | None = None) -> None:
        super().__init__()
        self.state = state
        self.detail = detail
        self.predicted_decode_tok_s = predicted_decode_tok_s  # after "done": on the new profile
