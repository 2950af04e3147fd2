"""Cost model: predict each placement's speed and memory from a model card and a profile.

Pure functions on plain data (no torch, no model loading), so the planner can be tested on
recorded profiles of machines we do not have. The equations, and where every constant comes
from, are in docs/cost-model.md. In short, at batch 1 every weight byte a token needs is read
once, from wherever it lives:

    t_decode = sum over tensors of  bytes read per token / bandwidth of the tier holding it
             + bytes over PCIe per token / measured host->device bandwidth   (HOBBIT misses)
             + per-token and per-layer overheads (graph dispatch, thread barriers, hand-offs)
    t_prefill per token = flops per token / compute rate (the vocabulary projection once a prompt)
             + weights copied to the GPU per micro-batch / (H2D bandwidth x micro-batch)
               (from 32 tokens a micro-batch; a shorter one multiplies RAM weights on the CPU)

Legend: L layers, E experts per layer, A experts used per token, N layers whose experts stay
in RAM (`--n-cpu-moe N`), G layers on the GPU (`-ngl G`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# ---- constants (docs/cost-model.md says where each comes from) -------------------------------
MIB = 1024**2
RUNTIME_OVERHEAD_BYTES = 256 * MIB  # Python, llama.cpp context, tokenizer (also manager's fit check)
VRAM_RESERVE_BYTES = 400 * MIB  # CUDA context + fragmentation headroom per GPU
RAM_HEADROOM = 0.90  # plan to use at most 90% of the RAM available now
UNIFIED_GPU_FRACTION = 0.75  # Metal's default working-set cap on unified memory
N_UBATCH = 512  # llama.cpp micro-batch (prefill chunk)
OP_OFFLOAD_MIN_BATCH = 32  # ggml's GPU backends run a RAM weight's matmul on the GPU from 32 tokens (offload_op)
CPU_TOKEN_OVERHEAD_S = 0.1e-3  # llama_decode's per-token graph build/scheduling + Python eval (a 2-layer model, measured)
CPU_LAYER_OVERHEAD_S = 63e-6  # per CPU layer beyond its counted ops: small-matrix rates, per-layer work (fitted here)
OPS_PER_LAYER = 30  # compute nodes of one llama.cpp MoE layer (norms, q/k/v/o, rope, attention, router, experts)
OPS_PER_TOKEN = 8  # outside the layers: embedding lookup, output norm and projection
EXPERT_OPS_PER_LAYER = 10  # the expert part of a layer (router, top-k, 3 mul_mat_id, glu, weighting, sum)
GPU_TOKEN_OVERHEAD_S = 1.0e-3  # graph build + launch + logits copy (estimate, GPU rows open)
GPU_LAYER_OVERHEAD_S = 25e-6  # kernel launches per layer (estimate)
HANDOFF_S = 30e-6  # one GPU<->CPU activation hand-off (PCIe latency + sync), estimate
TORCH_LAYER_OVERHEAD_S = 200e-6  # Python + torch dispatch per layer for the torch engines
CPU_PREFILL_EFFICIENCY = 0.6  # ggml quantized GEMM vs measured float32 BLAS rate (fitted)
GPU_PREFILL_EFFICIENCY = 0.35  # achieved / peak fp16 matmul at batch 512 (estimate)
HOBBIT_LOW_BITS = 2.0  # bits of a low-precision expert copy loaded on a miss (paper: INT2/INT4)
HOBBIT_HIGH_SHARE = 0.67  # share of misses loaded in the file's precision (HOBBIT §3.2, Mixtral)


def _hobbit_low_bits(type_name: str) -> float:
    """The engine's low copy on a GPU (backends/offload/low_copies.py auto_low_bits, --hobbit-low
    auto): groupwise int4 (5 bits/weight with fp16 scale + min per 32) or int2 (3 bits) for
    files under 5 bits. (Without a GPU auto keeps none, but a HOBBIT placement is only
    predicted with one.)"""
    return 3.0 if BITS.get(type_name, 4.5) < 5 else 5.0
FALLBACK_GPU_MEM_GBS = 300.0  # when a profile lacks measured GPU bandwidth
FALLBACK_H2D_GBS = 12.0  # PCIe 4 x16 achieved, when not measured

PLAIN = ":plain"  # cpu_matvec_gbs key suffix: the unrepacked layout's rate (a GPU run's CPU weights)

# GGUF type -> the measured matvec type whose rate stands in for it (same kernel family).
RATE_FAMILY = {
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_0", "IQ4_NL": "Q4_0", "MXFP4": "MXFP4",
    "Q8_0": "Q8_0", "Q8_1": "Q8_0",
    "Q2_K": "Q2_K", "Q3_K": "Q3_K", "Q4_K": "Q4_K", "Q5_K": "Q5_K", "Q6_K": "Q6_K", "IQ4_XS": "Q4_K",
    "F16": "F16", "BF16": "F16", "F32": "F16",
}
# the family whose rate stands in where a profile from before a family was probed lacks it
FAMILY_FALLBACK = {"MXFP4": "Q4_0", "Q2_K": "Q4_K", "Q3_K": "Q4_K", "Q5_K": "Q4_K", "Q6_K": "Q4_K",
                   "Q5_0": "Q4_0", "Q4_1": "Q4_0"}
BITS = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K": 5.5, "Q5_0": 5.5,
        "Q5_1": 6, "Q4_K": 4.5, "Q4_0": 4.5, "Q4_1": 5, "Q3_K": 3.4375, "Q2_K": 2.625, "MXFP4": 4.25}


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the weights live. kind: "cpu" (all in RAM), "gpu" (all in VRAM), "layers"
    (`-ngl G`: the last G layers on the GPU), "moe" (`--n-cpu-moe N`: all on the GPU but the
    experts of layers < N), "fiddler" / "hobbit" (`n` experts per layer resident on the GPU)."""

    kind: str
    n: int = 0


