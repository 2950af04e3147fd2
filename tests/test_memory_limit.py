"""The memory this process may use: the machine's RAM or its memory cgroup's limit, the smaller
(cgroup v1 and v2 trees written to tmp, and a real v1 cgroup where this machine has one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moechat.backends.plan import memory

GIB = 1024**3


def _v2_tree(tmp_path: Path, limit: str, current: int, inactive: int = 0) -> Path:
    group = tmp_path / "cg" / "user.slice" / "app"
    group.mkdir(parents=True)
    (group / "memory.max").write_text(limit + "\n")
    (group / "memory.current").write_text(f"{current}\n")
    (group / "memory.stat").write_text(f"anon 1\ninactive_file {inactive}\nactive_file 5\n")
    (tmp_path / "cg" / "memory.max").write_text("max\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice/app\n")
    return proc


def test_v2_limit_less_inactive_page_cache(tmp_path):
    proc = _v2_tree(tmp_path, str(4 * GIB), 3 * GIB, inactive=GIB)
    limit, used, source = memory.cgroup_limit(proc, tmp_path / "cg")
    assert (limit, used) == (4 * GIB, 2 * GIB)
    assert "memory.max" in source and "user.slice/app" in source


def test_v2_without_limit_is_none(tmp_path):
    proc = _v2_tree(tmp_path, "max", GIB)
    assert memory.cgroup_limit(proc, tmp_path / "cg") is None


def test_v1_tightest_level_wins(tmp_path):
    root = tmp_path / "cg"
    outer, inner = root / "memory" / "outer", root / "memory" / "outer" / "inner"
    inner.mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # unlimited
    (outer / "memory.limit_in_bytes").write_text(f"{2 * GIB}\n")
    (outer / "memory.usage_in_bytes").write_text(f"{GIB}\n")
    (inner / "memory.limit_in_bytes").write_text(f"{8 * GIB}\n")
    (inner / "memory.usage_in_bytes").write_text(f"{GIB}\n")
    proc = tmp_path / "cgroup"
    proc.write_text("5:cpu:/\n4:memory:/outer/inner\n")
    limit, used, source = memory.cgroup_limit(proc, root)
    assert (limit, used) == (2 * GIB, GIB) and source.endswith("outer")


def test_budget_is_the_smaller_and_says_which(monkeypatch):
    monkeypatch.setattr(memory, "cgroup_limit", lambda: (2 * GIB, GIB // 2, "cgroup v1 x"))
    budget = memory.ram_budget()
    assert budget.available == 2 * GIB - GIB // 2 and budget.bound_by == "cgroup v1 x"
    assert "cgroup limit of 2.0 GiB" in budget.describe()
    monkeypatch.setattr(memory, "cgroup_limit", lambda: (1 << 50, 0, "cgroup v2 y"))
    assert memory.ram_budget().bound_by == "RAM"


V1 = Path("/sys/fs/cgroup/memory")


@pytest.mark.skipif(not (V1.is_dir() and os.access(V1, os.W_OK)), reason="needs a writable cgroup v1 memory controller (root)")
def test_real_v1_cgroup_bounds_the_budget(tmp_path):
    group = V1 / f"moechat-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(1 * GIB))
        code = ("import os; open(os.environ['CG'] + '/cgroup.procs', 'w').write(str(os.getpid())); "
                "from moechat.backends.plan.memory import ram_budget; b = ram_budget(); "
                "print(b.available, b.cgroup_limit, b.bound_by)")
        r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, CG=str(group)),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        available, limit, bound_by = r.stdout.split(maxsplit=2)
        assert int(limit) == GIB and 0 < int(available) <= GIB and "memory.limit_in_bytes" in bound_by
    finally:
        group.rmdir()


def _in_v1_group(limit: int, argv: list[str], tmp_path) -> subprocess.CompletedProcess:
    """Run `python -m moechat ARGV` inside a fresh v1 memory cgroup capped at `limit` bytes."""
    group = V1 / f"moechat-test-{os.getpid()}-{len(argv)}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        code = ("import os, sys; open(os.environ['CG'] + '/cgroup.procs', 'w').write(str(os.getpid())); "
                "from moechat.app.cli import main; sys.exit(main(sys.argv[1:]))")
        return subprocess.run([sys.executable, "-c", code, *argv], env=dict(os.environ, CG=str(group)),
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    finally:
        group.rmdir()


@pytest.mark.skipif(not (V1.is_dir() and os.access(V1, os.W_OK)), reason="needs a writable cgroup v1 memory controller (root)")
@pytest.mark.parametrize("command", [["ask", "--engine", "llama.cpp", "--max-tokens", "2", "Hi", "--model"],
                                     ["--engine", "llama.cpp", "-m"]])
def test_model_too_big_for_the_cgroup_is_refused_in_one_line(demo_model, tmp_path, command):
    """The demo model (1.3 GB) under a 1 GiB cap with an engine that must hold it all: refused,
    naming the cgroup limit — not killed. (auto streams it instead: test_auto_streams_... below.)"""
    result = _in_v1_group(GIB, [*command, str(demo_model)], tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr)  # -9 would be the OOM killer
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cgroup" in lines[0] and "limit" in lines[0] and "1.0 GiB" in lines[0], lines[0]


@pytest.mark.skipif(not (V1.is_dir() and os.access(V1, os.W_OK)), reason="needs a writable cgroup v1 memory controller (root)")
def test_auto_streams_what_does_not_fit_the_cgroup(demo_model, tmp_path):
    """The same model and cap with the planner's choice: plan names the stream engine, not a refusal."""
    result = _in_v1_group(GIB, ["plan", "--json", str(demo_model)], tmp_path)
    assert result.returncode == 0, result.stderr
    import json

    assert json.loads(result.stdout)["choice"]["engine"] == "stream"


def test_planner_refusal_names_the_cgroup_limit():
    import dataclasses
    import json

    from moechat.backends.plan.hardware_profile import HardwareProfile, RamInfo
    from moechat.backends.plan.planner import NoFitError, make_plan
    from tests.fixtures.random_geometry import geometry_card

    data = json.loads((Path(__file__).parent / "profiles" / "laptop-ddr5-nogpu.json").read_text())
    profile = HardwareProfile.from_dict(data)
    # so little room that not even streaming the experts runs (the non-expert weights alone)
    note = "0.1 GiB available under the memory cgroup limit of 2.0 GiB (cgroup v1 x)"
    profile = dataclasses.replace(profile, ram=RamInfo(profile.ram.total_bytes, int(0.1 * GIB), note))
    with pytest.raises(NoFitError) as err:
        make_plan(geometry_card("mixtral-8x7b", n_layers=4), profile)
    assert "cgroup limit of 2.0 GiB" in str(err.value)
