"""The disk tier: expert bytes read through it equal the mapped file's, the slot cache's
policies on traces, greedy tokens identical with and without it, and the fault cases
(short read, file replaced or truncated while open)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from moechat.backends.engines.engine import Sampling
from moechat.backends.errors import MoechatError
from moechat.backends.offload.disk_reader import DiskReader
from moechat.backends.offload.ram_cache import SlotCache

PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
GIB = 1024**3


# ---- the reader ----------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [True, False])
def test_expert_bytes_read_through_the_disk_tier_equal_the_mapped_file(tiny_model, direct):
    from moechat.backends.offload.disk_experts import layer_files
    from moechat.backends.runtime.experts import ExpertStore
    from moechat.backends.runtime.gguf_weights import GGUFWeights

    path = tiny_model("qwen2moe", "Q8_0")
    weights = GGUFWeights(path)
    store = ExpertStore(weights, 2, 8)
    reader = DiskReader(path, queue_depth=3, max_read=1 << 16, direct=None if direct else False)
    try:
        if direct and not reader.direct:
            pytest.skip("this filesystem refuses O_DIRECT")
        for layer, f in layer_files(store).items():
            for expert in range(8):
                mapped = store.expert(layer, expert)
                for off, n, want in zip(f.offsets, f.slice_bytes, (mapped.gate, mapped.up, mapped.down)):
                    got = np.zeros(n, np.uint8)
                    reader.read(off + expert * n, got)
                    assert got.tobytes() == want.data.tobytes()
        assert reader.counters.bytes == sum(f.expert_bytes * 8 for f in layer_files(store).values())
    finally:
        reader.close()


def test_a_short_read_is_one_clear_error(tmp_path, tiny_model):
    path = tmp_path / "m.gguf"
    shutil.copy(tiny_model("llama-moe", "F32"), path)
    size = path.stat().st_size
    reader = DiskReader(path, max_read=1 << 16)
    try:
        os.truncate(path, size // 2)
        with pytest.raises(MoechatError, match="short read"):
            reader.read(size - 10000, np.zeros(8000, np.uint8))
        with pytest.raises(MoechatError, match="replaced or truncated"):
            reader.check_unchanged()
    finally:
        reader.close()


# ---- the slot cache -------------------------------------------------------------------------


def _replay(cache: SlotCache, ids: np.ndarray) -> float:
    """ids [N, L, A] -> hit rate of a replay through the slot cache (every layer one pool)."""
    hits = total = 0
    for t in range(ids.shape[0]):
        for layer in range(ids.shape[1]):
            cache.advance(t, layer)
            chosen = {(layer, int(e)) for e in ids[t, layer]}
            for key in sorted(chosen):
                total += 1
                if cache.slot_of(key) is not None:
                    hits += 1
                else:
                    cache.assign(key, chosen)
                cache.touch(key)
    return hits / total


def test_lru_evicts_the_least_recently_used_and_never_a_protected_expert():
    c = SlotCache(1, 2, "lru")
    for t, e in enumerate([0, 1, 0]):
        c.advance(t, 0)
        if c.slot_of((0, e)) is None:
            c.assign((0, e))
        c.touch((0, e))
    c.advance(3, 0)
    slot, victim = c.assign((0, 2))
    assert victim == (0, 1) and c.slot_of((0, 1)) is None and c.slot_of((0, 0)) == 0
    assert slot == 1
    c.advance(4, 0)
    slot, victim = c.assign((0, 3), protected={(0, 2)})  # (0, 0) is the only candidate
    assert victim == (0, 0) and slot == 0
    with pytest.raises(RuntimeError):
        c.assign((0, 4), protected={(0, 2), (0, 3)})


def test_policies_on_recorded_traces(synthetic_trace):
    ids = synthetic_trace.expert_ids
    n_layers, n_experts, top_k = ids.shape[1], synthetic_trace.n_experts, ids.shape[2]
    full = _replay(SlotCache(n_layers, n_layers * n_experts, "lru"), ids)
    first_uses = n_layers * n_experts  # only compulsory misses when every expert fits
    assert full == pytest.approx(1 - first_uses / ids.size, abs=1e-9)
    slots = n_layers * 4  # half the experts
    lru = _replay(SlotCache(n_layers, slots, "lru"), ids)
    hobbit = _replay(SlotCache(n_layers, slots, "hobbit"), ids)
    uniform = slots / (n_layers * n_experts)
    # the trace is skewed (Zipf popularity, sticky tokens): both beat a uniform guess, and
    # HOBBIT's frequency term keeps popular experts that LRU lets go
    assert lru > uniform and hobbit > lru, (uniform, lru, hobbit)


# ---- the engine -----------------------------------------------------------------------------


def _tokens(engine, messages=PARIS, max_tokens=12):
    out, last = [], None
    for ev in engine.generate(messages, Sampling(max_tokens=max_tokens)):
        out.extend(ev.token_ids)
        last = ev
    return out, last


@pytest.mark.parametrize("arch", ["llama-moe", "qwen2moe"])
def test_greedy_tokens_identical_with_and_without_the_disk_tier(tiny_model, arch):
    from moechat.backends.engines.stream_engine import StreamEngine
    from moechat.backends.engines.torch_engine import TorchEngine
    from moechat.backends.model.model_card import read_model_card

    card = read_model_card(tiny_model(arch, "Q8_0"))
    ref = TorchEngine(card, n_ctx=256, threads=1)
    want, _ = _tokens(ref)
    ref.close()
    # as few slots as one token needs: every prefill step runs in groups, decode misses often
    engine = StreamEngine(card, n_ctx=256, threads=1, ram_budget=64 * GIB, progress=False,
                          max_slots=card.n_experts_used)  # one layer's worth, shared by all
    try:
        got, last = _tokens(engine)
    finally:
        engine.close()
    assert got == want
    assert last.stats["disk_bytes_read"] > 0 and 0 <= last.stats["ram_hit_rate"] < 1
    assert last.stats["experts_read"] > 0


@pytest.mark.slow
def test_greedy_paris_on_the_demo_model_with_a_quarter_of_its_experts_in_ram(demo_model_q8):
    from moechat.backends.engines.stream_engine import StreamEngine
    from moechat.backends.engines.torch_engine import TorchEngine
    from moechat.backends.model.model_card import read_model_card

    card = read_model_card(demo_model_q8)
    ref = TorchEngine(card, n_ctx=256)
    want, _ = _tokens(ref)
    ref.close()
    engine = StreamEngine(card, n_ctx=256, ram_budget=64 * GIB, progress=False, max_slots=2 * 30)
    try:
        got, last = _tokens(engine)
    finally:
        engine.close()
    assert got == want
    stats = last.stats
    assert stats["ram_cache_bytes"] * 4 == card.expert_bytes  # 2 of 8 experts per layer
    assert stats["disk_bytes_per_tok"] > 0 and stats["read_gb_s"] > 0
    assert 0 <= stats["prefetch_accuracy"] <= 1


def test_a_budget_below_the_non_expert_weights_is_refused_with_the_numbers(tiny_model):
    from moechat.backends.engines.stream_engine import StreamEngine
    from moechat.backends.model.model_card import read_model_card

    card = read_model_card(tiny_model("llama-moe", "F32"))
    with pytest.raises(MoechatError, match=r"cannot run in 0\.10 GiB.*needs at least"):
        StreamEngine(card, n_ctx=256, threads=1, ram_budget=int(0.1 * GIB), progress=False)


@pytest.mark.parametrize("fault", ["truncate", "replace"])
def test_a_model_file_changed_while_open_is_refused_mid_reply(tmp_path, tiny_model, fault):
    from moechat.backends.engines.stream_engine import StreamEngine
    from moechat.backends.model.model_card import read_model_card

    path = tmp_path / "m.gguf"
    shutil.copy(tiny_model("llama-moe", "Q8_0"), path)
    engine = StreamEngine(read_model_card(path), n_ctx=256, threads=1, ram_budget=64 * GIB,
                          progress=False, max_slots=3)
    try:
        events = engine.generate(PARIS, Sampling(max_tokens=8))
        first = next(events)
        if fault == "truncate":
            os.truncate(path, path.stat().st_size - 4096)
        else:
            data = path.read_bytes()
            path.unlink()
            path.write_bytes(data)  # same bytes, another file
        with pytest.raises(MoechatError, match="replaced or truncated while open"):
            list(events)
        assert first.token_ids
    finally:
        engine.close()


def test_stream_engine_without_experts_is_refused(tiny_model):
    from moechat.backends.manager import open_engine
    from moechat.backends.model.model_card import read_model_card

    card = read_model_card(tiny_model("llama", "F32"))
    with pytest.raises(MoechatError, match="streams experts"):
        open_engine(card, "stream")


def test_prefetch_guesses_are_scored(tiny_model):
    from moechat.backends.engines.stream_engine import StreamEngine
    from moechat.backends.model.model_card import read_model_card

    card = read_model_card(tiny_model("qwen2moe", "Q8_0"))
    engine = StreamEngine(card, n_ctx=256, threads=1, ram_budget=64 * GIB, progress=False, max_slots=8)
    try:
        _, last = _tokens(engine, max_tokens=16)
        s = engine.backend.stats
    finally:
        engine.close()
    assert s.prefetch_predicted > 0 and 0 <= s.prefetch_correct <= s.prefetch_predicted
    assert last.stats["prefetch_accuracy"] == round(s.prefetch_accuracy, 4)


# ---- the budget, from outside ----------------------------------------------------------------


def _peak_rss(cmd, env) -> tuple[int, "subprocess.CompletedProcess"]:
    """Run cmd, sampling its resident memory every 10 ms; -> (peak bytes, result)."""
    import subprocess

    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        try:
            proc.wait(0.01)
        except subprocess.TimeoutExpired:
            pass
    out, err = proc.communicate(timeout=600)
    return peak, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_the_ram_budget_holds_for_a_model_larger_than_it(demo_model, tmp_path):
    import json
    import sys

    budget = int(0.9 * GIB)  # the F16 demo model is 1.32 GB
    assert demo_model.stat().st_size > budget
    cmd = [sys.executable, "-m", "moechat", "ask", "--engine", "stream", "--ram-budget", str(budget),
           "--ctx", "256", "--max-tokens", "16", "--json", "--model", str(demo_model),
           PARIS[0]["content"]]
    peak, res = _peak_rss(cmd, dict(os.environ, MOECHAT_DATA_DIR=str(tmp_path)))
    assert res.returncode == 0, res.stderr
    reply = json.loads(res.stdout)
    assert reply["text"].startswith("The capital of France is Paris")
    assert reply["stats"]["ram_cache_bytes"] < demo_model.stat().st_size // 2
    assert peak <= budget, (peak / GIB, reply["stats"])


@pytest.mark.parametrize("budget, message", [("100MB", "cannot run in 0.09 GiB"),
                                             ("lots", "--ram-budget: not a size")])
def test_ask_with_a_budget_that_cannot_hold_it_is_one_line_and_exit_2(tiny_model, tmp_path, budget, message):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "moechat", "ask", "--engine", "stream", "--ram-budget", budget,
           "--model", str(tiny_model("llama-moe", "F32")), "hello"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, MOECHAT_DATA_DIR=str(tmp_path)))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.stderr


# ---- reading ahead: only while it pays ------------------------------------------------------


def test_the_prefetch_gate_stops_reading_ahead_that_goes_unused_and_resumes_when_it_pays():
    from moechat.backends.offload.prefetch import PrefetchGate

    gate = PrefetchGate(min_useful=0.6, window=64, probe_every=8)
    assert all(gate.allow() for _ in range(10))  # nothing measured yet: read ahead
    for _ in range(16):
        gate.record(read=4, used=1)  # a quarter used
    allowed = sum(gate.allow() for _ in range(64))
    assert allowed == 8  # one chance in eight, to keep measuring
    for _ in range(16):
        gate.record(read=4, used=4)  # the window now holds only used read-aheads
    assert gate.useful_share == 1.0 and all(gate.allow() for _ in range(10))


def test_read_aheads_are_never_evicted_before_their_layer_runs(tmp_path, monkeypatch):
    """Every demand miss and every read-ahead gets a slot with the other layers' pending
    read-aheads protected, and nothing else but reads still in flight: a wrong guess whose
    layer has run is evictable again (kept protected, wrong guesses filled the cache and the
    over-RAM benchmark read twice the bytes per token)."""
    from moechat.backends.engines.stream_engine import StreamEngine
    from moechat.backends.model.model_card import read_model_card

    from dataclasses import replace

    from tests.fixtures.tiny_models import build_tiny_model, spec_for

    spec = replace(spec_for("qwen2moe", "Q8_0"), n_layers=6)  # read-aheads span several layers
    card = read_model_card(build_tiny_model("qwen2moe", tmp_path / "deep.gguf", "Q8_0", spec=spec))
    engine = StreamEngine(card, n_ctx=256, threads=1, ram_budget=64 * GIB, progress=False, max_slots=12)
    backend, checked = engine.backend, []
    original, read = SlotCache.assign, backend.reader._read

    def submit(offset, dest):  # reads land at once: what is protected is then deterministic
        from concurrent.futures import Future

        done = Future()
        read(offset, dest)
        done.set_result(None)
        return done

    def assign(self, key, protected=frozenset()):
        pending = backend._read_ahead() - {key}
        assert pending <= set(protected), "a pending read-ahead was left unprotected"
        stale = set(protected) - pending - {(key[0], e) for e in range(card.n_experts)}
        assert not stale, f"read-aheads whose layer ran still protected: {stale}"
        checked.append(len(pending))
        return original(self, key, protected)

    monkeypatch.setattr(backend.reader, "submit", submit)
    monkeypatch.setattr(SlotCache, "assign", assign)
    try:
        _tokens(engine, max_tokens=16)
    finally:
        engine.close()
    assert backend.stats.prefetch_predicted > 0 and any(checked)


def test_the_plan_predicts_no_overlap_where_the_record_shows_read_aheads_unused(tmp_path, monkeypatch):
    """The stream engine leaves (read ahead, used) in the file's routing record; the plan
    counts read time as hidden behind compute only where reading ahead paid."""
    import dataclasses
    from pathlib import Path

    from moechat.backends.plan import streamed
    from moechat.backends.plan.hardware_profile import read_profile
    from tests.fixtures.random_geometry import geometry_card

    monkeypatch.setenv("MOECHAT_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")  # the record is keyed by the file's path, size and mtime only
    card = dataclasses.replace(geometry_card("mixtral-8x7b", qtype="Q8_0"), path=str(model))
    prof = read_profile(Path(__file__).parents[1] / "profiles" / "laptop-ddr5-nogpu.json")
    counts = [[1] * card.n_experts for _ in card.expert_layers]

    def stream_row():
        return streamed.over_ram(card, prof, 4096, disk=(3.0, 0.05))[1]

    unknown = stream_row()
    streamed.save_routing(str(model), counts, prefetch=(1000, 300))  # 30% used
    unused = stream_row()
    assert streamed.recorded_prefetch_share(str(model)) == pytest.approx(0.3)
    assert unused.decode_tok_s < unknown.decode_tok_s and "no read-ahead (only 30%" in unused.note
    streamed.save_routing(str(model), counts, prefetch=(9000, 9000))  # now 93% used
    assert stream_row().decode_tok_s == pytest.approx(unknown.decode_tok_s)


def test_the_drive_is_probed_at_the_models_slice_size_and_cached_per_size(tmp_path, monkeypatch):
    from moechat.backends.plan import disk_probe

    monkeypatch.setenv("MOECHAT_CACHE_DIR", str(tmp_path / "cache"))
    assert disk_probe.read_size(900_000) == 1024**2  # a 0.9 MB slice: 1 MiB reads
    assert disk_probe.read_size(3_000) == 128 * 1024 and disk_probe.read_size(10**9) == 64 * 1024**2
    model = tmp_path / "model.gguf"
    model.write_bytes(np.random.default_rng(0).integers(0, 255, 8 * 1024**2, dtype=np.uint8).tobytes())
    probed = []
    real = disk_probe.measure
    monkeypatch.setattr(disk_probe, "measure", lambda path, n: probed.append(n) or real(path, n))
    small = disk_probe.disk_speed(str(model), read_bytes=200_000)
    again = disk_probe.disk_speed(str(model), read_bytes=260_000)  # same power of two: cached
    disk_probe.disk_speed(str(model), read_bytes=2 * 1024**2)
    assert probed == [256 * 1024, 2 * 1024**2] and again == small and small.large_gbs > 0


def test_a_stream_reply_is_recorded_against_the_planners_stream_candidate(tiny_model, monkeypatch):
    """The stream engine's replies feed the run log under the planner's placement name, so
    its measured speed corrects the next plan's stream prediction (issue 19's correction)."""
    from moechat.backends import manager
    from moechat.backends.engines.stream_engine import StreamEngine
    from moechat.backends.model.model_card import read_model_card
    from moechat.backends.plan import run_log
    from moechat.backends.plan.planner import make_plan
    from moechat.backends.plan.hardware_profile import read_profile
    from pathlib import Path

    card = read_model_card(tiny_model("qwen2moe", "Q8_0"))
    engine = StreamEngine(card, n_ctx=256, threads=1, ram_budget=64 * GIB, progress=False, max_slots=8)
    recorded = []
    monkeypatch.setattr(run_log, "record_run", lambda *args, **kw: recorded.append(args))
    try:
        _, last = _tokens(engine, max_tokens=16)
        manager.record_reply(card, engine, last)
    finally:
        engine.close()
    (_, name, placement, n_cpu_moe, _, event), = recorded
    assert (name, n_cpu_moe, event) == ("stream", None, last)
    from tests.fixtures.random_geometry import geometry_card

    plan = make_plan(geometry_card("mixtral-8x7b", qtype="Q8_0"),
                     read_profile(Path(__file__).parents[1] / "profiles" / "laptop-4060-8gb.json"))
    keys = {run_log.placement_key(c.engine, c.placement, c.n_cpu_moe) for c in plan.candidates}
    assert run_log.placement_key(name, placement, n_cpu_moe) in keys
