"""Every error of the issue's list, in each API's own shape and with its status; none of them
disturbs the request in flight, and no traceback reaches a client or the server's console
(the fixtures check the console when they stop the servers)."""

from __future__ import annotations

import threading
import time

import httpx
import ollama
import openai
import pytest

from moechat.app.server.jobs import MAX_BODY_BYTES

HI = [{"role": "user", "content": "Hi"}]


def post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=120, **kwargs)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    assert "Traceback" not in response.text
    if code:
        assert error["code"] == code
    return error


def assert_ollama_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'\xff\xfe'])
def test_malformed_json_is_400(server, body):
    assert_openai_error(post(server, "/v1/chat/completions", content=body), 400, "invalid_json")
    assert_ollama_error(post(server, "/api/chat", content=body), 400)


@pytest.mark.parametrize("fields,param", [
    ({"messages": HI}, "model"),
    ({"model": "moechat-demo"}, "messages"),
    ({"model": "moechat-demo", "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"model": "moechat-demo", "messages": HI, "temperature": "hot"}, "temperature"),
    ({"model": "moechat-demo", "messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"model": "moechat-demo", "messages": HI, "stop": [1]}, "stop"),
    ({"model": "moechat-demo", "messages": HI, "stream": "yes"}, "stream"),
])
def test_bad_fields_are_400(server, fields, param):
    error = assert_openai_error(post(server, "/v1/chat/completions", json=fields), 400)
    assert error["param"] == param


def test_bad_ollama_options_are_400(server):
    body = {"model": "moechat-demo", "messages": HI, "options": {"num_predict": "many"}}
    assert_ollama_error(post(server, "/api/chat", json=body), 400)
    assert_ollama_error(post(server, "/api/generate", json={"model": "moechat-demo"}), 400)


def test_prompt_over_the_context_is_400_context_length_exceeded(server):
    long = [{"role": "user", "content": "word " * 600}]  # the test server's context is 512
    error = assert_openai_error(post(server, "/v1/chat/completions",
                                     json={"model": "moechat-demo", "messages": long}), 400,
                                "context_length_exceeded")
    assert "512" in error["message"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        list(client.chat.completions.create(model="moechat-demo", messages=long, stream=True))
    assert caught.value.code == "context_length_exceeded"


def test_unknown_model_is_404(server):
    assert_openai_error(post(server, "/v1/chat/completions", json={"model": "gpt-9", "messages": HI}),
                        404, "model_not_found")
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0).chat.completions.create(
            model="gpt-9", messages=HI)
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=server.url).chat(model="llama9", messages=HI)
    assert caught.value.status_code == 404


def test_body_over_the_limit_is_413(server):
    big = b'{"model": "moechat-demo", "messages": [], "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'
    assert_openai_error(post(server, "/v1/chat/completions", content=big), 413, "body_too_large")

    def chunks():  # no Content-Length: the limit is counted while reading
        yield big[:1000]
        yield big[1000:]

    assert_ollama_error(post(server, "/api/chat", content=chunks()), 413)


def test_unknown_path_is_404_in_shape(server):
    assert_openai_error(httpx.get(f"{server.url}/v1/nothing"), 404)
    assert_ollama_error(httpx.get(f"{server.url}/api/nothing"), 404)


def test_bad_requests_do_not_disturb_the_one_in_flight(server):
    body = {"model": "moechat-demo", "messages": HI, "max_tokens": 24, "temperature": 0}
    alone = post(server, "/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    result = {}

    def in_flight():
        result["text"] = post(server, "/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

    thread = threading.Thread(target=in_flight)
    thread.start()
    for _ in range(3):
        assert post(server, "/v1/chat/completions", content=b"{oops").status_code == 400
        assert post(server, "/v1/chat/completions", json={"model": "nope", "messages": HI}).status_code == 404
        assert post(server, "/api/chat", json={"model": "moechat-demo", "messages": "x"}).status_code == 400
    thread.join(120)
    assert result["text"] == alone


def test_no_cors_unless_asked(server):
    response = httpx.options(f"{server.url}/v1/chat/completions",
                             headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in response.headers


# ---- --api-key, --queue 1, --cors --------------------------------------------------------------


def test_wrong_or_missing_key_is_401(locked_server):
    from serve.harness import API_KEY

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        assert_openai_error(post(locked_server, "/v1/chat/completions", json={}, headers=headers), 401,
                            "invalid_api_key")
        assert_ollama_error(httpx.get(f"{locked_server.url}/api/tags", headers=headers), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{locked_server.url}/v1", api_key="wrong", max_retries=0).models.list()
    models = openai.OpenAI(base_url=f"{locked_server.url}/v1", api_key=API_KEY).models.list()
    assert len(models.data) == 2
    tags = ollama.Client(host=locked_server.url, headers={"Authorization": f"Bearer {API_KEY}"}).list()
    assert len(tags.models) == 2


def test_cors_for_the_allowed_origin(locked_server):
    from serve.harness import ORIGIN

    preflight = httpx.options(f"{locked_server.url}/v1/chat/completions",
                              headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                       "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{locked_server.url}/v1/chat/completions",
                          headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert other.headers.get("access-control-allow-origin") != "http://evil.example"


def test_full_queue_is_503_with_retry_after(locked_server, demo_model_q8):
    from serve.harness import API_KEY

    auth = {"Authorization": f"Bearer {API_KEY}"}
    long = {"model": str(demo_model_q8), "messages": HI, "max_tokens": 400, "stream": True}
    short = {"model": str(demo_model_q8), "messages": HI, "max_tokens": 2, "temperature": 0}
    with httpx.Client(timeout=120, headers=auth) as http:
        with http.stream("POST", f"{locked_server.url}/v1/chat/completions", json=long) as running:
            lines = running.iter_lines()
            next(line for line in lines if '"content"' in line and '""' not in line)  # it runs
            waiting = {}
            thread = threading.Thread(target=lambda: waiting.update(
                r=http.post(f"{locked_server.url}/v1/chat/completions", json=short)))
            thread.start()
            while http.get(f"{locked_server.url}/moechat/status").json()["waiting"] < 1:
                time.sleep(0.05)  # until the second request is queued behind the running one
            refused = http.post(f"{locked_server.url}/v1/chat/completions", json=short)
            assert_openai_error(refused, 503, "queue_full")
            assert int(refused.headers["Retry-After"]) >= 1
        thread.join(120)  # leaving the stream cancelled it: the waiting request ran
    assert waiting["r"].status_code == 200
    assert waiting["r"].json()["usage"]["completion_tokens"] == 2


def test_naming_another_model_switches_the_loaded_one(locked_server, demo_model, demo_model_q8):
    from serve.harness import API_KEY

    client = openai.OpenAI(base_url=f"{locked_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=240)
    status = lambda: httpx.get(f"{locked_server.url}/moechat/status", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    for model in (str(demo_model), str(demo_model_q8)):
        reply = client.chat.completions.create(model=model, messages=[
            {"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
            max_tokens=20, temperature=0)
        assert "Paris" in reply.choices[0].message.content
        assert reply.model == model and status()["model"] == model
