"""A streaming reply reaches the screen a few times a second, not once per token (coalesce.py),
and the status bar says how many threads the engine used."""

from __future__ import annotations

import time

import pytest
from conftest import SIZE, ready, wait_until
from fake_engine import FakeEngine

from moechat.app.tui.coalesce import UPDATE_S, ReplyBuffer
from moechat.app.tui.message_item import MessageItem
from moechat.backends.engines.events import Event


def test_reply_buffer_joins_text_and_keeps_the_latest_numbers():
    buffer = ReplyBuffer()
    assert buffer.take() is None
    assert buffer.add(Event(text="Hel", token_ids=(1,), decode_tok_s=10.0))  # the first: wake up
    assert not buffer.add(Event(text="lo", token_ids=(2,), decode_tok_s=12.0))
    batch = buffer.take()
    assert (batch.text, batch.tokens, batch.event.decode_tok_s) == ("Hello", 2, 12.0)
    assert buffer.take() is None  # nothing new
    buffer.add(Event(text="", token_ids=(3,), decode_tok_s=13.0))  # half a character: no text
    assert buffer.take().tokens == 1


class SteadyEngine(FakeEngine):
    """300 tokens, 2 ms apart: a fast engine."""

    def generate(self, messages, sampling, cancel=None):
        for event in super().generate(messages, sampling, cancel):
            if not event.done:
                time.sleep(0.002)
            yield event


@pytest.mark.asyncio
async def test_a_fast_reply_is_drawn_a_few_times_a_second(make_app, monkeypatch):
    words = " ".join(f"w{i}" for i in range(300))
    engine = SteadyEngine([words], stats={"threads": 2})
    appends = []
    original = MessageItem.append

    async def counting_append(self, delta):
        appends.append(delta)
        await original(self, delta)

    monkeypatch.setattr(MessageItem, "append", counting_append)
    app = make_app(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.prompt.text = "go"
        t0 = time.monotonic()
        await pilot.press("enter")
        await wait_until(pilot, lambda: not app.generating)
        elapsed = time.monotonic() - t0
        await pilot.pause()
        assert app.chat.last("assistant").text == words
        assert "".join(appends) == words  # nothing lost between updates
        assert len(appends) <= elapsed / UPDATE_S + 3 < 300  # not one update per token
        assert "2 threads" in app.status.render()
