"""Snapshots of the app at a fixed size (pytest-textual-snapshot; --snapshot-update to accept
a deliberate change). The scripted engine reports fixed numbers, so the screen is stable."""

from __future__ import annotations

import pytest
from conftest import ready, send
from fake_engine import FakeEngine

pytest.importorskip("pytest_textual_snapshot")

SNAP_SIZE = (110, 30)
REPLY = ("Paris is the capital of France.\n\n```python\ndef capital():\n    return 'Paris'\n```")


def test_a_finished_reply(snap_compare, make_app):
    app = make_app(FakeEngine([REPLY]))

    async def chat(pilot):
        await ready(pilot)
        await send(pilot, "What is the capital of France?")
        app.prompt.blur()  # no blinking cursor in the picture

    assert snap_compare(app, terminal_size=SNAP_SIZE, run_before=chat)


def test_a_stopped_reply(snap_compare, make_app):
    app = make_app(FakeEngine(["Once upon a time there was a dragon"], hold_after=4))

    async def stop(pilot):
        await ready(pilot)
        app.prompt.text = "Write a long story about a dragon"
        await pilot.press("enter")
        await pilot.pause(0.2)
        await pilot.press("escape")
        await pilot.pause(0.2)
        await app.wait_idle()
        await pilot.pause()
        app.prompt.blur()

    assert snap_compare(app, terminal_size=SNAP_SIZE, run_before=stop)
