"""The benchmark harness's order of interleaved ops (bench/common.py ``_order``) and the co-action roofline's byte
count (bench/coaction_bench.py ``roofline``): host logic, no GPU."""

from __future__ import annotations

import os
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import common  # noqa: E402


@pytest.mark.parametrize("n", [2, 3, 10])
def test_every_repeat_runs_every_op_once_in_an_order_fixed_by_the_repeat(n):
    names = [f"op{i}" for i in range(n)]
    for r in range(30):
        order = common._order(names, r)
        assert sorted(order) == names
        assert order == common._order(list(names), r)  # what every rank draws


def test_no_op_always_follows_the_same_op():
    """The flaw of the rotation it replaces: there, op k always ran right behind op k - 1 (its time then carries
    whatever that op leaves behind). Over 10 repeats of 10 ops each op here follows at least 4 different ops."""
    names = [f"op{i}" for i in range(10)]
    before: dict[str, Counter] = {n: Counter() for n in names}
    seq = [n for r in range(10) for n in common._order(names, r)]
    for a, b in zip(seq, seq[1:]):
        before[b][a] += 1
    assert min(len(c) for c in before.values()) >= 4


def test_coaction_roofline_counts_only_what_the_op_must_move(monkeypatch):
    """Masked positions' feed rows and ids are not read (by the kernels, nor by any op that needs only the valid
    ones): the byte count grows with the valid positions and the whole mask, not with B x T rows."""
    try:
        import cupy  # noqa: F401  (the benchmark module imports it at the top; roofline itself is pure)
    except ImportError:
        monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    monkeypatch.delitem(sys.modules, "coaction_bench", raising=False)
    import coaction_bench
    from dwdp_ops.coaction import CoActionSpec

    spec = CoActionSpec()
    B, T = 8192, 100
    full, half = coaction_bench.roofline(spec, B, T, B * T), coaction_bench.roofline(spec, B, T, B * T // 2)
    D, Di, O = spec.feed_dim, spec.induction_dim, spec.out_dim
    assert full["fwd_bytes"] == 4 * (B * Di + B * T * D + B * O) + 8 * (B + B * T) + 4 * B * T
    assert full["fwd_bytes"] - half["fwd_bytes"] == (B * T // 2) * (4 * D + 8)  # a row and an id per valid position
    assert full["step_bytes"] - half["step_bytes"] == (B * T // 2) * (2 * (4 * D + 8) + 2 * 4 * D)
    assert half["fwd_flops"] * 2 == full["fwd_flops"] and half["step_flops"] == 3 * half["fwd_flops"]


def _fake_cupy():
    """Just what ``machine_facts`` asks of cupy (no GPU here)."""
    rt = types.SimpleNamespace(getDeviceProperties=lambda i: {"name": b"Fake GPU", "multiProcessorCount": 7},
                               runtimeGetVersion=lambda: 12080)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=rt, Device=lambda: types.SimpleNamespace(id=0)))


def test_machine_facts_gives_up_on_a_hung_nvidia_smi(monkeypatch, tmp_path):
    """``machine_facts`` ran ``nvidia-smi`` without a timeout (a hung driver hung the benchmark before it measured
    anything); it now has ``nvlink_facts``' limit (NVIDIA_SMI_TIMEOUT_S, 30 s; 0.5 s here) and records no driver."""
    import time

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexec sleep 30\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy())
    monkeypatch.setattr(common, "NVIDIA_SMI_TIMEOUT_S", 0.5, raising=False)
    t0 = time.monotonic()
    facts = common.machine_facts()
    assert time.monotonic() - t0 < 10
    assert facts["driver"] is None and facts["card"] == "Fake GPU" and facts["sms"] == 7
    assert common.nvlink_facts()["links"] == 0  # the sibling, with the same limit
    smi.write_text("#!/bin/sh\necho 570.86.15\n")  # an answering one is still read
    assert common.machine_facts()["driver"] == "570.86.15"
