"""Bad inputs of the simulator (``dwdp_ops.sim``) found in review: each test failed on the code before its fix (an
OverflowError, a ZeroDivisionError or a silent wrong answer far from the cause). CPU only."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from dwdp_ops.sim import analysis, cli, costs, model
from dwdp_ops.sim.workload import request_lengths

HUGE = 10**400  # an integer beyond floats' range: what a JSON file's 401-digit literal parses to


def _shipped(name: str = "h200") -> str:
    from importlib import resources

    return resources.files("dwdp_ops.sim").joinpath("calibration", f"{name}.json").read_text()


@pytest.mark.parametrize("make, name", [
    (lambda: costs.Overrides(fetch_gbps=HUGE), "fetch_gbps"),
    (lambda: costs.Overrides(dispatch_latency_us=HUGE), "dispatch_latency_us"),
    (lambda: costs.Overrides(interference=HUGE), "interference"),
    (lambda: model.SimConfig(cv=HUGE), "cv"),
    (lambda: model.SimConfig(owner_load=(1, HUGE)), "owner_load"),
    (lambda: request_lengths(2, 8192, cv=HUGE, rng=np.random.default_rng(0)), "cv"),
    (lambda: analysis.validate([], tolerance=HUGE), "tolerance"),
])
def test_an_integer_beyond_floats_range_is_refused_naming_the_argument(make, name):
    """math.isfinite(10**400) raises OverflowError ("int too large to convert to float"), which named nothing."""
    with pytest.raises(ValueError, match=rf"^{name}"):
        make()


def test_a_calibration_file_with_an_integer_beyond_floats_range_is_refused(tmp_path, capsys):
    """A 401-digit rate in a --calibration file had given a traceback (OverflowError) instead of an error line."""
    text = re.sub(r'"gbps": [0-9.]+', '"gbps": ' + str(HUGE), _shipped(), count=1)
    path = tmp_path / "cal.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"fetch\.gbps must be a finite number > 0"):
        costs.load_calibration(path)
    with pytest.raises(SystemExit) as e:
        cli.main(["--calibration", str(path), "--layers", "2", "--iterations", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "argument --calibration" in err[-1] and "fetch.gbps" in err[-1]


def test_a_validation_file_with_an_integer_beyond_floats_range_is_refused(tmp_path, capsys):
    """A 401-digit measured iteration_ms in a --validate file had given a traceback (OverflowError)."""
    result = {"dtype": "bfloat16", "points": [{"mode": "dwdp", "N": 2, "cv": 0, "max_tokens": 8192, "isl": 8192,
                                               "layers": 2, "iterations": 1, "iteration_ms": HUGE,
                                               "tps_per_gpu": 1000.0}]}
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps(result))
    with pytest.raises(ValueError, match=r"^measured point 0: measured iteration_ms must be a finite number"):
        analysis.validate_e2e(result)
    with pytest.raises(SystemExit) as e:
        cli.main(["--validate", str(path)])
    assert e.value.code == 2
    assert "argument --validate: measured point 0" in capsys.readouterr().err


@pytest.mark.parametrize("isl", [2**63, 10**300, 10**400], ids=["2^63", "10^300", "10^400"])
@pytest.mark.parametrize("src", [dict(ratio=0.5), dict(cv=0), dict(cv=0.5)])
def test_request_lengths_refuse_an_isl_beyond_int64(isl, src):
    """The lengths are int64: isl = 10**300 with cv 0.5 had given every request -2^63 tokens (a RuntimeWarning from
    numpy's cast, nothing else), 2**63 "high is out of bounds for int64" or "Python int too large to convert to C
    long", 10**400 an OverflowError; none named isl."""
    with pytest.raises(ValueError, match=r"^isl must be an integer in \[1, 2\*\*63 - 1\]"):
        request_lengths(2, isl, rng=np.random.default_rng(0), **src)
    top = request_lengths(2, 2**63 - 1, rng=np.random.default_rng(0), **(src if "ratio" in src else dict(cv=0)))
    assert top.min() >= 1


def test_a_gamma_draw_beyond_int64_is_refused_not_wrapped():
    """A draw of the gamma above 2^63 tokens (isl 2^62, cv 5: a tail of many times the mean) had been cast to
    -2^63 with a RuntimeWarning and no error."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"cv=5.*isl=4611686018427387904.*int64"):
            request_lengths(1000, 2**62, cv=5, rng=np.random.default_rng(0))


def _rates(cal: dict, scale: float) -> dict:
    """Every rate of ``cal`` times ``scale`` and its fixed costs 0 (in place)."""
    c = cal
    c["dense_gemm"]["tflops"] *= scale
    for p in c["expert_gemm"]["points"] + c["attention"]["core_points"] + c["attention"].get("equal_length_points", []):
        p["tflops"] *= scale
    c["attention"]["others_ns_per_token"] = 0
    for p in c["others"]["points"]:
        p["ns_per_token"] = 0
    c["dispatch"]["latency_us"] = 0
    c["dispatch"]["gbps"] *= scale
    c["fetch"]["gbps"] *= scale
    return c


@pytest.mark.parametrize("edit", [
    lambda c: c["weights"].__setitem__("expert_bytes", 1e308),  # DWDP's fetch inf: its TPS/GPU 0, ratio 0.0
    lambda c: c["dense_gemm"].__setitem__("tflops", 1e-320),  # ZeroDivisionError: TPS/GPU 0 in both modes
    lambda c: _rates(c, 1e296),  # numpy overflow warnings, compute 0 but the fetch: ratio 0.248
], ids=["expert_bytes", "dense_tflops", "all_rates"])
def test_a_calibration_whose_times_are_not_finite_numbers_is_refused(edit):
    """Each value passed the schema (a finite number > 0) but made an iteration time inf or 0: simulate had returned
    ratio 0.0 and an iteration of inf ms (json.dumps writes Infinity, not JSON), raised ZeroDivisionError, or
    returned a ratio of 0.248 after numpy's overflow warnings (every compute time rounded to 0, not the fetch)."""
    import warnings

    cal = costs.load_calibration("h200")
    edit(cal)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"^the calibration .* beyond floats' range"):
            model.simulate(model.SimConfig(layers=5, iterations=2), calibration=cal)


