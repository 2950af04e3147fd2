"""How much memory this process may use: the machine's available RAM, and the memory cgroup's
limit when one is set (a container, a systemd slice, `systemd-run -p MemoryMax=`), whichever is
smaller — and which of the two bound it.

Why by hand: psutil reports the machine's memory only; inside a container with a 4 GiB limit on
a 64 GiB host it says 60 GiB free, and a model sized by that is OOM-killed. The cgroup files are
read directly (v2 `memory.max`/`memory.current`, v1 `memory.limit_in_bytes`/
`memory.usage_in_bytes`), every level from this process's group up to the root, keeping the
tightest. Reclaimable page cache (`inactive_file`) is not counted as used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 60  # v1 writes 9223372036854771712 for "no limit"


@dataclass(frozen=True, slots=True)
class RamBudget:
    available: int  # bytes this process can still allocate
    bound_by: str  # "RAM" (the machine) or the cgroup file that set the limit
    cgroup_limit: int | None = None  # the tightest cgroup limit, when there is one
    machine_available: int = 0

    def describe(self) -> str:
        gib = 1024**3
        if self.cgroup_limit is None or self.bound_by == "RAM":
            return f"{self.available / gib:.1f} GiB of RAM available"
        return (f"{self.available / gib:.1f} GiB available under the memory cgroup limit of "
                f"{self.cgroup_limit / gib:.1f} GiB ({self.bound_by})")


def ram_budget() -> RamBudget:
    import psutil

    machine = psutil.virtual_memory().available
    limit = cgroup_limit()
    if limit is None:
        return RamBudget(machine, "RAM", None, machine)
    limit_bytes, used_bytes, source = limit
    in_group = max(0, limit_bytes - used_bytes)
    if in_group < machine:
        return RamBudget(in_group, source, limit_bytes, machine)
    return RamBudget(machine, "RAM", limit_bytes, machine)


def cgroup_limit(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT):
    """(limit, used, source) of the tightest memory cgroup above this process, or None."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            found = _tightest(root, path, "memory.max", "memory.current", "cgroup v2 memory.max")
        elif "memory" in controllers.split(","):
            found = _tightest(root / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes",
                              "cgroup v1 memory.limit_in_bytes")
        else:
            continue
        if found and (best is None or found[0] - found[1] < best[0] - best[1]):
            best = found
    return best


def _tightest(mount: Path, path: str, limit_name: str, usage_name: str, source: str):
    best = None
    group = mount / path.lstrip("/")
    for folder in [group, *group.parents]:
        if not str(folder).startswith(str(mount)):
            break
        limit = _read_int(folder / limit_name)
        if limit is None or limit >= UNLIMITED:
            continue
        used = (_read_int(folder / usage_name) or 0) - _inactive_file(folder / "memory.stat")
        if best is None or limit - used < best[0] - best[1]:
            best = (limit, max(0, used), f"{source} of {folder}")
    return best


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _inactive_file(stat: Path) -> int:
    """Page cache the kernel reclaims before it OOM-kills: not memory the process holds."""
    try:
        for line in stat.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
