"""Shared fixtures. Model files are built here, never downloaded (see shared/FIXTURES.md).

Built models live in a cache outside the repo, keyed by recipe version, so a second test
run reuses them; conversation history goes to a fresh temporary dir for every test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _session_kv_dir(tmp_path_factory):
    """Saved KV states (issue 16) never go to the user cache dir, also for engines that
    session- and module-scoped fixtures open before any test's own dir is set."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOECHAT_KV_CACHE_DIR", str(tmp_path_factory.mktemp("kv-session")))
        yield


@pytest.fixture(scope="module", autouse=True)
def _module_kv_dir(tmp_path_factory, _session_kv_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOECHAT_KV_CACHE_DIR", str(tmp_path_factory.mktemp("kv-module")))
        yield


@pytest.fixture(autouse=True)
def _isolated_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECHAT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MOECHAT_KV_CACHE_DIR", str(tmp_path / "kv"))  # saved KV states (issue 16)
    monkeypatch.setenv("MOECHAT_RUN_LOG", str(tmp_path / "runs.sqlite3"))  # recorded runs (issue 19)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The built-in demo MoE (SmolLM2 upcycled, 8 experts, top-2, F16), built once."""
    from moechat.backends.model.demo_model import demo_model_path

    return demo_model_path(progress=False)


@pytest.fixture(scope="session")
def demo_model_q8() -> Path:
    from moechat.backends.model.demo_model import UpcycleRecipe, demo_model_path

    return demo_model_path(UpcycleRecipe(expert_type="Q8_0"), progress=False)


def moechat_env(**extra: str) -> dict[str, str]:
    """Environment for running `moechat` in a subprocess."""
    env = dict(os.environ)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def tiny_model():
    """Factory for tiny random GGUF models (tests/fixtures/tiny_models.py), built once into
    cache_dir()/fixtures: `tiny_model("qwen3moe", "Q4_K")` -> Path."""
    from fixtures.tiny_models import tiny_model_path

    def make(arch: str, expert_type: str = "F32", seed: int = 0) -> Path:
        return tiny_model_path(arch, expert_type, seed)

    return make
