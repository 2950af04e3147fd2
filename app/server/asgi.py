"""The ASGI app: both APIs' routes on Starlette, the API key check, CORS when asked for, and
errors in each API's shape. Nothing here runs a model: that is the worker's (worker.py)."""

from __future__ import annotations

import hmac
import sys

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from moechat.app.server import ollama_routes, openai_routes
from moechat.app.server.errors import ApiError, error_body, error_response
from moechat.app.server.jobs import ClientGone
from moechat.app.server.models import ModelSet
from moechat.app.server.worker import EngineWorker


def build_app(worker: EngineWorker, models: ModelSet, api_key: str | None = None,
              cors_origins: list[str] | None = None) -> Starlette:
    middleware = []
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"],
                                     allow_headers=["*"]))
    if api_key:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=api_key))
    app = Starlette(
        routes=[_guard(r) for r in openai_routes.routes() + ollama_routes.routes()
                + [Route("/moechat/status", _status, methods=["GET"])]],
        middleware=middleware,
        exception_handlers={HTTPException: _http_error},
    )
    app.state.worker = worker
    app.state.models = models
    return app


async def _status(request: Request) -> JSONResponse:
    """moechat's own: the loaded model, the queue, and how the finished requests ended."""
    return JSONResponse(request.app.state.worker.status())


def _guard(route):
    """Wrap a route's endpoint: ApiError -> its response; any other exception -> one line on
    the console and a 500 in the API's shape (Starlette would print a traceback)."""
    endpoint = route.endpoint

    async def guarded(request: Request):
        try:
            return await endpoint(request)
        except ApiError as err:
            return error_response(request, err)
        except ClientGone:
            return JSONResponse({}, status_code=499)  # nobody reads it
        except Exception as err:
            print(f"moechat serve: {request.method} {request.url.path} failed: "
                  f"{type(err).__name__}: {err}", file=sys.stderr)
            return error_response(request, ApiError(500, "internal server error"))

    return Route(route.path, guarded, methods=route.methods)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(request, ApiError(exc.status_code, f"{request.method} {request.url.path}: "
                                                             f"{exc.detail}", code))


class ApiKeyMiddleware:
    """With --api-key, every request but a CORS preflight needs `Authorization: Bearer KEY`
    (what the openai client sends; the ollama client sends it through its `headers`)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        message = "missing API key" if not given else "wrong API key"
        err = ApiError(401, f"{message}: send the server's --api-key as 'Authorization: Bearer KEY'",
                       "invalid_api_key")
        response = JSONResponse(error_body(scope["path"], err), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