def test_cli_a_what_if_whose_times_are_beyond_floats_is_one_error_line(capsys):
    """--fetch-gbps 1e-310 (a number > 0) had printed a DWDP iteration of inf ms and a ratio of 0.0000."""
    with pytest.raises(SystemExit) as e:
        cli.main(["--fetch-gbps", "1e-310", "--layers", "5", "--iterations", "2"])
    assert e.value.code == 2
    out = capsys.readouterr()
    assert out.out == ""
    err = out.err.strip().splitlines()
    assert "error: " in err[-1] and "fetch_gbps" in err[-1] and "beyond floats' range" in err[-1]


@pytest.mark.parametrize("kw, name", [(dict(cvs=None), "cvs"), (dict(cvs=0.1), "cvs"), (dict(cvs="0.1"), "cvs"),
                                      (dict(budgets=16384), "budgets"), (dict(budgets="16384"), "budgets"),
                                      (dict(budgets=None), "budgets")])
def test_sweep_refuses_a_cvs_or_budgets_that_is_not_a_sequence_naming_it(kw, name):
    """cvs=None or budgets=16384 had raised a bare "object is not iterable"; budgets="16384" (a string, iterated
    by character) "max_tokens must be an integer >= 1, got '1'", naming neither the argument nor what it expects."""
    with pytest.raises(TypeError, match=rf"^{name} must be a sequence of numbers"):
        analysis.sweep(layers=2, iterations=1, **kw)
    assert len(analysis.sweep(layers=2, iterations=1, cvs=(0.1,), budgets=[8192], ratio=None)) == 1
    rows = analysis.sweep(layers=2, iterations=1, cvs=(c for c in (0.0, 0.1)), budgets=np.array([8192, 16384]),
                          ratio=None)  # a generator of cvs had given the CV rows of the first budget only
    assert [(r["max_tokens"], r["cv"]) for r in rows] == [(8192, 0.0), (8192, 0.1), (16384, 0.0), (16384, 0.1)]


RESULTS = __import__("pathlib").Path(__file__).resolve().parents[1] / "bench" / "results"


def _results_with(tmp_path, name: str, edit) -> None:
    """The calibration's input files copied to ``tmp_path``, ``edit`` applied to ``name``'s JSON."""
    import shutil

    from dwdp_ops.sim import calibrate

    for n in calibrate._CHECKS:
        shutil.copy(RESULTS / n, tmp_path / n)
    data = json.loads((tmp_path / name).read_text())
    edit(data)
    (tmp_path / name).write_text(json.dumps(data))


