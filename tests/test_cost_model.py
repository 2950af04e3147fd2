"""Cost model equations on real geometries (no model loaded, no timing)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moechat.backends.plan.hardware_profile import read_profile  # noqa: E402
from moechat.backends.plan import cost_model as cm  # noqa: E402
from tests.fixtures.random_geometry import geometry_card  # noqa: E402

PROFILES = Path(__file__).parent / "profiles"


@pytest.fixture(scope="module")
def rtx4090():
    return read_profile(PROFILES / "desktop-4090-ddr5.json")


@pytest.fixture(scope="module")
def laptop():
    return read_profile(PROFILES / "laptop-ddr5-nogpu.json")


def test_cpu_decode_is_bytes_over_measured_rate_plus_overheads(laptop):
    card = geometry_card("olmoe-1b-7b", qtype="Q4_0")
    p = cm.predict(card, laptop, cm.Placement("cpu"))
    # every tensor here is Q4_0 (rows of 1024/2048 columns) or F32 norms/routers
    q4 = sum(cm.read_bytes_per_token(card, t) for t in card.tensors if t.type_name == "Q4_0")
    f32 = sum(cm.read_bytes_per_token(card, t) for t in card.tensors if t.type_name == "F32")
    expected = (q4 / (laptop.cpu_matvec_gbs["Q4_0"] * 1e9) + f32 / (laptop.cpu_matvec_gbs["F16"] * 1e9)
                + cm.CPU_TOKEN_OVERHEAD_S + (cm.OPS_PER_TOKEN + card.n_layers * cm.OPS_PER_LAYER) * laptop.cpu_op_s
                + card.n_layers * cm.CPU_LAYER_OVERHEAD_S)
    assert 1 / p.decode_tok_s == pytest.approx(expected, rel=1e-3)
    assert p.vram_bytes == 0
    assert p.ram_bytes > card.tensor_bytes


def test_measured_op_cost_scales_the_overheads(laptop):
    import dataclasses

    card = geometry_card("olmoe-1b-7b", qtype="Q4_0")
    quiet = cm.predict(card, laptop, cm.Placement("cpu"))
    busy = cm.predict(card, dataclasses.replace(laptop, cpu_op_s=laptop.cpu_op_s * 10), cm.Placement("cpu"))
    extra = busy.decode_terms["overheads"] - quiet.decode_terms["overheads"]
    assert extra == pytest.approx(9 * laptop.cpu_op_s * (cm.OPS_PER_TOKEN + card.n_layers * cm.OPS_PER_LAYER))
    assert busy.decode_terms["weights in RAM (CPU)"] == quiet.decode_terms["weights in RAM (CPU)"]


def test_experts_read_at_top_k_over_e(laptop):
    card = geometry_card("qwen3-30b-a3b", n_layers=2, qtype="Q4_0")
    expert = next(t for t in card.tensors if t.is_expert)
    assert cm.read_bytes_per_token(card, expert) == pytest.approx(expert.n_bytes * 8 / 128)
    embd = card.tensor("token_embd.weight")
    assert cm.read_bytes_per_token(card, embd) == embd.n_bytes // card.vocab_size  # a lookup


def test_more_experts_in_ram_is_slower_and_needs_less_vram(rtx4090):
    card = geometry_card("mixtral-8x7b", qtype="Q4_0")
    preds = [cm.predict(card, rtx4090, cm.Placement("moe", n)) for n in (0, 4, 8, 16, 32)]
    decode = [p.decode_tok_s for p in preds]
    vram = [p.vram_bytes for p in preds]
    ram = [p.ram_bytes for p in preds]
    assert decode == sorted(decode, reverse=True)
    assert vram == sorted(vram, reverse=True) and ram == sorted(ram)
    # moving the experts of one layer moves exactly that layer's expert bytes
    assert vram[0] - vram[1] == 4 * card.expert_bytes_of_layer(0)
    gpu = cm.predict(card, rtx4090, cm.Placement("gpu"))
    cpu = cm.predict(card, rtx4090, cm.Placement("cpu"))
    assert gpu.decode_tok_s > preds[-1].decode_tok_s > cpu.decode_tok_s


def test_gpu_decode_is_bound_by_vram_bandwidth(rtx4090):
    card = geometry_card("qwen3-30b-a3b", qtype="Q4_K")
    p = cm.predict(card, rtx4090, cm.Placement("gpu"))
    bound = rtx4090.gpus[0].mem_gbs * 1e9 / card.active_bytes_per_token
    assert p.decode_tok_s < bound  # overheads only subtract
    embd_row = card.embedding_read_bytes_per_token  # the input embedding stays in RAM
    vram_term = (card.active_bytes_per_token - embd_row) / (rtx4090.gpus[0].mem_gbs * 1e9)
    assert p.decode_terms["weights in VRAM"] == pytest.approx(vram_term, rel=1e-6)
    assert p.ram_bytes < card.tensor("token_embd.weight").n_bytes + 2 * cm.RUNTIME_OVERHEAD_BYTES


def test_routing_skew_raises_fiddler_hit_rate(rtx4090):
    card = geometry_card("mixtral-8x7b", qtype="Q4_0")
    uniform = cm.predict(card, rtx4090, cm.Placement("fiddler", 4))
    skew = cm.Routing(tuple((0.4, 0.3, 0.1, 0.1, 0.05, 0.03, 0.01, 0.01) for _ in range(32)))
    assert skew.resident_hit_rate(0, 4, 8) == pytest.approx(0.9)
    assert cm.Routing().resident_hit_rate(0, 4, 8) == pytest.approx(0.5)
    skewed = cm.predict(card, rtx4090, cm.Placement("fiddler", 4), routing=skew)
    assert skewed.decode_tok_s > uniform.decode_tok_s


def test_kv_cache_grows_memory_with_context(laptop):
    card = geometry_card("mixtral-8x7b", n_layers=4, qtype="Q4_0")
    small = cm.predict(card, laptop, cm.Placement("cpu"), n_ctx=1024)
    big = cm.predict(card, laptop, cm.Placement("cpu"), n_ctx=32768)
    assert big.ram_bytes - small.ram_bytes == card.kv_bytes_per_token * (32768 - 1024)


def test_cost_model_does_not_import_torch():
    import subprocess

    code = ("import sys; import moechat.backends.plan.cost_model, moechat.backends.plan.planner; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_sliding_window_layers_read_only_their_window(rtx4090):
    gpt_oss = geometry_card("gpt-oss-20b", qtype="Q4_0")  # 24 layers, every other one SWA (window 128)
    assert (gpt_oss.sliding_window, gpt_oss.n_swa_layers) == (128, 12)
    per_layer = gpt_oss.kv_bytes_per_token / gpt_oss.n_layers
    assert cm.kv_read_bytes(gpt_oss, 32768) == per_layer * (12 * 32768 + 12 * 128)
    assert cm.kv_read_bytes(gpt_oss, 100) == cm.kv_bytes(gpt_oss, 100)  # inside the window: all of it
    assert cm.kv_bytes(gpt_oss, 32768) == gpt_oss.kv_bytes_per_token * 32768  # the cache stays full-size
    qwen = geometry_card("qwen3-30b-a3b", qtype="Q4_K")  # no sliding window: every position is read
    assert cm.kv_read_bytes(qwen, 32768) == cm.kv_bytes(qwen, 32768)
    deep = cm.predict(gpt_oss, rtx4090, cm.Placement("gpu"), n_ctx=40000, n_past=32768)
    assert deep.decode_terms["KV cache"] == pytest.approx(cm.kv_read_bytes(gpt_oss, 32768) / (rtx4090.gpus[0].mem_gbs * 1e9))



def test_mxfp4_uses_its_own_measured_rate_else_q4_0s(laptop):
    import dataclasses

    assert "MXFP4" not in laptop.cpu_matvec_gbs  # a profile from before MXFP4 was probed
    assert cm.cpu_rate_gbs(laptop, "MXFP4") == cm.cpu_rate_gbs(laptop, "Q4_0")
    profiled = dataclasses.replace(laptop, cpu_matvec_gbs={**laptop.cpu_matvec_gbs, "MXFP4": 9.5})
    assert cm.cpu_rate_gbs(profiled, "MXFP4") == 9.5
    assert cm.cpu_rate_gbs(profiled, "Q4_0") == laptop.cpu_matvec_gbs["Q4_0"]


def test_a_gpu_runs_cpu_experts_read_at_the_plain_layouts_rate(rtx4090):
    """llama.cpp keeps the RAM-resident weights of a run that uses a GPU unrepacked (the GPU's
    host buffer comes before the CPU repack buffer), so `--n-cpu-moe` experts read at the
    profile's ':plain' rate; a CPU-only run reads the repacked rate; without a ':plain' figure
    the family's rate stands in."""
    import dataclasses

    card = geometry_card("qwen3-30b-a3b", qtype="Q4_K")
    split = cm.Placement("moe", 48)
    assert cm.cpu_rate_gbs(rtx4090, "Q4_K", gpu_build=True) == cm.cpu_rate_gbs(rtx4090, "Q4_K")  # no ':plain'
    before = cm.predict(card, rtx4090, split).decode_terms["weights in RAM (CPU)"]
    slow = rtx4090.cpu_matvec_gbs["Q4_K"] / 2
    plain = dataclasses.replace(rtx4090, cpu_matvec_gbs={**rtx4090.cpu_matvec_gbs, "Q4_K" + cm.PLAIN: slow})
    assert cm.cpu_rate_gbs(plain, "Q4_K", gpu_build=True) == slow
    assert cm.cpu_rate_gbs(plain, "Q4_K") == rtx4090.cpu_matvec_gbs["Q4_K"]
    assert cm.predict(card, plain, split).decode_terms["weights in RAM (CPU)"] == pytest.approx(2 * before)
    # a CPU-only placement repacks - unless the llama.cpp build can use the machine's GPU (-ngl 0
    # on a CUDA build still puts the CPU weights in the GPU's host buffer)
    no_offload = dataclasses.replace(plain, gpu_offload=False)
    cpu_only = cm.predict(card, no_offload, cm.Placement("cpu")).decode_terms["weights in RAM (CPU)"]
    assert cpu_only == pytest.approx(cm.predict(card, rtx4090, cm.Placement("cpu")).decode_terms["weights in RAM (CPU)"])
    assert plain.gpu_offload
    on_gpu_build = cm.predict(card, plain, cm.Placement("cpu")).decode_terms["weights in RAM (CPU)"]
    assert on_gpu_build == pytest.approx(cpu_only * 2, rel=0.05)  # experts dominate; dense weights too


