"""Which CPU kernel should compute an expert? Measured, not assumed (issue 7: "measure and
choose", "evaluate that against a small C kernel of our own").

One Mixtral-8x7B expert matrix (14336 x 4096) times one activation vector (decode, batch 1).
Each kernel cycles through a set of distinct matrices holding at least `--mib` MiB (default
512, 16 x the 32 MiB L3 here), so every call reads its weights from RAM as decode does (one
matrix alone fits in L3 and would be timed from cache). Best of `--reps` passes.

Candidates, all fed the same Q4_0 expert (the format of the Mixtral-shaped test file):
  ggml Q4_0         llama.cpp's kernel on the bytes as they lie in the GGUF (kernels/ggml.py)
  ggml Q4_0 repack  the same after ggml's interleaved repack (what llama.cpp and the runtime use)
  ggml Q8_0         the 8.5-bit format, for scale
  torch int4pack    torch._weight_int4pack_mm_for_cpu: Q4_0 converted at load (scale in bf16)
  torch int8pack    torch._weight_int8pack_mm: int8 per output row (coarser than Q4_0's blocks)
  torch bf16        F.linear on weights dequantized once to bf16 (3.6x the bytes)
  torch blockwise   dequantize 1024 rows at a time with kernels/dequant.py, then multiply
  our C (AVX2)      benchmarks/q4_0_matvec.c: Q4_0 x 8-bit activation, OpenMP rows

    python benchmarks/expert_kernels.py                 # 1 and 2 threads
    python benchmarks/expert_kernels.py --threads 2 --mib 256 --reps 3
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROWS, COLS = 14336, 4096  # Mixtral-8x7B: ffn 14336, hidden 4096
Q4_0_ROW_BYTES = COLS // 32 * 18


def q4_0_values(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 blocks [rows, row_bytes] -> (4-bit values [rows, cols] uint8, scales [rows, cols/32] f32)."""
    b = blocks.reshape(blocks.shape[0], -1, 18)
    d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = b[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j low nibble, j + 16 high
    return q.reshape(blocks.shape[0], -1), d


def build_c_kernel(workdir: Path):
    lib = workdir / "libq4_0_matvec.so"
    subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC",
                    str(HERE / "q4_0_matvec.c"), "-o", str(lib)], check=True)
    handle = ctypes.CDLL(str(lib))
    handle.q4_0_matvec.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return handle


