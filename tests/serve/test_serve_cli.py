"""`moechat serve` as a command: loopback by default, the URL and the plan's reason on start,
a warning for an exposed host without a key, and Ctrl-C during a reply exits 0."""

from __future__ import annotations

import httpx

from moechat.app.cli import build_parser
from moechat.app.serve_cmd import DEFAULT_PORT, exposure_warning

from serve.harness import Server


def test_defaults_are_loopback_and_a_port_no_other_server_uses():
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1"
    assert DEFAULT_PORT not in (8080, 11434, 1234) and args.port == DEFAULT_PORT
    assert args.cors is None and args.engine == "auto"


def test_exposed_host_without_a_key_warns():
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("::1", None) is None
    assert exposure_warning("localhost", None) is None
    assert "--api-key" in exposure_warning("0.0.0.0", None)
    assert "--api-key" in exposure_warning("192.168.1.5", None)
    assert exposure_warning("0.0.0.0", "secret") is None


def test_taken_port_is_one_line_and_exit_2(server):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "moechat", "serve", "--port", str(server.port)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot listen" in result.stderr


def test_ctrl_c_during_a_reply_ends_it_and_exits_0(demo_model, hub_cache):
    srv = Server("--ctx", "512", env={"HF_HUB_CACHE": hub_cache}).wait_ready()
    out = "".join(srv.stdout_lines)
    assert f"http://127.0.0.1:{srv.port}" in out and "llama.cpp" in out
    body = {"model": "moechat-demo", "max_tokens": 400, "stream": True,
            "messages": [{"role": "user", "content": "Write a long story about a dragon."}]}
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        next(line for line in lines if '"content"' in line and '"content": ""' not in line)  # decoding
        code = srv.interrupt()
        rest = list(lines)  # the reply ends (cancelled), the stream closes cleanly
    assert code == 0, srv.stderr
    assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
    assert "Traceback" not in srv.stderr
