"""Conversation history: one SQLite file in the user data dir, shared by the TUI and `ask`.

WAL mode, so a reader (another `moechat`) never blocks the writer, and every commit is
durable against a killed process. The schema is versioned by `PRAGMA user_version`: each
entry of MIGRATIONS upgrades the file by one version, inside one transaction.

A reply is saved while it streams (ReplyWriter flushes at least every FLUSH_S seconds)
and once more at the end, so kill -9 mid-reply loses at most the last second of it.

Standard library only: `moechat ask` imports this before the model loads.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

FILE_NAME = "history.sqlite3"
FLUSH_S = 0.5  # a streaming reply reaches the disk at least this often (while tokens arrive)

# status of a message: "done"; an assistant reply also "streaming" (being written, or its
# writer died), "stopped" (the user stopped it) or "error"
MIGRATIONS = [
    # v1
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL,
        model TEXT NOT NULL DEFAULT '',
        system_prompt TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'done',
        model TEXT NOT NULL DEFAULT '',
        stats TEXT NOT NULL DEFAULT '{}',
        created REAL NOT NULL
    );
    CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
    CREATE INDEX conversations_by_update ON conversations(updated);
    """,
    # v2: small key/value state, e.g. the conversation the user was last in
    """
    CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
]


@dataclass(frozen=True, slots=True)
class Conversation:
    id: int
    title: str
    model: str
    system_prompt: str
    created: float
    updated: float


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    conversation_id: int
    role: str  # "user" | "assistant"
    content: str
    status: str
    model: str = ""
    stats: dict = field(default_factory=dict)


def history_path() -> Path:
    from moechat.backends.paths import data_dir

    return data_dir() / FILE_NAME


def title_from(text: str, limit: int = 48) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "New chat")
    return line if len(line) <= limit else line[: limit - 1] + "…"


class History:
    """One connection, usable from several threads (a lock serializes them)."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path is not None else history_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10,
                                       isolation_level=None)  # autocommit; explicit BEGINs
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable vs. process death
            self._db.execute("PRAGMA foreign_keys=ON")
            migrate(self._db)
        except sqlite3.DatabaseError as err:
            from moechat.backends.errors import MoechatError

            raise MoechatError(f"{self.path}: cannot open the history ({err})") from err

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, params: tuple = ()) -> int:
        """One write; returns the new row's id (for an INSERT)."""
        with self._lock:
            return self._db.execute(sql, params).lastrowid

    def _rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:  # fetched under the lock: the connection is shared by threads
            return self._db.execute(sql, params).fetchall()

    # ---- conversations ------------------------------------------------------------------
    def new_conversation(self, title: str = "New chat", model: str = "",
                         system_prompt: str = "") -> int:
        now = time.time()
        return int(self._execute(
            "INSERT INTO conversations (title, model, system_prompt, created, updated) "
            "VALUES (?, ?, ?, ?, ?)", (title, model, system_prompt, now, now)))

    def conversation(self, cid: int) -> Conversation | None:
        rows = self._rows("SELECT * FROM conversations WHERE id = ?", (cid,))
        return Conversation(*rows[0]) if rows else None

    def conversations(self, search: str = "") -> list[Conversation]:
        """Most recently updated first; `search` matches titles and message text."""
        if not search:
            rows = self._rows("SELECT * FROM conversations ORDER BY updated DESC, id DESC")
        else:
            like = f"%{_escape_like(search)}%"
            rows = self._rows(
                "SELECT * FROM conversations WHERE title LIKE ? ESCAPE '\\' OR id IN "
                "(SELECT conversation_id FROM messages WHERE content LIKE ? ESCAPE '\\') "
                "ORDER BY updated DESC, id DESC", (like, like))
        return [Conversation(*row) for row in rows]

    def last_conversation_id(self) -> int | None:
        """The conversation the user was last in (open in the TUI, or the last `ask`),
        else the most recently updated one."""
        rows = self._rows(
            "SELECT c.id FROM state s JOIN conversations c ON c.id = CAST(s.value AS INTEGER) "
            "WHERE s.key = 'current_conversation'")
        if not rows:
            rows = self._rows("SELECT id FROM conversations ORDER BY updated DESC, id DESC LIMIT 1")
        return int(rows[0][0]) if rows else None

    def get_state(self, key: str, default: str = "") -> str:
        rows = self._rows("SELECT value FROM state WHERE key = ?", (key,))
        return rows[0][0] if rows else default

    def set_state(self, key: str, value: str) -> None:
        self._execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))

    def set_current(self, cid: int | None) -> None:
        """Remember the conversation the user is in (None: a new chat, not started yet)."""
        if cid is None:
            self._execute("DELETE FROM state WHERE key = 'current_conversation'")
        else:
            self.set_state("current_conversation", str(cid))

    def rename(self, cid: int, title: str) -> None:
        self._execute("UPDATE conversations SET title = ? WHERE id = ?", (title, cid))

    def set_system_prompt(self, cid: int, system_prompt: str) -> None:
        self._execute("UPDATE conversations SET system_prompt = ? WHERE id = ?",
                      (system_prompt, cid))

    def delete_conversation(self, cid: int) -> None:
        """Delete it with its messages and the KV states its replies saved (named in their
        stats by the engine, "kv_state")."""
        names = [m.stats["kv_state"] for m in self.messages(cid) if m.stats.get("kv_state")]
        self._execute("DELETE FROM conversations WHERE id = ?", (cid,))
        if names:
            from moechat.backends.engines.kv_states import drop

            drop(names)

    # ---- messages -----------------------------------------------------------------------
    def add_message(self, cid: int, role: str, content: str, status: str = "done",
                    model: str = "") -> int:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN")
            cur = self._db.execute(
                "INSERT INTO messages (conversation_id, role, content, status, model, created) "
                "VALUES (?, ?, ?, ?, ?, ?)", (cid, role, content, status, model, now))
            self._db.execute("UPDATE conversations SET updated = ?, model = CASE WHEN ? = '' "
                             "THEN model ELSE ? END WHERE id = ?", (now, model, model, cid))
            self._db.execute("COMMIT")
            return int(cur.lastrowid)

    def update_message(self, mid: int, content: str, status: str | None = None,
                       stats: dict | None = None) -> None:
        sets, params = ["content = ?"], [content]
        if status is not None:
            sets.append("status = ?")
            params.append(status)
        if stats is not None:
            sets.append("stats = ?")
            params.append(json.dumps(stats))
        self._execute(f"UPDATE messages SET {', '.join(sets)} WHERE id = ?", (*params, mid))

    def delete_message(self, mid: int) -> None:
        self._execute("DELETE FROM messages WHERE id = ?", (mid,))

    def messages(self, cid: int) -> list[StoredMessage]:
        rows = self._rows(
            "SELECT id, conversation_id, role, content, status, model, stats FROM messages "
            "WHERE conversation_id = ? ORDER BY id", (cid,))
        return [StoredMessage(*row[:6], stats=json.loads(row[6] or "{}")) for row in rows]


