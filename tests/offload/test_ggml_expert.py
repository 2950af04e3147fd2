"""expert_compute.GgmlExpert — an expert's bytes computed with ggml's kernel on the CPU
standing in for the GPU — gives exactly what the torch runtime's all-experts ggml path
gives for that expert (biases, clamped SwiGLU and repacked MXFP4 included), where the
GPU-side DeviceExpert (dequantize + float32 matmul) only comes close."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fixtures.tiny_models import tiny_model_path


@pytest.mark.parametrize("arch, expert_type", [("gpt-oss", "MXFP4"), ("phimoe", "Q4_K"), ("deepseek2", "Q8_0")])
def test_ggml_expert_equals_the_runtime_expert_path(arch, expert_type):
    from moechat.backends.offload.expert_compute import DeviceExpert, GgmlExpert, device_expert, host_parts
    from moechat.backends.runtime import load_model

    model = load_model(tiny_model_path(arch, expert_type), threads=1, max_tokens=16)
    store, runtime = model.experts, model.expert_backend
    layer = store.layers[-1]
    x = torch.randn(3, model.args.dim, generator=torch.Generator().manual_seed(0))  # [T, D]
    for expert in (0, store.n_experts - 1):
        w = store.expert(layer, expert)
        parts = [p.clone() for p in host_parts(w)]
        ggml = device_expert(w, parts, model.cpu_kernels)
        assert isinstance(ggml, GgmlExpert) and ggml.nbytes == w.nbytes
        ids = np.full((3, 1), expert, dtype=np.int32)
        want = runtime.layers[layer](x.numpy(), ids)[:, 0]  # [T, D]
        got = ggml.forward(x).numpy()
        np.testing.assert_array_equal(got, want)
        dense = device_expert(w, parts)  # no CPU backend given: the GPU's path, on the CPU
        assert isinstance(dense, DeviceExpert)
        close = dense.forward(x).numpy()
        assert 0 < np.abs(close - want).max() < 0.05 * np.abs(want).max()
        ggml.close()
