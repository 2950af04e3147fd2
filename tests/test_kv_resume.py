"""Instant resume through the engines: a conversation continued by a new engine (a new
process, as `ask -c` is) restores its saved KV state, evaluates only the new tokens and
decodes exactly the tokens a full evaluation does; damaged states fall back to that."""

from __future__ import annotations

import threading

import pytest

from moechat.backends.engines import kv_states
from moechat.backends.engines.engine import Sampling
from moechat.backends.engines.kv_state_file import SUFFIX, read_state, write_state
from moechat.backends.model.model_card import read_model_card

PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
SAMPLING = Sampling(max_tokens=12)


def llama_engine(path):
    from moechat.backends.engines.llamacpp_engine import LlamaCppEngine

    return LlamaCppEngine(read_model_card(path), n_ctx=512, threads=1)


def torch_engine(path):
    from moechat.backends.engines.torch_engine import TorchEngine

    return TorchEngine(read_model_card(path), n_ctx=512, threads=1, device="cpu")


def answer(engine, messages, cancel=None):
    events = list(engine.generate(messages, SAMPLING, cancel))
    return "".join(e.text for e in events), [t for e in events for t in e.token_ids], events[-1]


def once(open_engine, path, messages):
    engine = open_engine(path)
    try:
        return answer(engine, messages)
    finally:
        engine.close()


def second_turn(first_text: str) -> list[dict]:
    return PARIS + [{"role": "assistant", "content": first_text},
                    {"role": "user", "content": "And the capital of Germany?"}]


def state_files(tmp_path):
    return sorted((tmp_path / "kv").glob(f"*/*{SUFFIX}"))


@pytest.fixture(params=["llama.cpp", "torch"])
def open_engine(request):
    return llama_engine if request.param == "llama.cpp" else torch_engine


