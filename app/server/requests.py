"""Request bodies of both APIs -> one GenerationRequest, with a 400 for every bad field.

Hand-written checks rather than a schema library: there are a dozen fields, the messages must
name the field as each API's clients expect, and unknown fields are ignored, as the real
servers do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from moechat.backends.engines.engine import Message, Sampling

from moechat.app.server.errors import ApiError

UNTIL_CONTEXT_ENDS = 1 << 20  # no max_tokens / num_predict -1: the engine stops at the context's end
MAX_STOPS = 4
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    model: str
    messages: tuple[Message, ...]
    sampling: Sampling
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # OpenAI stream_options.include_usage


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON ({err})", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", "invalid_json")
    return data


def openai_chat_request(data: dict) -> GenerationRequest:
    model = _string(data, "model", required=True)
    messages = _messages(data.get("messages"))
    if data.get("n", 1) != 1:
        raise ApiError(400, "only n = 1 is supported", "invalid_value", "n")
    max_tokens = _positive_int(data, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _positive_int(data, "max_tokens")
    stream = _bool(data, "stream", False)
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "invalid_type", "stream_options")
    return GenerationRequest(
        model=model,
        messages=messages,
        sampling=_sampling(max_tokens, _number(data, "temperature", 1.0, 0.0, 2.0),
                           _number(data, "top_p", 1.0, 0.0, 1.0), _int(data, "seed", 0)),
        stop=_stops(data.get("stop"), "stop"),
        stream=stream,
        include_usage=stream and _bool(options, "include_usage", False),
    )


def ollama_chat_request(data: dict) -> GenerationRequest:
    return _ollama_request(data, _messages(data.get("messages")))


def ollama_generate_request(data: dict) -> GenerationRequest:
    prompt = _string(data, "prompt", required=False)
    system = _string(data, "system", required=False)
    if not prompt:
        raise ApiError(400, "prompt is required", "missing_field", "prompt")
    messages = ([Message(role="system", content=system)] if system else []) + [
        Message(role="user", content=prompt)]
    return _ollama_request(data, tuple(messages))


def _ollama_request(data: dict, messages: tuple[Message, ...]) -> GenerationRequest:
    model = _string(data, "model", required=True)
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "options must be an object", "invalid_type", "options")
    num_predict = _int(options, "num_predict", -1)
    if num_predict == 0 or num_predict < -2:
        raise ApiError(400, "options.num_predict must be positive, or -1", "invalid_value", "num_predict")
    return GenerationRequest(
        model=model,
        messages=messages,
        sampling=_sampling(num_predict if num_predict > 0 else None,
                           _number(options, "temperature", 0.8, 0.0, 2.0),
                           _number(options, "top_p", 0.9, 0.0, 1.0), _int(options, "seed", 0)),
        stop=_stops(options.get("stop"), "stop"),
        stream=_bool(data, "stream", True),  # ollama streams unless told not to
    )


def _sampling(max_tokens, temperature, top_p, seed) -> Sampling:
    return Sampling(max_tokens=max_tokens or UNTIL_CONTEXT_ENDS, temperature=temperature,
                    top_p=top_p if top_p > 0 else 1e-6, seed=seed)


def _messages(value) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list", "invalid_value", "messages")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ApiError(400, f"messages[{i}] must be an object", "invalid_type", "messages")
        role = ROLES.get(item.get("role"))
        if role is None:
            raise ApiError(400, f"messages[{i}].role must be one of system, user, assistant",
                           "invalid_value", "messages")
        out.append(Message(role=role, content=_content(item.get("content"), i)))
    return tuple(out)


def _content(value, i: int) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)  # OpenAI content parts, text only
    raise ApiError(400, f"messages[{i}].content must be a string (or text parts)",
                   "invalid_value", "messages")


def _stops(value, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"{name} must be a string or a list of non-empty strings", "invalid_value", name)
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"{name} takes at most {MAX_STOPS} sequences", "invalid_value", name)
    return tuple(stops)


def _string(data: dict, name: str, required: bool) -> str:
    value = data.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise ApiError(400, f"{name} must be a non-empty string", "invalid_value", name)
    return value


def _bool(data: dict, name: str, default: bool) -> bool:
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false", "invalid_type", name)
    return value


def _int(data: dict, name: str, default: int) -> int:
    value = data.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer", "invalid_type", name)
    return value


def _positive_int(data: dict, name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, f"{name} must be a positive integer", "invalid_value", name)
    return value


def _number(data: dict, name: str, default: float, low: float, high: float) -> float:
    value = data.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"{name} must be a number from {low:g} to {high:g}", "invalid_value", name)
    return float(value)
