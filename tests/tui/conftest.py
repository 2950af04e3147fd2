"""Helpers for the TUI tests: an app on a scripted engine, and waiting for it."""

from __future__ import annotations

import time

import pytest

from fake_engine import FakeEngine, fake_loader

SIZE = (100, 30)


@pytest.fixture
def make_app():
    """make_app(engine) -> a MoechatApp on that engine; shut down after the test."""
    from moechat.app.tui.app import MoechatApp

    apps = []

    def make(engine: FakeEngine | None = None, **kwargs) -> MoechatApp:
        engine = engine or FakeEngine(["Hello there."])
        kwargs.setdefault("remeasure_idle_s", None)  # never the real cache's profile (test_tui_profile)
        app = MoechatApp(open_model=fake_loader(engine), **kwargs)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.shutdown(wait_s=2)


async def wait_until(pilot, predicate, timeout: float = 10.0) -> None:
    """Poll `predicate` while letting the app run (workers post from threads)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate.__code__.co_names}")
        await pilot.pause(0.02)


async def ready(pilot) -> None:
    """Until the (fake) model has loaded."""
    await wait_until(pilot, lambda: pilot.app.engine is not None)


async def send(pilot, text: str) -> None:
    pilot.app.prompt.text = text
    await pilot.press("enter")
    await wait_until(pilot, lambda: not pilot.app.generating and pilot.app._idle.is_set())
    await pilot.pause()


