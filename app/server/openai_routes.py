"""OpenAI's API, the part chat clients use: GET /v1/models, POST /v1/chat/completions
(streamed as server-sent events ending in `data: [DONE]`, or one JSON object).

moechat's own numbers (engine, placement, prefill and decode tok/s, expert-cache stats) ride
along in a `moechat` field, which OpenAI clients ignore.
"""

from __future__ import annotations

import json
import sys
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from moechat.app.server.errors import ApiError, error_body
from moechat.app.server.jobs import all_pieces, first_piece, read_body, rest, start_job
from moechat.app.server.requests import openai_chat_request, parse_json


def routes() -> list[Route]:
    return [Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"])]


async def list_models(request: Request) -> JSONResponse:
    models = request.app.state.models.available()
    return JSONResponse({"object": "list", "data": [
        {"id": m.id, "object": "model", "created": m.created, "owned_by": "moechat"} for m in models]})


async def chat_completions(request: Request):
    gen = openai_chat_request(parse_json(await read_body(request)))
    state = request.app.state
    job = start_job(state.worker, state.models, gen)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": job.model.id}
    if not gen.stream:
        pieces = await all_pieces(job, request)
        final = pieces[-1]
        return JSONResponse({
            **head, "object": "chat.completion",
            "choices": [{"index": 0, "logprobs": None, "finish_reason": _finish(final.finish_reason),
                         "message": {"role": "assistant", "content": "".join(p.text for p in pieces)}}],
            "usage": _usage(final), "moechat": final.moechat,
        })
    first = await first_piece(job, request)  # errors before the first token keep their status
    return StreamingResponse(_events(head, first, job, gen.include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(head: dict, first, job, include_usage: bool):
    chunk = {**head, "object": "chat.completion.chunk"}

    def sse(choices: list, **extra) -> str:
        return f"data: {json.dumps({**chunk, 'choices': choices, **extra})}\n\n"

    yield sse([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    try:
        piece = first
        pieces = rest(job) if first is not None else _nothing()
        while piece is not None:
            if piece.text:
                yield sse([{"index": 0, "delta": {"content": piece.text}, "finish_reason": None}])
            if piece.finish_reason is not None:
                yield sse([{"index": 0, "delta": {}, "finish_reason": _finish(piece.finish_reason)}],
                          moechat=piece.moechat)
                if include_usage:
                    yield sse([], usage=_usage(piece))
                break
            piece = await anext(pieces, None)
    except ApiError as err:  # after the first token the status is sent: report in the stream
        yield f"data: {json.dumps(error_body('/v1', err))}\n\n"
    except Exception as err:  # a bug: one line on the console, never a traceback
        print(f"moechat serve: stream failed: {type(err).__name__}: {err}", file=sys.stderr)
        yield f"data: {json.dumps(error_body('/v1', ApiError(500, 'internal server error')))}\n\n"
    yield "data: [DONE]\n\n"


async def _nothing():
    return
    yield


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _usage(final) -> dict:
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens}
