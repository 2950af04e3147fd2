"""Start-up time of one-shot commands, up to the point where a model would load.

`moechat ask` on a missing file exits right after argument parsing and model-card checks,
i.e. just before llama.cpp would load: that wall time is the start-up a user waits before
any model work. Best of N runs (start-up is noise-sensitive, the minimum is the cost).

    python benchmarks/startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass (interpreter alone)": [sys.executable, "-c", "pass"],
    "moechat --help": [sys.executable, "-m", "moechat", "--help"],
    "moechat ask (until model load)": [sys.executable, "-m", "moechat", "ask", "--model",
                                       "/nonexistent/model.gguf", "hi"],
}


def best_of(cmd: list[str], runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    print("| command | best wall time (s) |")
    print("|---|---|")
    for name, cmd in COMMANDS.items():
        print(f"| {name} | {best_of(cmd, args.runs):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
