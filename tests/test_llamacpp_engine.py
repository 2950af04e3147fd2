"""The llama.cpp engine: placements, KV-cache reuse across turns, cancellation, timings."""

from __future__ import annotations

import re
import threading

import pytest

from moechat.backends.engines.engine import Sampling
from moechat.backends.engines.llamacpp_engine import LlamaCppEngine, LlamaCppPlacement
from moechat.backends.engines.llamacpp_overrides import cpu_moe_patterns
from moechat.backends.model.model_card import read_model_card

PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def engine(demo_model_q8):
    engine = LlamaCppEngine(read_model_card(demo_model_q8), n_ctx=1024)
    yield engine
    engine.close()


def reply(events) -> tuple[str, list]:
    events = list(events)
    return "".join(e.text for e in events), events


def test_cpu_moe_patterns_match_llama_cpp_regex():
    patterns = cpu_moe_patterns(2)
    names = ["blk.0.ffn_up_exps.weight", "blk.1.ffn_gate_up_exps.weight", "blk.1.ffn_down_chexps.bias",
             "blk.2.ffn_up_exps.weight", "blk.10.ffn_up_exps.weight", "blk.0.ffn_up_shexp.weight",
             "blk.0.attn_q.weight"]
    matched = [n for n in names if any(re.search(p, n) for p in patterns)]
    assert matched == names[:3]


def test_n_cpu_moe_reaches_the_loader(demo_model_q8, capfd):
    """llama.cpp logs each tensor whose buffer type was overridden: exactly the experts of
    the first N layers (this also proves the CPU buffer type pointer is libllama's own)."""
    card = read_model_card(demo_model_q8)
    LlamaCppEngine(card, LlamaCppPlacement("moe", 3), n_ctx=256, verbose=True).close()
    log = capfd.readouterr().err
    overridden = set(re.findall(r"tensor (blk\.\d+\.\w+)\.weight .*buffer type overridden", log))
    expected = {f"blk.{i}.ffn_{p}_exps" for i in range(3) for p in ("gate", "up", "down")}
    assert overridden == expected


def test_placement_descriptions(demo_model_q8):
    card = read_model_card(demo_model_q8)
    assert LlamaCppPlacement("moe", 12).describe(card) == "experts of 12/30 layers in RAM"
    assert LlamaCppPlacement("cpu").describe(card) == "CPU only"


def test_second_turn_reuses_the_kv_cache(engine):
    text, events = reply(engine.generate(PARIS, Sampling(max_tokens=40)))
    assert "Paris" in text
    first = events[-1]
    assert first.stats["prompt_tokens_reused"] == 0
    history = PARIS + [{"role": "assistant", "content": text},
                       {"role": "user", "content": "And the capital of Germany?"}]
    text2, events2 = reply(engine.generate(history, Sampling(max_tokens=40)))
    assert "Berlin" in text2
    second = events2[-1]
    # Only the new turn is evaluated: the first turn's tokens come from the cache.
    assert second.stats["prompt_tokens_reused"] >= first.prompt_tokens
    assert second.stats["prompt_tokens_evaluated"] < second.prompt_tokens - first.prompt_tokens + 8


def test_events_stream_tokens_then_finish(engine):
    events = list(engine.generate(PARIS, Sampling(max_tokens=40)))
    *tokens, last = events
    assert all(e.finish_reason is None and len(e.token_ids) == 1 for e in tokens)
    assert last.finish_reason == "stop" and last.token_ids == ()
    assert last.prefill_tok_s > 0 and last.decode_tok_s > 0 and last.rss_bytes > 0
    assert last.stats["decoded_tokens"] >= len(tokens) - 1


def test_length_limit(engine):
    events = list(engine.generate(PARIS, Sampling(max_tokens=3)))
    assert sum(len(e.token_ids) for e in events) == 3
    assert events[-1].finish_reason == "length"


def test_cancel_stops_within_one_token(engine):
    cancel = threading.Event()
    seen = 0
    messages = [{"role": "user", "content": "Write a long story about a dragon."}]
    for event in engine.generate(messages, Sampling(max_tokens=500), cancel):
        seen += len(event.token_ids)
        if seen == 5:
            cancel.set()
        last = event
    assert last.finish_reason == "cancelled"
    assert seen == 5  # the engine checked the flag right after the 5th token


def test_greedy_matches_raw_llama_cpp_python(engine):
    """Our streaming loop produces exactly the tokens llama-cpp-python's own chat API does."""
    ours = [t for e in engine.generate(PARIS, Sampling(max_tokens=20)) for t in e.token_ids]
    raw = engine.llm.create_chat_completion(PARIS, temperature=0, max_tokens=20)["choices"][0]
    ours_text = engine.llm.detokenize(ours).decode()
    assert ours_text.strip() == raw["message"]["content"].strip()
