"""ModelArgs: the runtime's dataclass config, built from the model card plus the few GGUF
keys the card does not carry (RoPE, norm epsilon, routing options)."""

from __future__ import annotations

from dataclasses import dataclass

from moechat.backends.errors import MoechatError
from moechat.backends.model_card import ModelCard

# llama.cpp's llama_model_rope_type(): NORM rotates adjacent pairs (x0,x1),(x2,x3)...;
# NEOX rotates (x_i, x_{i+n/2}).
ROPE_NEOX_ARCHS = ("qwen2", "qwen2moe", "qwen3", "qwen3moe", "olmoe")
# Whether each architecture renormalises the top-k gate weights to sum to 1 (build_moe_ffn's
# norm_w argument in llama.cpp's graph for that architecture).
NORM_TOPK_ARCHS = ("llama", "qwen3moe")
RUNTIME_ARCHS = ("llama", "qwen2moe", "qwen3moe", "olmoe")


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

    def __post_init__(self):
        assert self.n_heads % self.n_kv_heads == 0, (self.n_heads, self.n_kv_heads)
        assert 0 < self.rope_dims <= self.head_dim and self.rope_dims % 2 == 0
        assert self.n_experts == 0 or 0 < self.n_experts_used <= self.n_experts

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0


def model_args(card: ModelCard, metadata: dict) -> ModelArgs:
    """`metadata`: the GGUF's key -> value map (GGUFWeights.metadata)."""
    arch = card.architecture
    if arch not in RUNTIME_ARCHS:
        raise MoechatError(
            f"{card.name}: the torch runtime does not support {arch!r} yet "
            f"(it runs {', '.join(RUNTIME_ARCHS)}; use --engine llama.cpp)"
        )

    def get(key, default):
        return metadata.get(f"{arch}.{key}", default)

    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise MoechatError(f"{card.name}: RoPE scaling {scaling!r} is not supported by the torch runtime")
    head_dim = card.head_dim_k
    if card.head_dim_v != head_dim:
        raise MoechatError(f"{card.name}: different K and V head sizes are not supported")
    factor = float(get("rope.scaling.factor", 1.0) or 1.0) if scaling == "linear" else 1.0
    attn_scale = float(get("attention.scale", 0.0) or 0.0)
    return ModelArgs(
        arch=arch,
        n_layers=card.n_layers,
        dim=card.hidden_size,
        n_heads=card.n_heads,
        n_kv_heads=card.n_kv_heads,
        head_dim=head_dim,
        vocab_size=card.vocab_size,
        n_experts=card.n_experts,
        n_experts_used=card.n_experts_used,
        expert_ffn=card.expert_ffn_size,
        rope_base=float(get("rope.freq_base", 10000.0)),
        rope_dims=int(get("rope.dimension_count", head_dim)),
        rope_neox=arch in ROPE_NEOX_ARCHS,
        rope_scale=1.0 / factor,
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        norm_topk=bool(get("expert_weights_norm", arch in NORM_TOPK_ARCHS)),
        expert_weights_scale=float(get("expert_weights_scale", 0.0) or 0.0),
        attn_scale=attn_scale or head_dim**-0.5,
    )
