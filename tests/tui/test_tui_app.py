"""The chat app driven headless with Pilot on a scripted engine (fake_engine.py)."""

from __future__ import annotations

import pytest
from conftest import SIZE, ready, send, wait_until
from fake_engine import FakeEngine
from textual.widgets import ListView

from moechat.app.history import History
from moechat.app.tui.sidebar import ConversationItem

pytestmark = pytest.mark.asyncio


def texts(app) -> list[tuple[str, str]]:
    return [(m.role, m.text) for m in app.chat.items()]


def stored(cid: int) -> list[tuple[str, str, str]]:
    history = History()
    try:
        return [(m.role, m.content, m.status) for m in history.messages(cid)]
    finally:
        history.close()


async def test_send_streams_markdown_and_shows_numbers(make_app):
    engine = FakeEngine(["The capital of France is **Paris**."])
    app = make_app(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press(*"Capital?")  # typed, not pasted
        await pilot.press("enter")
        await wait_until(pilot, lambda: not app.generating)
        await pilot.pause()
        assert texts(app) == [("user", "Capital?"),
                              ("assistant", "The capital of France is **Paris**.")]
        assert app.prompt.text == ""
        assert engine.calls == [[{"role": "user", "content": "Capital?"}]]
        reply = app.chat.last("assistant")
        rendered = " ".join(str(p.content) for p in reply.query("MarkdownParagraph"))
        assert "Paris" in rendered and "**" not in rendered  # rendered as Markdown
        status = app.status.render()
        for figure in ("fake-moe", "experts of 3/4 layers in RAM", "prefill 400.0 tok/s",
                       "decode 55.5 tok/s", "mem 300 MiB", "gpu hit rate 75%", "cache hits 42"):
            assert figure in status
        assert stored(app.cid) == [("user", "Capital?", "done"),
                                   ("assistant", "The capital of France is **Paris**.", "done")]


async def test_escape_stops_the_engine_within_one_token(make_app):
    engine = FakeEngine(["one two three four five six seven"], hold_after=3)
    app = make_app(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.prompt.text = "count"
        await pilot.press("enter")
        await wait_until(pilot, lambda: engine.holding.is_set())
        reply = app.chat.last("assistant")
        await wait_until(pilot, lambda: reply.text == "one two three ")  # streamed so far
        assert app.generating
        await pilot.press(*"next q")  # typing stays live while a reply streams
        await pilot.press("enter")  # refused while streaming: the text stays
        assert app.prompt.text == "next q"
        await pilot.press("escape")
        await wait_until(pilot, lambda: not app.generating)
        await pilot.pause()
        assert engine.sent_tokens == 3  # not one token after the stop
        assert reply.text == "one two three " and reply.status == "stopped"
        assert "stopped" in str(reply.query_one(".footer").render())
        assert stored(app.cid)[-1] == ("assistant", "one two three ", "stopped")
        assert app.prompt.text == "next q"
        # The stopped turn stays on screen but is not sent as context again.
        engine.hold_after = None
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(engine.calls) == 2 and not app.generating)
        assert engine.calls[1] == [{"role": "user", "content": "next q"}]
        assert [r for r, _ in texts(app)] == ["user", "assistant"] * 2


async def test_regenerate_replaces_the_last_reply(make_app):
    engine = FakeEngine(["first answer", "second answer"])
    app = make_app(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "question")
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: len(engine.calls) == 2 and not app.generating)
        await pilot.pause()
        assert texts(app) == [("user", "question"), ("assistant", "second answer")]
        assert engine.calls[1] == engine.calls[0] == [{"role": "user", "content": "question"}]
        assert stored(app.cid) == [("user", "question", "done"),
                                   ("assistant", "second answer", "done")]


async def test_edit_last_message_and_resend(make_app):
    engine = FakeEngine(["reply one", "reply two"])
    app = make_app(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "helo")
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert app.prompt.text == "helo" and texts(app) == [] and stored(app.cid) == []
        await pilot.press("end", "l", "o")
        await pilot.press("enter")
        await wait_until(pilot, lambda: not app.generating and len(engine.calls) == 2)
        await pilot.pause()
        assert texts(app) == [("user", "helolo"), ("assistant", "reply two")]


