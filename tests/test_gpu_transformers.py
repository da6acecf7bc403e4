"""Hugging Face DeepSeek-V3 with DWDP experts on 2 GPUs: the same greedy tokens as the model as shipped."""

from __future__ import annotations

import pytest
from conftest import GPU_COUNT

pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")


@pytest.mark.multigpu(n=2)
@pytest.mark.parametrize("policy", ["prefetch_all", "on_demand"])
def test_hugging_face_deepseek_v3_on_dwdp_generates_the_same_tokens(run_ranks, policy):
    if GPU_COUNT < 2:
        pytest.skip(f"needs 2 GPUs; found {GPU_COUNT}")
    proc = run_ranks(2, "hf_check.py", policy, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert proc.stdout.count(": OK") == 2 and "MISMATCH" not in proc.stdout
