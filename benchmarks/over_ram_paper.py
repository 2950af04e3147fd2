"""Paper table: the cost model's over-RAM predictions for big MoEs on consumer machines.

    .venv/bin/python benchmarks/over_ram_paper.py [--ctx 4096]

For Qwen3-30B-A3B, gpt-oss-120b, Qwen3-235B-A22B and DeepSeek-V3 (Q4_K/Q4_0 geometry cards: tensor
shapes from their config.json, no file) on the recorded consumer profiles (tests/profiles/),
with an NVMe drive of 3 and 7 GB/s (4 KiB reads at 0.05 GB/s), prints what the planner would
predict when the model does not fit: llama.cpp over mmap and the stream engine (CPU compute,
experts streamed into the RAM left after the non-expert weights), decode tok/s, with the
hit rate and MB read per token. Uniform routing (no routing record): a trained model's
skewed routing gives higher hit rates, so these are floors. Models that fit in RAM + VRAM
are marked "fits" (the planner then picks an in-memory placement).
Caveats: gpt-oss's experts are MXFP4 in the released files (here Q4_K, ~4.5 bits either
way; Q4_0 because its 2880-wide rows are no multiple of Q4_K's 256); DeepSeek-V3's query LoRA (q_lora_rank 1536) is not in the geometry (its attention is
written as V2-Lite's), which overstates its non-expert bytes by ~3.5 GB.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MODELS = {"qwen3-30b-a3b": "Q4_K", "gpt-oss-120b": "Q4_0", "qwen3-235b-a22b": "Q4_K", "deepseek-v3": "Q4_K"}
DRIVES = (3.0, 7.0)  # GB/s large reads
SMALL_GBS = 0.05


def extra_geometries():
    from fixtures.random_geometry import Geometry

    return {
        "gpt-oss-120b": Geometry(
            "gpt-oss", 36, 2880, 64, 8, 64, 2880, 128, 4, 2880, 201088, 131072, 150000.0, "none",
            "openai/gpt-oss-120b config.json", gpt_oss=True, sliding_window=128),
        "qwen3-235b-a22b": Geometry(
            "qwen3moe", 94, 4096, 64, 4, 128, 12288, 128, 8, 1536, 151936, 40960, 1e6, "head",
            "Qwen/Qwen3-235B-A22B config.json"),
        "deepseek-v3": Geometry(
            "deepseek2", 61, 7168, 128, 1, 192, 18432, 256, 8, 2048, 129280, 163840, 1e4, "none",
            "deepseek-ai/DeepSeek-V3 config.json (attention without q LoRA)",
            mla=(512, 128, 64, 128), n_dense_layers=3, n_shared=1),
    }


def main() -> int:
    from fixtures import random_geometry as rg

    from moechat.backends.plan import cost_model as cm
    from moechat.backends.plan.hardware_profile import read_profile
    from moechat.backends.plan.streamed import over_ram

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=4096)
    args = ap.parse_args()
    rg.GEOMETRIES.update(extra_geometries())  # this script's private additions
    profiles = sorted((ROOT / "tests" / "profiles").glob("*.json"))
    print(f"| model | GB | machine | RAM free GiB | VRAM GiB | mmap tok/s | "
          + " | ".join(f"stream @{d:g} GB/s: tok/s (hits, MB/tok)" for d in DRIVES) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(DRIVES))
    for name, qtype in MODELS.items():
        card = rg.geometry_card(name, qtype=qtype)
        for path in profiles:
            prof = read_profile(path)
            ram = cm.ram_capacity_bytes(prof) / 2**30
            vram = cm.gpu_capacity_bytes(prof) / 2**30 if prof.has_gpu else 0
            need = card.tensor_bytes + cm.kv_bytes(card, args.ctx) + cm.RUNTIME_OVERHEAD_BYTES
            if need <= cm.ram_capacity_bytes(prof) + (cm.gpu_capacity_bytes(prof) if prof.has_gpu else 0):
                cells = ["fits"] * (1 + len(DRIVES))
            else:
                cells = []
                for i, d in enumerate(DRIVES):
                    mmap, stream = over_ram(card, prof, args.ctx, disk=(d, SMALL_GBS))
                    if i == 0:
                        cells.append(f"{mmap.decode_tok_s:.3f}" if mmap.fits else "no")
                    cells.append(f"{stream.decode_tok_s:.2f} ({stream.hit_rate:.0%}, "
                                 f"{stream.bytes_per_token / 1e6:.0f})" if stream.fits else "cannot run")
            print(f"| {name} {qtype} | {card.tensor_bytes / 1e9:.0f} | {path.stem} | {ram:.0f} | {vram:.0f} | "
                  + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
