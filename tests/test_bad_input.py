"""Every kind of bad input gives one line on stderr, exit code 2, and no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.fixtures import bad_ggufs

QUESTION = "What is the capital of France?"


def run_moechat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moechat", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])


@pytest.fixture
def bad_files(tmp_path, demo_model):
    files = {
        "missing": tmp_path / "missing.gguf",
        "directory": tmp_path,
        "empty": tmp_path / "empty.gguf",
        "not_gguf": tmp_path / "photo.gguf",
        "truncated": bad_ggufs.write_truncated(demo_model, tmp_path / "truncated.gguf"),
        "absurd_counts": bad_ggufs.write_absurd_counts(tmp_path / "absurd.gguf"),
        "garbage_kv": bad_ggufs.write_garbage_kv(tmp_path / "garbage.gguf"),
        "unsupported_arch": bad_ggufs.write_header_only_model(tmp_path / "bert.gguf", arch="bert"),
        # 2**24 rows x 4096 x 4 bytes = 256 GiB claimed, stored sparsely: cannot fit in RAM.
        "too_big": bad_ggufs.write_header_only_model(
            tmp_path / "huge.gguf", hidden=4096, n_heads=32, tensor_rows=2**24
        ),
    }
    files["empty"].write_bytes(b"")
    files["not_gguf"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    return files


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing", ["no such file"]),
        ("directory", ["directory"]),
        ("empty", ["empty"]),
        ("not_gguf", ["not a GGUF"]),
        ("truncated", ["truncated"]),
        ("absurd_counts", ["corrupt", "tensors"]),
        ("garbage_kv", ["corrupt"]),
        ("unsupported_arch", ["unsupported architecture", "bert"]),
        ("too_big", ["needs", "GiB", "--force"]),
    ],
)
def test_bad_model_file(bad_files, case, words):
    result = run_moechat("ask", "--model", str(bad_files[case]), QUESTION)
    assert_one_line_error(result, *words)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--max-tokens", "-5"], ["max-tokens", "positive"]),
        (["--max-tokens", "lots"], ["max-tokens", "integer"]),
        (["--engine", "warp-drive"], ["engine", "invalid choice"]),
        (["--temperature", "-1"], ["temperature"]),
        (["--temperature", "nan"], ["temperature"]),
        (["--threads", "0"], ["threads"]),
        (["--n-cpu-moe", "-1"], ["n-cpu-moe"]),
        (["--no-such-flag"], ["unrecognized"]),
    ],
)
def test_bad_flags(flags, words):
    result = run_moechat("ask", *flags, QUESTION)
    assert_one_line_error(result, *words)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["plan", "--ctx", "-5"], ["ctx", "positive"]),
        (["plan", "--measure", "--rounds", "0"], ["rounds", "positive"]),
        (["bench", "--threads", "0"], ["threads", "positive"]),
        (["bench", "--n-cpu-moe", "-2"], ["n-cpu-moe"]),
        (["bench", "--tokens", "many"], ["tokens", "integer"]),
        (["--ctx", "0"], ["ctx", "positive"]),  # the chat app
    ],
)
def test_bad_numbers_on_every_command(argv, words):
    """Every subcommand takes its numbers through the same argparse types (app/arg_types.py)."""
    assert_one_line_error(run_moechat(*argv), *words)


def test_no_prompt_at_all():
    assert_one_line_error(run_moechat("ask", stdin=""), "no prompt")


def test_too_big_model_loads_with_force_then_fails_cleanly(bad_files):
    """--force skips the fit check; the sparse file then fails inside llama.cpp, still cleanly."""
    result = run_moechat("ask", "--force", "--model", str(bad_files["too_big"]), QUESTION)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "needs" not in result.stderr  # the fit check did not run


def test_serve_with_a_missing_model_is_one_line(tmp_path):
    assert_one_line_error(run_moechat("serve", "--port", "0", str(tmp_path / "missing.gguf")), "no such file")


@pytest.mark.parametrize("flag, value, words", [("--ram-budget", "lots", ("--ram-budget", "not a size")),
                                                ("--vram-budget", "200%", ("--vram-budget", "0–100%"))])
def test_a_bad_budget_is_refused_before_anything_loads(flag, value, words):
    assert_one_line_error(run_moechat("ask", flag, value, QUESTION), *words)


def test_a_profile_with_a_rate_that_is_not_a_number_is_one_line(tmp_path, demo_model):
    import json
    from pathlib import Path

    profiles = Path(__file__).parent / "fixtures" / "external_runs" / "profiles"
    good = json.loads((profiles / "7600k-gtx1060-ddr4-3000.json").read_text())
    good["cpu_matvec_gbs"]["Q2_K"] = "fast"
    bad = tmp_path / "profile.json"
    bad.write_text(json.dumps(good))
    assert_one_line_error(run_moechat("plan", "--profile", str(bad), str(demo_model)),
                          "not a moechat hardware profile", "Q2_K")
