"""How much a model card costs: local header parse vs gguf.GGUFReader, and bytes read remotely.

    python benchmarks/bench_model_card.py [GGUF ...]      (default: the built-in demo model)

For each file: the time to read its card with moechat's header parser (`read_model_card`)
and with gguf.GGUFReader (which maps the whole file and builds every tensor view), best of
3; then the card read over HTTP range requests from a local fake hub (tests/hub_server.py),
with the bytes the server actually sent against the file size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def best_of(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", nargs="*", type=Path)
    args = parser.parse_args()
    import gguf

    from hub_server import FakeHub
    from moechat.backends.model.model_card import read_model_card

    paths = args.gguf
    if not paths:
        from moechat.backends.model.demo_model import demo_model_path

        paths = [demo_model_path(progress=False)]

    hub = FakeHub()
    for path in paths:
        hub.add("bench/models", path.name, path)
    os.environ["HF_ENDPOINT"] = hub.start()
    from moechat.backends.model import hub as hub_api

    print(f"{'file':<48} {'size':>9} {'card':>8} {'GGUFReader':>11} {'ratio':>6} "
          f"{'remote':>8} {'read':>9} {'of file':>8}")
    for path in paths:
        size = path.stat().st_size
        t_card = best_of(lambda: read_model_card(path))
        t_reader = best_of(lambda: list(gguf.GGUFReader(path).tensors))
        hub.sha256("bench/models", path.name)  # the fake hub's ETag, computed once up front
        hub.log.clear()
        t0 = time.perf_counter()
        remote = hub_api.read_remote_card("bench/models", path.name)
        t_remote = time.perf_counter() - t0
        assert remote.tensors == read_model_card(path).tensors
        sent = hub.bytes_sent()
        print(f"{path.name[:48]:<48} {size / 1e6:>7.0f}MB {t_card * 1e3:>6.0f}ms {t_reader * 1e3:>9.0f}ms "
              f"{t_reader / t_card:>5.1f}x {t_remote * 1e3:>6.0f}ms {sent / 1e6:>7.2f}MB {sent / size:>7.2%}")
    hub.stop()


if __name__ == "__main__":
    main()
