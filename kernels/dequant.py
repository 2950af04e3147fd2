"""Dequantize GGUF tensors in torch, bit-exact with `gguf.quants.dequantize`.

Each `_dequant_<type>(blocks)` takes [B, type_size] uint8 blocks and returns [B, block_size]
float32, with the same float32 operations in the same order as gguf's numpy reference (a
scale times an integer, then plus/minus a min), so results are identical bit for bit; the
integer unpacking follows ggml-common.h's block layouts. Works on any device: the GPU
engines dequantize an expert where it will be used.

MXFP4 (gpt-oss's experts: 32 e2m1 values sharing one power-of-two e8m0 scale) follows
gguf's `MXFP4.dequantize_blocks` the same way. Types with no entry here (IQ*, TQ*, ...) are
refused by name.
"""

from __future__ import annotations

import torch

QK_K = 256
# name -> (values per block, bytes per block); ggml-common.h
BLOCK = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "MXFP4": (32, 17),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
SUPPORTED = tuple(BLOCK)
CHUNK_BLOCKS = 1 << 16  # bounds the temporaries of one step


class UnsupportedQuantType(ValueError):
    pass


def type_name(qtype: int | str) -> str:
    import gguf

    name = qtype if isinstance(qtype, str) else gguf.GGMLQuantizationType(int(qtype)).name
    if name not in BLOCK:
        raise UnsupportedQuantType(
            f"quantization type {name} is not supported by moechat's torch runtime "
            f"(supported: {', '.join(SUPPORTED)})"
        )
    return name


def dequantize(data, qtype: int | str, shape: tuple[int, ...] | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Raw GGUF bytes (numpy or torch uint8, or a float array for F32/F16) -> torch tensor.

    `shape` is the logical shape in torch order (outer first, e.g. [E, rows, cols]); by default
    the byte array's leading dims with the last dim converted from bytes to values."""
    name = type_name(qtype)
    raw = _as_uint8_tensor(data)
    if device is not None:
        raw = raw.to(device)
    block, size = BLOCK[name]
    if raw.numel() % size:
        raise ValueError(f"{name}: {raw.numel()} bytes is not a whole number of {size}-byte blocks")
    if shape is None:
        lead = tuple(data.shape[:-1]) if getattr(data, "ndim", 1) > 1 else ()
        row_bytes = data.shape[-1] * (data.dtype.itemsize if hasattr(data.dtype, "itemsize") else 1)
        shape = lead + (row_bytes // size * block,)
    blocks = raw.reshape(-1, size)
    out = torch.empty(blocks.shape[0], block, dtype=dtype, device=raw.device)
    fn = _DEQUANT[name]
    for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
        part = blocks[start : start + CHUNK_BLOCKS]
        out[start : start + part.shape[0]] = fn(part).to(dtype)
    return out.reshape(shape)


def _as_uint8_tensor(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        t = data.contiguous()
    else:
        import numpy as np

        t = torch.from_numpy(np.ascontiguousarray(data))
    return t.reshape(-1).view(torch.uint8)


# ---- helpers ----------------------------------------------------------------------------


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[B, 2] uint8 -> [B, 1] float32 (a half-float field)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """[B, n] bytes -> [B, n/group, 2, group]: low nibbles of each group, then high ones."""
    q = qs.reshape(qs.shape[0], -1, 1, group)
    return torch.cat([q & 0x0F, q >> 4], dim=2)


def _bits(b: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """[B, g, w] uint8 -> [B, g, len(shifts), w]: (b >> s) & mask for each shift s."""
    return torch.stack([(b >> s) & mask for s in shifts], dim=2)


# ---- float types ------------------------------------------------------------------------


def _dequant_f32(blocks):
    return blocks.contiguous().view(torch.float32)


def _dequant_f16(blocks):
    return blocks.contiguous().view(torch.float16).float()


def _dequant_bf16(blocks):
    return blocks.contiguous().view(torch.bfloat16).float()


# ---- 32-value blocks --------------------------------------------------------------------


def _dequant_q4_0(blocks):
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 2:], 16).reshape(blocks.shape[0], 32).to(torch.int16) - 8
    return d * q.float()


def _dequant_q4_1(blocks):
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 4:], 16).reshape(blocks.shape[0], 32).float()
    return d * q + m


