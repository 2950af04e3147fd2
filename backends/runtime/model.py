"""load_model: a GGUF file -> a runtime Model (one file per architecture), ready to run.

    model = load_model(path)                      # CPU: ggml kernels on the mapped bytes
    cache = model.new_cache(4096)
    logits = model.forward(tokens, cache, start=0)   # [T, V]
"""

from __future__ import annotations

import importlib

import torch

from moechat.backends.runtime.config import model_args
from moechat.backends.runtime.experts import ExpertBackend, ExpertStore, GgmlExperts, TorchExperts
from moechat.backends.runtime.gguf_weights import GGUFWeights
from moechat.kernels.dequant import type_name
from moechat.kernels.ggml import CpuBackend

ARCH_MODULES = {"llama": "llama", "qwen2moe": "qwen2moe", "qwen3moe": "qwen3moe", "olmoe": "olmoe",
                "deepseek2": "deepseek2", "phimoe": "phimoe", "gpt-oss": "gpt_oss"}

Model = importlib.import_module("moechat.backends.runtime.llama").Model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path, device: str = "cpu", dtype: torch.dtype | None = None, threads: int | None = None,
               expert_backend: ExpertBackend | None = None, max_tokens: int = 4096,
               kernels: str | None = None):
    """Open a GGUF in place and build its Model.

    device "cpu": every matrix product runs ggml's kernel on the quantized bytes (float32
    activations); "cuda": dense weights are dequantized there (float16 by default) and, unless
    an expert backend is given, the experts too (TorchExperts). kernels="torch" forces the
    dequantized-torch path on the CPU too (how the GPU code path is tested without a GPU)."""
    from moechat.backends.plan.threads import default_threads

    weights = GGUFWeights(path)
    args = model_args(weights.metadata, weights.tensors)
    for t in weights.tensors.values():  # refuse unsupported quant types by name, up front
        type_name(t.ggml_type)
    kernels = kernels or ("ggml" if device == "cpu" else "torch")
    assert kernels in ("ggml", "torch"), kernels
    dtype = dtype or (torch.float32 if device == "cpu" else torch.float16)
    cpu = CpuBackend(threads or default_threads())
    store = ExpertStore(weights, args.n_layers, args.n_experts, args.expert_activation)
    if expert_backend is None and args.is_moe:
        expert_backend = GgmlExperts(store, cpu) if kernels == "ggml" else TorchExperts(store, device, dtype)
    module = importlib.import_module(f"moechat.backends.runtime.{ARCH_MODULES[args.arch]}")
    dense_cpu = cpu if kernels == "ggml" else None  # None: dense layers dequantized to torch too
    model = module.Model(args, weights, store, expert_backend, device, dtype, dense_cpu, max_tokens)
    model.path = weights.path
    model.cpu_kernels = cpu  # ggml's CPU backend, also on a GPU: the offload engines' CPU experts
    return model
