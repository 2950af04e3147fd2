"""torch dequantization is bit-exact with gguf's numpy reference on random blocks."""

import gguf
import numpy as np
import pytest
import torch

from moechat.kernels import dequant
from moechat.kernels.ggml_ops import random_blocks


@pytest.mark.parametrize("qtype", dequant.SUPPORTED)
def test_bit_exact_vs_gguf(qtype):
    block, _ = dequant.BLOCK[qtype]
    cols = max(block, 256) * 2
    data = random_blocks(qtype, 24, cols, np.random.default_rng(7))
    if qtype not in ("F32", "F16", "BF16"):
        # fully random bytes, scales included (no NaN/Inf scale: those compare unequal)
        noisy = np.random.default_rng(8).integers(0, 256, data.shape, dtype=np.uint8)
        with np.errstate(all="ignore"):
            noisy_ref = gguf.quants.dequantize(noisy, gguf.GGMLQuantizationType[qtype])
        finite = np.isfinite(noisy_ref).all(axis=1)
        data = np.concatenate([data, noisy[finite]])
    ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).astype(np.float32)
    got = dequant.dequantize(data, qtype)
    assert got.dtype == torch.float32 and tuple(got.shape) == ref.shape
    assert np.array_equal(got.numpy().view(np.uint32), ref.view(np.uint32))  # bit for bit


def test_shape_dtype_and_3d_stacks():
    data = random_blocks("Q8_0", 4 * 8, 64, np.random.default_rng(0)).reshape(4, 8, -1)
    ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0)
    got = dequant.dequantize(data, gguf.GGMLQuantizationType.Q8_0.value)
    assert tuple(got.shape) == (4, 8, 64) and np.array_equal(got.numpy(), ref)
    half = dequant.dequantize(data, "Q8_0", shape=(32, 64), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and tuple(half.shape) == (32, 64)


@pytest.mark.parametrize("qtype", ["IQ4_XS", "TQ1_0", "IQ4_NL", "IQ2_XXS"])
def test_other_types_refused_by_name(qtype):
    with pytest.raises(dequant.UnsupportedQuantType, match=qtype):
        dequant.dequantize(np.zeros(1024, np.uint8), qtype)
    with pytest.raises(dequant.UnsupportedQuantType, match=qtype):
        dequant.dequantize(np.zeros(1024, np.uint8), gguf.GGMLQuantizationType[qtype].value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", dequant.SUPPORTED)
def test_cuda_matches_cpu(qtype):
    data = random_blocks(qtype, 16, 512, np.random.default_rng(0))
    cpu = dequant.dequantize(data, qtype)
    gpu = dequant.dequantize(data, qtype, device="cuda")
    assert torch.equal(gpu.cpu(), cpu)
    half = dequant.dequantize(data, qtype, dtype=torch.float16, device="cuda")  # what the runtime asks for
    assert half.dtype == torch.float16 and torch.equal(half.cpu(), cpu.half())
