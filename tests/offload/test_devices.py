import threading

import torch

from moechat.backends.offload.devices import CopyStream, CpuWorker, StagingBuffer, pick_devices, pin
from moechat.backends.offload.stats import OffloadStats


def test_staging_buffer_copies_and_refuses_overflow():
    dev = pick_devices("cpu")
    buf = StagingBuffer(4096, dev)
    a, b = torch.arange(100, dtype=torch.float16), torch.arange(300, dtype=torch.uint8).view(3, 100)
    (va, vb), n = buf.load([pin(a, dev), b])
    assert torch.equal(va, a) and torch.equal(vb, b) and n >= a.nbytes + b.nbytes
    assert va.data_ptr() != a.data_ptr()  # a real copy into the buffer
    (up,) = buf.upload([a])
    assert torch.equal(up, a) and up.data_ptr() not in (a.data_ptr(), va.data_ptr())
    try:
        buf.load([torch.zeros(5000, dtype=torch.uint8)])
    except ValueError:
        pass
    else:
        raise AssertionError("overflow accepted")
    s = CopyStream(dev)
    with s.context():
        pass
    s.wait(s.record())
    s.follow()  # no-ops on the CPU


def test_worker_runs_off_thread_and_stats_time():
    worker = CpuWorker()
    stats = OffloadStats()
    with stats.timer("cpu"):
        name = worker.submit(lambda: threading.current_thread().name).result()
    worker.close()
    assert name.startswith("moechat-cpu-experts")
    assert stats.time_s["cpu"] > 0
    stats.tokens, stats.expert_calls, stats.gpu_hits = 2, 4, 3
    assert stats.gpu_hit_rate == 0.75 and "cpu_ms_per_tok" in stats.ms_per_token()
    stats.reset()
    assert stats.tokens == 0 and stats.time_s == {}


def test_budget_parsing():
    import pytest

    from moechat.backends.offload.budget import budget_bytes, parse_budget

    assert budget_bytes(parse_budget("6GiB"), 0) == 6 * 1024**3
    assert budget_bytes(parse_budget("600M"), 0) == 600_000_000
    assert budget_bytes(parse_budget("25%"), 1000) == 250
    assert budget_bytes(parse_budget("123"), 0) == 123
    for bad in ("lots", "150%", "6 parsecs", ""):
        with pytest.raises(ValueError):
            parse_budget(bad)