@dataclass(frozen=True, slots=True)
class Routing:
    """Expert hit rates: expert_freq[layer][e] = fraction of that layer's routed picks that go
    to expert e (each row sums to 1). Uniform when unknown."""

    expert_freq: tuple[tuple[float, ...], ...] = ()

    def resident_hit_rate(self, layer: int, n_resident: int, n_experts: int) -> float:
        """Fraction of picks served by the n_resident most popular experts of a layer."""
        if n_experts <= 0:
            return 1.0
        n_resident = max(0, min(n_resident, n_experts))
        if layer >= len(self.expert_freq) or not self.expert_freq[layer]:
            return n_resident / n_experts
        freq = sorted(self.expert_freq[layer], reverse=True)
        total = sum(freq) or 1.0
        return sum(freq[:n_resident]) / total


@dataclass(frozen=True, slots=True)
class Prediction:
    prefill_tok_s: float
    decode_tok_s: float
    ram_bytes: int
    vram_bytes: int
    decode_terms: dict[str, float] = field(default_factory=dict)  # seconds per token, by term


# ---- bytes ----------------------------------------------------------------------------------


def kv_bytes(card, n_ctx: int, placement: "Placement | None" = None) -> int:
    """The KV cache at n_ctx tokens; the torch engines (fiddler, hobbit placements) keep a
    sliding-window layer's window only, llama-cpp-python every layer in full."""
    capped = placement is not None and placement.kind in ("fiddler", "hobbit")
    return card.kv_bytes(n_ctx, sliding_capped=capped)


def kv_read_bytes(card, n_past: int) -> float:
    """KV-cache bytes one decoded token reads at depth n_past: every position of a full
    attention layer, but only the window of a sliding-window layer (gpt-oss: half its layers
    attend to the last 128 positions) - the cache is full-size either way (kv_bytes)."""
    per_layer = card.kv_bytes_per_token / max(1, card.n_layers)
    swa = min(card.n_swa_layers, card.n_layers)
    window = min(n_past, card.sliding_window) if card.sliding_window else n_past
    return per_layer * ((card.n_layers - swa) * n_past + swa * window)


