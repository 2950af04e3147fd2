"""The chat app's cost in a real terminal: the same reply from `moechat ask` and from the chat
app running inside tmux (a real terminal emulator, so every screen update is written out),
alternating. The app's decode speed is read from the history, where it stores each reply's
figures; ask's from its --json. Prints a table of the pairs and their ratio.

    python benchmarks/tui_overhead_tmux.py [--model GGUF] [--tokens N] [--reps N] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Write a long story about a dragon"
SESSION = f"moechat-bench-{os.getpid()}"


def ask(model: str, tokens: int, threads: list[str], env: dict) -> float:
    r = subprocess.run([sys.executable, "-m", "moechat", "ask", "--json", "-m", model, "--max-tokens",
                        str(tokens), *threads, PROMPT], capture_output=True, text=True, env=env,
                       timeout=600, stdin=subprocess.DEVNULL)
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout)["decode_tok_s"]


def replies(db: Path) -> list[dict]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT stats FROM messages WHERE role = 'assistant' AND status = 'done' "
                         "ORDER BY id").fetchall()
    return [json.loads(s) for (s,) in rows]


def tmux(*args: str) -> None:
    subprocess.run(["tmux", *args], check=True, timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF path (default: the demo MoE)")
    parser.add_argument("--tokens", type=int, default=512,
                        help="ask's --max-tokens; keep the chat app's default of 512 for equal replies")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, help="default: the engines' default")
    args = parser.parse_args()
    from moechat.backends.model.demo_model import demo_model_path

    model = args.model or str(demo_model_path(progress=False))
    threads = ["--threads", str(args.threads)] if args.threads else []
    data = Path(tempfile.mkdtemp(prefix="moechat-bench-tmux-"))
    env = dict(os.environ, MOECHAT_DATA_DIR=str(data / "ask"))
    app_env = f"MOECHAT_DATA_DIR={shlex.quote(str(data / 'app'))}"
    db = data / "app" / "history.sqlite3"
    command = (f"{app_env} {shlex.quote(sys.executable)} -m moechat -m {shlex.quote(model)} "
               f"{' '.join(threads)}")
    tmux("new-session", "-d", "-s", SESSION, "-x", "120", "-y", "36", command)
    pairs = []
    try:
        time.sleep(8)  # the model loads
        for rep in range(args.reps):
            alone = ask(model, args.tokens, threads, env)
            done = len(replies(db))
            tmux("send-keys", "-t", SESSION, "C-n")  # a new chat: the same prompt, no history
            time.sleep(0.5)
            tmux("send-keys", "-t", SESSION, "-l", PROMPT)
            tmux("send-keys", "-t", SESSION, "Enter")
            deadline = time.monotonic() + 600
            while len(replies(db)) <= done:
                if time.monotonic() > deadline:
                    raise SystemExit("the chat app did not answer")
                time.sleep(0.2)
            stats = replies(db)[-1]
            pairs.append((alone, stats["decode_tok_s"], stats.get("threads")))
            print(f"rep {rep + 1}: ask {alone:.1f} tok/s, chat app {stats['decode_tok_s']:.1f} tok/s "
                  f"({stats.get('tokens')} tokens, {stats.get('threads')} threads)", file=sys.stderr)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", SESSION], timeout=30)
    print(f"model: {Path(model).name} · {args.tokens} tokens · {args.reps} alternating pairs · "
          f"chat app in tmux 120x36")
    print("| pair | ask decode tok/s | chat app decode tok/s | threads (app) | app / ask |")
    print("|---|---|---|---|---|")
    for i, (a, t, n) in enumerate(pairs, 1):
        print(f"| {i} | {a:.1f} | {t:.1f} | {n} | {t / a:.2f} |")
    print(f"| median | {statistics.median(a for a, _, _ in pairs):.1f} | "
          f"{statistics.median(t for _, t, _ in pairs):.1f} | | "
          f"{statistics.median(t / a for a, t, _ in pairs):.2f} |")


if __name__ == "__main__":
    main()
