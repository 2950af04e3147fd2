"""Ollama's API, the part the official `ollama` client uses to chat and to list:
POST /api/chat and /api/generate (NDJSON stream, or one object with "stream": false),
GET /api/tags, GET /api/version. Durations are in nanoseconds, as ollama reports them."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from datetime import datetime, timezone

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from moechat import __version__
from moechat.app.server.errors import ApiError
from moechat.app.server.jobs import all_pieces, first_piece, read_body, rest, start_job
from moechat.app.server.requests import ollama_chat_request, ollama_generate_request, parse_json


def routes() -> list[Route]:
    return [Route("/", root, methods=["GET", "HEAD"]),
            Route("/api/version", version, methods=["GET"]),
            Route("/api/tags", tags, methods=["GET"]),
            Route("/api/chat", chat, methods=["POST"]),
            Route("/api/generate", generate, methods=["POST"])]


async def root(request: Request) -> PlainTextResponse:
    return PlainTextResponse("moechat is running")


async def version(request: Request) -> JSONResponse:
    return JSONResponse({"version": __version__})


async def tags(request: Request) -> JSONResponse:
    return JSONResponse({"models": [{
        "name": m.id, "model": m.id, "size": m.size,
        "modified_at": datetime.fromtimestamp(m.created, timezone.utc).isoformat(),
        "digest": hashlib.sha256(m.path.encode()).hexdigest(),
        "details": {"format": "gguf", "family": "", "families": None, "parameter_size": "",
                    "quantization_level": ""},
    } for m in request.app.state.models.available()]})


async def chat(request: Request):
    return await _respond(request, ollama_chat_request, "message")


async def generate(request: Request):
    return await _respond(request, ollama_generate_request, "response")


async def _respond(request: Request, parse, field: str):
    gen = parse(parse_json(await read_body(request)))
    state = request.app.state
    started = time.perf_counter_ns()
    job = start_job(state.worker, state.models, gen)

    def body(text: str, final=None) -> dict:
        out = {"model": job.model.id, "created_at": datetime.now(timezone.utc).isoformat(),
               field: {"role": "assistant", "content": text} if field == "message" else text,
               "done": final is not None}
        if final is not None:
            out.update(_totals(final, time.perf_counter_ns() - started))
        return out

    if not gen.stream:
        pieces = await all_pieces(job, request)
        return JSONResponse(body("".join(p.text for p in pieces), pieces[-1]))
    first = await first_piece(job, request)

    async def lines():
        piece, pieces = first, rest(job)
        try:
            while piece is not None:
                if piece.finish_reason is not None:
                    yield json.dumps(body(piece.text, piece)) + "\n"
                    break
                yield json.dumps(body(piece.text)) + "\n"
                piece = await anext(pieces, None)
        except ApiError as err:  # after the first line the status is sent: report in the stream
            yield json.dumps({"error": err.message}) + "\n"
        except Exception as err:  # a bug: one line on the console, never a traceback
            print(f"moechat serve: stream failed: {type(err).__name__}: {err}", file=sys.stderr)
            yield json.dumps({"error": "internal server error"}) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _totals(final, total_ns: int) -> dict:
    decode = final.moechat.get("decode_tok_s") or 0
    prefill = final.moechat.get("prefill_tok_s") or 0
    evaluated = final.moechat.get("stats", {}).get("prompt_tokens_evaluated", final.prompt_tokens)
    return {
        "done_reason": "length" if final.finish_reason == "length" else "stop",
        "total_duration": total_ns,
        "load_duration": 0,
        "prompt_eval_count": final.prompt_tokens,
        "prompt_eval_duration": int(evaluated / prefill * 1e9) if prefill else 0,
        "eval_count": final.completion_tokens,
        "eval_duration": int(final.completion_tokens / decode * 1e9) if decode else 0,
        "moechat": final.moechat,
    }
