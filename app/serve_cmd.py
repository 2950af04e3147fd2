"""`moechat serve [MODEL ...]`: OpenAI- and Ollama-compatible HTTP API on moechat's engines.

Loads the first model once (the planner's choice of engine unless the engine flags say
otherwise), prints the URL and the plan's reason, and serves until Ctrl-C, which cancels the
generation in flight and exits 0. Listens on loopback unless --host says otherwise. The web
stack (Starlette, uvicorn) is imported here, in run(), and nowhere on the `ask` path.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

HELP = "serve the model over OpenAI- and Ollama-compatible HTTP APIs"
DEFAULT_PORT = 8473  # not llama-server's 8080, ollama's 11434 nor LM Studio's 1234
DEFAULT_QUEUE = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moechat.app.arg_types import non_negative_int, positive_int
    from moechat.app.engine_flags import add_engine_arguments

    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="GGUF path, catalogue NAME[:QUANT] or hub org/repo:file.gguf; the first is "
                             "loaded (default: the built-in demo MoE), the others and every downloaded "
                             "model can be asked for by name")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=non_negative_int, default=DEFAULT_PORT,
                        help=f"port (default: {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--api-key", default=os.environ.get("MOECHAT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every request (default: $MOECHAT_API_KEY)")
    parser.add_argument("--cors", action="append", metavar="ORIGIN",
                        help="allow browser requests from ORIGIN (repeatable; default: CORS off)")
    parser.add_argument("--queue", type=positive_int, default=DEFAULT_QUEUE, metavar="N",
                        help=f"requests that may wait for the engine; more get 503 (default: {DEFAULT_QUEUE})")
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from moechat.backends.manager import open_engine
    from moechat.backends.model.model_card import read_model_card
    from moechat.backends.model.model_resolve import resolve_model

    from moechat.app.engine_flags import engine_kwargs
    from moechat.app.server.models import ModelSet, served_model

    specs = args.models or [None]
    cards = [read_model_card(resolve_model(spec)) for spec in specs]  # a bad path: one line, exit 2
    named = [served_model(spec, card.path) for spec, card in zip(specs, cards)]
    sock = _bind(args.host, args.port)  # a taken port fails before the model loads
    card = cards[0]
    kwargs = engine_kwargs(args)
    reason = _plan_reason(card, kwargs)
    engine = open_engine(card, **kwargs)

    def open_model(model):
        return open_engine(read_model_card(model.path), **kwargs)

    return _serve(args, sock, engine, ModelSet(named), open_model, reason)


def _serve(args, sock, engine, models, open_model, reason: str) -> int:
    import uvicorn

    from moechat.app.server.asgi import build_app
    from moechat.app.server.worker import EngineWorker

    worker = EngineWorker(engine, models.named[0], open_model, queue_size=args.queue)
    app = build_app(worker, models, api_key=args.api_key, cors_origins=args.cors)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=15)
    server = _server(config, on_exit=worker.stop)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(f"moechat serve: {models.named[0].id} on {engine.name} ({engine.placement}); {reason}")
    print(f"moechat serve: listening on {url} (OpenAI API at {url}/v1, Ollama API at {url}/api); "
          "Ctrl-C stops", flush=True)
    warning = exposure_warning(args.host, args.api_key)
    if warning:
        print(f"moechat serve: warning: {warning}", file=sys.stderr, flush=True)
    worker.start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it caught, after shutting down
        pass
    finally:
        worker.stop()
    return 0


def _server(config, on_exit):
    """A uvicorn.Server that also cancels the generation in flight as soon as Ctrl-C arrives
    (on a thread: the signal handler must not wait), so that the graceful shutdown does not
    wait for a long reply."""
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            threading.Thread(target=on_exit, daemon=True).start()
            super().handle_exit(sig, frame)

    return Server(config)


def _bind(host: str, port: int):
    import socket

    from moechat.backends.errors import MoechatError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise MoechatError(f"serve: cannot listen on {host}:{port} ({err.strerror or err})") from None
    sock.listen(128)
    return sock


def _plan_reason(card, kwargs: dict) -> str:
    """The plan's one-line reason when the planner chooses; else what the flags asked for."""
    if kwargs["engine"] != "auto" or kwargs["n_cpu_moe"] is not None:
        return "engine and placement as asked"
    from moechat.backends.manager import default_context
    from moechat.backends.plan.hardware_profile import load_profile
    from moechat.backends.plan.planner import make_plan
    from moechat.backends.errors import MoechatError

    try:
        plan = make_plan(card, load_profile(measure=False), n_ctx=kwargs["n_ctx"] or default_context(card))
    except MoechatError as err:
        return str(err).splitlines()[0]
    return plan.reason.splitlines()[0]


def exposure_warning(host: str, api_key: str | None) -> str | None:
    if _is_loopback(host) or api_key:
        return None
    return (f"listening on {host} with no --api-key: anyone who can reach this port can use "
            "the model")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
