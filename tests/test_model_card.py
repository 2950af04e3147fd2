"""The model card reads back exactly what the tiny fixtures wrote, its derived byte counts agree
with an independent computation from the fixture's spec, and llama.cpp agrees with both: it
loads every fixture, reports the same hyperparameters, allocates the KV cache the card
predicts and returns finite logits over the whole vocabulary."""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import replace

import gguf
import numpy as np
import pytest
from fixtures.tiny_models import (
    ARCHITECTURES,
    MOE_ARCHITECTURES,
    RAW_K_QUANT_TYPES,
    RECIPE_VERSION,
    _random_k_quant,
    build_tiny_model,
    spec_for,
    tensor_plan,
    tiny_model_path,
)

from moechat.backends.model.demo_model import smollm2_path
from moechat.backends.model.model_card import read_model_card

MIB = 1 << 20
N_CTX = 4096  # big enough that the logged KV size (MiB, 2 decimals) pins bytes per token

# Every architecture in F32, plus quantized experts across architectures: each type once.
QUANT_CASES = [
    ("qwen3moe", "F16"),
    ("llama-moe", "Q8_0"),
    ("qwen2moe", "Q4_0"),
    ("gpt-oss", "MXFP4"),
    ("deepseek2", "Q4_K"),
    ("olmoe", "Q6_K"),
    ("phimoe", "Q5_K"),
    ("qwen3", "Q4_K"),  # dense: the FFN weights take the "expert" type
]
CASES = [(arch, "F32") for arch in ARCHITECTURES] + QUANT_CASES
CASE_IDS = [f"{a}-{t}" for a, t in CASES]


def type_bytes(type_name: str, n_elements: int) -> int:
    block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    assert n_elements % block == 0
    return n_elements // block * block_bytes


def expected_attention(spec):
    """(KV heads, K head dim, V head dim) as the file must state them. MLA stores its latent
    as one KV head of kv_lora_rank + rope dims (K) and kv_lora_rank (V)."""
    if spec.gguf_arch == "deepseek2" and spec.mla_split:
        return 1, spec.kv_lora_rank + spec.rope_dim, spec.kv_lora_rank
    return spec.n_kv_heads, spec.head_dim, spec.v_dim


def expected_expert_bytes_per_layer(spec, expert_type: str) -> int:
    """Routed experts of one MoE layer: gate, up [E, F, D] and down [E, D, F], plus gpt-oss's
    F32 expert biases [E, F] x 2 and [E, D]."""
    E, F, D = spec.n_experts, spec.expert_ffn, spec.hidden
    n = 3 * type_bytes(expert_type, E * F * D)
    if spec.gguf_arch == "gpt-oss":
        n += 4 * E * (2 * F + D)
    return n


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def case(request, tiny_model):
    arch, expert_type = request.param
    path = tiny_model(arch, expert_type)
    return arch, expert_type, spec_for(arch, expert_type), path, read_model_card(path)


# ---- what the builder wrote ------------------------------------------------------------------


def test_card_geometry_is_what_was_written(case):
    arch, expert_type, spec, path, card = case
    n_kv, hk, hv = expected_attention(spec)
    assert card.architecture == spec.gguf_arch
    assert card.path == str(path)
    assert card.file_bytes == path.stat().st_size
    assert (card.n_layers, card.hidden_size, card.n_heads) == (spec.n_layers, spec.hidden, spec.n_heads)
    assert (card.n_kv_heads, card.head_dim_k, card.head_dim_v) == (n_kv, hk, hv)
    assert card.context_length == spec.context
    assert card.vocab_size == spec.vocab
    assert (card.n_experts, card.n_experts_used) == (spec.n_experts, spec.n_used)
    assert card.n_shared_experts == spec.n_shared
    assert card.expert_ffn_size == spec.expert_ffn
    assert card.kv_lora_rank == spec.kv_lora_rank
    assert card.is_moe == (arch in MOE_ARCHITECTURES)
    assert card.expert_layers == spec.expert_layers


def test_card_tensor_table_is_what_was_written(case):
    arch, expert_type, spec, path, card = case
    plan = tensor_plan(spec)
    assert [t.name for t in card.tensors] == [t.name for t in plan]
    for written, read in zip(plan, card.tensors):
        if written.role in ("expert", "ffn"):
            want_type = expert_type
        else:
            want_type = "F16" if written.role == "embd" else "F32"
        assert read.type_name == want_type, read.name
        assert read.shape == tuple(reversed(written.shape)), read.name  # GGUF order: ne0 first
        assert read.n_bytes == type_bytes(want_type, int(np.prod(written.shape))), read.name
        assert read.is_expert == (written.role in ("expert", "expert_bias")), read.name
    # tensor data: in file order, aligned, not overlapping, inside the file
    ends = 0
    for t in sorted(card.tensors, key=lambda t: t.offset):
        assert t.offset % 32 == 0 and t.offset >= ends, t.name
        ends = t.offset + t.n_bytes
    assert ends <= card.file_bytes


