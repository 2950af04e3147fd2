"""ggml's CPU kernels on quantized bytes agree with gguf's dequantize-then-multiply."""

import numpy as np
import pytest

from moechat.kernels import ggml, ggml_ops

QTYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# ggml converts the activation to the weight's dot type first (F16/BF16 for those weights,
# Q8_0/Q8_1/Q8_K for quantized ones), as llama.cpp does: the error is that rounding.
TOLERANCE = {"F32": 1e-6, "F16": 1e-3, "BF16": 1e-2}
Q8_ACTIVATION_TOLERANCE = 3e-2  # max |error| / max |reference|; measured ≤ 1.3e-2


@pytest.fixture(scope="module")
def backend():
    b = ggml.CpuBackend(2)
    yield b
    b.close()


def _rel_err(y, ref):
    return float(np.abs(y - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("qtype", QTYPES)
def test_matvec_and_matmul_match_dequantize(qtype, backend):
    w, dense = ggml_ops.random_quant_weight(qtype, 96, 512, seed=3)
    linear = ggml_ops.QuantLinear(w, backend)
    rng = np.random.default_rng(0)
    tol = TOLERANCE.get(qtype, Q8_ACTIVATION_TOLERANCE)
    x1 = rng.standard_normal(512, dtype=np.float32)
    assert _rel_err(linear(x1), dense @ x1) < tol
    x4 = rng.standard_normal((4, 512), dtype=np.float32)
    y4 = linear(x4)
    assert y4.shape == (4, 96)
    assert _rel_err(y4, x4 @ dense.T) < tol
    # the cached graph is re-run with new values, not stale ones
    assert _rel_err(linear(-x1), -(dense @ x1)) < tol


def test_experts_match_reference(backend):
    import gguf

    rng = np.random.default_rng(1)
    n_experts, dim, ffn = 4, 64, 128

    def stacked(rows, cols):  # [E, rows, row_bytes] Q8_0 blocks, ggml shape (cols, rows, E)
        data = ggml_ops.random_blocks("Q8_0", n_experts * rows, cols, rng).reshape(n_experts, rows, -1)
        dense = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0)
        return ggml.QuantWeight(data, ggml.ggml_type_id("Q8_0"), (cols, rows, n_experts)), dense

    (wg, g), (wu, u), (wd, d) = stacked(ffn, dim), stacked(ffn, dim), stacked(dim, ffn)
    experts = ggml_ops.QuantExperts(wg, wu, wd, backend)
    x = rng.standard_normal((5, dim), dtype=np.float32) * 3
    ids = rng.integers(0, n_experts, (5, 2))
    y = experts(x, ids)  # [T, A, D]

    def silu(z):
        return z / (1 + np.exp(-z))

    ref = np.stack([[d[e] @ (silu(g[e] @ x[t]) * (u[e] @ x[t])) for e in ids[t]] for t in range(5)])
    assert y.shape == (5, 2, dim)
    assert _rel_err(y, ref) < Q8_ACTIVATION_TOLERANCE
    with pytest.raises(ValueError, match="expert ids"):
        experts(x, ids + n_experts)  # would be a ggml abort; refused in Python

    # gate weights given: weighting and the sum over the active experts happen in the graph,
    # in slot order as llama.cpp sums them, so float32 rounding matches numpy's exactly
    for n_tokens, n_used in ((5, 2), (1, 2), (1, 3), (3, 1)):
        xs = x[:n_tokens]
        sel = rng.integers(0, n_experts, (n_tokens, n_used))
        gate_w = rng.uniform(0.1, 1.0, (n_tokens, n_used)).astype(np.float32)
        per_slot = experts(xs, sel) * gate_w[:, :, None]  # [T, A, D]
        want = per_slot[:, 0]
        for a in range(1, n_used):
            want = want + per_slot[:, a]
        for _ in range(2):  # the one-token graph is cached: run it twice
            got = experts(xs, sel, gate_w)
            assert got.shape == (n_tokens, dim)
            np.testing.assert_array_equal(got, want)
        gate_w = gate_w * 2  # new values through the cached graph
        np.testing.assert_array_equal(experts(xs, sel, gate_w), want * 2)
    with pytest.raises(ValueError, match="gate weights"):
        experts(x, ids, np.ones((5, 3), np.float32))


def test_mxfp4_experts_with_biases_and_clamped_swiglu(backend):
    """gpt-oss's expert FFN: MXFP4 weights, a bias per expert on each product (ggml_add_id)
    and the clamped SwiGLU (alpha 1.702, limit 7), against numpy on the dequantized weights."""
    import gguf

    rng = np.random.default_rng(4)
    n_experts, dim, ffn = 4, 64, 96

    def stacked(rows, cols):
        data = ggml_ops.random_blocks("MXFP4", n_experts * rows, cols, rng).reshape(n_experts, rows, -1)
        dense = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.MXFP4)
        return ggml.QuantWeight(data, ggml.ggml_type_id("MXFP4"), (cols, rows, n_experts)), dense

    def bias(n):
        values = ggml.aligned_empty(n_experts * n * 4, np.float32).reshape(n_experts, n)
        values[:] = rng.standard_normal((n_experts, n)) * 0.5
        return ggml.QuantWeight(values, ggml.GGML_TYPE_F32, (n, n_experts)), values

    (wg, g), (wu, u), (wd, d) = stacked(ffn, dim), stacked(ffn, dim), stacked(dim, ffn)
    (bg, bg_v), (bu, bu_v), (bd, bd_v) = bias(ffn), bias(ffn), bias(dim)
    experts = ggml_ops.QuantExperts(wg, wu, wd, backend, biases=(bg, bu, bd), activation="swiglu_oai")
    x = rng.standard_normal((5, dim), dtype=np.float32) * 20
    ids = np.stack([rng.permutation(n_experts)[:2] for _ in range(5)])  # distinct, as routing picks

    def act(gate, up):
        gate, up = np.minimum(gate, 7.0), np.clip(up, -7.0, 7.0)
        return gate / (1 + np.exp(-1.702 * gate)) * (up + 1)

    ref = np.stack([[d[e] @ act(g[e] @ x[t] + bg_v[e], u[e] @ x[t] + bu_v[e]) + bd_v[e] for e in ids[t]]
                    for t in range(5)])
    got = experts(x, ids)
    assert _rel_err(got, ref) < Q8_ACTIVATION_TOLERANCE
    clamped = np.abs(np.stack([g[e] @ x[t] + bg_v[e] for t in range(5) for e in ids[t]])) > 7
    assert clamped.any()  # the limit is exercised, not just the plain SwiGLU range
    if ggml.can_repack(wg):  # AVX2: ggml's 8x8 interleaved MXFP4, as llama.cpp loads it
        packed = [ggml.PackedWeight(w) for w in (wg, wu, wd)]
        repacked = ggml_ops.QuantExperts(*packed, backend, biases=(bg, bu, bd), activation="swiglu_oai")
        assert _rel_err(repacked(x, ids), got) < 1e-5
        with pytest.raises(ValueError, match="repeat"):  # would overflow ggml's row table
            repacked(x, np.array([[1, 1]] * 5))
    plain = ggml_ops.QuantExperts(wg, wu, wd, backend)(x, ids)
    assert _rel_err(plain, got) > 0.1  # biases and the activation change the result
    with pytest.raises(ValueError, match="biases"):
        ggml_ops.QuantExperts(wg, wu, wd, backend, biases=(bg, bg, bg))
    with pytest.raises(ValueError, match="activation"):
        ggml_ops.QuantExperts(wg, wu, wd, backend, activation="gelu")


