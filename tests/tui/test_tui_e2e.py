"""The chat app on the real llama.cpp engine and the built-in demo MoE, end to end."""

from __future__ import annotations

import pytest
from conftest import SIZE, send, wait_until

from moechat.app.history import History

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


async def test_paris_question_on_the_demo_model(demo_model):
    from moechat.app.tui.app import MoechatApp
    from moechat.app.tui.model_loader import EngineOptions

    app = MoechatApp(str(demo_model), EngineOptions(threads=1, ctx=1024))
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.engine is not None, timeout=120)
            assert app.status.engine == "llama.cpp"
            await send(pilot, "What is the capital of France? Answer in one sentence.")
            reply = app.chat.last("assistant")
            assert "Paris" in reply.text and reply.status == "done"
            status = app.status.render()
            assert "tok/s" in status and app.status.decode_tok_s > 0
            assert app.status.prefill_tok_s > 0 and app.status.rss_bytes > 0
            (user, stored) = History().messages(app.cid)
            assert stored.content == reply.text and stored.stats["engine"] == "llama.cpp"
    finally:
        app.shutdown()