def _high_bits_32(qh: torch.Tensor) -> torch.Tensor:
    """[B, 4] bytes (a little-endian uint32) -> [B, 32] bit j of the word, as uint8."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


def _dequant_q5_0(blocks):
    d = _f16(blocks[:, :2])
    qh = _high_bits_32(blocks[:, 2:6])
    ql = _nibbles(blocks[:, 6:], 16).reshape(blocks.shape[0], 32)
    q = (ql | (qh << 4)).to(torch.int16) - 16
    return d * q.float()


def _dequant_q5_1(blocks):
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    qh = _high_bits_32(blocks[:, 4:8])
    ql = _nibbles(blocks[:, 8:], 16).reshape(blocks.shape[0], 32)
    return d * (ql | (qh << 4)).float() + m


def _dequant_q8_0(blocks):
    d = _f16(blocks[:, :2])
    x = blocks[:, 2:].contiguous().view(torch.int8).float()
    return x * d


# e2m1 code -> value, doubled (ggml's kvalues_mxfp4); the scale below is halved to match
_E2M1_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def _e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """[B, 1] uint8 exponents -> [B, 1] float32 2^(e-127) / 2 (ggml_e8m0_to_fp32_half): built
    from its bits, subnormal for e < 2."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int32, device=e.device) << e, (e - 1) << 23)
    return bits.view(torch.float32)


def _dequant_mxfp4(blocks):
    n = blocks.shape[0]
    d = _e8m0_half(blocks[:, :1])
    codes = _nibbles(blocks[:, 1:], 16).reshape(n, 32).long()  # low nibbles: values 0-15
    table = torch.tensor(_E2M1_DOUBLED, dtype=torch.float32, device=blocks.device)
    return d * table[codes]


# ---- k-quants (256-value super-blocks) --------------------------------------------------


def _dequant_q2_k(blocks):
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = (d * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _dequant_q3_k(blocks):
    n = blocks.shape[0]
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks[:, 108:110])
    low = _bits(scales[:, :8].reshape(n, 1, 8), [0, 4], 0x0F).reshape(n, 16)
    high = _bits(scales[:, 8:].reshape(n, 1, 4), [0, 2, 4, 6], 0x03).reshape(n, 16)
    sc = ((low | (high << 4)).to(torch.int16) - 32).float()
    dl = (d * sc).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16)
    qh = _bits(hmask.reshape(n, 1, 32), list(range(8)), 1).reshape(n, 16, 16) ^ 1
    q = (ql.to(torch.int16) - (qh.to(torch.int16) << 2)).float()
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 12] packed 6-bit scales and mins of Q4_K/Q5_K -> ([B, 8], [B, 8]) uint8."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _dequant_q4_k(blocks):
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    d = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    q = _nibbles(blocks[:, 16:], 32).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _dequant_q5_k(blocks):
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    qh, qs = blocks[:, 16:48], blocks[:, 48:]
    d = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    ql = _nibbles(qs, 32).reshape(n, 8, 32)
    hi = _bits(qh.reshape(n, 1, 32), list(range(8)), 1).reshape(n, 8, 32)
    q = (ql | (hi << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def _dequant_q6_k(blocks):
    n = blocks.shape[0]
    ql, qh, scales = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208]
    d = _f16(blocks[:, 208:210])
    d = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _nibbles(ql, 64).reshape(n, -1, 32)  # [n, 8, 32]
    high = _bits(qh.reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, -1, 32)
    q = (low | (high << 4)).to(torch.int16) - 32
    return (d * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


_DEQUANT = {
    "F32": _dequant_f32, "F16": _dequant_f16, "BF16": _dequant_bf16,
    "Q4_0": _dequant_q4_0, "Q4_1": _dequant_q4_1, "Q5_0": _dequant_q5_0, "Q5_1": _dequant_q5_1,
    "Q8_0": _dequant_q8_0, "MXFP4": _dequant_mxfp4, "Q2_K": _dequant_q2_k, "Q3_K": _dequant_q3_k, "Q4_K": _dequant_q4_k,
    "Q5_K": _dequant_q5_k, "Q6_K": _dequant_q6_k,
}
