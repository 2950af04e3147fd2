"""models.toml, its loader, model-name resolution, and the header-only GGUF parser."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hub_server import write_tiny_moe
from moechat.backends.model.catalogue import catalogue_path, find, load_catalogue, suggest
from moechat.backends.errors import MoechatError

GOOD_MODEL = """
[models.m]
family = "f"
architecture = "llama"
params_total_b = 1.0
params_active_b = 0.5
context_length = 4096
license = "mit"
source = "https://example.org/m"
[models.m.quants.Q4_K_M]
repo = "org/m-GGUF"
files = ["m-Q4_K_M.gguf"]
source = "https://example.org/m-gguf"
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_moe(tmp_path_factory.mktemp("tiny") / "tiny.gguf", vocab=5000)[0]


# ---- the shipped catalogue -----------------------------------------------------------------


def test_shipped_catalogue_is_found_from_the_checkout_and_meets_the_bar(monkeypatch):
    monkeypatch.delenv("MOECHAT_CATALOGUE", raising=False)
    assert catalogue_path() == Path(__file__).resolve().parent.parent / "models.toml"
    catalogue = load_catalogue()
    assert len(catalogue) >= 8
    assert len({e.architecture for e in catalogue.values()}) >= 4
    for entry in catalogue.values():
        assert entry.source.startswith("https://"), entry.name
        assert entry.params_active_b < entry.params_total_b, entry.name
        for quant in entry.quants.values():
            assert quant.source.startswith("https://"), (entry.name, quant.quant)
            assert all(f.endswith(".gguf") for f in quant.files)


def test_shipped_catalogue_lists_every_shard_of_split_models():
    from moechat.backends.model.model_card import SPLIT_NAME_RE, split_shard_names

    for entry in load_catalogue().values():
        for quant in entry.quants.values():
            first = quant.files[0]
            if SPLIT_NAME_RE.search(first):
                folder = first.rpartition("/")[0]
                names = split_shard_names(first.rpartition("/")[2])
                assert [f"{folder}/{n}" if folder else n for n in names] == list(quant.files)
            else:
                assert len(quant.files) == 1, (entry.name, quant.quant)


def test_required_models_are_in_the_catalogue():
    names = set(load_catalogue())
    for wanted in ("qwen3-30b-a3b-instruct-2507", "qwen3-coder-30b-a3b-instruct", "gpt-oss-20b",
                   "gpt-oss-120b", "mixtral-8x7b-instruct-v0.1", "olmoe-1b-7b-0924-instruct",
                   "deepseek-v2-lite-chat", "phi-3.5-moe-instruct", "glm-4.5-air"):
        assert wanted in names
    assert any(name.startswith("granite") for name in names)


# ---- loader validation ----------------------------------------------------------------------


