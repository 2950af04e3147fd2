"""Instant resume (issue 16): wall time of `moechat ask -c` on a long conversation, from a new
process, with the KV state cache and without it, against a fresh one-line prompt.

For each model and conversation size: a conversation of ~N tokens is written into a scratch
history (filler turns), one `ask -c` reads it in full and saves its state (setup, not timed),
and both folders are snapshotted. Then, alternating, each timed run starts from a copy of
the snapshots in a new `moechat ask` process:
  fresh    `ask "One more detail, please."` in a new conversation (empty KV cache)
  cache    `ask -c "One more detail, please."` with the saved states
  no cache the same with MOECHAT_KV_CACHE_SIZE=0 and no states
and the greedy tokens of `cache` and `no cache` are compared.

  .venv/bin/python benchmarks/resume.py [--models demo,mixtral] [--sizes 1000,4000] [--reps 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "One more detail, please."
FILLER = ("The museum's east wing holds maps of the old harbour, drawn between 1650 and 1720, "
          "with notes on tides, shoals and the ships that used them. ")


def model_path(name: str) -> Path:
    if name == "demo":
        from moechat.backends.model.demo_model import demo_model_path

        return demo_model_path(progress=True)
    if name == "mixtral":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.fixtures.random_geometry import random_geometry_path

        return random_geometry_path("mixtral-8x7b", n_layers=4, qtype="Q4_0", progress=True)
    return Path(name)


def write_conversation(data_dir: Path, n_tokens: int, turns: int = 6) -> None:
    from moechat.app.history import FILE_NAME, History

    history = History(data_dir / FILE_NAME)
    cid = history.new_conversation("resume benchmark", model="bench")
    per_turn = FILLER * max(1, int(n_tokens * 4 / len(FILLER) / turns))  # ~4 characters a token
    for i in range(turns):
        history.add_message(cid, "user", f"Part {i + 1} of my notes:\n{per_turn}")
        history.add_message(cid, "assistant", f"Noted part {i + 1}.")
    history.set_current(cid)
    history.close()


def ask(model: Path, folder: Path, args: list[str], ctx: int, engine: str, cache: bool,
        threads: int) -> tuple[float, dict]:
    env = dict(os.environ, MOECHAT_DATA_DIR=str(folder / "data"), MOECHAT_KV_CACHE_DIR=str(folder / "kv"))
    if not cache:
        env["MOECHAT_KV_CACHE_SIZE"] = "0"
    cmd = [sys.executable, "-m", "moechat", "ask", *args, "--model", str(model), "--max-tokens", "8",
           "--ctx", str(ctx), "--engine", engine, "--threads", str(threads), "--json"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return wall, json.loads(done.stdout)


def fresh_copy(snapshot: Path, work: Path, with_states: bool) -> Path:
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(snapshot / "data", work / "data")
    if with_states:
        shutil.copytree(snapshot / "kv", work / "kv")
    return work


def bench(model: Path, n_tokens: int, reps: int, nocache_reps: int, ctx: int, engine: str,
          threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="moechat-resume-") as tmp:
        tmp = Path(tmp)
        snap = tmp / "snapshot"
        write_conversation(snap / "data", n_tokens)
        setup_s, setup = ask(model, snap, ["-c", "What did I write first?"], ctx, engine, cache=True, threads=threads)
        times: dict[str, list[float]] = {"fresh": [], "cache": [], "no cache": []}
        outs: dict[str, dict] = {}
        for rep in range(reps):
            order = ["fresh", "cache", "no cache"] if rep % 2 == 0 else ["no cache", "cache", "fresh"]
            for kind in order:
                if kind == "no cache" and len(times[kind]) >= nocache_reps:
                    continue
                work = tmp / "work"
                if kind == "fresh":
                    if work.exists():
                        shutil.rmtree(work)
                    wall, out = ask(model, work, [QUESTION], ctx, engine, cache=True, threads=threads)
                else:
                    fresh_copy(snap, work, with_states=kind == "cache")
                    wall, out = ask(model, work, ["-c", QUESTION], ctx, engine, cache=kind == "cache", threads=threads)
                times[kind].append(wall)
                outs[kind] = out
        best = {k: min(v) for k, v in times.items()}
        return {"model": model.name, "engine": engine, "conversation_tokens": setup["prompt_tokens"],
                "setup_s": setup_s, "prompt_tokens": outs["cache"]["prompt_tokens"],
                "restored": outs["cache"]["stats"].get("prompt_tokens_restored", 0),
                "evaluated": outs["cache"]["stats"].get("prompt_tokens_evaluated", 0),
                "fresh_prompt_tokens": outs["fresh"]["prompt_tokens"],
                **{f"{k}_s": v for k, v in best.items()},
                "ratio_vs_fresh": best["cache"] / best["fresh"],
                "speedup_vs_no_cache": best["no cache"] / best["cache"],
                "same_tokens": outs["cache"]["token_ids"] == outs["no cache"]["token_ids"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,mixtral", help="demo, mixtral or GGUF paths, comma-separated")
    parser.add_argument("--sizes", default="1000,4000", help="conversation sizes in tokens (approximate)")
    parser.add_argument("--reps", type=int, default=2, help="timed runs of fresh and cache (best kept)")
    parser.add_argument("--nocache-reps", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--engine", default="llama.cpp")
    parser.add_argument("--threads", type=int, default=1,
                        help="default 1: on a shared, oversubscribed machine ggml's spinning thread "
                             "barriers made 2-thread decode ~40x slower than 1-thread (measured here)")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        model = model_path(name)
        for size in (int(s) for s in args.sizes.split(",")):
            row = bench(model, size, args.reps, args.nocache_reps, args.ctx, args.engine, args.threads)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print("| model | engine | conversation tok | restored / evaluated | fresh one-line s | ask -c cache s | "
          "ask -c no cache s | cache / fresh | no cache / cache | same greedy tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['engine']} | {r['prompt_tokens']} | {r['restored']} / {r['evaluated']} | "
              f"{r['fresh_s']:.1f} | {r['cache_s']:.1f} | {r['no cache_s']:.1f} | {r['ratio_vs_fresh']:.2f} | "
              f"{r['speedup_vs_no_cache']:.1f}x | {'yes' if r['same_tokens'] else 'NO'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
