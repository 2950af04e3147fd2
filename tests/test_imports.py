"""One-shot paths stay light: `moechat --help` and `moechat ask` import neither textual nor
torch, nor `serve`'s web stack (checked through sys.modules in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
from moechat.app.cli import main
try:
    code = main({argv!r})
except SystemExit as exit:  # argparse exits after printing --help
    code = exit.code
heavy = sorted(m for m in ("textual", "torch", "rich", "starlette", "uvicorn", "fastapi", "openai",
                          "ollama", "moechat.app.server") if m in sys.modules)
print("HEAVY", heavy, "CODE", code)
"""


def run_and_list_heavy(argv: list[str]) -> str:
    result = subprocess.run([sys.executable, "-c", CHECK.format(argv=argv)],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_help_imports_nothing_heavy():
    assert run_and_list_heavy(["--help"]).startswith("HEAVY [] CODE 0")


def test_ask_imports_nothing_heavy(demo_model):
    line = run_and_list_heavy(["ask", "--model", str(demo_model), "--max-tokens", "2", "Hi"])
    assert line == "HEAVY [] CODE 0"
