"""What a new user tripped on (issue 19): `moechat -m MODEL`, bytes that are not UTF-8 piped
into `ask`, llama.cpp's log lines on the terminal, absurd thread counts, and a CPU-only
llama.cpp build on an NVIDIA machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_bad_input import assert_one_line_error, run_moechat

PROFILES = Path(__file__).parent / "profiles"


@pytest.mark.parametrize("flag", ["-m", "--model"])
def test_chat_app_takes_model_flag(tmp_path, flag):
    """`moechat -m FILE` reaches the chat app's model check (before: "unrecognized arguments")."""
    missing = tmp_path / "nowhere.gguf"
    assert_one_line_error(run_moechat(flag, str(missing)), "no such file", "nowhere.gguf")


def test_chat_app_refuses_two_different_models(tmp_path):
    result = run_moechat(str(tmp_path / "a.gguf"), "-m", str(tmp_path / "b.gguf"))
    assert_one_line_error(result, "two models")


def test_ask_takes_short_m(tiny_model):
    model = tiny_model("llama", "F32")
    result = subprocess.run([sys.executable, "-m", "moechat", "ask", "-m", str(model),
                             "--max-tokens", "2", "--json", "Hi"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"] == str(model)


def test_non_utf8_stdin_is_replaced_with_one_warning(tiny_model, tmp_path):
    model = tiny_model("llama", "F32")
    result = subprocess.run(
        [sys.executable, "-m", "moechat", "ask", "-m", str(model), "--max-tokens", "2", "--json",
         "Summarise"],
        input=b"caf\xe9 \xff\xfe and more", capture_output=True, timeout=300)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert "Traceback" not in stderr
    warnings = [line for line in stderr.splitlines() if "not valid UTF-8" in line]
    assert len(warnings) == 1 and "stdin" in warnings[0] and "U+FFFD" in warnings[0]
    assert json.loads(result.stdout)["finish_reason"] in ("length", "stop")
    # the history holds the replaced text, so `ask -c` can go on from it
    from moechat.app.history import History

    history = History()
    cid = history.last_conversation_id()
    assert "\ufffd" in history.messages(cid)[0].content
    history.close()


def test_llamacpp_log_goes_to_the_state_dir(tiny_model, tmp_path):
    """A context longer than the training one makes llama.cpp warn; the warning lands in the
    log file, not on the terminal."""
    model = tiny_model("llama", "F32")
    state = tmp_path / "state"
    result = subprocess.run(
        [sys.executable, "-m", "moechat", "ask", "-m", str(model), "--ctx", "8192",
         "--max-tokens", "2", "Hi"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, MOECHAT_STATE_DIR=str(state)))
    assert result.returncode == 0, result.stderr
    assert "llama_context" not in result.stderr and "llama_" not in result.stdout
    log = (state / "llama.cpp.log").read_text()
    assert "n_ctx_train" in log and "llama_context" in log


@pytest.mark.parametrize("argv", [["ask", "--threads", "1000", "Hi"], ["--threads", "1000"],
                                  ["bench", "--threads", "1000"],
                                  ["plan", "--measure", "--threads", "1000"]])
def test_threads_above_the_logical_cores_are_refused(argv):
    assert_one_line_error(run_moechat(*argv), "threads", "logical cores")


def test_threads_at_the_logical_cores_are_accepted():
    from moechat.app.arg_types import thread_count

    assert thread_count(str(os.cpu_count())) == os.cpu_count()


def test_profile_on_nvidia_with_cpu_only_build_prints_the_reinstall_command(tmp_path):
    """A cached profile of an NVIDIA machine whose llama.cpp build is CPU-only."""
    cache = tmp_path / "cache"
    env = dict(os.environ, MOECHAT_CACHE_DIR=str(cache))
    where = subprocess.run(
        [sys.executable, "-c", "from moechat.backends.plan.hardware_profile import profile_path; "
                               "print(profile_path())"],
        capture_output=True, text=True, env=env, timeout=120)
    data = json.loads((PROFILES / "desktop-3060-ddr4.json").read_text())
    data["gpu_offload"] = False
    data["version"] = 1
    Path(where.stdout.strip()).write_text(json.dumps(data))
    result = subprocess.run([sys.executable, "-m", "moechat", "profile"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'CMAKE_ARGS="-DGGML_CUDA=on"' in result.stdout
    assert "-m pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python==" in result.stdout
    data["gpu_offload"] = True
    Path(where.stdout.strip()).write_text(json.dumps(data))
    again = subprocess.run([sys.executable, "-m", "moechat", "profile"], capture_output=True,
                           text=True, env=env, timeout=120)
    assert "CMAKE_ARGS" not in again.stdout
