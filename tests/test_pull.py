"""`moechat pull / models / rm` against a fake hub on 127.0.0.1 (tests/hub_server.py).

Every command runs in a subprocess with HF_ENDPOINT pointed at the fake hub and a fresh
HF_HOME, as a user would run it; the server's request log says what really went over the
wire (ranges asked for, bytes sent).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hub_server import GOOD_TOKEN, FakeHub, write_tiny_moe

REPO = "test-org/tiny-moe-GGUF"
GATED_REPO = "test-org/gated-moe-GGUF"
FILE = "tiny-moe-F16.gguf"
SPLIT_FIRST = "tiny-split-00001-of-00002.gguf"

CATALOGUE = f"""
[models.tiny-moe]
family = "test"
architecture = "llama"
params_total_b = 0.01
params_active_b = 0.005
context_length = 4096
license = "apache-2.0"
source = "tests/hub_server.py"
[models.tiny-moe.quants.F16]
repo = "{REPO}"
files = ["{FILE}"]
source = "tests/hub_server.py"

[models.tiny-split]
family = "test"
architecture = "llama"
params_total_b = 0.01
params_active_b = 0.005
context_length = 4096
license = "apache-2.0"
source = "tests/hub_server.py"
[models.tiny-split.quants.F16]
repo = "{REPO}"
files = ["sub/tiny-split-00001-of-00002.gguf", "sub/tiny-split-00002-of-00002.gguf"]
source = "tests/hub_server.py"

[models.stale-size]
family = "test"
architecture = "llama"
params_total_b = 0.01
params_active_b = 0.005
context_length = 4096
license = "apache-2.0"
source = "tests/hub_server.py"
[models.stale-size.quants.F16]
repo = "{REPO}"
files = ["{FILE}"]
size_bytes = 123
source = "tests/hub_server.py"

[models.gated-moe]
family = "test"
architecture = "llama"
params_total_b = 0.01
params_active_b = 0.005
context_length = 4096
license = "apache-2.0"
source = "tests/hub_server.py"
[models.gated-moe.quants.F16]
repo = "{GATED_REPO}"
files = ["{FILE}"]
source = "tests/hub_server.py"
"""


@pytest.fixture(scope="session")
def fixture_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-files")
    single = write_tiny_moe(root / FILE)[0]
    shards = write_tiny_moe(root / "tiny-split.gguf", split_max_tensors=12, seed=1)
    return {"single": single, "shards": shards}


@pytest.fixture(scope="session")
def fake_hub(fixture_files):
    hub = FakeHub()
    hub.add(REPO, FILE, fixture_files["single"])
    for shard in fixture_files["shards"]:
        hub.add(REPO, f"sub/{shard.name}", shard)
    hub.add(GATED_REPO, FILE, fixture_files["single"])
    hub.gated.add(GATED_REPO)
    url = hub.start()
    hub.url = url
    yield hub
    hub.stop()


@pytest.fixture
def hub(fake_hub):
    """The session's fake hub with a clean log and knobs reset after the test."""
    fake_hub.log.clear()
    yield fake_hub
    fake_hub.corrupt.clear()
    fake_hub.rate = None
    fake_hub.cdn = True
    fake_hub.log.clear()