def test_low_bit_k_quants_use_their_own_measured_rate_else_q4_ks(laptop):
    """Q2_K/Q3_K kernels are compute-bound at about Q4_K's weights a second, so a profile times
    them; one measured before that reads them at Q4_K's rate (not Q4_0's)."""
    import dataclasses

    assert "Q3_K" not in laptop.cpu_matvec_gbs  # a profile from before Q2_K/Q3_K were probed
    assert laptop.cpu_matvec_gbs["Q4_K"] != laptop.cpu_matvec_gbs["Q4_0"]
    assert cm.cpu_rate_gbs(laptop, "Q3_K") == min(laptop.cpu_matvec_gbs["Q4_K"], laptop.ram_read_gbs)
    timed = dataclasses.replace(laptop, cpu_matvec_gbs={**laptop.cpu_matvec_gbs, "Q2_K": 11.0, "Q3_K": 9.0})
    assert (cm.cpu_rate_gbs(timed, "Q2_K"), cm.cpu_rate_gbs(timed, "Q3_K")) == (11.0, 9.0)
    assert cm.cpu_rate_gbs(timed, "Q6_K") == cm.cpu_rate_gbs(laptop, "Q4_K")  # a K-quant not timed: Q4_K's


def test_unrepacked_legacy_quants_use_their_own_measured_rate_else_q4_0s(laptop):
    """ggml repacks Q4_0 but not Q5_0, Q5_1 or Q4_1, so a profile times Q5_0 (Q5_1 reads at its
    rate) and Q4_1; a profile measured before that reads them at Q4_0's rate, as it used to."""
    import dataclasses

    assert "Q5_0" not in laptop.cpu_matvec_gbs
    q4_0 = cm.cpu_rate_gbs(laptop, "Q4_0")
    assert cm.cpu_rate_gbs(laptop, "Q5_0") == cm.cpu_rate_gbs(laptop, "Q4_1") == q4_0
    timed = dataclasses.replace(laptop, cpu_matvec_gbs={**laptop.cpu_matvec_gbs, "Q5_0": 6.0, "Q4_1": 5.0})
    assert [cm.cpu_rate_gbs(timed, q) for q in ("Q5_0", "Q5_1", "Q4_1", "Q4_0")] == [6.0, 6.0, 5.0, q4_0]