def test_a_new_engine_restores_the_conversation_and_decodes_the_same_tokens(
        open_engine, demo_model_q8, tmp_path, monkeypatch):
    text, _, first = once(open_engine, demo_model_q8, PARIS)
    assert first.stats["prompt_tokens_restored"] == 0 and first.stats["kv_state"]
    assert len(state_files(tmp_path)) == 1
    turn2 = second_turn(text)
    _, resumed, last = once(open_engine, demo_model_q8, turn2)
    assert last.stats["prompt_tokens_restored"] >= first.prompt_tokens
    assert last.stats["prompt_tokens_evaluated"] < last.prompt_tokens - first.prompt_tokens + 8
    # the reference: a full evaluation with the cache off (no states on disk, none saved)
    monkeypatch.setenv("MOECHAT_KV_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("MOECHAT_KV_CACHE_SIZE", "0")
    _, full, ref = once(open_engine, demo_model_q8, turn2)
    assert ref.stats["prompt_tokens_restored"] == 0 and ref.stats["prompt_tokens_reused"] == 0
    assert resumed == full
    assert not list((tmp_path / "empty").glob(f"*/*{SUFFIX}"))


def test_regenerating_a_reply_restores_its_prompt(demo_model_q8):
    """The state saved after a reply covers prompt + reply; asking the same prompt again (the
    TUI's regenerate) restores the prompt from it and decodes the same reply."""
    _, tokens, first = once(llama_engine, demo_model_q8, PARIS)
    _, again, last = once(llama_engine, demo_model_q8, PARIS)
    assert last.stats["prompt_tokens_restored"] == first.prompt_tokens - 1
    assert again == tokens


def damage_and_resume(tmp_path, capsys, demo_model_q8, damage):
    text, _, _ = once(llama_engine, demo_model_q8, PARIS)
    (path,) = state_files(tmp_path)
    damage(path)
    capsys.readouterr()
    _, resumed, last = once(llama_engine, demo_model_q8, second_turn(text))
    return resumed, last, capsys.readouterr().err, text


@pytest.mark.parametrize("damage, reason", [
    (lambda p: p.write_bytes(p.read_bytes()[:-5000]), "truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:-5000] + bytes(5000)), "checksum"),
])
def test_damaged_states_fall_back_to_a_full_evaluation(tmp_path, capsys, monkeypatch, demo_model_q8,
                                                       damage, reason):
    resumed, last, err, text = damage_and_resume(tmp_path, capsys, demo_model_q8, damage)
    lines = [line for line in err.splitlines() if "KV state" in line]
    assert len(lines) == 1 and reason in lines[0] and "evaluating the prompt in full" in lines[0]
    assert last.stats["prompt_tokens_restored"] == 0 and last.stats["prompt_tokens_reused"] == 0
    monkeypatch.setenv("MOECHAT_KV_CACHE_SIZE", "0")
    monkeypatch.setenv("MOECHAT_KV_CACHE_DIR", str(tmp_path / "empty"))
    assert resumed == once(llama_engine, demo_model_q8, second_turn(text))[1]


def test_a_state_llama_cpp_rejects_falls_back(tmp_path, capsys, monkeypatch, tiny_model, demo_model_q8):
    """A state of another model (another layer count and head size) under this model's key,
    with a valid checksum: llama.cpp refuses the bytes, the engine says so and evaluates in full."""
    text, _, _ = once(llama_engine, demo_model_q8, PARIS)
    (path,) = state_files(tmp_path)
    header, tokens, _ = read_state(path)
    other = llama_engine(tiny_model("llama", "F32"))
    try:
        other.llm.eval(other.llm.tokenize(b"hello there, a few tokens of another model " * 4))
        from moechat.backends.engines.llamacpp_state import capture

        _, foreign = capture(other.llm)
    finally:
        other.close()
    write_state(path, {k: v for k, v in header.items() if k in ("model_key", "model")}, tokens, foreign)
    capsys.readouterr()
    _, resumed, last = once(llama_engine, demo_model_q8, second_turn(text))
    err = capsys.readouterr().err
    assert "llama.cpp could not load it" in err
    assert last.stats["prompt_tokens_restored"] == 0
    monkeypatch.setenv("MOECHAT_KV_CACHE_SIZE", "0")
    monkeypatch.setenv("MOECHAT_KV_CACHE_DIR", str(tmp_path / "empty"))
    assert resumed == once(llama_engine, demo_model_q8, second_turn(text))[1]


def test_a_reply_cut_short_leaves_its_long_prefill_saved(tmp_path, monkeypatch, demo_model_q8):
    monkeypatch.setattr(kv_states, "PREFILL_SAVE_MIN", 8)
    engine = llama_engine(demo_model_q8)
    cancel = threading.Event()
    saved = []
    real_save = engine.kv_states.save
    engine.kv_states.save = lambda tokens, payload, meta=None: saved.append(len(tokens)) or real_save(tokens, payload, meta)
    try:
        for event in engine.generate(PARIS, Sampling(max_tokens=50), cancel):
            cancel.set()
            prompt = event.prompt_tokens
    finally:
        engine.close()
    assert saved[0] == prompt  # right after the prefill, before any reply token was fed back
    _, _, last = once(llama_engine, demo_model_q8, PARIS)
    assert last.stats["prompt_tokens_restored"] == prompt - 1


def test_the_cache_command_and_history_deletion(tmp_path, capsys, demo_model_q8):
    from moechat.app.cli import main
    from moechat.app.history import History, ReplyWriter, reply_stats

    history = History()
    cid = history.new_conversation("paris")
    history.add_message(cid, "user", PARIS[0]["content"])
    _, tokens, last = once(llama_engine, demo_model_q8, PARIS)
    ReplyWriter(history, cid).finish("done", reply_stats(last, "llama.cpp", len(tokens)))
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert "1 state," in out and " tokens " in out and "1 saves" in out
    assert read_model_card(demo_model_q8).name in out
    history.delete_conversation(cid)
    assert state_files(tmp_path) == []
    once(llama_engine, demo_model_q8, PARIS)
    assert main(["cache", "clear"]) == 0
    assert "removed 1 saved state" in capsys.readouterr().out
    assert state_files(tmp_path) == []


def test_ask_continue_from_a_new_process_restores_the_conversation(demo_model_q8):
    import json
    import subprocess
    import sys

    def ask(*args):
        done = subprocess.run([sys.executable, "-m", "moechat", "ask", *args, "--model", str(demo_model_q8),
                               "--engine", "llama.cpp", "--threads", "1", "--ctx", "512", "--max-tokens", "12",
                               "--json"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    first = ask(PARIS[0]["content"])
    second = ask("-c", "And the capital of Germany?")
    assert second["conversation_id"] == first["conversation_id"]
    assert second["stats"]["prompt_tokens_restored"] >= first["prompt_tokens"]
    assert second["stats"]["prompt_tokens_evaluated"] < 20


@pytest.mark.parametrize("arch", ["gpt-oss", "deepseek2"])
def test_the_torch_engine_resumes_sliding_window_and_latent_caches(arch, tmp_path, monkeypatch):
    """gpt-oss's sliding-window rings and DeepSeek's MLA latent cache are saved and restored
    too: the second turn restores the first and decodes what a full evaluation decodes."""
    from tests.fixtures.tiny_models import tiny_model_path

    path = tiny_model_path(arch, "F32")
    text, _, first = once(torch_engine, path, PARIS)
    assert first.stats["kv_state"] and len(state_files(tmp_path)) == 1
    turn2 = second_turn(text)
    _, resumed, last = once(torch_engine, path, turn2)
    assert last.stats["prompt_tokens_restored"] >= first.prompt_tokens
    monkeypatch.setenv("MOECHAT_KV_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("MOECHAT_KV_CACHE_SIZE", "0")
    _, full, ref = once(torch_engine, path, turn2)
    assert ref.stats["prompt_tokens_restored"] == 0
    assert resumed == full