@pytest.mark.skipif(not (RESULTS / "deepseek_forward_H200_N2.json").is_file(), reason="bench/results not here")
@pytest.mark.parametrize("name, edit, field", [
    ("deepseek_forward_H200_N2.json", lambda d: d["ranks"][0]["rows"][0].update(tokens=HUGE),
     "ranks[0].rows[0].tokens"),  # OverflowError: int too large to convert to float
    ("deepseek_forward_H200_N2.json", lambda d: [r.update(requests=HUGE) for rk in d["ranks"] for r in rk["rows"]],
     "ranks[0].rows[0].requests"),  # ZeroDivisionError (T / requests rounded to 0.0)
    ("deepseek_forward_H200_N2.json", lambda d: d.update(layers=HUGE, moe_layers=HUGE), "layers"),  # OverflowError
    ("attention_probe_H200.json", lambda d: d["records"][0].update(S=HUGE), "records[0].S"),  # OverflowError
    ("attention_probe_H200.json", lambda d: [r.update(lengths=[10**300] * len(r["lengths"])) for r in d["records"]
                                             if r["kind"] == "mix"], ".lengths"),  # "cannot convert float NaN"
])
def test_calibrate_refuses_an_integer_beyond_int64_naming_the_field(tmp_path, capsys, name, edit, field):
    """A whole number too large passed calibrate's integer check, then failed where it was used: OverflowError or
    ZeroDivisionError tracebacks from ``python -m dwdp_ops.sim.calibrate`` (main catches ValueError only), or a
    ValueError naming no field. Now a ValueError naming the file and the field; the command exits 2, one line."""
    from dwdp_ops.sim import calibrate

    _results_with(tmp_path, name, edit)
    with pytest.raises(ValueError, match=r"must be an? .*integers? in \[1, 2\*\*63 - 1\]") as e:
        calibrate.h200_calibration(tmp_path)
    assert str(e.value).startswith(str(tmp_path / name)) and field in str(e.value), str(e.value)
    with pytest.raises(SystemExit) as e:
        calibrate.main(["--results", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("python -m dwdp_ops.sim.calibrate: error: ") and field in err[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (RESULTS / "deepseek_forward_H200_N2.json").is_file(), reason="bench/results not here")
def test_calibrate_takes_an_integer_up_to_int64(tmp_path):
    """The bound is 2**63 - 1, as for the workload's isl: an equal-length record of that many requests is read."""
    from dwdp_ops.sim import calibrate

    _results_with(tmp_path, "attention_probe_H200.json",
                  lambda d: [r.update(requests=2**63 - 1) for r in d["records"] if r["kind"] == "equal"])
    assert calibrate.h200_calibration(tmp_path)["attention"]["equal_length_points"]


@pytest.mark.parametrize("first, exc", [(1.5, TypeError), (2.0, TypeError), (True, TypeError), ("3", TypeError),
                                        (None, TypeError), (-1, ValueError)])
@pytest.mark.parametrize("fn", ["iter_batches", "batch_requests"])
def test_batching_refuses_a_first_request_that_is_not_an_integer_ge_0(fn, first, exc):
    """first_request was never checked: 1.5 gave request ids 1.5, 2.5, ..., True ids 1, 2, ..., -1 the id -1."""
    from dwdp_ops.sim.workload import batch_requests, iter_batches

    f = {"iter_batches": iter_batches, "batch_requests": batch_requests}[fn]
    with pytest.raises(exc, match=rf"^first_request must be an integer >= 0, got {re.escape(repr(first))}"):
        f([3, 4], 8, first_request=first)  # iter_batches: at the call, not at the first next()


def test_batching_takes_a_numpy_first_request_as_a_python_int():
    from dwdp_ops.sim.workload import batch_requests

    its = batch_requests([3, 4], 8, first_request=np.int64(5))
    assert [c.request for c in its[0].chunks] == [5, 6] and all(type(c.request) is int for c in its[0].chunks)


@pytest.mark.parametrize("points", [5, None, 2.5, {"mode": "dwdp"}, "points"],
                         ids=["int", "None", "float", "dict", "str"])
def test_validate_refuses_measured_points_that_are_not_a_collection_of_points(points):
    """validate(5) had raised a bare "'int' object is not iterable"; a single point (a dict) or a string had been
    iterated into its keys / characters ("measured point 0 must be an object ..., got str 'mode'")."""
    with pytest.raises(TypeError, match=r"^measured_points must be a list \(or other iterable\) of point objects"):
        analysis.validate(points)


def test_sweep_rows_hold_python_numbers_for_numpy_budgets_and_cvs():
    """Each budget and CV was stored as given: numpy integers in the rows, which json.dumps refuses ("Object of
    type int64 is not JSON serializable")."""
    rows = analysis.sweep(layers=2, iterations=1, cvs=np.array([0.0, 0.1], dtype=np.float32),
                          budgets=np.array([8192]), ratio=np.float32(0.8))
    json.dumps(rows)
    assert all(type(r["max_tokens"]) is int for r in rows)
    assert [type(r.get("cv", r.get("input_ratio"))) for r in rows] == [float] * 3