def test_short_prompts_multiply_ram_experts_on_the_cpu_not_over_pcie(rtx4090):
    """ggml offloads a RAM weight's matmul to the GPU from 32 tokens only (offload_op): a
    shorter prompt's CPU experts cost RAM reads, not PCIe copies; a long one's, the copies."""
    import dataclasses

    card = geometry_card("qwen3-30b-a3b", n_layers=4, qtype="Q4_0")
    split = cm.Placement("moe", 4)
    slow_link = dataclasses.replace(rtx4090, gpus=(dataclasses.replace(rtx4090.gpus[0], h2d_gbs=1.0),))
    for n_prompt, link_matters in ((16, False), (512, True)):
        fast = cm.predict(card, rtx4090, split, n_prompt=n_prompt).prefill_tok_s
        slow = cm.predict(card, slow_link, split, n_prompt=n_prompt).prefill_tok_s
        assert (slow < 0.5 * fast) == link_matters, (n_prompt, fast, slow)


def test_the_prompt_is_projected_onto_the_vocabulary_once(laptop):
    """llama.cpp computes logits for the prompt's last token only: a vocabulary projection
    costs a prompt one read of its weight, not 2 x its size in flops a token."""
    import dataclasses

    card = geometry_card("qwen3-30b-a3b", n_layers=2, qtype="Q4_0")
    out = card.tensor("output.weight")
    bigger = dataclasses.replace(out, shape=(out.shape[0], out.shape[1] * 4), n_bytes=out.n_bytes * 4)
    card4 = dataclasses.replace(card, tensors=[bigger if t.name == out.name else t for t in card.tensors])
    n = 512
    t1 = 1 / cm.predict(card, laptop, cm.Placement("cpu"), n_prompt=n).prefill_tok_s
    t4 = 1 / cm.predict(card4, laptop, cm.Placement("cpu"), n_prompt=n).prefill_tok_s
    assert (t4 - t1) * n == pytest.approx(3 * out.n_bytes / (laptop.ram_read_gbs * 1e9), rel=1e-6)


def test_per_type_gemm_rates_replace_the_cpus_one_rate(laptop):
    """The what-if of benchmarks/cpu_prefill_rate.py: every type at the profile's own rate gives
    the same prefill, and a slower rate for one type slows only that type's flops."""
    card = geometry_card("olmoe-1b-7b", n_layers=2, qtype="Q4_0")
    one = laptop.cpu_gflops * cm.CPU_PREFILL_EFFICIENCY
    same = {family: one for family in set(cm.RATE_FAMILY.values())}
    base = cm.prefill_seconds_per_token(card, laptop, cm.Placement("cpu"))
    assert cm.prefill_seconds_per_token(card, laptop, cm.Placement("cpu"), cpu_gemm_gflops=same) == pytest.approx(base)
    slow_q4 = dict(same, Q4_0=one / 2)
    q4_flops = 2 * sum(cm.tensor_params_per_token(card, t) for t in card.tensors
                       if t.type_name == "Q4_0" and t.name not in ("output.weight", "token_embd.weight"))
    slower = cm.prefill_seconds_per_token(card, laptop, cm.Placement("cpu"), cpu_gemm_gflops=slow_q4)
    assert slower - base == pytest.approx(q4_flops / (one * 1e9), rel=1e-6)
