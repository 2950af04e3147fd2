"""From a parsed request to the worker and back: pick the model (404), queue the job (503),
wait for its pieces while watching the client, and cancel the job when the client leaves."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from starlette.requests import Request

from moechat.app.server.errors import ApiError
from moechat.app.server.models import ModelSet
from moechat.app.server.requests import GenerationRequest
from moechat.app.server.worker import DONE, EngineWorker, Job, Piece

DISCONNECT_POLL_S = 0.25  # how often a request still waiting for its turn checks its client
MAX_BODY_BYTES = 4 * 1024 * 1024


class ClientGone(Exception):
    """The client disconnected: nothing is sent, the job is cancelled."""


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the body is larger than {limit} bytes", "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is larger than {limit} bytes", "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def start_job(worker: EngineWorker, models: ModelSet, gen: GenerationRequest) -> Job:
    model = models.find(gen.model)
    if model is None:
        raise ApiError(404, f"model {gen.model!r} not found (GET /v1/models lists the models "
                            "this server offers)", "model_not_found", "model")
    return worker.submit(gen, model)


async def first_piece(job: Job, request: Request) -> Piece | None:
    """The job's first piece (None if it ended at once), raising its ApiError if it failed: a
    route can still choose its status code then. Cancels the job if the client leaves first."""
    return _check(await _next(job, request))


async def rest(job: Job, request: Request | None = None) -> AsyncIterator[Piece]:
    """The remaining pieces. A streaming route passes no request (Starlette watches the client
    and cancels this generator); either way a consumer that stops early cancels the job."""
    try:
        while True:
            item = await _next(job, request)
            if item is DONE:
                return
            yield _check(item)
    finally:
        job.cancel.set()  # a no-op once the job has finished


async def all_pieces(job: Job, request: Request) -> list[Piece]:
    first = await first_piece(job, request)
    pieces = [] if first is None else [first]
    if first is not None:
        async for piece in rest(job, request):
            pieces.append(piece)
    return pieces


async def _next(job: Job, request: Request | None):
    if request is None:
        try:
            return await job.next()
        except BaseException:
            job.cancel.set()
            raise
    getter = asyncio.ensure_future(job.next())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if done:
                return getter.result()
            if await request.is_disconnected():
                raise ClientGone()
    except BaseException:
        job.cancel.set()
        getter.cancel()
        raise


def _check(item):
    if isinstance(item, ApiError):
        raise item
    return None if item is DONE else item
