"""Hardware profile: facts, the cache, the `profile` command, and the measurement kernels
(on small arrays: these check that they measure, not how fast this machine is)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moechat.backends.plan import cpu_probes, gpu_probes
from moechat.backends.plan import hardware_profile as hp

PROFILES = Path(__file__).parent / "profiles"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECHAT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_facts_match_psutil():
    import psutil

    cpu = cpu_probes.cpu_facts()
    assert cpu.logical_cores == psutil.cpu_count()
    assert 1 <= cpu.usable_cores <= cpu.logical_cores
    assert set(cpu.isa) <= set(cpu_probes.ISA_FLAGS)
    assert cpu.llc_bytes >= 256 * 1024
    facts = hp.facts_profile()
    assert facts.ram.total_bytes == psutil.virtual_memory().total
    assert "nominal" in facts.sources["*"]


def test_ram_read_measures_bytes_over_time(monkeypatch):
    calls = []
    real = cpu_probes._best_time

    def spy(fn, seconds, *args):
        t = real(fn, seconds, *args)
        calls.append(t)
        return t

    monkeypatch.setattr(cpu_probes, "_best_time", spy)
    monkeypatch.setattr(cpu_probes, "MIN_STREAM_BYTES", 16 * 1024**2)
    gbs = cpu_probes.measure_ram_read_gbs(threads=2, llc_bytes=1024**2, seconds=0.05)
    assert gbs == pytest.approx(16 * 1024**2 / calls[0] / 1e9)
    assert gbs > 0


def test_ggml_matvec_rate_covers_every_type(monkeypatch):
    monkeypatch.setattr(cpu_probes, "MIN_MATVEC_BYTES", 4 * 1024**2)
    monkeypatch.setattr(cpu_probes, "_llc_bytes", lambda: 256 * 1024)
    rates, source = cpu_probes.measure_cpu_matvec_gbs(threads=1)
    assert {k.removesuffix(cpu_probes.PLAIN) for k in rates} == set(cpu_probes.MATVEC_QTYPES)
    assert all(r > 0 for r in rates.values())
    assert "ggml" in source
    # the types ggml repacks on this CPU are also timed unrepacked, as a GPU run keeps them
    from moechat.kernels import ggml

    def weight(q):  # 8 rows of 4096 columns: only the type and shape matter here
        block, block_bytes = cpu_probes.quant_block(q)
        data = ggml.aligned_empty(8 * 4096 // block * block_bytes)
        return ggml.QuantWeight(data, ggml.ggml_type_id(q), (4096, 8))

    repacked = {q for q in cpu_probes.MATVEC_QTYPES if ggml.can_repack(weight(q), ggml.REPACK_TYPES)}
    assert {k.removesuffix(cpu_probes.PLAIN) for k in rates if k.endswith(cpu_probes.PLAIN)} == repacked


def test_repacked_matvec_matches_dequantized_weights_and_op_cost_is_measured():
    import numpy as np

    from moechat.kernels import ggml, ggml_ops

    backend = ggml.CpuBackend(2)
    x = np.random.default_rng(1).standard_normal(512).astype(np.float32)
    try:
        for qtype in ("Q4_0", "Q4_K", "Q2_K"):
            w, dense = ggml_ops.random_quant_weight(qtype, 64, 512)
            if not ggml.can_repack(w, ggml.REPACK_TYPES):
                if qtype == "Q2_K":  # its repacked layout is ggml's AVX-512 path only
                    assert not ggml.lib().ggml_cpu_has_avx512()
                    continue
                pytest.skip("this CPU/build does not repack")
            matvec = ggml_ops.QuantLinear(ggml.maybe_repack(w, ggml.REPACK_TYPES), backend)
            try:
                y, ref = matvec(x), dense @ x
            finally:
                matvec.close()
            # ggml quantizes x to Q8 before the dot product (~1e-2 relative), as llama.cpp does
            assert np.abs(y - ref).max() < 2e-2 * np.abs(ref).max()
        assert not ggml.can_repack(ggml_ops.random_quant_weight("Q8_0", 64, 512)[0], ggml.REPACK_TYPES)
        assert not ggml.can_repack(ggml_ops.random_quant_weight("Q4_0", 60, 512)[0], ggml.REPACK_TYPES)
    finally:
        backend.close()
    assert 0 < cpu_probes.measure_cpu_op_s(1, seconds=0.05) < 0.1


def test_profile_is_cached_and_reused(cache, monkeypatch):
    recorded = hp.read_profile(PROFILES / "desktop-3060-ddr4.json")
    measured = []
    monkeypatch.setattr(hp, "measure_profile", lambda progress=None, cancel=None: measured.append(1) or recorded)
    first = hp.load_profile()
    second = hp.load_profile()
    assert measured == [1]  # measured once, then read from the cache
    assert second.ram_read_gbs == first.ram_read_gbs == recorded.ram_read_gbs
    hp.load_profile(refresh=True)
    assert measured == [1, 1]
    hp.profile_path().write_text("{damaged")
    hp.load_profile()
    assert measured == [1, 1, 1]  # a damaged cache is re-measured, not fatal


def test_profile_command_json_from_cache(cache):
    recorded = hp.read_profile(PROFILES / "desktop-4090-ddr5.json")
    env = {"MOECHAT_CACHE_DIR": str(cache)}
    code = ("from moechat.backends.plan import hardware_profile as hp; import sys, json; "
            "hp.write_profile(hp.HardwareProfile.from_dict(json.load(open(sys.argv[1]))), hp.profile_path())")
    import os

    env = dict(os.environ, **env)
    subprocess.run([sys.executable, "-c", code, str(PROFILES / "desktop-4090-ddr5.json")], check=True, env=env)
    r = subprocess.run([sys.executable, "-m", "moechat.app.cli", "profile", "--json"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"cpu", "ram", "gpus", "ram_read_gbs"} <= set(out)
    assert out["ram_read_gbs"] == recorded.ram_read_gbs  # from the cache, not re-measured
    r = subprocess.run([sys.executable, "-m", "moechat.app.cli", "profile"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert "RAM read" in r.stdout and "RTX 4090" in r.stdout


@pytest.mark.gpu
def test_gpu_bandwidths_measured_with_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    gpus = gpu_probes.measure_gpus(gpu_probes.gpu_facts())
    assert gpus and all(g.h2d_gbs > 0 and g.mem_gbs > 0 for g in gpus)