def chat_messages(history: History, cid: int) -> list[dict]:
    """The conversation as engine messages, system prompt first.

    A turn whose reply did not finish (stopped with Esc or Ctrl-C, failed, or cut off by a
    crash) stays on screen and in the file, marked, but is not sent again: a half-written
    reply steers the model into continuing it instead of answering the next question.
    """
    conversation = history.conversation(cid)
    out = []
    if conversation and conversation.system_prompt:
        out.append({"role": "system", "content": conversation.system_prompt})
    stored = history.messages(cid)
    for i, m in enumerate(stored):
        reply = stored[i + 1] if m.role == "user" and i + 1 < len(stored) else None
        if m.role == "user" and reply is not None and reply.role == "assistant" \
                and reply.status != "done":
            continue  # the user message of an unfinished turn
        if m.role == "assistant" and m.status != "done":
            continue
        out.append({"role": m.role, "content": m.content})
    return out


class ReplyWriter:
    """An assistant reply saved while it streams: the row exists from the first token and is
    rewritten when FLUSH_S has passed since the last write, then once more by `finish`."""

    def __init__(self, history: History, cid: int, model: str = "", flush_s: float = FLUSH_S):
        self.history = history
        self.flush_s = flush_s
        self.parts: list[str] = []
        self.mid = history.add_message(cid, "assistant", "", status="streaming", model=model)
        self._last_flush = time.monotonic()

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def append(self, delta: str) -> None:
        if delta:
            self.parts.append(delta)
        if time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        self.history.update_message(self.mid, self.text)
        self._last_flush = time.monotonic()

    def finish(self, status: str = "done", stats: dict | None = None) -> None:
        self.history.update_message(self.mid, self.text, status=status, stats=stats)


def reply_stats(last, engine_name: str, n_tokens: int) -> dict:
    """What is stored with a reply (and shown under it): the final Event's figures."""
    stats = {"engine": engine_name, "tokens": n_tokens,
             "prefill_tok_s": round(last.prefill_tok_s, 2),
             "decode_tok_s": round(last.decode_tok_s, 2), "finish_reason": last.finish_reason}
    stats.update({k: v for k, v in last.stats.items() if k != "placement"})
    return stats


def export_markdown(history: History, cid: int) -> str:
    conversation = history.conversation(cid)
    if conversation is None:
        return ""
    out = [f"# {conversation.title}", ""]
    if conversation.system_prompt:
        out += ["**System:**", "", conversation.system_prompt, ""]
    for m in history.messages(cid):
        who = "You" if m.role == "user" else f"Assistant ({m.model})" if m.model else "Assistant"
        note = "" if m.status == "done" else f" *[{m.status}]*"
        out += [f"**{who}:**{note}", "", m.content, ""]
    return "\n".join(out)


def migrate(db: sqlite3.Connection) -> int:
    """Bring the file up to len(MIGRATIONS); returns the version it was at."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > len(MIGRATIONS):
        from moechat.backends.errors import MoechatError

        raise MoechatError(f"the history file is from a newer moechat (schema v{version})")
    for target in range(version + 1, len(MIGRATIONS) + 1):
        # executescript commits first; the script itself runs in one transaction
        db.executescript(f"BEGIN; {MIGRATIONS[target - 1]} PRAGMA user_version = {target}; COMMIT;")
    return version


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
