"""The DWDP-vs-DEP benchmark's workload (bench/e2e_dwdp_vs_dep.py) on the CPU: the simulator's draws and batching
where no request exceeds the budget (so that measured points and predictions describe the same requests), cut to
the budget where one does, and bad arguments refused."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from dwdp_ops.sim.workload import workload

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("e2e", ROOT / "bench" / "e2e_dwdp_vs_dep.py")
e2e = importlib.util.module_from_spec(spec)
spec.loader.exec_module(e2e)


@pytest.mark.parametrize("budget, dist", [(16384, {"ratio": 0.8}), (32768, {"cv": 0.0}), (32768, {"cv": 0.1})])
def test_the_plan_is_the_simulators_workload_when_nothing_is_chunked(budget, dist):
    got = e2e.plan(2, 6, 8192, budget, dist, seed=3)
    want = workload(2, 6, 8192, budget, seed=3, **dist)
    assert all(c.prefix == 0 for rank in want for it in rank for c in it.chunks)  # nothing chunked here
    assert got == [[[c.length for c in it.chunks] for it in rank] for rank in want]


def test_long_requests_are_cut_to_the_budget_and_iterations_fit():
    p = e2e.plan(3, 20, 8192, 8192, {"cv": 0.6}, seed=1)  # gamma tails well past the budget
    assert len(p) == 3 and all(len(rank) == 20 for rank in p)
    assert all(0 < sum(it) <= 8192 and all(1 <= n <= 8192 for n in it) for rank in p for it in rank)
    assert any(n == 8192 for rank in p for it in rank for n in it)  # at least one was cut


@pytest.mark.parametrize("text, want", [("ratio0.8", {"ratio": 0.8}), ("cv0", {"cv": 0.0}), ("cv0.25", {"cv": 0.25})])
def test_distribution_names(text, want):
    assert e2e.parse_dist(text) == want


@pytest.mark.parametrize("args, msg", [(["--dists", "foo"], "ratioR or cvC"), (["--modes", "dep,x"], "subset of"),
                                       (["--iterations", "0"], "must be >= 1")])
def test_bad_arguments_exit_2_with_one_line(args, msg):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "e2e_dwdp_vs_dep.py"), "--dry-run", *args],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and msg in proc.stderr


def test_routed_pairs_per_owner_counts_each_owners_experts_over_the_layers():
    import numpy as np

    ids = [np.array([[0, 1], [2, 3]]), np.array([[3, 3], [0, 2]])]  # 4 experts, 2 ranks: rank 0 owns 0-1
    assert e2e.routed_pairs_per_owner(ids, 4, 2) == [3, 5]
    assert e2e.routed_pairs_per_owner([np.zeros((0, 8), np.int64)], 256, 4) == [0, 0, 0, 0]


def test_owner_load_point_is_the_mean_of_per_iteration_shares():
    rec = {"owner_load": [{"pairs_per_owner": [1, 3]}, {"pairs_per_owner": [2, 2]}, {"pairs_per_owner": [0, 0]}]}
    assert e2e.owner_load_point(rec) == {"owner_load": [0.75, 1.25]}
    assert e2e.owner_load_point({}) == {} and e2e.owner_load_point({"owner_load": []}) == {}


@pytest.mark.parametrize("text", ["ratio1.5", "ratio0", "ratio-0.2", "cv-0.1", "cvnan", "cvinf", "rationan"])
def test_distributions_outside_the_workloads_range_are_refused_when_parsed(text):
    """A ratio outside (0, 1] or a cv that is negative or not finite is named by parse_dist, so that main refuses it
    with one error line before any GPU work: it had parsed, and the simulator's workload raised only when the run
    drew its first plan (after the model's weights were built on every GPU; a traceback in --dry-run)."""
    with pytest.raises(ValueError, match="ratioR or cvC"):
        e2e.parse_dist(text)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "e2e_dwdp_vs_dep.py"), "--dry-run", "--dists", text],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "error:" in proc.stderr, proc.stderr


def _row(i, mode, step, comm=0.0):
    return {"owner_pairs": [4, 4] if mode == "dwdp" else None, "iteration": i, "mode": mode, "lead": mode == "dwdp",
            "tokens": 1000, "requests": 2, "step_ms": step, "attn_ms": 1.0, "experts_ms": 1.0, "wait_ms": 0.0,
            "comm_ms": comm, "copy_ms": 0.0, "attn_flops": 1e12}


def test_dwdp_over_another_mode_is_the_median_of_per_iteration_ratios():
    """The modes run interleaved per iteration on the same requests: DWDP / DEP is the median over iterations of the
    per-iteration TPS ratio, as every comparison of the project (one slow DWDP iteration moves it little); the run's
    ratio of totals is kept beside it. It had been the ratio of totals only: 0.51 here, against a median of 1.95."""
    steps = {"dwdp": [10.0, 10.0, 100.0], "dep": [20.0, 20.0, 20.0]}
    per_rank = [[_row(i, m, steps[m][i] + rank) for i in range(3) for m in ("dwdp", "dep")] for rank in range(2)]
    rec = e2e.summarise(per_rank, ["dwdp", "dep"], 16384, "ratio0.8", {"ratio": 0.8}, [1.0])
    pairs = [(20 + 21) / (10 + 11), (20 + 21) / (10 + 11), (20 + 21) / (100 + 101)]
    assert rec["dwdp_over_dep_per_iteration"] == pytest.approx(pairs)
    assert rec["dwdp_over_dep"] == pytest.approx(41 / 21)
    assert rec["dwdp_over_dep_of_totals"] == pytest.approx((20 * 3 * 2 + 3) / (120 * 2 + 3))
    assert rec["modes"]["dwdp"]["tps_per_gpu"] == pytest.approx(6000 / ((120 * 2 + 3) * 1e-3))
    assert "| 1.952 |" in e2e.table([rec])  # the table's "DWDP / this" column is the median of pairs