async def test_newline_keys_do_not_send(make_app):
    engine = FakeEngine(["ok"])
    app = make_app(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("a", "ctrl+j", "b", "shift+enter", "c")
        assert app.prompt.text == "a\nb\nc" and engine.calls == []
        await pilot.press("enter")
        await wait_until(pilot, lambda: not app.generating and engine.calls)
        assert engine.calls[0][-1]["content"] == "a\nb\nc"


async def test_switch_conversation_and_continue_it(make_app):
    engine = FakeEngine(["reply A", "reply B", "reply A2"])
    app = make_app(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "alpha")
        first = app.cid
        await pilot.press("ctrl+n")
        assert texts(app) == []
        await send(pilot, "beta")
        assert app.cid != first
        listed = app.query(ConversationItem)
        assert [i.cid for i in listed] == [app.cid, first]  # newest first
        await pilot.click(listed[1])
        await wait_until(pilot, lambda: app.cid == first)
        await pilot.pause()
        assert texts(app) == [("user", "alpha"), ("assistant", "reply A")]
        await send(pilot, "more")
        assert engine.calls[-1] == [{"role": "user", "content": "alpha"},
                                    {"role": "assistant", "content": "reply A"},
                                    {"role": "user", "content": "more"}]


async def test_restart_shows_the_history_and_search_finds_it(make_app):
    engine = FakeEngine(["Paris it is.", "Berlin."])
    app = make_app(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "capital of France?")
        await pilot.press("ctrl+n")
        await send(pilot, "capital of Germany?")
        await pilot.press(*"unsent", "ctrl+j", *"draft")
        await pilot.press("ctrl+q")
    app.shutdown()

    again = make_app(FakeEngine(["x"]))
    async with again.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert texts(again) == [("user", "capital of Germany?"), ("assistant", "Berlin.")]
        assert again.prompt.text == "unsent\ndraft"  # the draft typed before quitting
        again.prompt.clear()
        assert len(again.query(ConversationItem)) == 2
        await pilot.press("ctrl+f", *"paris")  # matches a reply's text, not a title
        await wait_until(pilot, lambda: len(again.query(ConversationItem)) == 1)
        item = again.query_one(ConversationItem)
        await pilot.click(item)
        await wait_until(pilot, lambda: texts(again)[:1] == [("user", "capital of France?")])
    again.shutdown()

    # The chat open at exit is the one the next start (and `ask -c`) continues.
    third = make_app(FakeEngine(["x"]))
    async with third.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert texts(third) == [("user", "capital of France?"), ("assistant", "Paris it is.")]


async def test_rename_delete_and_settings(make_app, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    engine = FakeEngine(["```python\nprint(1)\n```"])
    app = make_app(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("f4", *"0.7", "enter")
        await pilot.press("f5", *"64", "enter")
        assert (app.sampling.temperature, app.sampling.max_tokens) == (0.7, 64)
        await pilot.press("f4", *"hot", "enter")  # refused
        assert app.sampling.temperature == 0.7
        await pilot.press("f3", *"Be brief.", "enter")
        await send(pilot, "code please")
        assert engine.calls[0][0] == {"role": "system", "content": "Be brief."}
        await pilot.press("f2", *"Renamed", "enter")
        await pilot.pause()
        assert str(app.query_one(ConversationItem).query_one("Label").content) == "Renamed"
        await pilot.press("ctrl+s")
        exported = (tmp_path / f"moechat-chat-{app.cid}.md").read_text()
        assert exported.startswith("# Renamed") and "print(1)" in exported
        app.query_one(ListView).focus()
        await pilot.press("delete", "y")
        await wait_until(pilot, lambda: len(app.query(ConversationItem)) == 0)
        assert app.cid is None and texts(app) == []


async def test_help_and_plan_screens(tiny_model, monkeypatch):
    """F1 lists the keys; F9 shows the planner's plan for the loaded model's card, here on a
    recorded consumer machine profile (so the test measures nothing)."""
    from pathlib import Path

    from moechat.backends.plan import hardware_profile
    from moechat.app.tui.app import MoechatApp
    from moechat.app.tui.model_loader import LoadedModel
    from moechat.backends.model.model_card import read_model_card

    profile = hardware_profile.read_profile(Path(__file__).parents[1] / "profiles" / "desktop-3060-ddr4.json")
    monkeypatch.setattr(hardware_profile, "load_profile", lambda refresh=False: profile)
    card = read_model_card(tiny_model("llama-moe"))
    engine = FakeEngine(["ok"])
    app = MoechatApp(open_model=lambda spec, options, progress: LoadedModel(engine, "tiny", card))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("f1")
        await pilot.pause()
        assert type(app.screen).__name__ == "HelpScreen"
        help_text = app.screen.query_one("Markdown").source
        for key, what in (("ctrl+r", "Regenerate"), ("escape", "Stop reply"),
                          ("f9", "Show plan"), ("ctrl+j", "new line")):
            assert key in help_text and what in help_text
        await pilot.press("escape")
        await pilot.press("f9")
        await wait_until(pilot, lambda: type(app.screen).__name__ == "PlanScreen")
        await wait_until(pilot, lambda: "Choice:" in str(app.screen.query_one("#plan-text").render()))
        text = str(app.screen.query_one("#plan-text").render())
        assert "llama.cpp" in text and "tok/s" in text


async def test_a_model_that_fails_to_load_is_reported_not_fatal(tmp_path):
    from moechat.app.tui.app import MoechatApp
    from moechat.backends.errors import MoechatError

    def broken(spec, options, progress):
        raise MoechatError(f"{spec}: not a GGUF file")

    app = MoechatApp("bad.gguf", open_model=broken)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.status.model == "no model")
        app.prompt.text = "hello"
        await pilot.press("enter")
        await pilot.pause()
        assert app.prompt.text == "hello" and texts(app) == []  # kept, not sent
        assert any("not a GGUF file" in str(n.message) for n in app._notifications)
    app.shutdown()


async def test_copy_reply_and_code_block(make_app):
    reply = "Here:\n\n```python\ndef f():\n    return 1\n```\n\nDone."
    app = make_app(FakeEngine([reply]))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "code")
        await pilot.press("ctrl+t")
        assert app.clipboard == reply
        await pilot.press("f8")
        assert app.clipboard == "def f():\n    return 1\n"


async def test_switch_model_closes_the_old_engine_and_opens_the_new_one(make_app):
    from moechat.app.tui.app import MoechatApp
    from moechat.app.tui.model_loader import LoadedModel

    engines, specs = [], []

    def open_model(spec, options, progress):
        specs.append(spec)
        engines.append(FakeEngine([f"from {spec}"]))
        return LoadedModel(engines[-1], f"model {spec}")

    app = MoechatApp(open_model=open_model)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+o", *"/models/other.gguf", "enter")
        await wait_until(pilot, lambda: len(specs) == 2 and app.engine is engines[1])
        assert specs == [None, "/models/other.gguf"] and engines[0].closed
        assert app.status.model == "model /models/other.gguf"
        await send(pilot, "hi")
        assert texts(app)[-1] == ("assistant", "from /models/other.gguf")
    app.shutdown()


def fake_planner(monkeypatch, candidates, reason="llama.cpp on the CPU: no GPU here"):
    """The planner answers with `candidates` for any card, on a machine whose profile counts
    as measured (so nothing is measured here)."""
    import types
    from pathlib import Path

    from moechat.backends.plan import hardware_profile
    from moechat.backends.plan import planner

    plan = types.SimpleNamespace(choice=candidates[0], candidates=tuple(candidates), reason=reason)
    monkeypatch.setattr(planner, "make_plan", lambda card, profile, **kw: plan)
    monkeypatch.setattr(hardware_profile, "load_profile", lambda measure=True, **kw: "2 cores")
    monkeypatch.setattr(hardware_profile, "profile_path", lambda: Path(__file__))  # exists


def candidate(engine, placement, decode, n_cpu_moe=None, note=""):
    import types

    return types.SimpleNamespace(engine=engine, placement=placement, n_cpu_moe=n_cpu_moe,
                                 decode_tok_s=decode, prefill_tok_s=10 * decode, note=note)


async def test_the_plan_screen_shows_the_planners_plan(make_app, monkeypatch):
    fake_planner(monkeypatch, [candidate("llama.cpp", "cpu", 31.5),
                               candidate("hobbit", "hobbit", 80.0, note="needs a GPU")])
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.card = object()  # a loaded model's card
        await pilot.press("f9")
        await wait_until(pilot, lambda: type(app.screen).__name__ == "PlanScreen")
        await wait_until(pilot, lambda: "Choice" in str(
            app.screen.query_one("#plan-text").render()))
        text = str(app.screen.query_one("#plan-text").render())
        assert "llama.cpp · cpu · predicted 31.5 tok/s decode" in text
        assert "no GPU here" in text and "needs a GPU" in text


async def test_measured_decode_is_shown_against_the_prediction(monkeypatch):
    from moechat.app.tui.app import MoechatApp
    from moechat.app.tui.model_loader import LoadedModel

    fake_planner(monkeypatch, [candidate("llama.cpp", "cpu", 30.0),
                               candidate("fake", "fake", 111.0)])
    engine = FakeEngine(["some reply"])
    app = MoechatApp(open_model=lambda spec, options, progress:
                     LoadedModel(engine, "fake-moe", card=object()))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.status.predicted_decode_tok_s == 111.0  # the loaded engine's candidate
        await send(pilot, "hi")
        assert "decode 55.5 tok/s (50% of the predicted 111.0)" in app.status.render()
    app.shutdown()


async def test_every_command_is_in_the_palette(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {"Regenerate", "Edit last message", "System prompt", "Temperature", "Max tokens",
                "Switch model", "Copy reply", "Copy code block", "Export to Markdown",
                "Show the plan", "New chat", "Rename chat", "Delete chat", "Search chats",
                "Keys"} <= titles


async def test_a_message_sent_while_the_model_loads_is_answered_once_it_is_ready():
    import threading

    from moechat.app.tui.app import MoechatApp
    from moechat.app.tui.model_loader import LoadedModel

    release = threading.Event()
    engine = FakeEngine(["ready now"])

    def slow_open(spec, options, progress):
        progress("loading weights")
        assert release.wait(20)
        return LoadedModel(engine, "slow-moe")

    app = MoechatApp(open_model=slow_open)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app.loading and app.engine is None
        app.prompt.text = "early question"
        await pilot.press("enter")
        await pilot.pause()
        assert texts(app) == [("user", "early question")] and app.prompt.text == ""
        assert stored(app.cid) == [("user", "early question", "done")]  # saved at once
        assert engine.calls == []
        release.set()
        await wait_until(pilot, lambda: engine.calls and not app.generating)
        await pilot.pause()
        assert texts(app) == [("user", "early question"), ("assistant", "ready now")]
    app.shutdown()
