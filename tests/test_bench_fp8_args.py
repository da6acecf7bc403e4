"""The host-side parts of the fp8 modes of bench/deepseek_forward.py and bench/prefetch_overlap.py (issue 13): argument
parsing, result file names, rows per expert and the roofline T* arithmetic. The benchmarks themselves need GPUs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def load(name: str):
    sys.path.insert(0, str(ROOT / "bench"))  # the benches import bench/common.py
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def overlap():
    pytest.importorskip("cupy")
    return load("prefetch_overlap")


@pytest.fixture(scope="module")
def forward():
    pytest.importorskip("torch")
    return load("deepseek_forward")


def test_deepseek_forward_dtype_argument_and_file_name(forward, capsys):
    ns = forward.parse_args([])
    assert ns.dtype == "bfloat16" and ns.token_counts == [4096, 16384, 32768]
    assert forward.parse_args(["--dtype", "float8_e4m3fn", "--tokens", "1024"]).dtype == "float8_e4m3fn"
    assert forward.result_suffix(2, "bfloat16") == "_N2"  # the name tests/test_sim.py and the docs read
    assert forward.result_suffix(2, "float8_e4m3fn") == "_N2_fp8"
    with pytest.raises(SystemExit) as info:
        forward.parse_args(["--dtype", "fp16"])
    assert info.value.code == 2 and "argument --dtype: invalid choice: 'fp16'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        forward.parse_args(["--tokens", "1000"])  # not a multiple of the 16 requests
    assert info.value.code == 2 and "every count must be a positive multiple of --requests (16), got 1000" in \
        capsys.readouterr().err


def test_prefetch_overlap_dtype_argument_and_file_name(overlap, capsys):
    ns = overlap.parse_args([])
    assert (ns.dtype, ns.fp8_mlp, ns.layers, ns.repeats) == ("float16", "gemms", 4, 10)
    assert ns.token_counts == [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    ns = overlap.parse_args(["--dtype", "float8_e4m3fn", "--fp8-mlp", "full", "--tokens", "8192"])
    assert (ns.dtype, ns.fp8_mlp, ns.token_counts) == ("float8_e4m3fn", "full", [8192])
    assert overlap.result_suffix(2, "float16") == "_N2"
    assert overlap.result_suffix(2, "float16", "_x") == "_N2_x"
    assert overlap.result_suffix(4, "float8_e4m3fn", "_x") == "_N4_fp8_x"
    with pytest.raises(SystemExit) as info:
        overlap.parse_args(["--dtype", "bfloat16"])
    assert info.value.code == 2 and "argument --dtype: invalid choice: 'bfloat16'" in capsys.readouterr().err


def test_rows_per_expert_are_16_aligned_in_fp8(overlap):
    assert overlap.rows_per_expert(1024, "float16") == 32
    assert overlap.rows_per_expert(100, "float16") == 3
    assert overlap.rows_per_expert(100, "float8_e4m3fn") == 16  # 3 rows -> one aligned group of 16
    assert overlap.rows_per_expert(1024, "float8_e4m3fn") == 32
    assert overlap.rows_per_expert(65536, "float8_e4m3fn") == 2048
    # fp8 activations take less memory than fp16's at the same rows (x, h, y fp16 against xq, aq, h, y)
    assert overlap.activation_bytes(65536, "float8_e4m3fn") < overlap.activation_bytes(65536, "float16")
    assert overlap.activation_bytes(65536, "float8_e4m3fn", "full") > overlap.activation_bytes(65536, "float8_e4m3fn")


def test_t_star_is_fetch_time_over_per_token_compute(overlap):
    E, L, k = 256, 128, 8
    P = 3 * 2048 * 7168  # parameters per expert
    for bpp, C, B in ((2, 661e12, 372.6), (1, 1094e12, 372.6), (1, 900e12, 400.0)):
        fetch_s = (E - L) * P * bpp / (B * 1e9)
        per_token_s = 2 * k * P / C
        assert overlap.t_star(E, L, bpp, C, B, k) == pytest.approx(fetch_s / per_token_s, rel=1e-12)
    # half the bytes at the same B and C halves T*; the fp8 rate scales it back up by C_fp8 / C_fp16
    t16 = overlap.t_star(E, L, 2, 661e12, 372.6, k)
    assert overlap.t_star(E, L, 1, 661e12, 372.6, k) == pytest.approx(t16 / 2)
    assert overlap.t_star(E, L, 1, 2 * 661e12, 372.6, k) == pytest.approx(t16)
    for rate in (0.0, -1.0, float("nan")):  # (it had divided by zero, or returned a negative or NaN T*)
        with pytest.raises(ValueError, match="positive fetch rate"):
            overlap.t_star(E, L, 2, 661e12, rate, k)


@pytest.mark.skipif(not (RESULTS / "prefetch_overlap_H200_N2.json").is_file(), reason="bench/results not here")
def test_t_star_reproduces_the_recorded_fp16_figure(overlap):
    """The function gives the T* the fp16 run recorded from its own C and B (the arithmetic did not move)."""
    r = json.loads((RESULTS / "prefetch_overlap_H200_N2.json").read_text())["ranks"][0]["roofline"]
    got = overlap.t_star(256, 128, r["bytes_per_param"], r["C_tflops"] * 1e12, r["B_gbps"], 8)
    assert got == pytest.approx(r["T_star"], rel=1e-9)
