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


RESULTS = __import__("pathlib").Path(__file__).resolve().parents[1] / "bench" / "results"
FWD, OVL, DSP, FB, PRB = ("deepseek_forward_H200_N2.json", "prefetch_overlap_H200_N2.json",
                          "dispatch_bandwidth_H200_N2.json", "fetch_bandwidth_H200_N2_bfloat16.json",
                          "attention_probe_H200.json")


def _rows(j):
    return [row for rk in j["ranks"] for row in rk["rows"]]


@pytest.mark.skipif(not (RESULTS / FWD).is_file(), reason="bench/results not here")
@pytest.mark.parametrize("name, breakage, field", [
    (FWD, lambda j: j.pop("ranks"), "ranks must be a non-empty list of objects, got nothing (missing)"),
    (FWD, lambda j: j.update(ranks="x"), "ranks must be a non-empty list of objects, got 'x'"),
    (FWD, lambda j: j["ranks"][0]["rows"][0].update(step_ms="1"), "ranks[0].rows[0].step_ms must be a finite"),
    (FWD, lambda j: j["ranks"][0].update(dense_tflops=None), "ranks[0].dense_tflops must be a finite number > 0"),
    (FWD, lambda j: [r.update(expert_tflops=-5) for r in _rows(j)], "ranks[0].rows[0].expert_tflops must be"),
    (FWD, lambda j: j["ranks"][0]["rows"][0].update(tokens=True), "ranks[0].rows[0].tokens must be an integer"),
    (FWD, lambda j: "[]", "must hold a JSON object, got list"),
    (FWD, lambda j: "{not json", "is not valid JSON"),
    (DSP, lambda j: j.update(records=[]), "records must be a non-empty list of objects, got []"),
    (DSP, lambda j: j.update(records=j["records"][-1:]), "at least 2 records of different payloads"),
    (FB, lambda j: j.update(records=[]), "records must be a non-empty list of objects, got []"),
    (OVL, lambda j: [r.update(slowdown=[]) for r in j["ranks"]], "ranks[0].slowdown must be a non-empty list"),
    (PRB, lambda j: j["records"][1].update(lengths=[]), "records[1].lengths must be a non-empty list of integers"),
])
def test_calibration_inputs_with_a_missing_or_wrong_field_are_refused_naming_file_and_field(
        tmp_path, capsys, name, breakage, field):
    """A missing field had ended in a bare KeyError ("'ranks'"), a wrong-typed one in a TypeError or IndexError
    traceback ("string indices must be integers", "expected non-empty vector for x", "list index out of range"),
    and a negative expert GEMM rate had been replaced silently by the monotone-time rule; each is now a ValueError
    naming the file and the field, and the command exits 2 with one error line."""
    import json
    import shutil

    from dwdp_ops.sim import calibrate

    for f in RESULTS.glob("*.json"):
        if f.name in calibrate._CHECKS:
            shutil.copy(f, tmp_path / f.name)
    data = json.loads((tmp_path / name).read_text())
    out = breakage(data)
    (tmp_path / name).write_text(out if isinstance(out, str) else json.dumps(data))
    with pytest.raises(ValueError) as e:
        calibrate.h200_calibration(tmp_path)
    assert str(e.value).startswith(str(tmp_path / name)) and field in str(e.value), str(e.value)
    with pytest.raises(SystemExit) as e:
        calibrate.main(["--results", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and field in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("cv", [1e-160, 1e200])
def test_simconfig_refuses_a_cv_out_of_floats_range_up_front(cv):
    """SimConfig checked cv only as a finite number >= 0: a cv whose gamma has no float shape or scale passed it and
    was refused only when simulate() drew the workload. It is refused where the configuration is made now."""
    from dwdp_ops.sim.model import SimConfig

    with pytest.raises(ValueError, match=r"cv=.* is out of range"):
        SimConfig(cv=cv)
