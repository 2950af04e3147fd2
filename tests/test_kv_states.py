"""The KV state cache without a model: keying, longest-prefix lookup, RAM and disk tiers, LRU
under a size cap, and every damaged file falling back with one line on stderr."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from moechat.backends.engines import kv_states
from moechat.backends.engines.kv_state_file import read_state, write_state
from moechat.backends.engines.kv_states import KVStateStore
from moechat.backends.errors import MoechatError

KEY = "k" * 32


def payload(tokens, size=1000) -> bytearray:
    """Bytes that depend on the tokens, so a mix-up shows."""
    seed = sum(tokens) % 251
    return bytearray((seed + i) % 256 for i in range(size))


def store(tmp_path, key=KEY, **kw) -> KVStateStore:
    kw.setdefault("cap", 10**6)
    return KVStateStore(key, "test-model", root=tmp_path / "kv", **kw)


def saved_on_disk(tmp_path, tokens, key=KEY, **kw):
    """Save through one store, then look up through a new one (a new process: empty RAM)."""
    s = store(tmp_path, key, **kw)
    name = s.save(tokens, payload(tokens))
    s.wait()
    return name, store(tmp_path, key, **kw)


def test_a_new_store_finds_the_longest_shared_prefix_on_disk(tmp_path):
    a, b = list(range(100)), list(range(50)) + [999] * 60
    first = store(tmp_path)
    first.save(a, payload(a))
    first.save(b, payload(b))
    first.wait()
    fresh = store(tmp_path)
    prompt = list(range(80)) + [7, 7]
    hit = fresh.best(prompt)
    assert hit.tokens == a and hit.common == 80 and hit.path is not None
    assert fresh.load(hit) == payload(a)
    # a state running past the point where the prompt differs still serves its prefix
    assert fresh.best(list(range(50)) + [999, 1]).common == 51


def test_model_identity_changes_with_file_context_engine_and_variant(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(100))
    base = kv_states.model_key(model, 1024, "llama.cpp", "cpu")
    assert base == kv_states.model_key(model, 1024, "llama.cpp", "cpu")
    assert base != kv_states.model_key(model, 2048, "llama.cpp", "cpu")
    assert base != kv_states.model_key(model, 1024, "torch", "cpu")
    assert base != kv_states.model_key(model, 1024, "llama.cpp", "other build")
    model.write_bytes(b"GGUF" + bytes(101))  # the file changed
    assert base != kv_states.model_key(model, 1024, "llama.cpp", "cpu")


def test_other_models_states_are_never_offered(tmp_path):
    tokens = list(range(64))
    saved_on_disk(tmp_path, tokens, key="a" * 32)
    assert store(tmp_path, key="b" * 32).best(tokens) is None


def test_a_longer_sequence_replaces_its_prefixes(tmp_path):
    s = store(tmp_path)
    short, longer = list(range(40)), list(range(90))
    s.save(short, payload(short))
    s.save(longer, payload(longer))
    s.wait()
    assert [t for t, _ in s.ram.values()] == [longer]
    states, totals = kv_states.summary(tmp_path / "kv")
    assert [st.n_tokens for st in states] == [90]
    assert totals["saves"] == 2


def test_ram_tier_keeps_several_sequences_for_alternating_clients(tmp_path):
    s = store(tmp_path, cap=0, ram_slots=3)  # disk tier off: RAM only
    convs = [[c] * 5 + list(range(60)) for c in (1, 2, 3, 4)]
    for conv in convs[:3]:
        s.save(conv, payload(conv))
    for conv in convs[:3]:  # each client's prefix is still there
        hit = s.best(conv + [5])
        assert hit.tokens == conv and hit.path is None and s.load(hit) == payload(conv)
    s.save(convs[3], payload(convs[3]))  # a fourth evicts the least recently used
    assert s.best(convs[0] + [5]) is None
    assert not (tmp_path / "kv" / KEY).exists()


def test_disk_tier_evicts_least_recently_used_over_the_cap(tmp_path):
    seqs = [[n] * 40 for n in (1, 2, 3)]
    name, _ = saved_on_disk(tmp_path, seqs[0])
    cap = 2 * (tmp_path / "kv" / KEY / f"{name}.kvs").stat().st_size + 100  # room for two
    s = store(tmp_path, cap=cap)
    names = [name, s.save(seqs[1], payload(seqs[1]))]
    s.wait()
    for i, name in enumerate(names):
        os.utime(tmp_path / "kv" / KEY / f"{name}.kvs", (1000 + i, 1000 + i))
    reader = store(tmp_path, cap=cap)
    reader.load(reader.best(seqs[0]))  # a restore makes seqs[0] the most recently used
    names.append(s.save(seqs[2], payload(seqs[2])))
    s.wait()
    left = {st.name for st in kv_states.summary(tmp_path / "kv")[0]}
    assert left == {names[0], names[2]}


def test_hits_and_misses_are_counted(tmp_path):
    tokens = list(range(100))
    _, fresh = saved_on_disk(tmp_path, tokens)
    assert fresh.pick(tokens + [1, 2], live=0) is not None
    candidate = fresh.best(tokens)
    fresh.restored(candidate, 99)
    assert fresh.pick([5, 5, 5], live=0) is None
    states, totals = kv_states.summary(tmp_path / "kv")
    assert states[0].hits == 1 and totals["hits"] == 1 and totals["misses"] == 1
    assert totals["restored_tokens"] == 99


def test_a_restore_must_add_enough_tokens(tmp_path):
    tokens = list(range(100))
    _, fresh = saved_on_disk(tmp_path, tokens)
    assert fresh.pick(tokens, live=99 - kv_states.MIN_RESTORE + 1) is None  # the context has it
    assert fresh.pick(tokens, live=99 - kv_states.MIN_RESTORE) is not None


def _damaged(tmp_path, capsys, damage):
    tokens = list(range(100))
    name, fresh = saved_on_disk(tmp_path, tokens)
    path = tmp_path / "kv" / KEY / f"{name}.kvs"
    damage(path)
    capsys.readouterr()
    picked = fresh.pick(tokens + [1], live=0)
    err = capsys.readouterr().err
    return picked, err, path


def test_a_truncated_state_is_ignored_with_one_line(tmp_path, capsys):
    def truncate(path):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 300])

    picked, err, path = _damaged(tmp_path, capsys, truncate)
    assert picked is None and not path.exists()
    assert err.count("\n") == 1 and "truncated" in err and "evaluating the prompt in full" in err


def test_a_corrupt_state_is_ignored_with_one_line(tmp_path, capsys):
    def flip(path):
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF
        path.write_bytes(bytes(data))

    picked, err, _ = _damaged(tmp_path, capsys, flip)
    assert picked is None and err.count("\n") == 1 and "checksum" in err


def test_garbage_and_a_cut_header_are_ignored(tmp_path, capsys):
    picked, err, _ = _damaged(tmp_path, capsys, lambda p: p.write_bytes(b"\x00" * 50))
    assert picked is None and "not a moechat KV state" in err
    picked, err, _ = _damaged(tmp_path, capsys, lambda p: p.write_bytes(p.read_bytes()[:20]))
    assert picked is None and "truncated" in err


def test_a_state_of_another_model_or_build_in_the_wrong_place_is_ignored(tmp_path, capsys):
    tokens = list(range(100))
    name, _ = saved_on_disk(tmp_path, tokens, key="other" * 6 + "xx")
    wrong = tmp_path / "kv" / KEY
    wrong.mkdir(parents=True)
    (tmp_path / "kv" / ("other" * 6 + "xx") / f"{name}.kvs").rename(wrong / f"{name}.kvs")
    capsys.readouterr()
    assert store(tmp_path).pick(tokens + [1], live=0) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another model, context size or build" in err


def test_a_kill_during_a_save_leaves_the_previous_state_usable(tmp_path):
    """A child process saves a longer state and is SIGKILLed after writing all of it, at the
    rename; the state saved before it is still found and loads whole."""
    tokens = list(range(100))
    saved_on_disk(tmp_path, tokens)
    child = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from moechat.backends.engines.kv_states import KVStateStore
        os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
        s = KVStateStore({KEY!r}, root=Path({str(tmp_path / 'kv')!r}), cap=10**6)
        s.save(list(range(200)), bytearray(5000))
        s.wait()
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=120)
    assert done.returncode == -9
    folder = tmp_path / "kv" / KEY
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]  # the torn write
    fresh = store(tmp_path)
    hit = fresh.best(list(range(150)))
    assert hit.tokens == tokens and fresh.load(hit) == payload(tokens)
    for tmp in folder.glob(".*.tmp"):
        os.utime(tmp, (time.time() - 2 * kv_states.STALE_TMP_S,) * 2)
    kv_states.evict(tmp_path / "kv", 10**6)
    assert not list(folder.glob(".*.tmp"))


def test_write_state_is_atomic_over_an_existing_file(tmp_path):
    path = tmp_path / "s.kvs"
    write_state(path, {"model_key": KEY}, [1, 2, 3], b"old")
    write_state(path, {"model_key": KEY}, [1, 2, 3, 4], b"new!")
    header, tokens, data = read_state(path)
    assert tokens == [1, 2, 3, 4] and data == b"new!" and header["n_tokens"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["s.kvs"]


def test_cap_from_the_environment(monkeypatch):
    monkeypatch.setenv("MOECHAT_KV_CACHE_SIZE", "500MiB")
    assert kv_states.disk_cap() == 500 * 1024**2
    monkeypatch.setenv("MOECHAT_KV_CACHE_SIZE", "0")
    assert kv_states.disk_cap() == 0
    monkeypatch.delenv("MOECHAT_KV_CACHE_SIZE")
    assert kv_states.disk_cap() == kv_states.DEFAULT_DISK_CAP
    for bad in ("lots", "50%"):
        monkeypatch.setenv("MOECHAT_KV_CACHE_SIZE", bad)
        with pytest.raises(MoechatError, match="MOECHAT_KV_CACHE_SIZE"):
            kv_states.disk_cap()


def test_drop_and_clear(tmp_path):
    a, b = [1] * 40, [2] * 40
    s = store(tmp_path)
    name_a = s.save(a, payload(a))
    s.wait()
    s.save(b, payload(b))
    s.wait()
    assert kv_states.drop([name_a, "no-such-state"], tmp_path / "kv") == 1
    assert [st.n_tokens for st in kv_states.summary(tmp_path / "kv")[0]] == [40]
    files, size = kv_states.clear(tmp_path / "kv")
    assert files == 1 and size > 1000
    assert kv_states.summary(tmp_path / "kv") == ([], dict.fromkeys(("hits", "misses", "saves", "restored_tokens"), 0))