def compute_buffer_bytes(card) -> int:
    """llama.cpp's compute buffer at a 512-token micro-batch: logits + the widest activation."""
    widest = max(card.ffn_size, card.expert_ffn_size * max(1, card.n_experts_used), card.hidden_size * 4)
    return N_UBATCH * 4 * (card.vocab_size + 2 * widest)


def layer_bytes(card, layer: int) -> int:
    return sum(t.n_bytes for t in card.tensors if t.layer == layer)


def non_layer_bytes(card) -> int:
    return sum(t.n_bytes for t in card.tensors if t.layer is None)


def read_bytes_per_token(card, t) -> float:
    """Bytes of tensor t read to decode one token (uniform routing for expert tensors)."""
    if t.is_expert:
        return t.n_bytes * card.n_experts_used / max(1, card.n_experts)
    if t.name == "token_embd.weight":
        tied = card.tensor("output.weight") is None
        return t.n_bytes if tied else card.embedding_read_bytes_per_token
    return t.n_bytes


def params_per_token(card) -> float:
    """Multiply-adds per decoded token (= weights touched, experts at A/E), for the flop count."""
    return sum(params_per_token_by_type(card).values())


def params_per_token_by_type(card) -> dict[str, float]:
    """params_per_token split by the weights' GGUF type."""
    out: dict[str, float] = {}
    for t in card.tensors:
        if t.name == "token_embd.weight" and card.tensor("output.weight") is not None:
            continue  # a lookup, not a matmul
        out[t.type_name] = out.get(t.type_name, 0.0) + tensor_params_per_token(card, t)
    return out


def tensor_params_per_token(card, t) -> float:
    """Multiply-adds of tensor t a token: its weights, an expert tensor's at A/E."""
    n = math.prod(t.shape)
    return n * card.n_experts_used / card.n_experts if t.is_expert else n


# ---- rates ----------------------------------------------------------------------------------


def cpu_rate_gbs(profile, type_name: str, gpu_build: bool = False) -> float:
    """CPU bytes/s for a weight of this type at batch 1: the measured ggml matvec rate of its
    kernel family, never above the measured RAM read bandwidth. `gpu_build`: the weight stays
    in RAM while the run uses a GPU; llama.cpp then keeps it in the GPU's host buffer (or the
    file's map), never in the CPU repack buffer, so the plain layout's rate applies
    (`"<family>:plain"` in the profile; docs/cost-model.md, 'CPU weights of a GPU run')."""
    rates = profile.cpu_matvec_gbs or {}
    family = RATE_FAMILY.get(type_name, "Q4_K")
    # MXFP4 (gpt-oss's experts), the K-quants, Q5_0 and Q4_1 have their own kernels, measured
    # by `moechat profile` since issue 20; profiles without them take FAMILY_FALLBACK's rate
    rate = (rates.get(family) or rates.get(FAMILY_FALLBACK.get(family, "Q4_0")) or rates.get("Q4_0")
            or profile.ram_read_gbs)
    if gpu_build:
        rate = rates.get(f"{family}{PLAIN}") or rate
    return min(rate, profile.ram_read_gbs) if profile.ram_read_gbs else rate


def gpu_mem_gbs(profile) -> float:
    if not profile.gpus:
        return 0.0
    g = profile.gpus[0]
    if g.unified:
        return g.mem_gbs or profile.ram_read_gbs
    return g.mem_gbs or FALLBACK_GPU_MEM_GBS


def h2d_gbs(profile) -> float:
    if not profile.gpus:
        return 0.0
    g = profile.gpus[0]
    if g.h2d_gbs:
        return g.h2d_gbs
    if g.pcie_gen and g.pcie_width:  # nominal per-lane GB/s x width x ~80% achieved
        per_lane = {3: 0.985, 4: 1.969, 5: 3.938}.get(g.pcie_gen, 0.985)
        return per_lane * g.pcie_width * 0.8
    return FALLBACK_H2D_GBS


