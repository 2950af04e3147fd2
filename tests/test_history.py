"""The conversation history (app/history.py) and `moechat ask -c / --cid` on top of it."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from moechat.app import history as history_mod
from moechat.app.history import History, ReplyWriter, chat_messages, export_markdown
from moechat.backends.errors import MoechatError


@pytest.fixture
def history(tmp_path):
    h = History(tmp_path / "h.sqlite3")
    yield h
    h.close()


def test_fresh_file_is_migrated_to_the_latest_version_in_wal_mode(tmp_path):
    path = tmp_path / "h.sqlite3"
    History(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(history_mod.MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"conversations", "messages"} <= tables


def test_reopening_keeps_data_and_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "h.sqlite3"
    h = History(path)
    cid = h.new_conversation("t")
    h.add_message(cid, "user", "kept")
    h.close()
    h = History(path)  # migrations do not run twice
    assert [m.content for m in h.messages(cid)] == ["kept"]
    h.close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(history_mod.MIGRATIONS) + 1}")
    db.commit()
    db.close()
    with pytest.raises(MoechatError, match="newer moechat"):
        History(path)


def test_a_v1_file_is_upgraded_in_place(tmp_path):
    path = tmp_path / "h.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(history_mod.MIGRATIONS[0] + "PRAGMA user_version = 1;")
    db.execute("INSERT INTO conversations (title, created, updated) VALUES ('old', 1, 1)")
    db.commit()
    db.close()
    h = History(path)
    assert [c.title for c in h.conversations()] == ["old"]
    h.set_current(h.conversations()[0].id)  # v2's state table is there
    h.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(history_mod.MIGRATIONS) >= 2


def test_a_future_migration_runs_once_on_an_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "h.sqlite3"
    h = History(path)
    cid = h.new_conversation("old")
    h.close()
    before = len(history_mod.MIGRATIONS)
    monkeypatch.setattr(history_mod, "MIGRATIONS", history_mod.MIGRATIONS +
                        ["ALTER TABLE conversations ADD COLUMN pinned INTEGER DEFAULT 0;"])
    db = sqlite3.connect(path)
    assert history_mod.migrate(db) == before
    assert history_mod.migrate(db) == before + 1  # nothing left to do
    assert db.execute("SELECT title, pinned FROM conversations WHERE id=?", (cid,)).fetchone() \
        == ("old", 0)


def test_the_last_conversation_is_the_one_the_user_was_in(history):
    a = history.new_conversation("a")
    b = history.new_conversation("b")
    history.add_message(b, "user", "newest")
    assert history.last_conversation_id() == b  # nothing chosen: the latest
    history.set_current(a)
    assert history.last_conversation_id() == a
    history.delete_conversation(a)
    assert history.last_conversation_id() == b  # a deleted choice is ignored
    history.set_current(None)
    assert history.last_conversation_id() == b


def test_conversations_order_search_rename_delete(history):
    a = history.new_conversation("About dragons")
    history.add_message(a, "user", "tell me about 100% fire")
    b = history.new_conversation("Capitals")
    history.add_message(b, "user", "capital of France?")
    history.add_message(a, "assistant", "dragons breathe fire")  # a is now the latest
    assert [c.id for c in history.conversations()] == [a, b]
    assert history.last_conversation_id() == a
    assert [c.id for c in history.conversations("france")] == [b]  # message text, any case
    assert [c.id for c in history.conversations("100%")] == [a]  # LIKE wildcards escaped
    assert history.conversations("100_") == []
    history.rename(b, "Geography")
    assert history.conversation(b).title == "Geography"
    history.delete_conversation(a)
    assert [c.id for c in history.conversations()] == [b]
    assert history.messages(a) == []  # cascaded


def test_chat_messages_leave_out_unfinished_turns(history):
    cid = history.new_conversation("t", system_prompt="Be brief.")
    history.add_message(cid, "user", "hi")
    history.add_message(cid, "assistant", "hello")
    for status in ("stopped", "error", "streaming"):
        history.add_message(cid, "user", f"a turn that ended {status}")
        history.add_message(cid, "assistant", "half a rep", status=status)
    history.add_message(cid, "user", "lone")  # e.g. the engine failed to open
    history.add_message(cid, "user", "again")  # being answered now: no reply row yet
    assert chat_messages(history, cid) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "lone"},
        {"role": "user", "content": "again"},
    ]
    assert "**System:**" in export_markdown(history, cid)


def test_reply_writer_flushes_while_streaming_and_at_the_end(history):
    cid = history.new_conversation("t")
    writer = ReplyWriter(history, cid, flush_s=0.05)
    reader = History(history.path)  # another connection sees what reached the file
    writer.append("Hello")
    assert reader.messages(cid)[0].content == ""  # too soon to flush
    time.sleep(0.06)
    writer.append(" world")
    assert (reader.messages(cid)[0].content, reader.messages(cid)[0].status) == \
        ("Hello world", "streaming")
    writer.append("!")
    writer.finish("stopped", stats={"tokens": 3})
    m = reader.messages(cid)[0]
    assert (m.content, m.status, m.stats) == ("Hello world!", "stopped", {"tokens": 3})
    reader.close()


WRITER_SCRIPT = r"""
import sys, time
from moechat.app.history import History, ReplyWriter
h = History(sys.argv[1])
cid = h.new_conversation("kill test")
h.add_message(cid, "user", "write forever")
w = ReplyWriter(h, cid)
i = 0
while True:
    w.append(f"t{i} ")
    i += 1
    print(i, time.monotonic(), flush=True)
    time.sleep(0.01)
