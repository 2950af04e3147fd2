"""How fast the drive holding a model reads: at the stream engine's read size for that model
(one expert slice, rounded to a power of two) and queue depth (direct reads, several in
flight), and at 4 KiB (what page faults of a memory-mapped
file come down to under memory pressure). Measured once per device (st_dev) and read
size on the model file itself, cached in cache_dir()/disk/.

Why by hand: fio is not a Python dependency and not installed on most machines; the probe
is twenty preadv calls on threads, the same calls the engine makes.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

LARGE_READ = 3 * 1024**2  # default: about one expert slice of a small MoE, a third of a big one's
READ_RANGE = (128 * 1024, 64 * 1024**2)  # read sizes probed (a model's slice, clamped)
QUEUE_DEPTH = 4  # = plan/streamed.py READ_THREADS, the engine's reads in flight
LARGE_TOTAL = 256 * 1024**2
SMALL_READ = 4096
SMALL_TOTAL = 4 * 1024**2
ALIGN = 4096
VERSION = 2


@dataclass(frozen=True, slots=True)
class DiskSpeed:
    large_gbs: float  # GB/s with large direct reads (the model's slice size), QUEUE_DEPTH in flight
    small_gbs: float  # GB/s with 4 KiB reads, one at a time
    direct: bool  # whether O_DIRECT was honoured (else buffered reads, page cache dropped)


def read_size(slice_bytes: int) -> int:
    """The probe's large read for slices of `slice_bytes`: the power of two nearest, clamped."""
    lo, hi = READ_RANGE
    size = 1 << max(0, round(math.log2(max(1, slice_bytes))))
    return min(hi, max(lo, size))


def disk_speed(path: str, refresh: bool = False, read_bytes: int = LARGE_READ) -> DiskSpeed:
    """The cached speed of the device holding `path` at `read_bytes` reads (rounded by
    read_size), measured on first use."""
    from moechat.backends.paths import cache_dir

    dev = os.stat(path).st_dev
    read_bytes = read_size(read_bytes)
    cached = cache_dir() / "disk" / f"dev-{dev}-r{read_bytes // 1024}k-v{VERSION}.json"
    if not refresh and cached.exists():
        try:
            return DiskSpeed(**json.loads(cached.read_text()))
        except (OSError, ValueError, TypeError):
            pass
    speed = measure(path, read_bytes)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(speed)))
    os.replace(tmp, cached)
    return speed


def measure(path: str, read_bytes: int = LARGE_READ) -> DiskSpeed:
    size = os.stat(path).st_size
    try:
        fd, direct = os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except (OSError, AttributeError):
        fd, direct = os.open(path, os.O_RDONLY), False
    try:
        rng = random.Random(0)
        large = _rate(fd, size, read_bytes, QUEUE_DEPTH, LARGE_TOTAL, direct, rng)
        small = _rate(fd, size, SMALL_READ, 1, SMALL_TOTAL, direct, rng)
    finally:
        os.close(fd)
    return DiskSpeed(round(large, 3), round(small, 4), direct)


def _rate(fd, size, read_bytes, depth, total, direct, rng) -> float:
    read_bytes = min(read_bytes, size // ALIGN * ALIGN)
    n = max(1, min(total, size) // read_bytes)
    offsets = [rng.randrange(0, max(1, size - read_bytes)) // ALIGN * ALIGN for _ in range(n)]
    buffers = [mmap.mmap(-1, read_bytes) for _ in range(depth)]

    def one(i):
        off = offsets[i]
        got = os.preadv(fd, [buffers[i % depth]], off)
        if not direct:
            os.posix_fadvise(fd, off, read_bytes, os.POSIX_FADV_DONTNEED)
        return got

    t0 = time.perf_counter()
    if depth == 1:
        got = sum(one(i) for i in range(n))
    else:
        with ThreadPoolExecutor(depth) as pool:  # at most `depth` reads in flight, one buffer each
            got = 0
            for start in range(0, n, depth):
                got += sum(pool.map(one, range(start, min(n, start + depth))))
    seconds = time.perf_counter() - t0
    for b in buffers:
        b.close()
    return got / seconds / 1e9 if seconds > 0 else 0.0