def test_bad_weights_are_refused_not_aborted():
    w, _ = ggml_ops.random_quant_weight("Q4_0", 8, 64)
    with pytest.raises(ValueError, match="bytes"):
        ggml.QuantWeight(w.data.reshape(-1)[: w.nbytes - 18], w.ggml_type, w.shape)
    with pytest.raises(ValueError, match="multiple"):
        ggml.QuantWeight(w.data, w.ggml_type, (48, 8))
    raw = np.zeros(w.nbytes + 32, np.uint8)
    misaligned = raw[(-raw.ctypes.data) % 32 + 1 :][: w.nbytes]
    with pytest.raises(ValueError, match="aligned"):
        ggml.QuantWeight(misaligned, w.ggml_type, w.shape)


def test_matvec_rate_is_measured():
    rate = ggml_ops.quantized_matvec_bytes_per_s("Q4_0", 512, 1024, threads=1, repeats=3)
    assert 1e8 < rate < 1e13  # bytes/s: plausible for any CPU, and a real timing


def test_repacked_q4_0_gives_the_same_products(backend):
    """ggml's interleaved Q4_0 layout (what llama.cpp uses on AVX2) reads the same blocks."""
    w, dense = ggml_ops.random_quant_weight("Q4_0", 64, 256, seed=5)
    if not ggml.can_repack(w):
        pytest.skip("no AVX2: ggml has no repacked Q4_0 layout on this CPU")
    packed = ggml.PackedWeight(w)
    x = np.random.default_rng(2).standard_normal((3, 256), dtype=np.float32)
    plain, fast = ggml_ops.QuantLinear(w, backend)(x), ggml_ops.QuantLinear(packed, backend)(x)
    assert _rel_err(fast, plain) < 1e-5 and _rel_err(fast, x @ dense.T) < Q8_ACTIVATION_TOLERANCE
    assert not ggml.can_repack(ggml_ops.random_quant_weight("Q8_0", 64, 256)[0])  # unknown rule: not taken