@pytest.mark.parametrize("broken, message", [
    (GOOD_MODEL.replace('source = "https://example.org/m-gguf"\n', ""), "quant Q4_K_M: missing 'source'"),
    (GOOD_MODEL.replace('"m-Q4_K_M.gguf"', '"m-Q4_K_M.bin"'), "files must be a list of .gguf names"),
    (GOOD_MODEL.replace('license = "mit"', 'licence = "mit"'), "unknown keys licence"),
    (GOOD_MODEL.replace('repo = "org/m-GGUF"', 'repo = "m-GGUF"'), "repo must be org/name"),
    (GOOD_MODEL.replace("context_length = 4096", 'context_length = "4k"'), "'context_length' has the wrong type"),
    (GOOD_MODEL + 'default_quant = "Q8_0"\n', "quant Q4_K_M: unknown keys default_quant"),
    (GOOD_MODEL.replace('license = "mit"', 'license = "mit"\ndefault_quant = "Q8_0"'),
     "default_quant 'Q8_0' is not one of its quants"),
    (GOOD_MODEL + "[models.m\n", "not valid TOML"),
    ("[models.m]\nfamily = 3\n", "no [models.m.quants.QUANT] tables"),
    ("title = 'x'\n", "no [models.NAME] tables"),
], ids=lambda value: value if len(value) < 60 else None)
def test_bad_catalogues_fail_on_one_line_naming_the_entry(tmp_path, broken, message):
    path = tmp_path / "models.toml"
    path.write_text(broken)
    with pytest.raises(MoechatError) as err:
        load_catalogue(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_find_and_suggest(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(GOOD_MODEL.replace("[models.m", "[models.qwen-moe"))
    catalogue = load_catalogue(path)
    entry, quant = find("qwen-moe", catalogue)
    assert entry.name == "qwen-moe" and quant.quant == "Q4_K_M"
    assert find("QWEN-MOE:q4_k_m", catalogue)[1].files == ("m-Q4_K_M.gguf",)
    assert find("llama", catalogue) is None
    with pytest.raises(MoechatError, match="has no quant 'Q2_K' \\(offered: Q4_K_M\\)"):
        find("qwen-moe:Q2_K", catalogue)
    assert suggest("qwen-mo", catalogue) == ["qwen-moe"]
    assert suggest("qwen", catalogue) == ["qwen-moe"]
    assert suggest("zzzzzz", catalogue) == []


# ---- resolution ----------------------------------------------------------------------------


def test_lookup_tells_path_hub_file_and_catalogue_apart(tmp_path, monkeypatch, tiny):
    from huggingface_hub import constants

    from moechat.backends.model.model_resolve import lookup, resolve_model

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert lookup(str(tiny)).local == tiny and not lookup(str(tiny)).on_hub
    hub_ref = lookup("org/x-GGUF:sub/x-00001-of-00002.gguf")
    assert hub_ref.repo == "org/x-GGUF" and hub_ref.local is None
    assert hub_ref.files == ("sub/x-00001-of-00002.gguf", "sub/x-00002-of-00002.gguf")
    ref = lookup("gpt-oss-120b")
    assert ref.catalogue_name == "gpt-oss-120b:MXFP4" and len(ref.files) == 3
    assert resolve_model(str(tiny)) == tiny
    with pytest.raises(MoechatError, match="run `moechat pull gpt-oss-20b`"):
        resolve_model("gpt-oss-20b")
    with pytest.raises(MoechatError, match="did you mean mixtral-8x7b-instruct-v0.1"):
        lookup("mixtral")
    assert lookup("missing/file.gguf").local == Path("missing/file.gguf")  # read_model_card reports it


# ---- header parser -------------------------------------------------------------------------


def test_header_parser_agrees_with_gguf_reader(tiny):
    import gguf

    from moechat.backends.model.model_card import read_model_card

    card = read_model_card(tiny)
    reader = gguf.GGUFReader(tiny)
    expected = [(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.n_bytes),
                 int(t.data_offset)) for t in reader.tensors]
    assert [(t.name, t.type_name, t.shape, t.n_bytes, t.offset) for t in card.tensors] == expected
    assert card.n_experts == 4 and card.n_experts_used == 2 and card.n_layers == 2
    assert card.vocab_size == 5000 and card.file_bytes == tiny.stat().st_size


def test_header_parser_errors_are_one_line(tmp_path, tiny):
    from moechat.backends.model.model_card import read_model_card

    data = tiny.read_bytes()
    cases = {
        "short-header.gguf": (data[:20_000], "corrupt or truncated GGUF (header ends early"),
        "short-data.gguf": (data[: len(data) // 2], "truncated GGUF: tensor data needs"),
        "bad-length.gguf": (data[:24] + b"\xff" * 8 + data[32:], "corrupt or truncated GGUF"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(MoechatError) as err:
            read_model_card(path)
        assert message in str(err.value) and "\n" not in str(err.value), name


def test_plan_columns_use_the_planner(tiny):
    from moechat.app.models_cmd import plan_columns
    from moechat.backends.model.model_card import read_model_card

    fits, decode = plan_columns(read_model_card(tiny))
    assert isinstance(fits, bool) and decode > 0


def test_models_command_starts_without_heavy_imports():
    import subprocess
    import sys

    code = ("import sys, moechat.app.models_cmd, moechat.app.pull_cmd, moechat.app.rm_cmd;"
            "print(sorted(m for m in ('numpy', 'torch', 'textual', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ), timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
