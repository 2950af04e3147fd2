"""The runtime's building blocks: the CPU fast paths agree with the general ones (which a GPU
runs), and CPU attention gives a decode step exactly what a prefill gives at that position."""

import torch

from moechat.backends.runtime.layers import attention_batched, attention_per_query, rms_norm
from moechat.backends.runtime.rope import Rope


def _qkv(t: int, s: int, heads: int = 6, kv_heads: int = 2, head_dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, heads, head_dim, generator=g)
    k = torch.randn(kv_heads, s, head_dim, generator=g).half()  # the cache holds f16
    v = torch.randn(kv_heads, s, head_dim, generator=g).half()
    return q, k, v


def test_attention_per_query_matches_batched_and_is_shape_independent():
    start, t = 7, 5
    q, k, v = _qkv(t, start + t)
    per_query = attention_per_query(q, k, v, start, 0.25)  # [T, H*Dh]
    batched = attention_batched(q, k, v, start, 0.25)
    assert per_query.shape == batched.shape == (t, 6 * 16)
    assert (per_query - batched).abs().max() < 1e-4  # f16-rounded probabilities, f32 sums
    # each position alone, as a cached decode step sees the cache: bit-identical to the prefill
    for i in range(t):
        pos = start + i
        alone = attention_per_query(q[i : i + 1], k[:, : pos + 1], v[:, : pos + 1], pos, 0.25)
        assert torch.equal(alone[0], per_query[i])


def test_attention_sees_no_future_keys():
    start, t = 3, 4
    q, k, v = _qkv(t, start + t, seed=1)
    k2, v2 = k.clone(), v.clone()
    k2[:, -1], v2[:, -1] = 100, -100  # the last position's key/value: only the last query sees it
    for fn in (attention_per_query, attention_batched):
        a, b = fn(q, k, v, start, 0.25), fn(q, k2, v2, start, 0.25)
        assert torch.equal(a[:-1], b[:-1])
        assert not torch.allclose(a[-1], b[-1])


def test_rope_complex_path_matches_rotation_formula():
    rope = Rope(head_dim=16, rope_dims=16, base=10000.0, neox=False, max_pos=64)
    assert rope.turn is not None  # adjacent-pair mode rotating every dim: the complex product
    x = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(2))
    fast = rope(x, 20)  # float32: complex multiply
    general = rope(x.double(), 20)  # float64 takes the cos/sin formula
    assert (fast.double() - general).abs().max() < 1e-5
    assert torch.equal(rope(x[1:2], 21), fast[1:2])  # position = start + row, one token at a time


def test_rms_norm_matches_formula():
    x = torch.randn(4, 3, 32, generator=torch.Generator().manual_seed(3)) * 5  # per head, too (qwen3moe)
    w = torch.rand(32, generator=torch.Generator().manual_seed(4)) + 0.5
    x64, w64 = x.double(), w.double()
    formula = x64 / x64.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * w64
    assert (rms_norm(x, w, 1e-5).double() - formula).abs().max() < 1e-5


def test_rope_tables_follow_ggml_rope_yarn():
    """One table builder for every architecture: YaRN keeps the original angle for the
    fast pairs (below the correction range), the interpolated one for the slow pairs, blends
    in between, and scales cos/sin by attn_factor (1 + 0.1 ln(1/freq_scale)); without YaRN,
    angles are just interpolated and scaled by attn_factor."""
    import math

    import numpy as np

    from moechat.backends.runtime.rope import Yarn, rope_tables, yarn_corr_dims

    n, base, fs, yarn = 32, 10000.0, 1 / 8, Yarn(4096)
    cos, sin = rope_tables(n, base, 200, fs, yarn=yarn, attn_factor=0.5)
    low, high = yarn_corr_dims(n, yarn, base)
    assert 0 < low < high < n // 2  # all three kinds of pair occur
    pos, pair = np.arange(200)[:, None], np.arange(n // 2)[None, :]
    extrap = pos * base ** (-2 * pair / n)
    ramp = 1 - np.clip((pair - low) / max(0.001, high - low), 0, 1)
    angles = fs * extrap * (1 - ramp) + extrap * ramp
    mscale = 0.5 * (1 + 0.1 * math.log(1 / fs))
    np.testing.assert_allclose(cos, np.cos(angles) * mscale, atol=1e-4)
    np.testing.assert_allclose(sin, np.sin(angles) * mscale, atol=1e-4)
    plain_cos, _ = rope_tables(n, base, 200, fs, attn_factor=0.5)
    np.testing.assert_allclose(plain_cos, np.cos(fs * extrap) * 0.5, atol=1e-4)
