"""bench/decode_breakdown.py on the CPU: the kernel-name categories and the dry run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import decode_breakdown as db  # noqa: E402


def test_categories_and_dry_run(capsys):
    assert db.category("void cutlass::device_kernel<f8f8bf16_grouped::Kernel>") == "expert GEMMs (grouped)"
    assert db.category("quant_rows_kernel<__nv_bfloat16>") == "fp8 quantisation (ours)"
    assert db.category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n") == "dense GEMMs"
    assert db.category("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>") == "attention softmax"
    assert db.category("void at::native::index_elementwise_kernel<128, 4>") == "indexing (gather / scatter / sort)"
    assert db.category("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>") == \
        "elementwise and reductions"
    assert db.category("my_kernel") == "other"
    assert db.main(["--dry-run", "--moe-layers", "2"]) == 0 and "5 layers" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        db.parse(["--steps", "0"])
    assert info.value.code == 2 and "--moe-layers, --prompts and --steps must be >= 1" in capsys.readouterr().err