"""


def test_kill_9_mid_reply_loses_at_most_the_last_second(tmp_path):
    path = tmp_path / "h.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(path)],
                            stdout=subprocess.PIPE, text=True)
    appended = []  # (tokens appended, when)
    try:
        while not appended or appended[-1][1] - appended[0][1] < 2.5:
            n, t = proc.stdout.readline().split()
            appended.append((int(n), float(t)))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = time.monotonic()
    h = History(path)
    (conversation,) = h.conversations()
    user, reply = h.messages(conversation.id)
    assert (user.content, reply.status) == ("write forever", "streaming")
    tokens = reply.content.split()
    assert tokens == [f"t{i}" for i in range(len(tokens))]  # a clean prefix, nothing torn
    # Everything appended more than a second before the kill is on disk.
    due = max(n for n, t in appended if t <= killed_at - 1.0)
    assert len(tokens) >= due, (len(tokens), due, appended[-1][0])
    h.close()


# ---- moechat ask -c / --cid (the real demo model) ----------------------------------------
def ask(capsys, *argv) -> dict:
    from moechat.app.cli import main

    sys.stdin = io.StringIO("")  # nothing piped (pytest's stdin refuses reads)
    # one thread: llama.cpp's spinning workers crawl on a shared, busy CI machine
    assert main(["ask", "--json", "--threads", "1", *argv]) == 0
    return json.loads(capsys.readouterr().out)


STOPPED_STORY = ("In the heart of the desert, a majestic dragon named Luminari stood tall, its "
                 "scales shimmering with a soft,")


@pytest.mark.slow
def test_ask_continue_goes_on_with_the_last_conversation(demo_model, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", sys.stdin)  # restored after ask() replaces it
    first = ask(capsys, "What is the capital of France? Answer in one sentence.")
    assert "Paris" in first["text"]
    cid = first["conversation_id"]
    h = History()  # then a long reply stopped with Esc in the chat app, as a user would
    h.add_message(cid, "user", "Write a long story about a dragon")
    h.add_message(cid, "assistant", STOPPED_STORY, status="stopped")
    h.close()

    second = ask(capsys, "-c", "And the capital of Germany?")
    assert "Berlin" in second["text"]
    assert second["conversation_id"] == cid
    assert second["prompt_tokens"] > first["prompt_tokens"]  # the earlier turn was sent
    other = ask(capsys, "--cid", str(cid), "--max-tokens", "1", "Hi")
    assert other["conversation_id"] == cid
    fresh = ask(capsys, "--max-tokens", "1", "Hello")
    assert fresh["conversation_id"] != cid

    h = History()
    turns = [(m.role, m.status) for m in h.messages(cid)]
    assert turns == [("user", "done"), ("assistant", "done"), ("user", "done"),
                     ("assistant", "stopped")] + [("user", "done"), ("assistant", "done")] * 2
    assert h.messages(cid)[5].content == second["text"]
    assert h.last_conversation_id() == fresh["conversation_id"]
    h.close()


def test_ask_cid_of_a_missing_conversation_is_a_one_line_error():
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-m", "moechat", "ask", "--cid", "999", "hi"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "moechat: ask: no conversation with id 999"


def test_headless_paths_never_import_textual():
    code = ("import sys, moechat.app.cli, moechat.app.ask_cmd, moechat.app.history, "
            "moechat.app.tui_cmd; print('textual' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "False", out.stderr
