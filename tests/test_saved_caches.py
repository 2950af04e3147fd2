"""Saved KV states of the torch runtime's other caches: MLA's latent cache (keys only, V their
view; or K and V apart for unsplit files) and gpt-oss's sliding-window rings. A state loaded
into a fresh cache gives the next step exactly the keys and values the original gives."""

from __future__ import annotations

import pytest
import torch

from moechat.backends.runtime.mla import LatentCache
from moechat.backends.runtime.swa_cache import SLACK, SlidingKVCache


def fill(cache, n: int, chunk: int, heads: int, k_dim: int, v_dim: int | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, chunk):
        t = min(chunk, n - start)
        for layer in range(len(cache.k)):
            k = torch.randn(t, heads, k_dim, generator=g)
            v = torch.randn(t, heads, v_dim, generator=g) if v_dim else None
            cache.update(layer, start, k, v)
        cache.advance(start + t)


@pytest.mark.parametrize("separate_values", [False, True])
def test_latent_cache_round_trip(separate_values):
    heads, k_dim, v_dim = (2, 12, 8) if separate_values else (1, 12, 8)
    a = LatentCache(3, heads, k_dim, v_dim, 64, separate_values=separate_values)
    fill(a, 40, 7, heads, k_dim, v_dim if separate_values else None)
    payload = a.export(40)
    b = LatentCache(3, heads, k_dim, v_dim, 64, separate_values=separate_values)
    assert a.savable and b.load(payload, 40) and b.length == 40
    for layer in range(3):
        step_k, step_v = torch.randn(1, heads, k_dim), torch.randn(1, heads, v_dim)
        got = b.update(layer, 40, step_k, step_v if separate_values else None)
        want = a.update(layer, 40, step_k, step_v if separate_values else None)
        assert all(torch.equal(x, y) for x, y in zip(got, want))
    assert not LatentCache(3, heads, k_dim, v_dim, 64, separate_values=separate_values).load(payload, 39)
    assert not LatentCache(3, heads, k_dim + 1, v_dim, 64, separate_values=separate_values).load(payload, 40)


def sliding(max_tokens: int = 300) -> SlidingKVCache:
    return SlidingKVCache([8, 0], n_kv_heads=2, head_dim=4, max_tokens=max_tokens)


def next_step_equal(a: SlidingKVCache, b: SlidingKVCache, start: int) -> bool:
    g = torch.Generator().manual_seed(1)
    same = True
    for layer in range(2):
        k, v = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
        ka, va, fa = a.update(layer, start, k, v)
        kb, vb, fb = b.update(layer, start, k, v)
        same &= fa == fb and torch.equal(ka, kb) and torch.equal(va, vb)
    return same


def test_a_wrapped_ring_round_trips():
    a = sliding()
    assert a.sizes[0] == 8 + SLACK < a.max_tokens  # layer 0 is a ring, layer 1 a plain buffer
    fill(a, 290, 16, 2, 4, 4)  # past the ring's 264 slots: it has wrapped
    assert a.oldest == 290 - a.sizes[0]
    b = sliding()
    assert b.load(a.export(290), 290) and (b.length, b.oldest) == (290, a.oldest)
    assert next_step_equal(a, b, 290)


def test_a_ring_stepped_back_round_trips_and_truncates_like_the_original():
    a = sliding()
    fill(a, 290, 16, 2, 4, 4)
    assert a.truncate(280) == 280  # the window before 280 is still in the ring
    fill_from = 280
    g = torch.Generator().manual_seed(2)
    for layer in range(2):
        a.update(layer, fill_from, torch.randn(4, 2, 4, generator=g), torch.randn(4, 2, 4, generator=g))
    a.advance(284)
    b = sliding()
    assert b.load(a.export(284), 284)
    assert b.truncate(282) == a.truncate(282) == 282
    assert next_step_equal(a, b, 282)
    assert b.truncate(10) == 0  # too far back for the ring: nothing usable, as the original says


def test_a_sliding_state_of_another_shape_is_refused():
    a = sliding()
    fill(a, 50, 16, 2, 4, 4)
    payload = a.export(50)
    assert not sliding().load(payload, 49)
    assert not SlidingKVCache([8, 0], n_kv_heads=2, head_dim=5, max_tokens=300).load(payload, 50)
    assert not sliding().load(payload[:-1], 50)


def test_a_conversation_shorter_than_the_window_keeps_its_prefix():
    """Stepping back inside the first window keeps the prefix (it used to say 0: the window's
    start before position 0 was taken for a position the ring had lost)."""
    a = sliding()
    fill(a, 5, 5, 2, 4, 4)
    assert a.truncate(4) == 4
    b = sliding()
    fill(b, 5, 5, 2, 4, 4)
    assert next_step_equal(a, b, 4)


def test_a_state_too_far_past_the_prompt_is_not_restorable():
    """Checked before loading: a ring that no longer holds the window before `keep` cannot
    serve that prompt, so the engine keeps its live cache instead of loading it."""
    a = sliding()
    fill(a, 290, 16, 2, 4, 4)
    payload = a.export(290)
    b = sliding()
    assert b.restorable(payload, 285) and not b.restorable(payload, 10)
    assert LatentCache(1, 1, 4, 2, 16).restorable(b"", 3)  # full caches can always be cut back