def gpu_capacity_bytes(profile) -> int:
    """VRAM the planner may fill: free VRAM less a reserve; on unified memory, a share of RAM."""
    if not profile.gpus:
        return 0
    if profile.gpus[0].unified:
        return int(profile.ram.total_bytes * UNIFIED_GPU_FRACTION)
    return max(0, sum(g.vram_free_bytes - VRAM_RESERVE_BYTES for g in profile.gpus))


def ram_capacity_bytes(profile) -> int:
    return int(profile.ram.available_bytes * RAM_HEADROOM)


# ---- placement -> where each tensor lives -----------------------------------------------------


def on_gpu(card, t, placement: Placement) -> bool:
    kind, n = placement.kind, placement.n
    if kind == "cpu":
        return False
    if t.name == "token_embd.weight":  # llama.cpp keeps the input embedding on the CPU
        return False
    if kind == "gpu":
        return True
    if kind == "layers":
        if t.layer is None:
            return n > card.n_layers  # output goes to the GPU only with -ngl > L
        return t.layer >= card.n_layers - n
    if kind == "moe":
        return not (t.is_expert and t.layer is not None and t.layer < n)
    # fiddler / hobbit: dense weights on the GPU; experts are split per expert (below)
    return not t.is_expert


def memory(card, placement: Placement, n_ctx: int) -> tuple[int, int]:
    """(RAM bytes, VRAM bytes) needed: weights where they live, KV cache and buffers."""
    kv = kv_bytes(card, n_ctx, placement)
    if placement.kind == "cpu":
        return card.tensor_bytes + kv + compute_buffer_bytes(card) + RUNTIME_OVERHEAD_BYTES, 0
    ram = vram = 0
    for t in card.tensors:
        if placement.kind in ("fiddler", "hobbit") and t.is_expert:
            resident = t.n_bytes * placement.n / max(1, card.n_experts)
            vram += resident
            ram += t.n_bytes if placement.kind == "fiddler" else t.n_bytes - resident
            continue
        if on_gpu(card, t, placement):
            vram += t.n_bytes
        else:
            ram += t.n_bytes
    if placement.kind == "layers":
        kv_gpu = kv * min(placement.n, card.n_layers) // max(1, card.n_layers)
        ram += kv - kv_gpu + compute_buffer_bytes(card) // 4
        vram += kv_gpu
    else:
        vram += kv
    vram += compute_buffer_bytes(card)
    return int(ram + RUNTIME_OVERHEAD_BYTES), int(vram)


# ---- speed ----------------------------------------------------------------------------------


