"""The pure parts of the server: stop sequences over a token stream, and request parsing."""

from __future__ import annotations

import pytest

from moechat.app.server.errors import ApiError
from moechat.app.server.requests import (UNTIL_CONTEXT_ENDS, ollama_chat_request, ollama_generate_request,
                                         openai_chat_request, parse_json)
from moechat.app.server.stops import StopMatcher

HI = [{"role": "user", "content": "Hi"}]


def run(stops, pieces):
    matcher = StopMatcher(tuple(stops))
    out = [matcher.push(p) for p in pieces]
    return "".join(out) + matcher.flush(), matcher.stopped, out


def test_stop_split_across_tokens_is_found_and_held_back():
    text, stopped, out = run(["\nUser:"], ["Paris.", "\n", "Us", "er:", " more"])
    assert (text, stopped) == ("Paris.", True)
    assert out[:3] == ["Paris.", "", ""]  # the "\n", "Us" were held until "er:" decided


def test_text_that_only_looks_like_a_stop_start_is_released():
    text, stopped, out = run(["END"], ["a E", "N", "x", "y"])
    assert (text, stopped) == ("a ENxy", False)
    assert out == ["a ", "", "ENx", "y"]


def test_earliest_of_several_stops_wins_and_nothing_after_it():
    text, stopped, _ = run(["b", "cd"], ["acd b", "zzz"])
    assert (text, stopped) == ("a", True)


def test_no_stops_passes_everything_through():
    assert run([], ["x", "y"])[:2] == ("xy", False)


def test_openai_fields():
    req = openai_chat_request({"model": "m", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
        "max_tokens": 9, "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": 4,
        "stop": "x", "stream": True, "stream_options": {"include_usage": True}, "unknown": 1})
    assert req.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"})
    assert (req.sampling.max_tokens, req.sampling.temperature, req.sampling.top_p, req.sampling.seed) == (7, 0, 0.5, 4)
    assert req.stop == ("x",) and req.stream and req.include_usage


def test_openai_defaults():
    req = openai_chat_request({"model": "m", "messages": HI})
    assert req.sampling.max_tokens == UNTIL_CONTEXT_ENDS and req.sampling.temperature == 1.0
    assert not req.stream and not req.include_usage and req.stop == ()


def test_ollama_fields_and_defaults():
    req = ollama_chat_request({"model": "m", "messages": HI,
                               "options": {"temperature": 0, "num_predict": 5, "seed": 2, "stop": ["\n"]}})
    assert (req.sampling.max_tokens, req.sampling.temperature, req.sampling.seed, req.stop) == (5, 0, 2, ("\n",))
    assert req.stream  # ollama streams unless "stream": false
    gen = ollama_generate_request({"model": "m", "prompt": "Hi", "system": "Be brief.", "stream": False})
    assert gen.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"})
    assert not gen.stream and gen.sampling.max_tokens == UNTIL_CONTEXT_ENDS


@pytest.mark.parametrize("body,param", [
    ({"model": "m", "messages": HI, "n": 2}, "n"),
    ({"model": "m", "messages": HI, "top_p": 1.5}, "top_p"),
    ({"model": "m", "messages": HI, "seed": 1.5}, "seed"),
    ({"model": "m", "messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ({"model": "", "messages": HI}, "model"),
])
def test_openai_bad_fields(body, param):
    with pytest.raises(ApiError) as caught:
        openai_chat_request(body)
    assert caught.value.status == 400 and caught.value.param == param


def test_parse_json_refuses_non_objects():
    assert parse_json(b'{"a": 1}') == {"a": 1}
    for body in (b"", b"[]", b"nul"):
        with pytest.raises(ApiError) as caught:
            parse_json(body)
        assert caught.value.status == 400
