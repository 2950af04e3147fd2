"""Model card: what a GGUF file holds, read from its header alone (no tensor data).

`read_model_card(path)` is the one entry point. Every number the planner and the engines
need about a model comes from here: geometry, expert counts, each tensor's type and bytes,
and derived byte counts (expert vs dense weights, bytes read per decoded token, KV-cache
bytes per token). Bad files fail with a one-line MoechatError before anything is loaded.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from moechat.backends.errors import MoechatError
from moechat.backends.model.gguf_header import GGUFHeader, HeaderError, parse_header

# Architectures moechat knows (GGUF `general.architecture`) and whether they are MoE.
MOE_ARCHITECTURES = ("llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek2", "gpt-oss", "phimoe")
DENSE_ARCHITECTURES = ("llama", "qwen2", "qwen3")
SUPPORTED_ARCHITECTURES = tuple(dict.fromkeys(MOE_ARCHITECTURES + DENSE_ARCHITECTURES))

# llama.cpp's LLM_FFN_EXPS_REGEX: the stacked routed-expert tensors (weights and biases).
EXPERT_TENSOR_RE = re.compile(r"\.ffn_(up|down|gate|gate_up)_(ch|)exps")
LAYER_RE = re.compile(r"^blk\.(\d+)\.")
SPLIT_NAME_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")

GGUF_MAGIC = b"GGUF"
MAX_TENSORS = 1_000_000  # more than any real model has, by orders of magnitude
MAX_KV_PAIRS = 100_000


# The torch runtime's sliding-window KV ring holds window + this many positions
# (backends/runtime/swa_cache.py reads it from here, so the card and the cache agree).
SWA_CACHE_SLACK = 256

@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    type_name: str  # GGML type, e.g. "Q4_K", "F16"
    shape: tuple[int, ...]  # GGUF order: ne0 (innermost) first
    n_bytes: int
    offset: int  # absolute byte offset of the data in the file
    shard: int = 0  # which file of a split GGUF holds it (0 = the first or only file)

    @property
    def layer(self) -> int | None:
        m = LAYER_RE.match(self.name)
        return int(m.group(1)) if m else None

    @property
    def is_expert(self) -> bool:
        return EXPERT_TENSOR_RE.search(self.name) is not None


@dataclass(frozen=True)
class ModelCard:
    path: str
    file_bytes: int
    architecture: str
    name: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim_k: int
    head_dim_v: int
    context_length: int
    vocab_size: int
    ffn_size: int  # dense FFN size (0 when every layer is MoE and the key is absent)
    n_experts: int  # routed experts per layer (0 for dense models)
    n_experts_used: int  # experts each token is routed to
    n_shared_experts: int
    expert_ffn_size: int
    kv_lora_rank: int  # deepseek2 MLA; 0 elsewhere
    tensors: tuple[TensorInfo, ...]
    # MLA files (deepseek2 as converted today) store the latent as one KV head of
    # head_dim_k = kv_lora_rank + rope dims; these are the per-head sizes it expands to.
    # 0 when absent, e.g. older deepseek2 files with an unsplit attn_kv_b (cached as MHA).
    head_dim_k_mla: int = 0
    head_dim_v_mla: int = 0
    # sliding-window attention: the window, and how many layers use it (they still get a
    # full-size cache, see kv_bytes_per_token, but attend to - and read - only the window)
    sliding_window: int = 0
    n_swa_layers: int = 0
    # bits of one cached K/V value: 16 (f16, what moechat's engines allocate); a run with
    # llama.cpp's `-ctk/-ctv q8_0` caches 8.5 (the published-runs table sets it per run)
    kv_bits: float = 16.0

    # ---- derived ---------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def expert_bytes(self) -> int:
        """Bytes of all routed-expert tensors (what --n-cpu-moe moves to RAM)."""
        return sum(t.n_bytes for t in self.tensors if t.is_expert)

    @property
    def dense_bytes(self) -> int:
        """Bytes of everything else: attention, norms, routers, shared experts, embeddings."""
        return self.tensor_bytes - self.expert_bytes

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    def expert_bytes_of_layer(self, layer: int) -> int:
        return sum(t.n_bytes for t in self.tensors if t.is_expert and t.layer == layer)

    @property
    def expert_layers(self) -> tuple[int, ...]:
        return tuple(sorted({t.layer for t in self.tensors if t.is_expert and t.layer is not None}))

    @property
    def bytes_per_expert(self) -> int:
        """Bytes of one expert of one layer (all its projections)."""
        if not self.is_moe:
            return 0
        return self.expert_bytes // (len(self.expert_layers) * self.n_experts)

    @property
    def embedding_read_bytes_per_token(self) -> int:
        """The token embedding is a lookup: one row is read per token."""
        embd = self.tensor("token_embd.weight")
        return embd.n_bytes // max(1, self.vocab_size) if embd else 0

    @property
    def dense_active_bytes_per_token(self) -> int:
        """Non-expert bytes read per decoded token (the embedding table counts once, as the
        output projection, only when the model ties the two)."""
        embd = self.tensor("token_embd.weight")
        tied = self.tensor("output.weight") is None
        skip = 0 if (tied or embd is None) else embd.n_bytes - self.embedding_read_bytes_per_token
        return self.dense_bytes - skip

    @property
    def active_expert_bytes_per_token(self) -> int:
        if not self.is_moe:
            return 0
        return self.expert_bytes * self.n_experts_used // self.n_experts

    @property
    def active_bytes_per_token(self) -> int:
        """Weight bytes read to decode one token: dense part + the used fraction of experts."""
        return self.dense_active_bytes_per_token + self.active_expert_bytes_per_token

    @property
    def is_mla(self) -> bool:
        """llama.cpp's test (llama_hparams::is_mla): both MLA head sizes are in the file."""
        return self.head_dim_k_mla > 0 and self.head_dim_v_mla > 0

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer at kv_bits (f16 unless set), as llama.cpp allocates them.
        MLA caches only the latent (kv_lora_rank + rope dims, one "head") as K and no V; sliding-window layers
        count in full because llama-cpp-python allocates full-size SWA caches (swa_full)."""
        values = self.head_dim_k if self.is_mla else self.head_dim_k + self.head_dim_v
        return int(self.n_layers * self.n_kv_heads * values * self.kv_bits / 8)

    @property
    def n_sliding_layers(self) -> int:
        """Layers with a sliding window: llama.cpp's pattern 2 for gpt-oss (layers 0, 2, ...)."""
        return (self.n_layers + 1) // 2 if self.sliding_window else 0

    def kv_bytes(self, n_ctx: int, sliding_capped: bool = False) -> int:
        """KV cache bytes at a context of n_ctx tokens. llama.cpp (llama-cpp-python, which
        allocates SWA caches full-size) holds every layer for n_ctx tokens; moechat's torch
        runtime (`sliding_capped`) holds a sliding layer's window plus SWA_CACHE_SLACK slots."""
        per_layer = self.kv_bytes_per_token // max(1, self.n_layers)
        if not sliding_capped or not self.sliding_window:
            return self.kv_bytes_per_token * n_ctx
        n_slide = self.n_sliding_layers
        kept = min(n_ctx, self.sliding_window + SWA_CACHE_SLACK)
        return per_layer * ((self.n_layers - n_slide) * n_ctx + n_slide * kept)

    def tensor(self, name: str) -> TensorInfo | None:
        for t in self.tensors:
            if t.name == name:
                return t
        return None