def predict(card, profile, placement: Placement, routing: Routing | None = None,
            n_ctx: int = 4096, n_past: int = 0, n_prompt: int = N_UBATCH) -> Prediction:
    """Predicted prefill/decode tok/s and memory of one placement on one machine."""
    routing = routing or Routing()
    ram, vram = memory(card, placement, n_ctx)
    terms: dict[str, float] = {}

    def add(term: str, seconds: float) -> None:
        if seconds:
            terms[term] = terms.get(term, 0.0) + seconds

    gpu_gbs, link_gbs = gpu_mem_gbs(profile), h2d_gbs(profile)
    uses_gpu = placement.kind != "cpu"
    # a llama.cpp build that can use a (discrete) GPU keeps its CPU weights in the GPU's host
    # buffer even for a CPU-only placement (-ngl 0): unrepacked, as in a split
    gpu_build = uses_gpu or bool(profile.gpus and profile.gpu_offload and not profile.gpus[0].unified)
    if uses_gpu and not profile.gpus:  # nothing to predict: the planner marks it unfit
        return Prediction(0.0, 0.0, ram, vram)
    fiddler_layers: dict[int, list[float]] = {}  # layer -> [GPU s, CPU s]: overlapped per layer
    for t in card.tensors:
        nbytes = read_bytes_per_token(card, t)
        if t.is_expert and placement.kind in ("fiddler", "hobbit"):
            hit = routing.resident_hit_rate(t.layer or 0, placement.n, card.n_experts)
            if placement.kind == "fiddler":
                # the engine runs decode misses on a CPU worker while the GPU computes its
                # resident experts (backends/offload/fiddler_experts.py): per layer, the max
                side = fiddler_layers.setdefault(t.layer or 0, [0.0, 0.0])
                side[0] += nbytes * hit / (gpu_gbs * 1e9)
                side[1] += nbytes * (1 - hit) / (cpu_rate_gbs(profile, t.type_name) * 1e9)
            else:
                add("experts in VRAM", nbytes * hit / (gpu_gbs * 1e9))
                # a miss loads the file's weights for the important experts (the top-1
                # always) and the low copy for the rest (HOBBIT: 67% / 33% on Mixtral)
                low = min(1.0, _hobbit_low_bits(t.type_name) / BITS.get(t.type_name, 4.5))
                share = HOBBIT_HIGH_SHARE + (1 - HOBBIT_HIGH_SHARE) * low
                add("expert misses over PCIe", nbytes * (1 - hit) * share / (link_gbs * 1e9))
        elif uses_gpu and on_gpu(card, t, placement):
            add("weights in VRAM", nbytes / (gpu_gbs * 1e9))
        else:
            add("weights in RAM (CPU)", nbytes / (cpu_rate_gbs(profile, t.type_name, gpu_build=gpu_build) * 1e9))
    for gpu_s, cpu_s in fiddler_layers.values():
        add("experts GPU ‖ CPU (overlapped)", max(gpu_s, cpu_s))
    add("KV cache", kv_read_bytes(card, n_past) / ((gpu_gbs if uses_gpu else profile.ram_read_gbs) * 1e9))
    _add_overheads(card, profile, placement, add)
    decode_s = sum(terms.values())
    return Prediction(
        prefill_tok_s=1.0 / prefill_seconds_per_token(card, profile, placement, n_prompt),
        decode_tok_s=1.0 / decode_s,
        ram_bytes=ram,
        vram_bytes=vram,
        decode_terms=terms,
    )


def cpu_layer_overhead_s(profile) -> float:
    """Per-layer CPU overhead: ops per layer x the profile's measured cost per ggml op, plus the
    fixed per-layer remainder a layer costs beyond them (CPU_LAYER_OVERHEAD_S: docs/cost-model.md,
    'Constants' - it was once counted per token)."""
    return OPS_PER_LAYER * profile.cpu_op_s + CPU_LAYER_OVERHEAD_S


def _add_overheads(card, profile, placement: Placement, add) -> None:
    L, kind = card.n_layers, placement.kind
    if kind == "cpu":
        add("overheads", CPU_TOKEN_OVERHEAD_S + OPS_PER_TOKEN * profile.cpu_op_s + L * cpu_layer_overhead_s(profile))
        return
    add("overheads", GPU_TOKEN_OVERHEAD_S + L * GPU_LAYER_OVERHEAD_S)
    if kind == "moe":  # each CPU-expert layer: CPU ops + two activation hand-offs
        n = min(placement.n, len(card.expert_layers))
        add("overheads", n * (EXPERT_OPS_PER_LAYER * profile.cpu_op_s + 2 * HANDOFF_S))
    elif kind == "layers":
        cpu_layers = max(0, L - placement.n)
        add("overheads", cpu_layers * cpu_layer_overhead_s(profile) + (HANDOFF_S if 0 < cpu_layers < L else 0))
    elif kind in ("fiddler", "hobbit"):
        add("overheads", L * (TORCH_LAYER_OVERHEAD_S + (2 * HANDOFF_S if kind == "fiddler" else 0)))