@pytest.fixture
def env(tmp_path, fake_hub):
    catalogue = tmp_path / "models.toml"
    catalogue.write_text(CATALOGUE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=fake_hub.url, HF_HOME=str(tmp_path / "hf"), MOECHAT_CATALOGUE=str(catalogue),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
    return env


def moechat(env, *args, **kwargs):
    return subprocess.run([sys.executable, "-m", "moechat", *args], env=env, capture_output=True,
                          text=True, timeout=60, **kwargs)


def one_line_error(result) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moechat"), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def blobs(env, repo=REPO) -> list[Path]:
    folder = Path(env["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}" / "blobs"
    return sorted(folder.glob("*")) if folder.exists() else []


# ---- pull ---------------------------------------------------------------------------------


def test_pull_shows_progress_verifies_and_lands_in_the_hub_cache(hub, env, fixture_files):
    result = moechat(env, "pull", "tiny-moe")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.name == FILE and f"models--{REPO.replace('/', '--')}" in str(path)
    assert sha256(path) == sha256(fixture_files["single"])
    assert "100%" in result.stderr and FILE in result.stderr  # the tqdm bar ran to the end
    assert [r.range_start for r in hub.gets(FILE)] == [None]  # one whole-file GET...
    assert {r.status for r in hub.log if r.method == "REDIRECT"} == {302}  # ...from the "CDN"

    again = moechat(env, "pull", "tiny-moe:f16")  # quant names are case-insensitive
    assert again.returncode == 0 and Path(again.stdout.strip()) == path
    assert "already downloaded" in again.stderr
    assert len(hub.gets(FILE)) == 1  # nothing fetched the second time


def test_interrupted_pull_resumes_where_it_stopped(hub, env, fixture_files):
    size = fixture_files["single"].stat().st_size
    hub.rate = 4e6  # ~3.5 s for the whole file: time to interrupt it
    proc = subprocess.Popen([sys.executable, "-m", "moechat", "pull", "tiny-moe"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # huggingface-hub writes in 10 MiB pieces: wait until the first is on disk
    deadline = time.monotonic() + 30
    while not any(p.stat().st_size for p in blobs(env) if p.name.endswith(".incomplete")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    partials = [p for p in blobs(env) if p.name.endswith(".incomplete")]
    assert len(partials) == 1
    kept = partials[0].stat().st_size
    assert 0 < kept < size

    hub.rate = None
    result = moechat(env, "pull", "tiny-moe", "--quiet")
    assert result.returncode == 0, result.stderr
    resumed = hub.gets(FILE)[-1]
    assert resumed.range_start == kept  # asked only for the missing part...
    assert resumed.sent == size - kept  # ...and got only that
    assert sha256(result.stdout.strip()) == sha256(fixture_files["single"])
    assert not [p for p in blobs(env) if p.name.endswith(".incomplete")]


def test_corrupted_download_is_rejected_and_deleted(hub, env, fixture_files):
    hub.corrupt.add(FILE)
    line = one_line_error(moechat(env, "pull", "tiny-moe", "--quiet"))
    assert "corrupted download" in line and "sha256" in line
    assert blobs(env) == []  # neither the bad blob nor a partial is kept
    hub.corrupt.clear()
    assert moechat(env, "pull", "tiny-moe", "--quiet").returncode == 0


def test_split_gguf_pulls_every_shard_and_reads_as_one_model(hub, env, fixture_files):
    from moechat.backends.model.model_card import read_model_card

    result = moechat(env, "pull", "tiny-split", "--quiet")
    assert result.returncode == 0, result.stderr
    first = Path(result.stdout.strip())
    assert first.name == SPLIT_FIRST
    assert (first.parent / "tiny-split-00002-of-00002.gguf").exists()
    card = read_model_card(first)
    assert card.file_bytes == sum(p.stat().st_size for p in fixture_files["shards"])
    assert {t.shard for t in card.tensors} == {0, 1} and card.n_experts == 4

    listed = {row["name"]: row for row in json.loads(moechat(env, "models", "--json").stdout)}
    assert listed["tiny-split:F16"]["local"] and listed["tiny-split:F16"]["size_bytes"] == card.file_bytes


def test_hub_repo_file_spec_pulls_too_from_a_server_without_cdn(hub, env, fixture_files):
    hub.cdn = False  # small git files, and mirrors, answer on the resolve URL itself
    result = moechat(env, "pull", f"{REPO}:{FILE}", "--quiet")
    assert result.returncode == 0, result.stderr
    assert not [r for r in hub.log if r.method == "REDIRECT"]
    assert sha256(result.stdout.strip()) == sha256(fixture_files["single"])


# ---- header-only planning -------------------------------------------------------------------


def test_remote_card_reads_only_the_header(hub, env, fixture_files, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from moechat.backends.model.model_card import read_model_card
    from moechat.backends.model.model_resolve import resolve_card

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("MOECHAT_CATALOGUE", env["MOECHAT_CATALOGUE"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    size = fixture_files["single"].stat().st_size

    remote = resolve_card("tiny-moe", allow_remote=True)
    local = read_model_card(fixture_files["single"])
    assert remote.tensors == local.tensors and remote.file_bytes == local.file_bytes == size
    assert remote.active_bytes_per_token == local.active_bytes_per_token
    served = hub.bytes_sent()
    assert 0 < served < size / 20, f"read {served:,} of {size:,} bytes"
    assert all(r.range_start == 0 for r in hub.log if r.method == "GET")
    assert not (tmp_path / "empty-cache").exists()  # nothing downloaded

    split = resolve_card("tiny-split", allow_remote=True)
    assert split.tensors == read_model_card(fixture_files["shards"][0]).tensors
    with pytest.raises(Exception, match="not downloaded yet"):
        resolve_card("tiny-moe")  # without allow_remote it does not touch the network


def test_models_plan_flag_reads_remote_headers(hub, env, fixture_files):
    rows = {r["name"]: r for r in json.loads(moechat(env, "models", "--json", "--plan").stdout)}
    row = rows["tiny-moe:F16"]
    assert not row["local"] and row["plan_error"] is None
    assert row["size_bytes"] == fixture_files["single"].stat().st_size
    assert hub.bytes_sent(FILE) < row["size_bytes"] / 20
    assert "gated" in rows["gated-moe:F16"]["plan_error"]


def test_plan_before_download_reads_only_the_header(hub, env, fixture_files):
    """`moechat plan NAME:QUANT` for a model not downloaded: the card comes from the remote
    header, the plan is made on a recorded machine profile, and nothing is downloaded."""
    profile = Path(__file__).parent / "profiles" / "laptop-ddr5-nogpu.json"
    result = moechat(env, "plan", "tiny-moe:F16", "--json", "--profile", str(profile))
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["choice"]["engine"] == "llama.cpp" and plan["choice"]["decode_tok_s"] > 0
    assert plan["reason"] and len(plan["candidates"]) >= 2
    size = fixture_files["single"].stat().st_size
    assert 0 < hub.bytes_sent(FILE) < size / 20
    assert blobs(env) == []  # planned, not pulled


# ---- models / rm ----------------------------------------------------------------------------


def test_models_json_works_offline_and_marks_what_is_local(hub, env):
    assert moechat(env, "pull", "tiny-moe", "--quiet").returncode == 0
    offline = dict(env, HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HUB_OFFLINE="1")
    result = moechat(offline, "models", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["tiny-moe:F16"]["local"] and Path(rows["tiny-moe:F16"]["path"]).exists()
    assert rows["tiny-moe:F16"]["architecture"] == "llama"
    assert not rows["tiny-split:F16"]["local"] and rows["tiny-split:F16"]["path"] is None
    assert set(rows["tiny-moe:F16"]) >= {"name", "quant", "architecture", "size_bytes", "local",
                                          "fits", "decode_tok_s"}
    table = moechat(offline, "models")
    assert table.returncode == 0 and "tiny-moe:F16" in table.stdout


def test_pulled_model_resolves_by_name_then_rm_deletes_it(hub, env, monkeypatch):
    from huggingface_hub import constants

    from moechat.backends.model.model_resolve import resolve_model

    path = Path(moechat(env, "pull", "tiny-moe", "--quiet").stdout.strip())
    monkeypatch.setenv("MOECHAT_CATALOGUE", env["MOECHAT_CATALOGUE"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(env["HF_HOME"]) / "hub"))
    assert resolve_model("tiny-moe") == path  # what ask and the TUI use
    assert resolve_model(f"{REPO}:{FILE}") == path

    result = moechat(env, "rm", "tiny-moe")
    assert result.returncode == 0, result.stderr
    assert "removed tiny-moe:F16" in result.stdout
    assert not path.exists() and not [p for p in blobs(env) if p.is_file()]
    rows = {r["name"]: r for r in json.loads(moechat(env, "models", "--json").stdout)}
    assert not rows["tiny-moe:F16"]["local"]
    assert "not downloaded" in one_line_error(moechat(env, "rm", "tiny-moe"))


# ---- errors: one line, non-zero exit ---------------------------------------------------------


def test_unknown_model_suggests_close_names(env):
    assert "unknown model 'no-such-model'" in one_line_error(moechat(env, "pull", "no-such-model"))
    assert "did you mean tiny-moe" in one_line_error(moechat(env, "pull", "tiny-mo"))
    assert "offered: F16" in one_line_error(moechat(env, "pull", "tiny-moe:Q9_9"))


def test_catalogue_size_that_disagrees_with_the_hub_stops_the_pull(hub, env):
    line = one_line_error(moechat(env, "pull", "stale-size"))
    assert "catalogue says 123" in line and "out of date" in line
    assert hub.gets(FILE) == []  # stopped before downloading


def test_no_network(env):
    offline = dict(env, HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    assert "cannot reach" in one_line_error(moechat(offline, "pull", "tiny-moe"))


def test_gated_repo_needs_a_token(hub, env):
    assert "gated" in one_line_error(moechat(env, "pull", "gated-moe"))  # 401: no token
    assert "gated" in one_line_error(moechat(dict(env, HF_TOKEN="hf_wrong"), "pull", "gated-moe"))  # 403
    assert [r.status for r in hub.log] == [401, 403]
    ok = moechat(dict(env, HF_TOKEN=GOOD_TOKEN), "pull", "gated-moe", "--quiet")
    assert ok.returncode == 0, ok.stderr


def test_disk_full(hub, env):
    def small_disk():  # writes past 1 MB fail with EFBIG, as they would with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    result = subprocess.run([sys.executable, "-m", "moechat", "pull", "tiny-moe", "--quiet"], env=env,
                            capture_output=True, text=True, timeout=60, preexec_fn=small_disk)
    line = one_line_error(result)
    assert "disk full" in line and "resume" in line


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_second_pull_of_the_same_file_waits_its_turn(hub, env):
    from filelock import FileLock

    lock = Path(env["HF_HOME"]) / "hub" / ".locks" / "moechat" / f"{hub.sha256(REPO, FILE)}.lock"
    lock.parent.mkdir(parents=True)
    with FileLock(lock):
        line = one_line_error(moechat(env, "pull", "tiny-moe", "--quiet"))
    assert "being downloaded by another process" in line
    assert moechat(env, "pull", "tiny-moe", "--quiet").returncode == 0