def read_model_card(path: str | os.PathLike) -> ModelCard:
    """Read a GGUF's metadata and tensor table; raise MoechatError (one line) if unusable.

    For a split GGUF (`-00001-of-00003.gguf`, the first shard) the other shards' headers
    are read too, so the card describes the whole model."""
    path = Path(path).expanduser()
    file_bytes = _check_file(path)
    header = _read_local_header(path)
    headers, sizes = [header], [file_bytes]
    for shard in split_shard_paths(path, header)[1:]:
        sizes.append(_check_file(shard))
        headers.append(_read_local_header(shard))
    return card_from_headers(str(path), headers, sizes)


def split_shard_paths(path: Path, header: GGUFHeader) -> list[Path]:
    """All shard paths of a split GGUF given its first shard ([path] when not split)."""
    count = header.metadata.get("split.count") or 1
    if count <= 1:
        return [path]
    if header.metadata.get("split.no", 0) != 0:
        raise MoechatError(f"{path}: a later shard of a split GGUF; give the first (-00001-of-...)")
    names = split_shard_names(path.name, count)
    if names is None:
        raise MoechatError(f"{path}: split GGUF ({count} shards) whose name lacks -00001-of-{count:05d}")
    return [path.with_name(name) for name in names]


def split_shard_names(first_name: str, count: int | None = None) -> list[str] | None:
    """`x-00001-of-00003.gguf` -> the three shard names; None if the name is not a first shard."""
    m = SPLIT_NAME_RE.search(first_name)
    if not m or int(m.group(1)) != 1 or (count is not None and int(m.group(2)) != count):
        return None
    total = int(m.group(2))
    stem = first_name[: m.start()]
    return [f"{stem}-{i:05d}-of-{total:05d}.gguf" for i in range(1, total + 1)]