def time_pass(fn, n: int, reps: int) -> float:
    """Seconds per call: the best of `reps` passes over matrices 0..n-1 (after a warm-up pass)."""
    for i in range(n):
        fn(i)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def candidates(q4_blocks: list[np.ndarray], x: np.ndarray, threads: int, c_lib, mib: int):
    """Yield (name, own bytes per matrix, n matrices, fn(i) -> y of matrix i)."""
    import torch
    import torch.nn.functional as F

    from moechat.kernels import dequant, ggml, ggml_ops

    torch.set_num_threads(threads)
    backend = ggml.CpuBackend(threads)
    q4 = ggml.ggml_type_id("Q4_0")

    def count(nbytes):  # distinct matrices to cycle through for this format
        return max(2, -(-mib * 2**20 // nbytes))

    n = min(len(q4_blocks), count(q4_blocks[0].nbytes))
    mapped = [ggml_ops.QuantLinear(ggml.QuantWeight(b, q4, (COLS, ROWS)), backend) for b in q4_blocks[:n]]
    yield "ggml Q4_0", q4_blocks[0].nbytes, n, lambda i: mapped[i](x)
    packed = [ggml_ops.QuantLinear(ggml.PackedWeight(l.weight), backend) for l in mapped]
    yield "ggml Q4_0 repack", q4_blocks[0].nbytes, n, lambda i: packed[i](x)
    for l in mapped + packed:
        l.close()
    del mapped, packed

    rng = np.random.default_rng(1)
    q8 = [ggml_ops.random_blocks("Q8_0", ROWS, COLS, rng) for _ in range(count(ROWS * COLS // 32 * 34))]
    q8_lin = [ggml_ops.QuantLinear(ggml.QuantWeight(b, ggml.ggml_type_id("Q8_0"), (COLS, ROWS)), backend) for b in q8]
    yield "ggml Q8_0 (other weights: no error column)", q8[0].nbytes, len(q8), lambda i: q8_lin[i](x)
    for l in q8_lin:
        l.close()
    del q8, q8_lin

    xb = torch.from_numpy(x)[None].to(torch.bfloat16)  # [1, K]
    int4 = []
    for b in q4_blocks[:n]:
        q, d = q4_0_values(b)
        w = torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q.astype(np.int32)), 1)
        scale_zero = torch.zeros(COLS // 32, ROWS, 2, dtype=torch.bfloat16)  # w = (q - 8) * scale + zero
        scale_zero[..., 0] = torch.from_numpy(d.T.copy()).to(torch.bfloat16)
        int4.append((w, scale_zero))
    yield ("torch int4pack", int4[0][0].nbytes + int4[0][1].nbytes, n,
           lambda i: torch._weight_int4pack_mm_for_cpu(xb, int4[i][0], 32, int4[i][1]))
    del int4

    dense0 = torch.from_numpy(dequant_q4_0(q4_blocks[0]))  # [N, K] float32, matrix 0
    scale = dense0.abs().amax(1) / 127
    int8 = [((dense0 / scale[:, None]).round().to(torch.int8), scale.to(torch.bfloat16))]
    n8 = count(ROWS * COLS)
    int8 += [(torch.randint(-127, 128, (ROWS, COLS), dtype=torch.int8), int8[0][1]) for _ in range(n8 - 1)]
    yield "torch int8pack", ROWS * COLS + 2 * ROWS, n8, lambda i: torch._weight_int8pack_mm(xb, *int8[i])
    del int8

    n16 = count(ROWS * COLS * 2)
    bf16 = [dense0.to(torch.bfloat16)] + [torch.randn(ROWS, COLS, dtype=torch.bfloat16) * 0.01 for _ in range(n16 - 1)]
    yield "torch bf16", ROWS * COLS * 2, n16, lambda i: F.linear(xb, bf16[i])
    del bf16, dense0

    xt = torch.from_numpy(x)

    def blockwise(i, chunk=1024):
        out = torch.empty(ROWS)
        for r in range(0, ROWS, chunk):
            w = dequant.dequantize(q4_blocks[i][r : r + chunk], "Q4_0", (min(chunk, ROWS - r), COLS))
            out[r : r + chunk] = w @ xt
        return out

    yield "torch blockwise dequant", q4_blocks[0].nbytes, n, blockwise

    y_c = np.empty(ROWS, np.float32)

    def ours(i):
        c_lib.q4_0_matvec(q4_blocks[i].ctypes.data, x.ctypes.data, y_c.ctypes.data, ROWS, COLS, threads)
        return y_c

    yield "our C (AVX2)", q4_blocks[0].nbytes, n, ours
    backend.close()


def dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    q, d = q4_0_values(blocks)
    return ((q.astype(np.float32) - 8).reshape(ROWS, -1, 32) * d[..., None]).reshape(ROWS, COLS)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--mib", type=int, default=512, help="bytes cycled through per kernel (≫ L3)")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    from moechat.kernels import ggml_ops

    rng = np.random.default_rng(0)
    n_q4 = max(2, -(-args.mib * 2**20 // (ROWS * Q4_0_ROW_BYTES)))
    q4_blocks = [ggml_ops.random_blocks("Q4_0", ROWS, COLS, rng) for _ in range(n_q4)]
    x = rng.standard_normal(COLS, dtype=np.float32)
    exact = dequant_q4_0(q4_blocks[0]).astype(np.float64) @ x.astype(np.float64)  # matrix 0
    q4_mb = q4_blocks[0].nbytes / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        c_lib = build_c_kernel(Path(tmp))
        print(f"{ROWS} x {COLS} expert matrix, batch 1; Q4_0 = {q4_mb:.1f} MB; ≥ {args.mib} MiB cycled per kernel; "
              f"best of {args.reps} passes")
        print("| kernel | threads | MB per matrix | ms per matrix | GB/s of its bytes | time vs ggml Q4_0 repack "
              "| max error / max |y| (vs exact Q4_0) |")
        print("|---|---|---|---|---|---|---|")
        for threads in args.threads:
            rows, base = [], None
            for name, nbytes, n, fn in candidates(q4_blocks, x, threads, c_lib, args.mib):
                seconds = time_pass(fn, n, args.reps)
                y0 = fn(0)
                y0 = (y0.float().numpy() if hasattr(y0, "numpy") else y0).astype(np.float64).reshape(-1)
                err = np.abs(y0 - exact).max() / np.abs(exact).max() if "Q8_0" not in name else float("nan")
                if name == "ggml Q4_0 repack":
                    base = seconds
                rows.append((name, nbytes, seconds, err))
            for name, nbytes, seconds, err in rows:
                print(f"| {name} | {threads} | {nbytes / 1e6:.1f} | {seconds * 1e3:.2f} | {nbytes / seconds / 1e9:.1f} "
                      f"| {seconds / base:.2f} | {'—' if np.isnan(err) else f'{err:.1e}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
