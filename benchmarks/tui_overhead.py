"""Does the chat app slow the engine down, and how fast does Esc stop it?

Runs the same greedy reply three ways on one loaded llama.cpp engine, alternating, and
prints a table: the engine alone (a plain loop over generate()), the same inside the
headless Textual app (thread worker, Markdown stream, history writes every 0.5 s), and the
app stopped by Esc after STOP_AT words (tokens llama.cpp evaluated after the key press, and
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
    direct, in_app, stops, pairs = [], [], [], []
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

            await app.action_new_chat()
            app.prompt.text = PROMPT
            await pilot.press("enter")
            await app.wait_idle()
            await pilot.pause()
            in_app.append(app.status.decode_tok_s)
            pairs.append(in_app[-1] / direct[-1])

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
    print()
    print("| Esc after ~20 words | Esc → reply marked stopped (ms) | tokens decoded after Esc |")
    print("|---|---|---|")
    for i, (secs, extra) in enumerate(stops, 1):
        print(f"| run {i} | {secs * 1e3:.0f} | {extra} |")


if __name__ == "__main__":
    main()
