"""Bad inputs of the simulator's workload, cost model and calibration builder (``dwdp_ops.sim.workload``,
``costs``, ``calibrate``) found in review: each test failed on the code before its fix. CPU only."""

from __future__ import annotations

import numpy as np
import pytest
from dwdp_ops.sim.workload import request_lengths, workload


@pytest.mark.parametrize("cv", [1e-200, 1e-160, 1e155, 1e200])
def test_a_cv_whose_gamma_is_out_of_floats_range_is_refused(cv):
    """cv = 1e-160 had given every request -2^63 tokens (shape 1 / cv^2 = inf, gamma NaN, cast to int64), 1e-200 a
    ZeroDivisionError, 1e200 an OverflowError, none of them naming cv."""
    with pytest.raises(ValueError, match=r"cv=.* is out of range"):
        request_lengths(4, 8192, cv=cv, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"cv=.* is out of range"):
        workload(1, 1, 8192, 16384, cv=cv)
    for ok in (1e-150, 1e150):  # the gamma still exists in floats: lengths >= 1
        assert request_lengths(4, 8192, cv=ok, rng=np.random.default_rng(0)).min() >= 1


@pytest.mark.parametrize("kw, name", [(dict(seed=True), "seed"), (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"),
                                      (dict(seed=None), "seed"), (dict(rank=True), "rank"), (dict(rank=-1), "rank")])
def test_rank_and_seed_must_be_integers_at_least_0(kw, name):
    """seed=True had drawn the queues of seed 1 without a word; -1, 1.5 or None failed inside numpy's seeding
    ("expected non-negative integer", "object of type 'NoneType' has no len()") without naming the seed."""
    from dwdp_ops.sim.workload import rank_iterations

    args = dict(rank=0, iterations=2, isl=1024, max_tokens=4096, ratio=0.8, seed=0) | kw
    with pytest.raises(ValueError, match=rf"^{name} must be an integer >= 0, got "):
        rank_iterations(**args)
    if name == "seed":
        with pytest.raises(ValueError, match=r"^seed must be an integer >= 0"):
            workload(2, 2, 1024, 4096, ratio=0.8, seed=kw["seed"])
    assert workload(2, 2, 1024, 4096, ratio=0.8, seed=np.int64(3)) == workload(2, 2, 1024, 4096, ratio=0.8, seed=3)


@pytest.mark.parametrize("n", [True, -1, 2.5])
def test_request_count_must_be_an_integer_at_least_0(n):
    """n=-1 or 2.5 had failed inside numpy ("negative dimensions are not allowed", "expected a sequence of
    integers") without naming n."""
    with pytest.raises(ValueError, match=r"^n must be an integer >= 0, got "):
        request_lengths(n, 8192, ratio=0.8, rng=np.random.default_rng(0))
    assert request_lengths(np.int64(0), 8192, ratio=0.8, rng=np.random.default_rng(0)).size == 0


@pytest.mark.parametrize("ranks, error", [(0, ValueError), (-2, ValueError), (True, TypeError), (2.5, TypeError)])
def test_rank_factors_need_at_least_one_rank(ranks, error):
    """With a rank speed spread, rank_factors(0) and (-2) had returned one factor, [1 + s]; True one rank's [1.0];
    2.5 failed in a list multiplication."""
    from dwdp_ops.models.deepseek_r1.config import DeepSeekConfig
    from dwdp_ops.sim.costs import CostModel, Overrides, load_calibration

    m = CostModel(load_calibration("h200"), DeepSeekConfig.r1(), Overrides(rank_slowdown=0.25))
    with pytest.raises(error, match=r"^ranks must be an int >= 1, got "):
        m.rank_factors(ranks)
    assert m.rank_factors(np.int64(3)) == [0.875, 0.875, 1.25]


def test_a_calibration_file_that_is_not_text_is_refused_naming_it(tmp_path):
    """A binary file had raised UnicodeDecodeError ("'utf-8' codec can't decode byte 0xff"), naming neither the file
    nor what it should be."""
    from dwdp_ops.sim.costs import load_calibration

    bad = tmp_path / "cal.json"
    bad.write_bytes(b"\xff\xfe{\x00")
    with pytest.raises(ValueError, match=r"cal\.json is not a calibration JSON file \(not UTF-8 text"):
        load_calibration(bad)
