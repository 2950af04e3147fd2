"""`moechat cache`: what the KV state cache holds (size, entries, hits); `moechat cache clear`
empties it. Standard library only at top level."""

from __future__ import annotations

import argparse
import json
import time

HELP = "show the saved conversation states (KV cache) or clear them"
GIB, MIB = 1024**3, 1024**2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=("show", "clear"), default="show")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from moechat.backends.engines import kv_states

    root = kv_states.kv_cache_dir()
    if args.action == "clear":
        files, size = kv_states.clear(root)
        if args.json:
            print(json.dumps({"removed_states": files, "removed_bytes": size, "path": str(root)}))
        else:
            print(f"removed {files} saved state{'s' if files != 1 else ''} ({_size(size)}) from {root}")
        return 0
    cap = kv_states.disk_cap()
    states, totals = kv_states.summary(root)
    size = sum(s.bytes for s in states)
    if args.json:
        print(json.dumps({"path": str(root), "bytes": size, "cap_bytes": cap, "entries": len(states),
                          **totals, "states": [{"name": s.name, "model": s.model, "tokens": s.n_tokens,
                                                "bytes": s.bytes, "hits": s.hits, "last_used": s.last_used}
                                               for s in states]}))
        return 0
    print(f"KV state cache: {root}")
    print(f"  {len(states)} state{'s' if len(states) != 1 else ''}, {_size(size)} of {_size(cap)} "
          f"(MOECHAT_KV_CACHE_SIZE)")
    print(f"  {totals['hits']} hits ({totals['restored_tokens']} prompt tokens restored), "
          f"{totals['misses']} misses, {totals['saves']} saves")
    for s in states:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.last_used))
        print(f"  {s.name}  {s.model}  {s.n_tokens} tokens  {_size(s.bytes)}  {s.hits} hits  last used {used}")
    return 0


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"
