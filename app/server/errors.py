"""Errors a client sees, in each API's own shape, and the statuses they carry.

OpenAI clients read `{"error": {"message", "type", "code", "param"}}`; the ollama client
reads `{"error": "message"}`. Routes raise ApiError; one handler (asgi.py) writes it in the
shape of the API the path belongs to, so no traceback ever reaches a client.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 503: "server_busy",
          500: "server_error"}


@dataclass
class ApiError(Exception):
    status: int
    message: str
    code: str | None = None
    param: str | None = None
    retry_after: int | None = None  # seconds, for 503

    def __str__(self) -> str:
        return self.message


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def error_response(request: Request, err: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    return JSONResponse(error_body(request.url.path, err), status_code=err.status, headers=headers)


def error_body(path: str, err: ApiError) -> dict:
    if is_ollama_path(path):
        return {"error": err.message}
    return {"error": {"message": err.message, "type": _TYPES.get(err.status, "invalid_request_error"),
                      "param": err.param, "code": err.code}}
