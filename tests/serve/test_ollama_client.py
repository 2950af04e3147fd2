"""The real `ollama` client against `moechat serve` on the demo MoE: chat streamed and not,
generate, the model list and the version."""

from __future__ import annotations

import ollama
import pytest

PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
GREEDY = {"temperature": 0, "num_predict": 20, "seed": 1}


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=120)


def test_tags_list_the_demo(client):
    assert [m.model for m in client.list().models] == ["moechat-demo"]


def test_version(client, server):
    import httpx

    from moechat import __version__

    assert httpx.get(f"{server.url}/api/version").json() == {"version": __version__}


def test_chat_not_streamed(client):
    reply = client.chat(model="moechat-demo", messages=PARIS, options=GREEDY, stream=False)
    assert "Paris" in reply.message.content
    assert reply.message.role == "assistant"
    assert reply.done and reply.done_reason == "stop"
    assert reply.prompt_eval_count > 10 and 0 < reply.eval_count < 20
    assert reply.eval_duration > 0 and reply.total_duration >= reply.eval_duration


def test_chat_streamed_equals_not_streamed(client):
    whole = client.chat(model="moechat-demo", messages=PARIS, options=GREEDY, stream=False)
    parts = list(client.chat(model="moechat-demo", messages=PARIS, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == whole.eval_count


def test_num_predict_ends_with_length(client):
    reply = client.chat(model="moechat-demo:latest", messages=PARIS, stream=False,
                        options={"temperature": 0, "num_predict": 2})
    assert reply.done_reason == "length" and reply.eval_count == 2


@pytest.mark.parametrize("stream", [False, True])
def test_generate(client, stream):
    kwargs = dict(model="moechat-demo", prompt=PARIS[0]["content"], options=GREEDY)
    if stream:
        text = "".join(p.response for p in client.generate(stream=True, **kwargs))
    else:
        text = client.generate(stream=False, **kwargs).response
    assert "Paris" in text