# ---- derived values, computed independently from the spec ------------------------------------


def test_card_derived_bytes(case):
    arch, expert_type, spec, path, card = case
    embd_bytes = 2 * spec.vocab * spec.hidden  # F16 table
    per_layer = expected_expert_bytes_per_layer(spec, expert_type) if spec.is_moe else 0
    expert = per_layer * len(spec.expert_layers)

    assert card.expert_bytes == expert
    assert card.expert_bytes + card.dense_bytes == card.tensor_bytes
    assert card.tensor_bytes == sum(t.n_bytes for t in card.tensors)
    assert card.tensor_bytes < card.file_bytes  # plus header, tokenizer, padding
    for layer in range(spec.n_layers):
        assert card.expert_bytes_of_layer(layer) == (per_layer if layer in spec.expert_layers else 0)
    assert card.bytes_per_expert == (per_layer // spec.n_experts if spec.is_moe else 0)

    # one token reads: the used share of each expert layer, every other weight once, and of
    # an untied embedding table only its row (a tied one is read whole, as the output layer)
    used_experts = expert * spec.n_used // spec.n_experts if spec.is_moe else 0
    rest = card.tensor_bytes - expert
    if not spec.tied_embeddings:
        rest -= embd_bytes - embd_bytes // spec.vocab
    assert card.embedding_read_bytes_per_token == 2 * spec.hidden
    assert card.active_expert_bytes_per_token == used_experts
    assert card.active_bytes_per_token == rest + used_experts

    n_kv, hk, hv = expected_attention(spec)
    if spec.gguf_arch == "deepseek2" and spec.mla_split:
        kv = spec.n_layers * (spec.kv_lora_rank + spec.rope_dim) * 2  # f16 latent, no V
    else:
        kv = spec.n_layers * n_kv * (hk + hv) * 2
    assert card.kv_bytes_per_token == kv


# ---- llama.cpp agrees ------------------------------------------------------------------------


def load_llama(path, n_ctx=N_CTX):
    """Load with llama.cpp, returning the model and its log (hyperparameters, KV size). The log
    goes through moechat's own llama.cpp log hook, echoed to the (captured) stderr: whichever
    test ran before, llama.cpp's hook is then ours, not llama-cpp-python's."""
    import llama_cpp

    from moechat.backends.engines.llamacpp_log import install_log

    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        install_log(echo=True)
        try:
            llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=2, n_batch=64, verbose=True,
                                  logits_all=True)  # fmt: skip
        finally:
            install_log(echo=False)
    return llm, log.getvalue()


def logged_hparams(log: str) -> dict[str, str]:
    return {k: v.strip() for k, v in re.findall(r"print_info: (\w+) += (.*)", log)}


def logged_kv_mib(log: str) -> float:
    """Total KV cache llama.cpp allocated (sliding-window models log two caches)."""
    sizes = re.findall(r"llama_kv_cache: size = +([\d.]+) MiB", log)
    assert sizes, "no KV cache size in llama.cpp's log"
    return sum(float(s) for s in sizes)


def check_llama_agrees(card, path):
    llm, log = load_llama(path)
    try:
        hp = logged_hparams(log)
        assert hp["arch"] == card.architecture
        assert int(hp["n_layer"]) == card.n_layers
        assert int(hp["n_embd"]) == card.hidden_size
        assert int(hp["n_head"]) == card.n_heads
        assert int(hp["n_head_kv"]) == card.n_kv_heads
        assert int(hp["n_embd_head_k"]) == card.head_dim_k
        assert int(hp["n_embd_head_v"]) == card.head_dim_v
        assert int(hp["n_ctx_train"]) == card.context_length
        assert int(hp["n_vocab"]) == card.vocab_size == llm.n_vocab()
        assert int(hp.get("n_expert", 0)) == card.n_experts
        assert int(hp.get("n_expert_used", 0)) == card.n_experts_used
        if "n_ff_exp" in hp:
            assert int(hp["n_ff_exp"]) == card.expert_ffn_size
        if "n_expert_shared" in hp:
            assert int(hp["n_expert_shared"]) == card.n_shared_experts
        if "n_lora_kv" in hp:
            assert int(hp["n_lora_kv"]) == card.kv_lora_rank
        # the KV cache llama.cpp allocated, to the 2 decimals it logs
        assert logged_kv_mib(log) == pytest.approx(card.kv_bytes_per_token * N_CTX / MIB, abs=0.011)

        tokens = llm.tokenize(b"The capital of France is", add_bos=True)
        llm.eval(tokens)
        logits = np.asarray(llm.scores[: len(tokens)])  # [T, vocab]
        assert logits.shape == (len(tokens), card.vocab_size)
        assert np.isfinite(logits).all()
        assert logits.std() > 0  # random weights, so not a constant
    finally:
        llm.close()