def test_normed_linears_match_numpy(backend):
    """The steps around a layer's attention in one graph: RMSNorm (llama.cpp's), the norm
    weight, the products that read it — and, with an input projection, the residual first."""
    rng = np.random.default_rng(5)
    dim, d_in, eps = 64, 96, 1e-5
    g = ggml.aligned_empty(dim * 4, np.float32)
    g[:] = rng.uniform(0.5, 1.5, dim)
    norm = ggml.QuantWeight(g, ggml.GGML_TYPE_F32, (dim, 1))
    (wq, q), (wk, k) = ggml_ops.random_quant_weight("F32", 32, dim, 1), ggml_ops.random_quant_weight("F16", 16, dim, 2)
    w_in, w_in_dense = ggml_ops.random_quant_weight("F32", dim, d_in, 3)

    def rms(h):
        return h / np.sqrt((h.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * g

    qkv = ggml_ops.NormedLinears(norm, eps, [wq, wk], backend)
    post = ggml_ops.NormedLinears(norm, eps, [wq], backend, w_in=w_in)
    for n_tokens in (1, 3, 1):  # the one-token graph is cached and re-run
        x = rng.standard_normal((n_tokens, dim), dtype=np.float32) * 3
        a = rng.standard_normal((n_tokens, d_in), dtype=np.float32)
        yq, yk = qkv(x)
        assert yq.shape == (n_tokens, 32) and yk.shape == (n_tokens, 16)
        assert _rel_err(yq, rms(x) @ q.T) < 1e-5
        assert _rel_err(yk, rms(x) @ k.T) < TOLERANCE["F16"]  # F16 weights: x rounded to f16
        h, n, yr = post(x, a)  # flat: [h, n, W_i @ n ...]
        assert _rel_err(h, x + a @ w_in_dense.T) < 1e-5
        assert _rel_err(n, rms(h)) < 1e-5
        assert _rel_err(yr, rms(h) @ q.T) < 1e-5
    with pytest.raises(ValueError, match="exactly when"):
        qkv(x, a)
    with pytest.raises(ValueError, match="D="):
        ggml_ops.NormedLinears(norm, eps, [w_in], backend)
