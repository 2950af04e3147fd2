"""The import arrows point down (app -> backends -> kernels, and the rooms inside backends), as
import-linter checks the contracts in pyproject.toml.

import-linter reads a package from the file system, and moechat's sub-packages live beside
moechat/ (pyproject's package-dir). So the test lays the package out as an install would — a
copy of the .py files under tmp/moechat/ following that mapping — and lints the copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def _lay_out_package(dest: Path) -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, folder in sorted(config["package-dir"].items()):
        target = dest.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for source in (REPO / folder).glob("*.py"):
            shutil.copy2(source, target / source.name)


def test_lint_imports_contracts_hold(tmp_path):
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports is not installed (pip install -e '.[test]')")
    _lay_out_package(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([lint, "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_a_broken_arrow_is_caught(tmp_path):
    """The same check fails when a backend imports a front end (so the test above can fail)."""
    _lay_out_package(tmp_path)
    (tmp_path / "moechat" / "kernels" / "upward.py").write_text("import moechat.app.cli\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([shutil.which("lint-imports") or "lint-imports", "--config",
                        str(REPO / "pyproject.toml"), "--no-cache"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "BROKEN" in r.stdout
