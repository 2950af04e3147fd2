"""A chat template's cost per turn: compiled on every call (as before) against compiled once
(backends/engines/chat_template.compiled). Prints a table of ms per render; both are timed
in the same run, alternating, so the ratio holds on a busy machine.

    python benchmarks/template_render.py [--rounds 5] [--calls 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from moechat.backends.engines.chat_template import CHATML_TEMPLATE, compiled, render_chat

HARMONY = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "templates" / "harmony.jinja"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And now?"}]


def ms_per_call(template: str, calls: int, fresh: bool) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        if fresh:
            compiled.cache_clear()
        render_chat(template, MESSAGES)
    return (time.perf_counter() - start) / calls * 1e3


def main() -> int:
    from moechat.app.arg_types import positive_int

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--calls", type=positive_int, default=20)
    args = parser.parse_args()
    print("| template | chars | compiled each call, ms | compiled once, ms | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for name, template in (("harmony (gpt-oss)", HARMONY.read_text()), ("ChatML", CHATML_TEMPLATE)):
        fresh, kept = [], []
        for _ in range(args.rounds):
            fresh.append(ms_per_call(template, args.calls, fresh=True))
            kept.append(ms_per_call(template, args.calls, fresh=False))
        f, k = statistics.median(fresh), statistics.median(kept)
        print(f"| {name} | {len(template)} | {f:.2f} | {k:.3f} | {f / k:.0f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
