"""The real `openai` client against `moechat serve` on the demo MoE: chat streamed and not,
the fields it reads (usage, finish_reason), stop sequences, moechat's extra numbers, the
model list, and the KV-cache reuse of a conversation's second turn."""

from __future__ import annotations

import openai
import pytest

PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_demo(client):
    assert [m.id for m in client.models.list()] == ["moechat-demo"]


def test_chat_not_streamed(client):
    reply = client.chat.completions.create(model="moechat-demo", messages=PARIS, max_tokens=20,
                                           temperature=0)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10
    assert 0 < reply.usage.completion_tokens < 20
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    numbers = reply.model_extra["moechat"]
    assert numbers["engine"] == "llama.cpp" and numbers["placement"]
    assert numbers["decode_tok_s"] > 0 and numbers["prefill_tok_s"] > 0


def test_chat_streamed_equals_not_streamed(client):
    kwargs = dict(model="moechat-demo", messages=PARIS, temperature=0, seed=3)
    whole = client.chat.completions.create(max_completion_tokens=12, **kwargs)
    chunks = list(client.chat.completions.create(max_completion_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_ends_with_length(client):
    reply = client.chat.completions.create(model="moechat-demo", messages=PARIS, max_tokens=3, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_cuts_the_reply(client, stream):
    kwargs = dict(model="moechat-demo", messages=PARIS, max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    assert " is " in full
    reply = client.chat.completions.create(stop=[" is ", "zzz"], stream=stream, **kwargs)
    if stream:
        chunks = list(reply)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert text == full[: full.index(" is ")]
    assert finish == "stop"


def test_second_turn_reuses_the_first_turns_kv_cache(client):
    first = client.chat.completions.create(model="moechat-demo", messages=PARIS, max_tokens=20, temperature=0)
    turn2 = PARIS + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And the capital of Germany?"}]
    second = client.chat.completions.create(model="moechat-demo", messages=turn2, max_tokens=20, temperature=0)
    assert "Berlin" in second.choices[0].message.content
    stats = second.model_extra["moechat"]["stats"]
    assert stats["prompt_tokens_reused"] >= first.usage.prompt_tokens
    assert stats["prompt_tokens_evaluated"] < second.usage.prompt_tokens - first.usage.prompt_tokens + 5
