import numpy as np

from moechat.backends.offload.trace import TraceRecorder, load_trace


def test_recorder_roundtrip(tmp_path):
    rec = TraceRecorder(n_layers=3, n_experts=4, prefetch_depth=2, model="m")
    rng = np.random.default_rng(0)
    steps = [(5, True), (1, False), (1, False)]
    for i, (t, prefill) in enumerate(steps):
        if i == 0:
            rec.begin_sequence()
        for layer in range(3):
            ids = rng.integers(0, 4, size=(t, 2))
            pred = rng.integers(0, 4, size=(t, min(2, 2 - layer), 2)) if layer < 2 else None
            rec.record(layer, ids, rng.random((t, 2)), pred)
        rec.end_step(prefill)
    rec.begin_sequence()
    for layer in range(3):
        rec.record(layer, np.array([[3, 1]]), np.array([[0.7, 0.3]]))
    rec.end_step(False)
    trace = rec.trace()
    assert trace.expert_ids.shape == (8, 3, 2)
    assert list(trace.seq_starts) == [0, 7]
    assert list(trace.prefill) == [True] * 5 + [False] * 3
    assert trace.predicted.shape == (8, 3, 2, 2)
    assert (trace.predicted[:, 2] == -1).all()  # nothing to predict after the last layer
    assert trace.counts().sum() == 8 * 3 * 2
    trace.save(tmp_path / "t.npz")
    back = load_trace(tmp_path / "t.npz")
    assert np.array_equal(back.expert_ids, trace.expert_ids)
    assert np.allclose(back.gate_weights, trace.gate_weights)
    assert np.array_equal(back.predicted, trace.predicted)
    assert back.sequences() == [(0, 7), (7, 8)]


def test_split_at_sequence_boundary(synthetic_trace):
    a, b = synthetic_trace.split(0.5)
    assert a.n_tokens + b.n_tokens == synthetic_trace.n_tokens
    assert a.n_tokens in synthetic_trace.seq_starts
    assert b.seq_starts[0] == 0 and b.n_tokens > 0


def test_decode_only_keeps_sequences_apart(synthetic_trace):
    d = synthetic_trace.decode_only()
    assert not d.prefill.any()
    assert d.n_tokens == int((~synthetic_trace.prefill).sum())
    assert len(d.seq_starts) == len(synthetic_trace.seq_starts)
    first = synthetic_trace.sequences()[1]
    n0 = int((~synthetic_trace.prefill[: first[0]]).sum())
    assert d.seq_starts[1] == n0
