"""Does the chat app slow the engine down, and how fast does Esc stop it?

Runs the same greedy reply four ways on one loaded llama.cpp engine, alternating, and
prints a table: the engine alone (a plain loop over generate()), the same inside the
headless Textual app (thread worker, Markdown stream, history writes every 0.5 s) drawing
every 0.2 s as it does, the app drawing every token (as before issue 19: `ReplyBuffer.add`
patched to wake the UI each time), and the app stopped by Esc after STOP_AT words (tokens llama.cpp evaluated after the key press, and
the time from the key press to the reply shown as stopped).

    python benchmarks/tui_overhead.py [--model GGUF] [--threads N] [--tokens N] [--reps N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

PROMPT = "Write a long story about a dragon"
STOP_AT = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF path (default: the demo MoE)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: the engines' default thread count)")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("MOECHAT_DATA_DIR", tempfile.mkdtemp(prefix="moechat-bench-"))
    asyncio.run(run(args))


async def run(args) -> None:
    from moechat.app.tui.app import MoechatApp
    from moechat.app.tui.model_loader import EngineOptions
    from moechat.backends.engines.engine import Sampling

    sampling = Sampling(max_tokens=args.tokens)
    app = MoechatApp(args.model, EngineOptions(threads=args.threads, ctx=2048))
    from moechat.app.tui import coalesce

    direct, in_app, stops, pairs = [], [], [], []
    per_token, per_token_pairs, ui_share = [], [], {"coalesced": [], "per token": []}
    original_add = coalesce.ReplyBuffer.add

    async def in_app_reply(mode: str) -> float:
        coalesce.ReplyBuffer.add = (original_add if mode == "coalesced"
                                    else lambda self, event: original_add(self, event) or True)
        await app.action_new_chat()
        app.prompt.text = PROMPT
        cpu0, t0 = _main_thread_cpu(), time.perf_counter()
        await pilot.press("enter")
        await app.wait_idle()
        await pilot.pause()
        ui_share[mode].append((_main_thread_cpu() - cpu0) / (time.perf_counter() - t0))
        coalesce.ReplyBuffer.add = original_add
        return app.status.decode_tok_s

    async with app.run_test(size=(120, 36)) as pilot:
        while app.engine is None:
            await pilot.pause(0.1)
        app.sampling = sampling
        messages = [{"role": "user", "content": PROMPT}]
        for _ in range(args.reps):
            last = None
            for last in app.engine.generate(messages, sampling):
                pass
            direct.append(last.decode_tok_s)

            in_app.append(await in_app_reply("coalesced"))
            pairs.append(in_app[-1] / direct[-1])
            per_token.append(await in_app_reply("per token"))
            last = None
            for last in app.engine.generate(messages, sampling):  # a second "alone" for this pair
                pass
            per_token_pairs.append(per_token[-1] / last.decode_tok_s)

            await app.action_new_chat()
            app.prompt.text = PROMPT
            await pilot.press("enter")
            reply = app.chat.last("assistant")
            while reply.text.count(" ") < STOP_AT:
                await pilot.pause(0.005)
            evaluated = app.engine.llm.n_tokens  # tokens llama.cpp has run so far
            t0 = time.perf_counter()
            await pilot.press("escape")
            while reply.status != "stopped":
                await pilot.pause(0.002)
            stops.append((time.perf_counter() - t0, app.engine.llm.n_tokens - evaluated))
            await app.wait_idle()
        model = app.model_name
        threads = app.status.threads or args.threads
    app.shutdown()

    d, a = statistics.median(direct), statistics.median(in_app)
    print(f"model: {model} · llama.cpp · {threads} thread(s) · {args.tokens} tokens · "
          f"median of {args.reps} alternating pairs")
    print("| run | decode tok/s |")
    print("|---|---|")
    print(f"| engine alone | {d:.1f} |")
    print(f"| in the chat app | {a:.1f} |")
    print(f"| app / alone (median of the pairs' ratios) | {statistics.median(pairs):.2f} |")
    print(f"| pairs' ratios | {' '.join(f'{r:.2f}' for r in pairs)} |")
    print(f"| in the app, drawing every token (before issue 19) | {statistics.median(per_token):.1f} |")
    print(f"| per-token app / alone (median of its pairs) | {statistics.median(per_token_pairs):.2f} |")
    print(f"| its pairs' ratios | {' '.join(f'{r:.2f}' for r in per_token_pairs)} |")
    for mode, shares in ui_share.items():
        print(f"| UI thread's CPU while the app streams, {mode} (cores) | "
              f"{statistics.median(shares):.3f} |")
    print()
    print("| Esc after ~20 words | Esc → reply marked stopped (ms) | tokens decoded after Esc |")
    print("|---|---|---|")
    for i, (secs, extra) in enumerate(stops, 1):
        print(f"| run {i} | {secs * 1e3:.0f} | {extra} |")


def _main_thread_cpu() -> float:
    """CPU seconds of this process's main thread (the Textual event loop), from /proc."""
    import psutil

    pid = os.getpid()
    return next(t.user_time + t.system_time for t in psutil.Process().threads() if t.id == pid)


if __name__ == "__main__":
    main()
