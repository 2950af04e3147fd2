"""`moechat worker`: serve this machine's CPU (or GPUs) to a main moechat over ggml's RPC.

The main machine lists workers with `--workers host:port,...`; llama.cpp then keeps some of
the model's layers (and their KV cache) in the workers' memory. ggml's RPC has no
authentication and no encryption, so anything but loopback gets a loud warning: use a
private network or an SSH tunnel (`ssh -L 50052:127.0.0.1:50052 worker-host`).
"""

from __future__ import annotations

import argparse
import sys

HELP = "serve this machine's memory and compute to another moechat over llama.cpp's RPC"
DEFAULT_PORT = 50052  # llama.cpp's rpc-server default
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moechat.app.arg_types import positive_int

    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; anything else is reachable "
                             "by anyone on that network: RPC has no authentication)")
    parser.add_argument("--port", type=positive_int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: physical cores)")
    parser.add_argument("--cache", action="store_true",
                        help="keep received weights in a local file cache (llama.cpp's rpc cache: "
                             "a restart of the main process reloads large tensors from disk)")


def run(args: argparse.Namespace) -> int:
    import os
    import socket
    import threading

    from moechat.backends.engines.rpc import served_devices, start_server
    from moechat.backends.errors import MoechatError
    from moechat.backends.paths import cache_dir
    from moechat.backends.plan.threads import default_threads

    if args.port > 65535:
        raise MoechatError(f"--port {args.port}: ports go up to 65535")
    endpoint = f"{args.host}:{args.port}"
    try:  # ggml would only print "Failed to create server socket": say why, and exit 2
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise MoechatError(f"cannot listen on {endpoint}: {reason}") from None
    if args.host not in LOOPBACK:
        print("WARNING: serving on " + endpoint + ", which is not loopback. llama.cpp's RPC has no\n"
              "WARNING: authentication or encryption: anyone who can reach this port can run code\n"
              "WARNING: on this machine's memory. Use a private network or an SSH tunnel.", file=sys.stderr)
    devices = served_devices()
    threads = args.threads or default_threads()
    rpc_cache = None
    if args.cache:
        rpc_cache = cache_dir() / "rpc"
        rpc_cache.mkdir(parents=True, exist_ok=True)
    offered = ", ".join(f"{d.name} {d.free_bytes / 2**30:.1f} GiB free of {d.total_bytes / 2**30:.1f} GiB"
                        for d in devices)
    print(f"moechat worker on {endpoint}: offers {offered}; {threads} threads"
          f"{f'; tensor cache {rpc_cache}' if rpc_cache else ''}", flush=True)
    print(f"use it from the main machine with: --workers {endpoint}", flush=True)
    # ggml's server loop never returns while it serves; it runs on a daemon thread so that
    # Ctrl-C and SIGTERM still reach Python and end the process cleanly
    server = threading.Thread(target=start_server, args=(endpoint, threads, str(rpc_cache) if rpc_cache else None,
                                                         devices), daemon=True)
    server.start()
    server.join()  # returns only if ggml gave up (it printed why)
    raise MoechatError(f"the RPC server on {endpoint} stopped")
