"""Decode and prefill speed of the torch runtime vs llama.cpp on the same GGUF, alternating.

Each (engine, round) runs in a fresh subprocess so that its peak RSS is its own: load the
model, prefill a fixed prompt, decode greedily, report tok/s and peak RSS. Rounds alternate
llama.cpp / torch so that a noisy, shared machine hurts both alike; the table shows the
median of the rounds and the ratio torch ÷ llama.cpp.

    python benchmarks/torch_vs_llamacpp.py                       # demo (Q8_0 experts) + Mixtral-shaped
    python benchmarks/torch_vs_llamacpp.py --model X.gguf --rounds 5 --threads 2
    python benchmarks/torch_vs_llamacpp.py --profile             # where torch's decode time goes
    python benchmarks/torch_vs_llamacpp.py --device cuda         # GPU: all layers offloaded on both sides
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def default_models() -> list[Path]:
    from moechat.backends.model.demo_model import UpcycleRecipe, demo_model_path

    models = [demo_model_path(UpcycleRecipe(expert_type="Q8_0"), progress=True)]
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.fixtures.random_geometry import random_geometry_path

        models.append(random_geometry_path("mixtral-8x7b", n_layers=4, qtype="Q4_0", progress=True))
    except ImportError:
        from moechat.backends.paths import cache_dir

        cached = cache_dir() / "fixtures" / "mixtral-8x7b-L4-q4_0-v1.gguf"
        if cached.exists():
            models.append(cached)
        else:
            print("(no Mixtral-shaped model: tests/fixtures/random_geometry.py is absent)", file=sys.stderr)
    return models


# ---- one measurement (runs in a subprocess) ----------------------------------------------


def measure(engine: str, path: str, threads: int, n_prompt: int, n_decode: int, profile: bool,
            device: str = "cpu") -> dict:
    import resource

    import psutil

    prompt = [1] + [100 + (i * 37) % 5000 for i in range(n_prompt - 1)]
    if engine == "llama.cpp":
        import llama_cpp

        rss_before_load = psutil.Process().memory_info().rss
        if device == "cuda" and not llama_cpp.llama_supports_gpu_offload():
            raise SystemExit("this llama-cpp-python build has no GPU offload (README: CMAKE_ARGS=-DGGML_CUDA=on)")
        llm = llama_cpp.Llama(model_path=path, n_ctx=n_prompt + n_decode + 8, n_batch=512,
                              n_threads=threads, n_threads_batch=threads, verbose=False,
                              n_gpu_layers=-1 if device == "cuda" else 0)
        t0 = time.perf_counter()
        llm.eval(prompt)
        llama_cpp.llama_synchronize(llm.ctx)
        prefill_s = time.perf_counter() - t0
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        t0 = time.perf_counter()
        for _ in range(n_decode):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())
        decode_s = time.perf_counter() - t0
    else:
        import torch

        from moechat.backends.runtime import load_model

        torch.set_num_threads(1)  # as the torch engine does: ggml's pool does the heavy work
        rss_before_load = psutil.Process().memory_info().rss
        model = load_model(path, device=device, threads=threads, max_tokens=n_prompt + n_decode + 8)

        def sync():
            if device == "cuda":
                torch.cuda.synchronize()

        cache = model.new_cache(n_prompt + n_decode + 8)
        with torch.inference_mode():
            t0 = time.perf_counter()
            logits = model.forward(torch.tensor(prompt), cache, 0, all_logits=False)
            sync()
            prefill_s = time.perf_counter() - t0
            token, pos = int(logits[-1].argmax()), n_prompt

            def decode():
                nonlocal token, pos
                for _ in range(n_decode):
                    logits = model.forward(torch.tensor([token]), cache, pos, all_logits=False)
                    token, pos = int(logits[-1].argmax()), pos + 1

            t0 = time.perf_counter()
            if profile:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.runcall(decode)
                decode_s = time.perf_counter() - t0
                pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(15)
            else:
                decode()
                decode_s = time.perf_counter() - t0
    return {
        "engine": engine,
        "prefill_tok_s": n_prompt / prefill_s,
        "decode_tok_s": n_decode / decode_s,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_load": rss_before_load,  # the interpreter and its libraries (torch: ~0.23 GB)
        "peak_vram": _peak_vram(engine, device),
    }


def _peak_vram(engine: str, device: str) -> int:
    """torch's peak allocation on the GPU (0 on the CPU; llama.cpp's is not visible here)."""
    if device != "cuda" or engine != "torch":
        return 0
    import torch

    return torch.cuda.max_memory_allocated()


def run_one(engine: str, path: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--model", str(path), "--threads", str(args.threads),
           "--device", args.device,
           "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens)]
    if args.profile and engine == "torch":
        cmd.append("--profile")
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # the child's errors go to stderr
    if out.returncode != 0:
        raise SystemExit(f"the {engine} round on {path.name} failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the table --------------------------------------------------------------------------


def main() -> int:
    from moechat.backends.plan.threads import default_threads

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="GGUF path (repeatable; default: demo Q8_0 + Mixtral-shaped)")
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the torch runtime on the GPU and llama.cpp with every layer offloaded")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--profile", action="store_true", help="cProfile torch's decode (printed to stderr)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.model[0], args.threads, args.prompt_tokens,
                                 args.decode_tokens, args.profile, args.device)))
        return 0

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA GPU here")
    models = [Path(m) for m in args.model] if args.model else default_models()
    print(f"device {args.device}, threads {args.threads}, prompt {args.prompt_tokens} tok, decode {args.decode_tokens} tok, "
          f"{args.rounds} alternating rounds, median shown; load average {os.getloadavg()[0]:.1f}")
    print(header := "| model | file GB | engine | prefill tok/s | decode tok/s | peak RSS GB | RSS / file "
                    "| RSS before load GB | (peak − before load) / file |")
    print("|" + "---|" * header.count(" | ") + "---|")
    for path in models:
        size = path.stat().st_size
        results = {"llama.cpp": [], "torch": []}
        for _ in range(args.rounds):
            for engine in ("llama.cpp", "torch"):
                results[engine].append(run_one(engine, path, args))
        med = {}
        for engine, rs in results.items():
            med[engine] = {k: statistics.median(r[k] for r in rs)
                           for k in ("prefill_tok_s", "decode_tok_s", "peak_rss", "rss_before_load")}
            m = med[engine]
            print(f"| {path.name} | {size / 1e9:.2f} | {engine} | {m['prefill_tok_s']:.1f} | {m['decode_tok_s']:.1f} "
                  f"| {m['peak_rss'] / 1e9:.2f} | {m['peak_rss'] / size:.2f} | {m['rss_before_load'] / 1e9:.2f} "
                  f"| {(m['peak_rss'] - m['rss_before_load']) / size:.2f} |")
        ratio_d = med["torch"]["decode_tok_s"] / med["llama.cpp"]["decode_tok_s"]
        ratio_p = med["torch"]["prefill_tok_s"] / med["llama.cpp"]["prefill_tok_s"]
        per_round = [t["decode_tok_s"] / l["decode_tok_s"] for t, l in zip(results["torch"], results["llama.cpp"])]
        print(f"| {path.name} | | **torch ÷ llama.cpp** | {ratio_p:.2f} | **{ratio_d:.2f}** "
              f"(rounds: {', '.join(f'{r:.2f}' for r in per_round)}) | | | | |")
        if args.device == "cuda":
            vram = statistics.median(r["peak_vram"] for r in results["torch"])
            print(f"(torch peak GPU allocation on {path.name}: {vram / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
