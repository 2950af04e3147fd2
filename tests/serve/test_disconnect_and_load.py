"""One engine, many clients: a client that leaves mid-stream stops its generation and the
next request runs at once; 8 concurrent clients get exactly the answers their requests get
when sent alone (or a 503), whatever the interleaving.

The load test runs on a tiny random-weight MoE (real tokenizer and chat template, noise for
text) so that its 120 requests stay bounded in time on a busy 2-core machine; cross-talk
would show on it just as well."""

from __future__ import annotations

import threading

import httpx
import ollama
import openai
import pytest

from serve.harness import Server

MAX_NEW = 480  # more than fits the test server's 512-token context after the prompt


def status(server) -> dict:
    return httpx.get(f"{server.url}/moechat/status").json()


def test_disconnect_mid_stream_cancels_and_the_next_request_runs(server):
    body = {"model": "moechat-demo", "max_tokens": MAX_NEW, "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a long story about a dragon."}]}
    cancelled_before = status(server)["finished"].get("cancelled", 0)
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
            received = 0
            for line in response.iter_lines():
                if '"content"' in line:
                    received += 1
                if received == 4:
                    break  # leave: closing the stream drops the connection
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="moechat-demo", max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert reply.usage.completion_tokens == 4
    after = status(server)
    assert after["finished"].get("cancelled", 0) == cancelled_before + 1
    # the abandoned generation stopped a token or so after the client left, not at MAX_NEW
    assert after["last"]["cancelled"]["completion_tokens"] <= received + 6
    assert not after["running"] and after["waiting"] == 0


# Two prompts per client, each starting with its own token right after the chat template's
# shared system prefix. Why: llama.cpp's numbers depend slightly on how a prompt is split into
# batches, and the engine reuses the KV cache for the prefix a prompt shares with the previous
# one; with these prompts every request reuses exactly the template prefix whatever ran before
# it (never the same prompt twice in a row), so "the answer it gets alone" is well defined.
FIRST_WORDS = ["Apple", "Red", "Paris", "Mars", "Dog", "Nile", "Oak", "Iron", "Chess", "Rose",
               "Piano", "Eagle", "Tea", "Gold", "Snow", "Moon"]
PROMPTS = [f"{word}: say something about it in three words." for word in FIRST_WORDS]
REQUESTS_PER_CLIENT = 13  # 8 x 13 = 104
NEW_TOKENS = 8


def ask(kind: str, url: str, prompt: str, model: str) -> str | None:
    """One greedy request through one of the four routes; None for a 503."""
    messages = [{"role": "user", "content": prompt}]
    try:
        if kind.startswith("openai"):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
            args = dict(model=model, messages=messages, max_tokens=NEW_TOKENS, temperature=0)
            if kind == "openai-stream":
                return "".join(c.choices[0].delta.content or "" for c in
                               client.chat.completions.create(stream=True, **args) if c.choices)
            return client.chat.completions.create(**args).choices[0].message.content
        client = ollama.Client(host=url, timeout=300)
        args = dict(model=model, messages=messages, options={"temperature": 0, "num_predict": NEW_TOKENS})
        if kind == "ollama-stream":
            return "".join(p.message.content for p in client.chat(stream=True, **args))
        return client.chat(stream=False, **args).message.content
    except openai.APIStatusError as err:
        if err.status_code == 503:
            return None
        raise
    except ollama.ResponseError as err:
        if err.status_code == 503:
            return None
        raise


def test_prompts_differ_from_their_first_token(demo_model):
    from moechat.backends.engines.prompt import ChatTokenizer

    tokenizer = ChatTokenizer.open(demo_model)
    try:
        firsts = {tokenizer.tokenize(p, add_bos=False)[0] for p in PROMPTS}
    finally:
        tokenizer.close()
    assert len(firsts) == len(PROMPTS)


@pytest.fixture(scope="module")
def tiny_server(tiny_model, hub_cache):
    path = str(tiny_model("llama-moe", "F32"))
    srv = Server(path, "--ctx", "512", env={"HF_HUB_CACHE": hub_cache}).wait_ready()
    yield srv, path
    assert srv.interrupt() == 0, srv.stderr
    assert "Traceback" not in srv.stderr, srv.stderr


def test_eight_clients_get_what_each_request_gets_alone(tiny_server):
    server, model = tiny_server
    alone = {p: ask("openai", server.url, p, model) for p in PROMPTS}
    assert len(set(alone.values())) >= len(PROMPTS) // 4  # answers depend on the prompt: cross-talk would show
    kinds = ["openai", "openai-stream", "ollama", "ollama-stream"]
    results, errors = [], []

    def client(i: int) -> None:
        mine = PROMPTS[2 * i: 2 * i + 2]
        try:
            for k in range(REQUESTS_PER_CLIENT):
                prompt = mine[k % 2]
                results.append((prompt, ask(kinds[(i + k) % 4], server.url, prompt, model)))
        except Exception as err:  # reported below, with the others
            errors.append(repr(err))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors[:3]
    assert len(results) == 8 * REQUESTS_PER_CLIENT >= 100
    answered = [(p, text) for p, text in results if text is not None]
    assert answered, "every request was refused"
    wrong = [(p, text, alone[p]) for p, text in answered if text != alone[p]]
    assert not wrong, wrong[:3]
