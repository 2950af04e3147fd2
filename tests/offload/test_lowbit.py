import pytest
import torch

from moechat.kernels.lowbit import dequantize_groupwise, lowbit_expert, lowbit_linear, quantize_groupwise


@pytest.mark.parametrize("bits,tol", [(4, 0.15), (2, 0.7)])
def test_groupwise_roundtrip_and_size(bits, tol):
    torch.manual_seed(0)
    w = torch.randn(96, 256)
    lw = quantize_groupwise(w, bits)
    err = (dequantize_groupwise(lw) - w).abs()
    group_range = w.view(96, -1, 32).amax(-1) - w.view(96, -1, 32).amin(-1)
    # every weight within half a step of its group's grid (+ fp16 rounding of scale/min)
    step = (group_range / ((1 << bits) - 1)).repeat_interleave(32, 1)
    assert (err <= step / 2 + 1e-2).all()
    assert err.std() / w.std() < tol
    assert lw.nbytes == 96 * 256 * bits // 8 + 2 * 2 * 96 * 256 // 32


def test_kernel_matches_dequantized_reference():
    torch.manual_seed(1)
    x = torch.randn(3, 64)
    g, u, d = (quantize_groupwise(torch.randn(*s) * 0.1, 4) for s in ((128, 64), (128, 64), (64, 128)))
    ref = (torch.nn.functional.silu(x @ dequantize_groupwise(g).T) * (x @ dequantize_groupwise(u).T)) @ dequantize_groupwise(d).T
    assert torch.allclose(lowbit_expert(x, g, u, d), ref, atol=1e-5)
    assert torch.allclose(lowbit_linear(x, g), x @ dequantize_groupwise(g).T, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_on_gpu_matches_cpu():
    torch.manual_seed(2)
    lw = quantize_groupwise(torch.randn(128, 64), 4)
    x = torch.randn(2, 64)
    assert torch.allclose(lowbit_linear(x.cuda(), lw.to("cuda")).cpu(), lowbit_linear(x, lw), atol=1e-4)
