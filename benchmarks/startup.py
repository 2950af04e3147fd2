"""Start-up time of one-shot commands, up to the point where a model would load.

`moechat ask` on a model too big for this machine (a sparse GGUF claiming 256 GiB) runs
argument parsing, the GGUF header read (model card) and the memory-fit check, then stops
exactly where llama.cpp would start loading: that wall time is the start-up a user waits
before any model work. Best of N runs (start-up is noise-sensitive, the minimum is the cost).

    python benchmarks/startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fixtures.bad_ggufs import write_header_only_model  # noqa: E402

HUGE = write_header_only_model(Path(tempfile.mkdtemp()) / "huge.gguf", hidden=4096, n_heads=32,
                               tensor_rows=2**24)

COMMANDS = {
    "python -c pass (interpreter alone)": [sys.executable, "-c", "pass"],
    "moechat --help": [sys.executable, "-m", "moechat", "--help"],
    "moechat ask (header read + fit check, until model load)": [
        sys.executable, "-m", "moechat", "ask", "--model", str(HUGE), "hi"],
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