def prefill_seconds_per_token(card, profile, placement: Placement, n_prompt: int = N_UBATCH,
                              cpu_gemm_gflops: dict[str, float] | None = None) -> float:
    """Seconds a prompt token, for a prompt of n_prompt tokens in micro-batches of N_UBATCH;
    llama.cpp projects only the last token onto the vocabulary (its logits). cpu_gemm_gflops
    (type family -> GFLOPS) replaces the CPU's one rate with per-type GEMM rates (a what-if of
    benchmarks/cpu_prefill_rate.py; no profile measures them yet)."""
    n = max(1, n_prompt)
    batches = [N_UBATCH] * (n // N_UBATCH) + ([n % N_UBATCH] if n % N_UBATCH else [])
    out = card.tensor("output.weight") or card.tensor("token_embd.weight")  # tied: the embedding
    seconds = sum(_micro_batch_seconds(card, profile, placement, b, out, cpu_gemm_gflops) for b in batches)
    if out is not None:  # one token's projection, read from wherever the weight lives
        on_the_gpu = placement.kind != "cpu" and profile.gpus and on_gpu(card, out, placement)
        seconds += out.n_bytes / ((gpu_mem_gbs(profile) if on_the_gpu else profile.ram_read_gbs) * 1e9)
    return seconds / n


def _touched(card, t, b: int) -> float:
    """Share of tensor t's bytes a micro-batch of b tokens reads (experts: uniform routing)."""
    if not t.is_expert:
        return 1.0
    return 1.0 - (1.0 - card.n_experts_used / max(1, card.n_experts)) ** b


def _micro_batch_seconds(card, profile, placement: Placement, b: int, out, cpu_gemm_gflops=None) -> float:
    """Compute-bound at b tokens, plus each weight read once (from RAM on the CPU; copied over
    PCIe when a GPU run offloads a RAM weight's matmul, which ggml does from 32 tokens).
    `out` (the vocabulary projection) is left to the caller: one token a prompt."""
    cpu_flops = max(profile.cpu_gflops, 1.0) * 1e9 * CPU_PREFILL_EFFICIENCY
    gpu = profile.gpus[0] if profile.gpus else None
    gpu_flops = ((gpu.tflops if gpu else 0.0) or 20.0) * 1e12 * GPU_PREFILL_EFFICIENCY
    torch_engine = placement.kind in ("fiddler", "hobbit")
    seconds = 0.0
    for t in card.tensors:
        if out is not None and t.name in (out.name, "token_embd.weight"):
            continue  # the projection is counted once a prompt; the embedding is a lookup
        flops = 2 * tensor_params_per_token(card, t) * b
        if gpu is None or placement.kind == "cpu":
            where = "cpu"
        elif torch_engine:
            where = "missed" if t.is_expert else "gpu"
        elif on_gpu(card, t, placement):
            where = "gpu"
        else:  # a RAM weight: ggml copies it over and multiplies there from 32 tokens
            where = "copied" if b >= OP_OFFLOAD_MIN_BATCH else "cpu"
        if where == "cpu":
            rate = cpu_flops
            if cpu_gemm_gflops:
                family = RATE_FAMILY.get(t.type_name, "Q4_K")
                rate = cpu_gemm_gflops.get(family, cpu_gemm_gflops.get("Q4_K", 1.0)) * 1e9
            seconds += flops / rate + t.n_bytes * _touched(card, t, b) / (profile.ram_read_gbs * 1e9)
        elif where == "copied":
            seconds += flops / gpu_flops + t.n_bytes / (h2d_gbs(profile) * 1e9)
        elif where == "missed":  # the torch engines load the missed experts to the GPU
            missed = t.n_bytes * (1 - placement.n / max(1, card.n_experts))
            seconds += flops / gpu_flops + missed / (h2d_gbs(profile) * 1e9)
        else:  # in VRAM: compute-bound, and a short batch reads the weights it touches too
            read = t.n_bytes * _touched(card, t, b) / (gpu_mem_gbs(profile) * 1e9)
            seconds += flops / gpu_flops + (read if b < OP_OFFLOAD_MIN_BATCH else 0.0)
    return seconds
