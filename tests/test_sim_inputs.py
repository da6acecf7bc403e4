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
