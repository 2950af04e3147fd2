"""HOBBIT's low-precision expert copies: a groupwise int4 (or int2) copy of every routed
expert, derived once from the file's own experts and cached on disk keyed by the file.

Low copies exist to cut the bytes a cache miss moves over the host->GPU link. So
`--hobbit-low auto` means:
- no GPU (the CPU stands in for it): no low copies — there is no link to save bytes on,
  and every expert is computed in the file's own precision (llama.cpp's output);
- a GPU: int4, or int2 when the file's experts are already under 5 bits per weight (the
  low copy must be meaningfully smaller than what it stands in for). MXFP4 files (gpt-oss,
  4.25 bits per weight) get int2: 3 bits with its group scale and minimum, 1.4x fewer
  bytes per fill (int4 would be 5 bits: more bytes than the MXFP4 original).
`int4` / `int2` ask for that format on any device (how the low tier is tested on the CPU);
`none` keeps no low tier anywhere. The planner's HOBBIT prediction (a GPU placement,
plan/cost_model.py `_hobbit_low_bits`) assumes the GPU rule; `auto_low_bits` is the one
place it is decided.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from moechat.backends.errors import MoechatError
from moechat.backends.offload.calibration import model_file_key
from moechat.backends.paths import cache_dir
from moechat.kernels.lowbit import GROUP, LowBitWeight, quantize_groupwise

LOW_FORMATS = ("auto", "int4", "int2", "none")
PROJECTIONS = ("gate", "up", "down")
LOW_COPY_VERSION = 1


def expert_bits_per_weight(type_name: str) -> float:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return 8 * size / block


def auto_low_bits(expert_type: str, has_gpu: bool) -> int:
    """What `--hobbit-low auto` picks: 0 (no low copies) without a GPU; on a GPU int2 for
    files under 5 bits per weight (MXFP4, Q4_*, ...), else int4."""
    if not has_gpu:
        return 0
    return 2 if expert_bits_per_weight(expert_type) < 5 else 4


def low_bits(fmt: str, expert_type: str, has_gpu: bool) -> int:
    """Bits of the low copies for `--hobbit-low fmt` (0: no low tier)."""
    if fmt not in LOW_FORMATS:
        raise MoechatError(f"unknown --hobbit-low {fmt!r} (choose from {', '.join(LOW_FORMATS)})")
    if fmt == "auto":
        return auto_low_bits(expert_type, has_gpu)
    return 0 if fmt == "none" else int(fmt[3:])


@dataclass(slots=True)
class LowCopies:
    bits: int
    experts: dict[tuple[int, int], tuple[LowBitWeight, LowBitWeight, LowBitWeight]]

    def expert_bytes(self, key: tuple[int, int]) -> int:
        return sum(w.nbytes for w in self.experts[key])


def low_copy_path(model_path, bits: int) -> Path:
    return cache_dir() / "hobbit" / f"{model_file_key(model_path)}-int{bits}g{GROUP}-v{LOW_COPY_VERSION}.pt"


def load_or_build(model_path, bits: int, progress: bool = True) -> LowCopies:
    if bits == 0:
        return LowCopies(0, {})
    path = low_copy_path(model_path, bits)
    if not path.exists():
        build(model_path, bits, path, progress)
    blob = torch.load(path, mmap=True, weights_only=True)
    experts = {}
    for key_text, parts in blob["experts"].items():
        layer, expert = (int(x) for x in key_text.split("."))
        experts[(layer, expert)] = tuple(
            LowBitWeight(p["codes"], p["scale"], p["minimum"], bits, tuple(p["shape"].tolist()))
            for p in parts)
    return LowCopies(bits, experts)


def build(model_path, bits: int, out: Path, progress: bool = True) -> None:
    """Dequantize each layer's stacked experts from the GGUF and write their low copies."""
    import gguf
    from tqdm import tqdm

    reader = gguf.GGUFReader(str(model_path))
    by_name = {t.name: t for t in reader.tensors}
    layers = sorted({int(n.split(".")[1]) for n in by_name if n.endswith("ffn_gate_exps.weight")})
    if not layers:
        raise MoechatError(f"{model_path}: no routed experts to make low-precision copies of")
    experts: dict[str, list[dict]] = {}
    bar = tqdm(layers, desc=f"int{bits} expert copies", unit="layer", file=sys.stderr,
               disable=not progress)
    for layer in bar:
        per_proj = []
        for proj in PROJECTIONS:
            t = by_name[f"blk.{layer}.ffn_{proj}_exps.weight"]
            w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))  # [E, O, I]
            n_exp, o, i = w.shape
            lw = quantize_groupwise(w.reshape(n_exp * o, i), bits)  # all experts at once
            per_proj.append((lw.codes.view(n_exp, o, -1), lw.scale.view(n_exp, o, -1),
                             lw.minimum.view(n_exp, o, -1), (o, i)))
        for e in range(n_exp):
            experts[f"{layer}.{e}"] = [
                {"codes": c[e].clone(), "scale": s[e].clone(), "minimum": m[e].clone(),
                 "shape": torch.tensor(shape)} for c, s, m, shape in per_proj]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    torch.save({"bits": bits, "experts": experts}, tmp)
    tmp.replace(out)