def test_llama_cpp_loads_and_agrees_with_card(case):
    arch, expert_type, spec, path, card = case
    check_llama_agrees(card, path)


def test_legacy_deepseek2_kv_cache_is_full_attention(tmp_path):
    """Older deepseek2 GGUFs keep attn_kv_b unsplit and have no *_mla keys: llama.cpp then
    caches full per-head K and V, not the latent (the card once assumed MLA for any
    kv_lora_rank and under-counted these files' KV cache 6x)."""
    spec = replace(spec_for("deepseek2"), mla_split=False, n_kv_heads=4)
    path = build_tiny_model("deepseek2", tmp_path / "ds2-legacy.gguf", spec=spec)
    card = read_model_card(path)
    assert not card.is_mla and card.kv_lora_rank == spec.kv_lora_rank
    assert card.kv_bytes_per_token == spec.n_layers * 4 * (spec.head_dim + spec.v_dim) * 2
    check_llama_agrees(card, path)


# ---- the fixtures themselves ---------------------------------------------------------------------


def test_tokenizer_and_chat_template_are_smollm2s(tiny_model):
    """Every tokenizer.* key was copied: llama.cpp tokenizes as SmolLM2 does, and the chat
    template is SmolLM2's."""
    import llama_cpp

    text = "Hello, world! Ünïcode, <|im_start|>user\ncode: `x = 1`<|im_end|>"
    models = [llama_cpp.Llama(str(p), vocab_only=True, verbose=False)
              for p in (tiny_model("deepseek2"), smollm2_path())]  # fmt: skip
    ours, theirs = (m.tokenize(text.encode(), add_bos=True, special=True) for m in models)
    assert ours == theirs and len(ours) > 10
    assert models[0].detokenize(ours, special=True).decode() == text
    template = models[0].metadata["tokenizer.chat_template"]
    assert template == models[1].metadata["tokenizer.chat_template"] and "im_start" in template
    for m in models:
        m.close()


def test_fixture_is_cached_by_recipe_version(tiny_model):
    path = tiny_model("olmoe")
    assert f"v{RECIPE_VERSION}" in path.name and path.parent.name == "fixtures"
    mtime = path.stat().st_mtime_ns
    assert tiny_model_path("olmoe") == path
    assert path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert not list(path.parent.glob(f"{path.name}.part*"))  # no temp file left behind


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = build_tiny_model("llama-moe", tmp_path / "a.gguf", "Q4_0", seed=3)
    b = build_tiny_model("llama-moe", tmp_path / "b.gguf", "Q4_0", seed=3)
    c = build_tiny_model("llama-moe", tmp_path / "c.gguf", "Q4_0", seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_size == c.stat().st_size and a.read_bytes() != c.read_bytes()
    assert not list(tmp_path.glob("*.part*"))


def read_tensor(card, name: str) -> np.ndarray:
    """A tensor's dequantized values, read at the card's offset (checks the offsets too)."""
    t = card.tensor(name)
    qtype = gguf.GGMLQuantizationType[t.type_name]
    raw = np.fromfile(card.path, np.uint8, count=t.n_bytes, offset=t.offset)
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows = raw.reshape(-1, t.shape[0] // block * block_bytes)
    if t.type_name in ("F32", "F16"):
        rows = rows.view(np.float32 if t.type_name == "F32" else np.float16)
    return gguf.quants.dequantize(rows, qtype).reshape(tuple(reversed(t.shape)))


def test_expert_weights_decode_to_finite_values_of_the_intended_spread(case):
    """Quantized experts come from gguf.quants or, for K-quants (which gguf-py cannot
    quantize), random blocks with set fp16 scales: all must decode to sane weights."""
    arch, expert_type, spec, path, card = case
    layer = spec.expert_layers[0] if spec.is_moe else 0
    name = f"blk.{layer}.ffn_down{'_exps' if spec.is_moe else ''}.weight"
    weights = read_tensor(card, name)
    assert card.tensor(name).type_name == expert_type
    assert np.isfinite(weights).all()
    assert 0.03 < weights.std() < 0.08  # WEIGHT_STD 0.05


@pytest.mark.parametrize("expert_type", RAW_K_QUANT_TYPES)
def test_random_k_quant_blocks_decode_to_finite_values(expert_type):
    blocks = _random_k_quant((4, 8, 512), expert_type, np.random.default_rng(0))  # [E, rows, bytes]
    qtype = gguf.GGMLQuantizationType[expert_type]
    weights = gguf.quants.dequantize(blocks, qtype)
    assert weights.shape == (4, 8, 512)
    assert np.isfinite(weights).all() and 0.03 < weights.std() < 0.08


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        spec_for("mamba")
    with pytest.raises(ValueError, match="unknown expert type"):
        spec_for("qwen3moe", "Q4_K_M")
