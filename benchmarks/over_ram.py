"""A model bigger than its memory cap: the stream engine against llama.cpp over mmap.

    sudo .venv/bin/python benchmarks/over_ram.py [--model FILE] [--caps 0.75,0.5,0.3]

For each cap (a share of the file's size) both sides run in their own cgroup-v1 memory group
with that limit (when run as root; else uncapped, marked), after the page cache is dropped:
the stream engine opened by the manager with --engine auto (so the test is also that auto
picks it instead of refusing), and llama.cpp over mmap with its extra buffer types off
(`use_extra_bufts = false`: no repacked anonymous copy, so the kernel can page weights back
to the file). An uncapped stream run gives the reference greedy tokens and the compute time
of a token with every expert in RAM (its second reply); the drive's large-read rate comes
from backends/plan/disk_probe.py. Printed per cap and side: decode and prefill tok/s, disk
bytes read per decoded token (/proc/self/io), achieved GB/s, and the ratio to the physical
limit  1 / (bytes missed per token / read bandwidth + compute per token), where the read
bandwidth is the best the drive showed: the probe's, or what the stream engine achieved if
higher (a virtual disk backed by the host's page cache can beat the probe).

Default model: SmolLM2 upcycled to 32 experts, top-4, Q8_0, skewed router (2.76 GB), built
into /tmp/moechat-over-ram/ on first use.
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

CGROUP = Path("/sys/fs/cgroup/memory")
PROMPT = "Write a short poem about the sea."


def default_model() -> Path:
    from moechat.backends.model.demo_model import UpcycleRecipe, build_upcycled, smollm2_path

    recipe = UpcycleRecipe(n_experts=32, n_used=4, expert_type="Q8_0", seed=0, router_skew=0.7)
    out = Path("/tmp/moechat-over-ram") / recipe.file_name
    if not out.exists():
        build_upcycled(smollm2_path(), out, recipe)
    return out


def _io_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


# ---- children: one side, one run, one JSON line ---------------------------------------------


def child_stream(model: str, tokens: int, replies: int, engine_name: str, budget: str | None) -> dict:
    from moechat.backends.engines.engine import Sampling
    from moechat.backends.manager import open_engine
    from moechat.backends.model.model_card import read_model_card

    card = read_model_card(model)
    engine = open_engine(card, engine_name, n_ctx=512, ram_budget=budget)
    out = {"engine": engine.name, "placement": engine.placement, "replies": []}
    messages = [{"role": "user", "content": PROMPT}]
    for _ in range(replies):
        io0, ids, last = _io_read_bytes(), [], None
        for ev in engine.generate(messages, Sampling(max_tokens=tokens)):
            ids.extend(ev.token_ids)
            last = ev
        stats = dict(last.stats)
        out["replies"].append({"token_ids": ids, "decode_tok_s": last.decode_tok_s,
                               "prefill_tok_s": last.prefill_tok_s, "io_bytes": _io_read_bytes() - io0,
                               "decoded": stats.get("decoded_tokens", len(ids)), "stats": stats})
    engine.close()
    return out


def child_mmap(model: str, tokens: int) -> dict:
    import llama_cpp
    import numpy as np

    default_params = llama_cpp.llama_model_default_params

    def mapped_params():  # no repacked copies: every weight stays a page of the file
        p = default_params()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = mapped_params
    threads = len(os.sched_getaffinity(0))
    llm = llama_cpp.Llama(model_path=model, n_ctx=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False, use_mmap=True)
    prompt = llm.tokenize(f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n".encode(),
                          special=True)
    io0 = _io_read_bytes()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t0
    io1 = _io_read_bytes()
    ids, t1 = [], time.perf_counter()
    for _ in range(tokens):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))  # the last token's
        tok = int(logits.argmax())
        ids.append(tok)
        llm.eval([tok])
    decode_s = time.perf_counter() - t1
    return {"engine": "llama.cpp mmap", "replies": [{
        "token_ids": ids, "decode_tok_s": tokens / decode_s, "prefill_tok_s": len(prompt) / prefill_s,
        "io_bytes": _io_read_bytes() - io1, "prefill_io_bytes": io1 - io0, "decoded": tokens}]}


# ---- the parent -----------------------------------------------------------------------------


def run_child(args: list[str], limit: int | None, timeout: float) -> dict:
    group = None
    if limit is not None:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        group = CGROUP / f"moechat-over-ram-{os.getpid()}"
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit))

    def enter():
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    cmd = [sys.executable, __file__, "--child", *args]
    # each run evaluates its whole prompt: a KV state saved by an earlier run (another cap,
    # another engine) restored here would make the greedy-token comparison one of caches
    env = {**os.environ, "MOECHAT_KV_CACHE_DIR": tempfile.mkdtemp(prefix="moechat-over-ram-kv-")}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=enter, env=env)
        peak = int((group / "memory.max_usage_in_bytes").read_text()) if group else 0
        killed = group is not None and "oom_kill 1" in (group / "memory.oom_control").read_text()
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        shutil.rmtree(env["MOECHAT_KV_CACHE_DIR"], ignore_errors=True)
        if group is not None:
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
    if res.returncode != 0:
        tail = res.stderr.strip().splitlines()[-1:] or [""]
        return {"error": f"exit {res.returncode}{' (OOM-killed)' if killed else ''}: {tail[0]}"}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["cgroup_peak_bytes"] = peak
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--caps", default="0.75,0.5,0.3")
    ap.add_argument("--tokens", type=int, default=48, help="decoded tokens, stream engine")
    ap.add_argument("--mmap-tokens", type=int, default=12, help="decoded tokens, llama.cpp over mmap")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, model, tokens, *rest = args.child
        if kind == "stream":
            result = child_stream(model, int(tokens), int(rest[0]), rest[1], rest[2] if len(rest) > 2 else None)
        else:
            result = child_mmap(model, int(tokens))
        print(json.dumps(result))
        return 0

    from moechat.backends.plan.disk_probe import measure

    model = str(Path(args.model) if args.model else default_model())
    size = os.path.getsize(model)
    root = os.geteuid() == 0 and CGROUP.exists()
    from moechat.backends.model.model_card import read_model_card
    from moechat.backends.plan.disk_probe import read_size

    slice_bytes = read_size(read_model_card(model).bytes_per_expert // 3)
    disk = measure(model, slice_bytes)
    print(f"model {model}: {size / 1e9:.2f} GB; drive {disk.large_gbs:.2f} GB/s with {slice_bytes >> 10} KiB reads "
          f"(one expert slice, 4 in flight), {disk.small_gbs * 1000:.0f} MB/s 4 KiB reads; caps by cgroup: {root}")
    ref = run_child(["stream", model, str(args.tokens), "2", "stream", "64GiB"], None, args.timeout)
    if "error" in ref:
        print("reference run failed:", ref["error"])
        return 1
    warm = ref["replies"][1]
    compute_s = 1.0 / warm["decode_tok_s"]
    want = ref["replies"][0]["token_ids"]
    print(f"uncapped stream engine, every expert in RAM: decode {warm['decode_tok_s']:.2f} tok/s "
          f"(compute {compute_s * 1000:.0f} ms/token)\n")
    head = (f"{'cap':>10} {'side':<15} {'decode tok/s':>12} {'prefill tok/s':>13} {'MB read/tok':>11} "
            f"{'GB/s':>6} {'limit tok/s':>11} {'x limit':>7} {'same tokens':>11} {'peak MiB':>8}")
    print(head)
    rows = []
    for cap in (float(c) for c in args.caps.split(",")):
        limit = int(cap * size) if root else None
        sides = {}
        for side in ("stream", "mmap"):
            child = (["stream", model, str(args.tokens), "1", "auto"] if side == "stream"
                     else ["mmap", model, str(args.mmap_tokens)])
            sides[side] = r = run_child(child, limit, args.timeout)
            label = f"{cap:.0%} {limit / 2**30:.2f}G" if limit else f"{cap:.0%} (none)"
            if "error" in r:
                print(f"{label:>10} {side:<15} {r['error']}")
                continue
            rep = r["replies"][0]
            per_tok = (rep["stats"]["disk_bytes_per_tok"] if side == "stream"
                       else rep["io_bytes"] / max(rep["decoded"], 1))  # decode only, both sides
            gbs = rep["stats"]["read_gb_s"] if side == "stream" else 0.0
            best_gbs = max(disk.large_gbs, gbs, *(x["replies"][0]["stats"]["read_gb_s"] for x in
                                                 sides.values() if "error" not in x and x is not r and
                                                 "stats" in x["replies"][0]))
            limit_tok_s = 1.0 / (per_tok / (best_gbs * 1e9) + compute_s)
            n = min(len(rep["token_ids"]), len(want))
            same = rep["token_ids"][:n] == want[:n]
            print(f"{label:>10} {r['engine'] if side == 'stream' else 'llama.cpp mmap':<15} "
                  f"{rep['decode_tok_s']:>12.2f} {rep['prefill_tok_s']:>13.2f} {per_tok / 1e6:>11.1f} "
                  f"{gbs:>6.2f} {limit_tok_s:>11.2f} {rep['decode_tok_s'] / limit_tok_s:>7.2f} "
                  f"{str(same) + f' ({n})':>11} {r['cgroup_peak_bytes'] / 2**20:>8.0f}")
            rows.append({"cap": cap, "side": side, **{k: v for k, v in r.items() if k != "replies"}, **rep})
        if "error" not in sides["stream"] and "error" not in sides["mmap"]:
            ratio = sides["stream"]["replies"][0]["decode_tok_s"] / sides["mmap"]["replies"][0]["decode_tok_s"]
            print(f"{'':>10} stream / mmap decode: {ratio:.1f}x")
    Path("/tmp/moechat-over-ram/last.json").write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
