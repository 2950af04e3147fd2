"""`moechat worker` + `--workers`: real loopback workers (subprocesses, killed in teardown)
split the demo model with this process and give the same greedy tokens as a local run; a
dead, mismatched or dying worker is one clear line, never an abort."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rpc_workers import Worker, fake_rpc_server, free_port, workers  # noqa: E402

from moechat.backends.errors import MoechatError  # noqa: E402
from moechat.backends.plan.rpc_probe import parse_workers, probe_worker  # noqa: E402

PARIS = "What is the capital of France? Answer in one sentence."


def moechat(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moechat", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_this_llama_cpp_has_rpc():
    import llama_cpp

    assert llama_cpp.llama_supports_rpc(), "build llama-cpp-python with CMAKE_ARGS=-DGGML_RPC=on"


def test_two_loopback_workers_give_the_local_greedy_tokens(demo_model):
    local = moechat("ask", "--json", "--max-tokens", "12", "--ctx", "256", "--model", str(demo_model), PARIS)
    assert local.returncode == 0, local.stderr
    with workers(2) as (a, b):
        split = moechat("ask", "--json", "--max-tokens", "12", "--ctx", "256", "--model", str(demo_model),
                        "--engine", "llama.cpp", "--workers", f"{a.endpoint},{b.endpoint}", PARIS)
        plan = moechat("plan", "--json", str(demo_model), "--ctx", "256", "--workers", f"{a.endpoint},{b.endpoint}")
    assert split.returncode == 0, split.stderr
    local_out, split_out = json.loads(local.stdout), json.loads(split.stdout)
    assert "on workers" in split_out["placement"]
    assert "Paris" in split_out["text"]
    assert split_out["token_ids"] == local_out["token_ids"]
    assert plan.returncode == 0, plan.stderr
    splits = [c for c in json.loads(plan.stdout)["candidates"] if c["placement"] == "split"]
    assert splits and all(c["decode_tok_s"] > 0 and c["fits"] for c in splits)
    assert all(c["workers"] == [a.endpoint, b.endpoint] for c in splits)
    assert all(c["layers_here"] + sum(c["tensor_split"]) == 30 for c in splits)


def test_probe_reads_version_memory_and_link():
    with workers(1) as (w,):
        link = probe_worker(w.endpoint)
        again = probe_worker(w.endpoint, measure_link=False)  # the worker serves one client at a time
    assert link.version == (7, 0, 0) and again.version == (7, 0, 0)
    assert link.devices and 0 < link.devices[0].free_bytes <= link.devices[0].total_bytes
    assert 0 < link.rtt_s < 0.1 and link.link_gbs > 0.01


def test_stopped_worker_is_one_line_and_exit_2(demo_model):
    w = Worker()
    w.stop()
    result = moechat("ask", "--model", str(demo_model), "--workers", w.endpoint, PARIS, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and w.endpoint in lines[0] and "not reachable" in lines[0]
    plan = moechat("plan", str(demo_model), "--workers", w.endpoint, timeout=60)
    assert plan.returncode == 2 and "not reachable" in plan.stderr


@pytest.mark.parametrize("version, words", [((6, 1, 0), "speaks RPC protocol 6.1.0"),
                                            ((7, 9, 0), "speaks RPC protocol 7.9.0"),
                                            (None, "did not answer the RPC hello")])
def test_mismatched_worker_is_one_line_and_exit_2(demo_model, version, words):
    with fake_rpc_server(version) as endpoint:
        with pytest.raises(MoechatError, match=words):
            probe_worker(endpoint)
        result = moechat("ask", "--model", str(demo_model), "--workers", endpoint, PARIS, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0]


def test_bad_workers_flag():
    for text in ("nohost", "a:b", "h:0", "h:1,h:1"):
        with pytest.raises(MoechatError, match="--workers"):
            parse_workers(text)
    assert parse_workers("10.0.0.2:50052, 10.0.0.3:50053") == ("10.0.0.2:50052", "10.0.0.3:50053")


def test_worker_dying_mid_reply_ends_with_an_error_event(demo_model):
    from moechat.backends.engines.engine import Sampling
    from moechat.backends.engines.rpc_engine import RpcLlamaCppEngine
    from moechat.backends.model.model_card import read_model_card

    card = read_model_card(demo_model)
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    with workers(2) as (a, b):
        engine = RpcLlamaCppEngine(card, (a.endpoint, b.endpoint), (10, 10), n_ctx=512, threads=1)
        try:
            events, text = [], ""
            for event in engine.generate(messages, Sampling(max_tokens=400)):
                events.append(event)
                text += event.text
                if len(events) == 5:
                    b.stop()  # SIGKILL mid-reply
            last = events[-1]
            assert last.finish_reason == "error" and b.endpoint in last.error
            assert len(events) > 5 and text.strip()  # what came before is kept
            with pytest.raises(MoechatError, match="has ended"):
                list(engine.generate(messages, Sampling(max_tokens=4)))
        finally:
            engine.close()


def test_worker_command_warns_off_loopback_and_refuses_a_busy_port():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moechat", "worker", "--host", "0.0.0.0", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        assert "WARNING" in first and "not loopback" in first
        assert "offers CPU" in proc.stdout.readline()
        busy = moechat("worker", "--host", "0.0.0.0", "--port", str(port), timeout=60)
        assert busy.returncode == 2 and len(busy.stderr.strip().splitlines()) == 1
        assert "cannot listen" in busy.stderr
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_a_busy_worker_is_named_busy_not_mismatched():
    import socket

    from moechat.backends.plan import rpc_probe

    with workers(1) as (w,):
        held = socket.create_connection(("127.0.0.1", w.port))  # another client the worker is serving
        try:
            held.sendall(bytes([14]) + (24).to_bytes(8, "little") + bytes(24))
            held.recv(8 + 28)
            old, rpc_probe.REPLY_TIMEOUT_S = rpc_probe.REPLY_TIMEOUT_S, 1.0
            try:
                with pytest.raises(MoechatError, match="serving another moechat"):
                    probe_worker(w.endpoint)
            finally:
                rpc_probe.REPLY_TIMEOUT_S = old
        finally:
            held.close()


def test_a_reply_abandoned_midway_does_not_leak_into_the_next(demo_model):
    from moechat.backends.engines.engine import Sampling
    from moechat.backends.engines.rpc_engine import RpcLlamaCppEngine
    from moechat.backends.model.model_card import read_model_card

    card = read_model_card(demo_model)
    paris = [{"role": "user", "content": PARIS}]
    with workers(1) as (w,):
        engine = RpcLlamaCppEngine(card, (w.endpoint,), (15,), n_ctx=256, threads=1)
        try:
            stream = engine.generate([{"role": "user", "content": "Tell me a story."}], Sampling(max_tokens=64))
            next(stream), next(stream)
            stream.close()  # the caller stops reading after two tokens
            text = "".join(e.text for e in engine.generate(paris, Sampling(max_tokens=12)))
        finally:
            engine.close()
    assert "Paris" in text
