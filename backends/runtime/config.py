"""ModelArgs: the runtime's dataclass config, built from the GGUF's metadata — the same keys
the model card reads (backends/model/model_card.py) plus the ones it does not carry (RoPE, norm
epsilon, routing options)."""

from __future__ import annotations

from dataclasses import dataclass

from moechat.backends.errors import MoechatError

# llama.cpp's llama_model_rope_type(): NORM rotates adjacent pairs (x0,x1),(x2,x3)...;
# NEOX rotates (x_i, x_{i+n/2}).
ROPE_NEOX_ARCHS = ("qwen2", "qwen2moe", "qwen3", "qwen3moe", "olmoe", "phimoe", "gpt-oss")
# Whether each architecture renormalises the top-k gate weights to sum to 1 (build_moe_ffn's
# norm_w argument in llama.cpp's graph for that architecture).
NORM_TOPK_ARCHS = ("llama", "qwen3moe", "phimoe")
RUNTIME_ARCHS = ("llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek2", "phimoe", "gpt-oss")
# The gated activation between each expert's products (layers.glu), where not SwiGLU.
EXPERT_ACTIVATION = {"gpt-oss": "swiglu_oai"}


@dataclass(frozen=True, slots=True)
class ModelArgs:
    arch: str
    n_layers: int
    dim: int  # D
    n_heads: int  # H
    n_kv_heads: int  # Hkv
    head_dim: int  # Dh
    vocab_size: int  # V
    n_experts: int  # E (0: dense)
    n_experts_used: int  # A
    expert_ffn: int  # I
    rope_base: float
    rope_dims: int  # rotated dims per head (may be < head_dim)
    rope_neox: bool
    rope_scale: float  # linear position scaling (1.0: none)
    norm_eps: float
    norm_topk: bool
    expert_weights_scale: float  # 0 or 1: none
    attn_scale: float
    sliding_window: int = 0  # gpt-oss: the even layers attend to this many tokens (0: none)
    expert_activation: str = "swiglu"  # layers.glu's name
    # YaRN RoPE (rope.scaling.type "yarn"): the training context and the ramp's bounds
    rope_yarn_orig_ctx: int = 0  # 0: no YaRN
    rope_yarn_beta_fast: float = 32.0  # llama.cpp's defaults (its loader reads no key for them)
    rope_yarn_beta_slow: float = 1.0

    def __post_init__(self):
        assert self.n_heads % self.n_kv_heads == 0, (self.n_heads, self.n_kv_heads)
        assert 0 < self.rope_dims <= self.head_dim and self.rope_dims % 2 == 0
        assert self.n_experts == 0 or 0 < self.n_experts_used <= self.n_experts

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0


def model_args(metadata: dict, tensors: dict) -> ModelArgs:
    """From a GGUF's metadata and tensor table (GGUFWeights.metadata / .tensors)."""
    arch = metadata.get("general.architecture", "?")
    name = metadata.get("general.name", arch)
    if arch not in RUNTIME_ARCHS:
        raise MoechatError(
            f"{name}: the torch runtime does not support {arch!r} yet "
            f"(it runs {', '.join(RUNTIME_ARCHS)}; use --engine llama.cpp)"
        )

    def get(key, default=None):
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise MoechatError(f"{name}: GGUF metadata lacks {arch}.{key}")
        return max(value) if isinstance(value, list) else value  # per-layer arrays

    dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", dim // n_heads))
    if arch == "deepseek2":  # MLA: key_length is the cached latent's; *_mla are the heads'
        head_dim = int(get("attention.key_length_mla", head_dim))
    elif int(get("attention.value_length", head_dim)) != head_dim:
        raise MoechatError(f"{name}: different K and V head sizes are not supported")
    scaling = get("rope.scaling.type", "none")
    # YaRN: every architecture's tables come from runtime/rope.py; every other non-linear
    # scaling is refused
    if scaling not in ("none", "linear", "yarn"):
        raise MoechatError(f"{name}: RoPE scaling {scaling!r} is not supported by the torch runtime")
    factor = float(get("rope.scaling.factor", 1.0) or 1.0) if scaling != "none" else 1.0
    yarn_ctx = int(get("rope.scaling.original_context_length", 0) or 0)
    n_experts = int(get("expert_count", 0))
    up = tensors.get("blk.0.ffn_up_exps.weight")
    return ModelArgs(
        arch=arch,
        n_layers=int(get("block_count")),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        vocab_size=int(tensors["token_embd.weight"].shape[1]),
        n_experts=n_experts,
        n_experts_used=int(get("expert_used_count", 0)),
        expert_ffn=int(get("expert_feed_forward_length", up.shape[1] if up else 0)),
        rope_base=float(get("rope.freq_base", 10000.0)),
        rope_dims=int(get("rope.dimension_count", head_dim)),
        rope_neox=arch in ROPE_NEOX_ARCHS,
        rope_scale=1.0 / factor,
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        norm_topk=bool(get("expert_weights_norm", arch in NORM_TOPK_ARCHS)),
        expert_weights_scale=float(get("expert_weights_scale", 0.0) or 0.0),
        attn_scale=float(get("attention.scale", 0.0) or 0.0) or head_dim**-0.5,
        sliding_window=int(get("attention.sliding_window", 0) or 0),
        expert_activation=EXPERT_ACTIVATION.get(arch, "swiglu"),
        rope_yarn_orig_ctx=(yarn_ctx or int(get("context_length", 4096))) if scaling == "yarn" and factor != 1.0 else 0,
    )