def card_from_headers(path: str, headers: list[GGUFHeader], file_sizes: list[int]) -> ModelCard:
    """Build the card from parsed headers (one per shard; metadata from the first). Shared by
    local files and remote header-only reads; `path` names the model in messages."""
    meta = _Metadata(headers[0].metadata)
    arch = meta.str("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise MoechatError(
            f"{path}: unsupported architecture {arch!r} "
            f"(moechat supports {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    tensors = []
    for shard, (header, file_bytes) in enumerate(zip(headers, file_sizes)):
        shard_tensors = [
            TensorInfo(name=t.name, type_name=t.type_name, shape=t.shape, n_bytes=t.n_bytes,
                       offset=t.offset, shard=shard)
            for t in header.tensors
        ]
        end = max((t.offset + t.n_bytes for t in shard_tensors), default=0)
        if end > file_bytes:
            raise MoechatError(
                f"{path}: truncated GGUF: tensor data needs {end:,} bytes, the file has {file_bytes:,}"
            )
        tensors.extend(shard_tensors)
    tensors = tuple(tensors)
    file_bytes = sum(file_sizes)

    n_heads = meta.int(f"{arch}.attention.head_count")
    hidden = meta.int(f"{arch}.embedding_length")
    head_dim = hidden // n_heads if n_heads else 0
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    n_experts = meta.int(f"{arch}.expert_count", 0)
    expert_ffn = meta.int(f"{arch}.expert_feed_forward_length", 0)
    if n_experts and not expert_ffn:
        up = next((t for t in tensors if t.name.endswith("ffn_up_exps.weight")), None)
        expert_ffn = up.shape[1] if up else 0
    n_shared = meta.int(f"{arch}.expert_shared_count", 0)
    if not n_shared and any("_shexp" in t.name for t in tensors):
        n_shared = 1
    card = ModelCard(
        path=path,
        file_bytes=file_bytes,
        architecture=arch,
        name=meta.str("general.name", Path(path).stem),
        n_layers=meta.int(f"{arch}.block_count"),
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=meta.int(f"{arch}.attention.head_count_kv", n_heads),
        head_dim_k=meta.int(f"{arch}.attention.key_length", head_dim),
        head_dim_v=meta.int(f"{arch}.attention.value_length", head_dim),
        context_length=meta.int(f"{arch}.context_length", 2048),
        vocab_size=embd.shape[1] if embd and len(embd.shape) > 1 else meta.int(f"{arch}.vocab_size", 0),
        ffn_size=meta.int(f"{arch}.feed_forward_length", 0),
        n_experts=n_experts,
        n_experts_used=meta.int(f"{arch}.expert_used_count", 0),
        n_shared_experts=n_shared,
        expert_ffn_size=expert_ffn,
        kv_lora_rank=meta.int(f"{arch}.attention.kv_lora_rank", 0),
        tensors=tensors,
        head_dim_k_mla=meta.int(f"{arch}.attention.key_length_mla", 0),
        head_dim_v_mla=meta.int(f"{arch}.attention.value_length_mla", 0),
        sliding_window=(window := meta.int(f"{arch}.attention.sliding_window", 0)),
        n_swa_layers=swa_layer_count(arch, meta.int(f"{arch}.block_count"), window),
    )
    _check_geometry(card)
    return card


def swa_layer_count(arch: str, n_layers: int, window: int) -> int:
    """Layers with sliding-window attention, by llama.cpp's per-architecture pattern
    (gpt-oss: every other layer, `set_swa_pattern(2)`); 0 for architectures without one."""
    if not window:
        return 0
    return (n_layers + 1) // 2 if arch == "gpt-oss" else 0


# ---- validation ---------------------------------------------------------------------------


def _check_file(path: Path) -> int:
    if not path.exists():
        raise MoechatError(f"{path}: no such file")
    if path.is_dir():
        raise MoechatError(f"{path}: is a directory, not a GGUF file")
    size = path.stat().st_size
    if size == 0:
        raise MoechatError(f"{path}: empty file")
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != GGUF_MAGIC:
        raise MoechatError(f"{path}: not a GGUF file (bad magic {head[:4]!r})")
    if len(head) < 24:
        raise MoechatError(f"{path}: truncated GGUF header ({size} bytes)")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise MoechatError(f"{path}: unsupported GGUF version {version}")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV_PAIRS:
        raise MoechatError(
            f"{path}: corrupt GGUF header (claims {n_tensors:,} tensors and {n_kv:,} metadata keys)"
        )
    return size


def _read_local_header(path: Path) -> GGUFHeader:
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            return parse_header(f.read, MAX_TENSORS, MAX_KV_PAIRS)
    except HeaderError as err:
        raise MoechatError(f"{path}: corrupt or truncated GGUF ({err})") from err


def _check_geometry(card: ModelCard) -> None:
    problems = []
    if card.n_layers <= 0 or card.n_layers > 10_000:
        problems.append(f"{card.n_layers} layers")
    if card.hidden_size <= 0 or card.n_heads <= 0:
        problems.append(f"hidden size {card.hidden_size}, {card.n_heads} heads")
    if card.n_experts and not (0 < card.n_experts_used <= card.n_experts):
        problems.append(f"{card.n_experts_used} of {card.n_experts} experts used")
    if card.architecture in DENSE_ARCHITECTURES and card.architecture not in MOE_ARCHITECTURES:
        if card.n_experts:
            problems.append(f"{card.architecture} with experts")
    if card.architecture != "llama" and card.architecture in MOE_ARCHITECTURES and not card.n_experts:
        problems.append(f"{card.architecture} without experts")
    if problems:
        raise MoechatError(f"{card.path}: implausible model geometry ({'; '.join(problems)})")


class _Metadata:
    """Typed access to GGUF key/value pairs."""

    def __init__(self, metadata: dict):
        self._fields = metadata

    def _value(self, key: str):
        return self._fields.get(key)

    def str(self, key: str, default: str | None = None) -> str:
        value = self._value(key)
        if value is None:
            if default is None:
                raise MoechatError(f"GGUF metadata lacks {key!r}")
            return default
        return str(value)

    def int(self, key: str, default: int | None = None) -> int:
        value = self._value(key)
        if value is None:
            if default is None:
                raise MoechatError(f"GGUF metadata lacks {key!r}")
            return default
        if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv): take the largest
            return int(max(value)) if value else (default or 0)
        return int(value)
