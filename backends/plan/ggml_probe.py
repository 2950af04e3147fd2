"""ggml's per-op cost: a graph of tiny dependent ops, timed by the hardware profile.

A decode step runs hundreds of small ggml ops; each pays a dispatch and a thread barrier on
top of reading its weights. This graph isolates that cost (built on kernels/ggml.py's graph
class). Weight-reading rates are measured with kernels/ggml.py's QuantLinear directly.
"""

from __future__ import annotations


def op_chain(ggml, backend, n_ops: int = 64, width: int = 64):
    """A callable running a graph of n_ops tiny dependent ops (y = W @ y, F32 width x width):
    its time per op is ggml's per-op cost at this thread count — dispatch plus the thread
    barrier after every op — which is what a decode step of many small ops pays on top of
    reading weights. Call `.close()` when done."""
    import numpy as np

    class _Chain(ggml._Graph):
        MAX_TENSORS = n_ops * 2 + 8

        def __init__(self):
            super().__init__(backend)
            w = ggml.aligned_empty(width * width * 4, np.float32)
            w[:] = np.eye(width, dtype=np.float32).ravel() * 0.5
            self.w = self._weight(ggml.QuantWeight(w.view(np.uint8), ggml.GGML_TYPE_F32, (width, width)))
            self.x = self._new(ggml.GGML_TYPE_F32, width, 1)
            y = self.x
            for _ in range(n_ops):
                y = self.lib.ggml_mul_mat(self.ctx, self.w, y)
            self.y = y
            self._finish(self.y)
            self._view(self.x, (width,))[:] = 1.0

        def __call__(self):
            self._run()

    return _Chain()
