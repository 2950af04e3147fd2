"""What does `moechat serve` cost over the engine in-process?

The same greedy request, alternating: streamed through a `moechat serve` subprocess (OpenAI
route, SSE, timed at the client with httpx), and through an engine opened in this process
(a plain loop over generate()). Both run the same prompt on the same GGUF with the same
thread count, one after the other (never at once), so both reuse the KV cache of the
previous identical prompt alike. Prints decode tok/s (tokens after the first, over the time
from the first to the last token), time to first token, their medians and the ratios.

    python benchmarks/server_overhead.py [--model GGUF] [--threads N] [--tokens N] [--reps N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "Write a long story about a dragon."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF path (default: the demo MoE)")
    parser.add_argument("--threads", type=int, default=1,
                        help="engine threads (default 1: leaves a core for the client on 2-core machines)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("MOECHAT_DATA_DIR", tempfile.mkdtemp(prefix="moechat-bench-"))

    from moechat.backends.engines.engine import Sampling
    from moechat.backends.manager import open_engine
    from moechat.backends.model.model_card import read_model_card
    from moechat.backends.model.model_resolve import resolve_model

    path = resolve_model(args.model, progress=False)
    import httpx

    server, url = start_server(path, args.threads)
    http = httpx.Client(base_url=url, timeout=300)  # one client, as real ones keep (creating one costs ~60 ms)
    engine = open_engine(read_model_card(path), engine="llama.cpp", n_ctx=2048, threads=args.threads)
    sampling = Sampling(max_tokens=args.tokens, temperature=0.0)
    messages = [{"role": "user", "content": PROMPT}]
    try:
        served(http, args.tokens), in_process(engine, messages, sampling)  # warm both caches
        rows = []
        for rep in range(args.reps):
            rows.append(("served", rep, *served(http, args.tokens)))
            rows.append(("in-process", rep, *in_process(engine, messages, sampling)))
    finally:
        engine.close()
        http.close()
        server.terminate()
        server.wait(30)
    print_table(rows, path, args)


def start_server(path, threads: int):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moechat", "serve", str(path), "--port", str(port),
                             "--engine", "llama.cpp", "--ctx", "2048", "--threads", str(threads)],
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "listening on" in line:
            return proc, f"http://127.0.0.1:{port}"
    raise SystemExit("moechat serve did not start")


def served(http, tokens: int) -> tuple[int, float, float]:
    body = {"model": "any", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    body["model"] = http.get("/v1/models").json()["data"][0]["id"]
    t0 = time.perf_counter()
    first = last = None
    n = 0
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    return n, rate(n, first, last), (first - t0) * 1e3


def in_process(engine, messages, sampling) -> tuple[int, float, float]:
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for event in engine.generate(messages, sampling):
        if event.token_ids:
            n += len(event.token_ids)
        if event.text:
            last = time.perf_counter()
            first = first or last
    return n, rate(n, first, last), (first - t0) * 1e3


def rate(n: int, first: float, last: float) -> float:
    return (n - 1) / (last - first) if n > 1 and last > first else 0.0


def print_table(rows, path, args) -> None:
    print(f"model {path.name}, llama.cpp CPU, {args.threads} thread(s), {args.tokens} tokens, {args.reps} reps")
    print(f"{'route':<11} {'rep':>3} {'tokens':>6} {'decode tok/s':>12} {'TTFT ms':>8}")
    for route, rep, n, tok_s, ttft in rows:
        print(f"{route:<11} {rep:>3} {n:>6} {tok_s:>12.2f} {ttft:>8.1f}")
    med = {r: (statistics.median(x[3] for x in rows if x[0] == r), statistics.median(x[4] for x in rows if x[0] == r))
           for r in ("served", "in-process")}
    print(f"median served {med['served'][0]:.2f} tok/s, TTFT {med['served'][1]:.1f} ms; "
          f"in-process {med['in-process'][0]:.2f} tok/s, TTFT {med['in-process'][1]:.1f} ms")
    pairs = [(s, p) for s, p in zip([x for x in rows if x[0] == "served"], [x for x in rows if x[0] == "in-process"])]
    ratios = [s[3] / p[3] for s, p in pairs if p[3]]
    added = [s[4] - p[4] for s, p in pairs]
    print(f"served / in-process decode: median {statistics.median(ratios):.3f} (per pair {min(ratios):.3f}..{max(ratios):.3f}); "
          f"added TTFT: median {statistics.median(added):+.1f} ms (per pair {min(added):+.1f}..{max(added):+.1f})")


if __name__ == "__main__":
    main()
