"""Edge cases of the DWDP / DEP simulator (``dwdp_ops.sim``) found in review: each test failed on the code before
its fix. CPU only."""

from __future__ import annotations

import pytest
from dwdp_ops.sim.costs import Overrides
from dwdp_ops.sim.model import SimConfig, simulate

SAME_GPUS = Overrides(rank_slowdown=0.0)


@pytest.mark.parametrize("overrides", [SAME_GPUS, Overrides()])
def test_no_moe_layer_on_several_gpus_is_the_same_in_both_modes(overrides):
    """docs/simulator.md: "With N = 1 or no MoE layer there is no collective, and both modes give the same result".
    With dense layers only, DEP's ranks never meet, so a rank with less work does not wait for the others; DEP had
    kept them in lockstep (iteration = the slowest rank's, the rest booked as sync_wait)."""
    r = simulate(SimConfig(gpus=4, layers=3, dense_layers=3, cv=0.3, max_tokens=16384, iterations=6,
                           overrides=overrides))
    dw, dep = r["dwdp"], r["dep"]
    assert r["config"]["moe_layers"] == 0
    assert dep["breakdown_ms"]["sync_wait"] == 0 and dep["breakdown_ms"]["communication"] == 0
    assert r["ratio"] == pytest.approx(1.0, rel=1e-12)
    assert dep["iteration_ms"] == pytest.approx(dw["iteration_ms"], rel=1e-12)
    assert dep["slowest_rank_iteration_ms"] == pytest.approx(dw["slowest_rank_iteration_ms"], rel=1e-12)
    assert dep["per_rank_iteration_ms"] == pytest.approx(dw["per_rank_iteration_ms"], rel=1e-12)
    for c in dw["breakdown_ms"]:
        assert dep["breakdown_ms"][c] == pytest.approx(dw["breakdown_ms"][c], rel=1e-12, abs=1e-12), c


def _run_cli(argv, capsys):
    from dwdp_ops.sim import cli

    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    return (code, *capsys.readouterr())


def test_cli_refuses_hardware_that_calibration_would_override(capsys):
    """--calibration FILE replaces --hardware's profile: --hardware gb200 with an h200 file had been ignored without a
    word (the run was h200's). The same profile named twice is still fine."""
    from importlib import resources

    h200 = str(resources.files("dwdp_ops.sim").joinpath("calibration", "h200.json"))
    code, out, err = _run_cli(["--hardware", "gb200", "--calibration", h200, "--layers", "5", "--iterations", "2"],
                              capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and out == "" and len(errors) == 1, (out, err)
    assert "--hardware" in errors[0] and "gb200" in errors[0] and "'h200'" in errors[0], errors[0]
    code, out, err = _run_cli(["--hardware", "h200", "--calibration", h200, "--layers", "5", "--iterations", "2"],
                              capsys)
    assert code == 0 and "2 x h200" in out, err


def test_paper_setting_needs_r1s_three_dense_layers(capsys):
    """The paper's setting is the full R1 (3 dense + 58 MoE layers): with --dense-layers 0 (61 MoE layers) the CLI had
    still printed the paper's Table 3 comparison as if it were the same setting."""
    from dwdp_ops.sim.analysis import is_paper_setting

    base = dict(hardware="gb200", gpus=4, isl=8192, ratio=0.8, max_tokens=32768, layers=61, iterations=2)
    assert is_paper_setting(simulate(SimConfig(**base))["config"])
    assert is_paper_setting(simulate(SimConfig(dense_layers=3, **base))["config"])
    assert not is_paper_setting(simulate(SimConfig(dense_layers=0, **base))["config"])
    code, out, err = _run_cli(["--hardware", "gb200", "--gpus", "4", "--iterations", "2", "--dense-layers", "0"],
                              capsys)
    assert code == 0 and "The paper" not in out, err
    code, out, err = _run_cli(["--hardware", "gb200", "--gpus", "4", "--iterations", "2"], capsys)
    assert code == 0 and "The paper" in out, err


@pytest.mark.parametrize("make, name", [
    (lambda: SimConfig(ratio=True), "ratio"), (lambda: SimConfig(cv=True), "cv"), (lambda: SimConfig(cv=False), "cv"),
    (lambda: SimConfig(owner_load=(True, 1.0)), "owner_load"), (lambda: Overrides(fetch_gbps=True), "fetch_gbps"),
    (lambda: Overrides(dispatch_latency_us=False), "dispatch_latency_us"),
    (lambda: Overrides(rank_slowdown=False), "rank_slowdown")])
def test_bools_are_not_numbers(make, name):
    """ratio=True had run ratio 1 (every request ISL tokens), cv=True a CV of 1, a True load or rate 1.0."""
    with pytest.raises(ValueError, match=name):
        make()


def test_bool_length_parameters_are_refused_by_the_workload():
    import numpy as np
    from dwdp_ops.sim.workload import request_lengths, workload

    # the whole refusal (a bare "ratio" / "cv" also matched "give exactly one of ratio ... and cv", the message of a
    # bool that was dropped on the way instead of refused)
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\], got True$"):
        request_lengths(3, 8192, ratio=True, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="cv must be a finite number >= 0, got True$"):
        workload(2, 2, 8192, 16384, cv=True)


def test_numpy_numbers_are_numbers():
    """Values read from an array (np.float32, np.int64) had been refused as if out of range ('ratio must be in
    (0, 1], got np.float32(0.8)'); they are taken as the Python floats they stand for (so the result is JSON)."""
    import json

    import numpy as np

    for kw, same in [(dict(ratio=np.float32(0.75)), dict(ratio=0.75)), (dict(cv=np.float32(0.25)), dict(cv=0.25)),
                     (dict(owner_load=(np.float32(0.5), np.int64(1))), dict(owner_load=(0.5, 1.0))),
                     (dict(overrides=Overrides(fetch_gbps=np.float32(300), dispatch_latency_us=np.int64(50),
                                               interference=np.float32(0.25), rank_slowdown=np.float16(0.5))),
                      dict(overrides=Overrides(fetch_gbps=300.0, dispatch_latency_us=50.0, interference=0.25,
                                               rank_slowdown=0.5)))]:
        a = simulate(SimConfig(layers=5, iterations=2, **kw))
        json.dumps(a)
        assert a == simulate(SimConfig(layers=5, iterations=2, **same)), kw


@pytest.mark.parametrize("bad", [8192.7, 100.0, True, "100"])
def test_batching_refuses_lengths_that_are_not_integers(bad):
    """A float length had been truncated (8192.7 -> 8192), True taken as a 1-token request, all without a word."""
    import numpy as np
    from dwdp_ops.sim.workload import batch_requests

    with pytest.raises(TypeError, match="position 1"):
        batch_requests([10, bad], 16384)
    assert [it.tokens for it in batch_requests(np.array([10, 20], dtype=np.int32), 16384)] == [30]


def test_expert_time_stays_monotone_past_the_last_point_of_any_file():
    """costs.CostModel keeps one expert's time non-decreasing in its rows with a running maximum "for any file"; past
    the last point the time had been m F / R_last at the file's raw last rate, so a file whose last point is faster
    (noise) dropped the time there: 64 rows took 0.64 F / 1e12, 65 rows 0.33 F / 1e12."""
    import copy

    from dwdp_ops.models.deepseek_r1.config import DeepSeekConfig
    from dwdp_ops.sim.costs import CostModel, load_calibration

    cal = copy.deepcopy(load_calibration("h200"))
    cal["expert_gemm"]["points"] = [{"rows_per_expert": 32, "tflops": 50.0, "source": "test"},
                                    {"rows_per_expert": 64, "tflops": 200.0, "source": "test"}]
    m = CostModel(cal, DeepSeekConfig.r1())
    t = [m.expert_ms(rows, 1) for rows in range(1, 200)]
    assert all(b >= a for a, b in zip(t, t[1:]))
    # past the last point: linear in rows at the last point's (running-maximum) time per row
    assert m.expert_ms(128, 1) == pytest.approx(2 * m.expert_ms(64, 1))
    shipped = CostModel(load_calibration("h200"), DeepSeekConfig.r1())  # a monotone file: m F / R_last as before
    assert shipped.expert_ms(4096, 1) == pytest.approx(4096 * shipped.ops.expert_flops_per_pair / 645.094e12 * 1e3)


POINT = {"mode": "dep", "N": 2, "cv": 0.0, "max_tokens": 16384, "iteration_ms": 250.0, "tps_per_gpu": 60000.0}


def test_validate_refuses_no_points_and_a_bad_tolerance():
    """validate([]) had answered all_within=True (every point of none) with a worst error of 0; a tolerance of NaN or
    -1 put every point outside, '0.1' raised a bare comparison TypeError."""
    from dwdp_ops.sim.analysis import validate

    with pytest.raises(ValueError, match="no measured point"):
        validate([], layers=5, iterations=2)
    with pytest.raises(ValueError, match="no measured point"):
        validate(iter(()), layers=5, iterations=2)
    for tol in (float("nan"), -0.1, float("inf"), "0.1", True, None):
        with pytest.raises(ValueError, match="tolerance"):
            validate([POINT], layers=5, iterations=2, tolerance=tol)
    v = validate([POINT], layers=5, iterations=2, tolerance=0.5)
    assert v["tolerance"] == 0.5 and len(v["points"]) == 1


def test_owner_load_is_scaled_without_overflow():
    """owner_factors divided by sum / N: loads near the float maximum summed to inf and every factor became 0 (no
    expert GEMMs, no rows in DEP) without a word; relative loads are scale-free."""
    big = SimConfig(gpus=2, owner_load=(1e308, 1e308))
    assert big.owner_factors() == [1.0, 1.0]
    assert SimConfig(gpus=2, owner_load=(1.7e308, 0.85e308)).owner_factors() == pytest.approx([4 / 3, 2 / 3])


def test_cli_plot_writes_the_path_it_names_and_refuses_unknown_formats(tmp_path, capsys):
    """--plot FILE without an extension had written FILE.png (matplotlib's default) while printing 'figure: FILE';
    an extension matplotlib cannot write (x.xyz) raised a traceback only after the whole simulation."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "figure"
    code, out, err = _run_cli(["--layers", "5", "--iterations", "2", "--plot", str(path)], capsys)
    assert code == 0, err
    assert f"figure: {path}" in out and path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "figure.png").exists()
    bad = tmp_path / "x.xyz"
    code, out, err = _run_cli(["--layers", "5", "--iterations", "2", "--plot", str(bad)], capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and out == "" and len(errors) == 1 and "Traceback" not in err, err
    assert "--plot" in errors[0] and "xyz" in errors[0] and "png" in errors[0], errors[0]
    assert not bad.exists()
    svg = tmp_path / "x.SVG"
    code, out, err = _run_cli(["--layers", "5", "--iterations", "2", "--plot", str(svg)], capsys)
    assert code == 0 and svg.read_bytes().lstrip().startswith(b"<?xml"), err


# ---------------------------------------------------------------------- owner_load with uneven experts per rank
def _dep_pairs(monkeypatch, config: SimConfig) -> tuple[list[float], list[list[float]]]:
    """Simulates ``config`` recording what its expert GEMMs were timed at: each rank's tokens x k per iteration
    (DWDP's calls, every rank on its own tokens over all E experts, rank-major) and DEP's pairs per rank, one list
    per iteration (its calls, iteration-major)."""
    from dwdp_ops.sim.costs import CostModel

    calls = []
    real = CostModel.expert_ms

    def recording(self, pairs, experts):
        calls.append(pairs)
        return real(self, pairs, experts)

    monkeypatch.setattr(CostModel, "expert_ms", recording)
    simulate(config)
    N, it = config.gpus, config.iterations
    dwdp, dep = calls[:N * it], calls[N * it:]
    assert len(dep) == N * it
    tokens_k = [sum(dwdp[r * it + i] for r in range(N)) for i in range(it)]  # all ranks' T k, per iteration
    return tokens_k, [dep[i * N:(i + 1) * N] for i in range(it)]


UNEVEN = [(3, (0.5, 1.0, 1.5)), (6, (1.0, 2.0, 0.5, 1.0, 1.0, 3.0)), (72, (1.0,) * 71 + (3.0,)),
          (72, tuple(0.5 + (r * 37 % 72) / 36 for r in range(72)))]


@pytest.mark.parametrize("gpus, load", UNEVEN)
@pytest.mark.parametrize("redundant", [0, None])
def test_owner_load_conserves_the_pairs_with_uneven_experts_per_rank(monkeypatch, gpus, load, redundant):
    """256 experts over 3, 6 or 72 GPUs: 85/86, 42/43 or 3/4 a rank. owner_load (relative pairs per owner) had been
    scaled to an unweighted mean 1 and applied to each owner's uniform share (in proportion to its experts), so the
    ranks' pairs summed to sum_r f_r c_r / E x T k, not T k: 256.5 / 256 at N = 3 with (0.5, 1, 1.5), 256.86 / 256 at
    N = 72 with one owner at 3x. Now every iteration's DEP pairs over the ranks are the tokens x top-k, with and
    without EPLB's replicas, and (R = 0) each owner takes owner_load[r] / sum(owner_load) of them."""
    cfg = SimConfig(gpus=gpus, layers=4, ratio=0.8, max_tokens=8192, iterations=2, owner_load=load,
                    redundant_experts=redundant)
    from dwdp_ops.sim.model import dep_expert_counts

    f = cfg.owner_factors()
    assert sum(x * c for x, c in zip(f, dep_expert_counts(256, gpus))) == pytest.approx(256, rel=1e-12)
    tokens_k, dep = _dep_pairs(monkeypatch, cfg)
    for want, pairs in zip(tokens_k, dep):
        assert sum(pairs) == pytest.approx(want, rel=1e-12)
        if redundant == 0:
            assert pairs == pytest.approx([want * x / sum(load) for x in load], rel=1e-12)


@pytest.mark.parametrize("gpus", [3, 6, 72])
def test_measured_uniform_routing_is_the_uniform_routing(gpus):
    """A uniform router measured on DEP's placement gives pairs per owner in proportion to its experts (owner_load =
    c_r): that must simulate as owner_load=None. The factors had been c_r / mean(c), pairs in proportion to c_r^2."""
    from dwdp_ops.sim.model import dep_expert_counts

    base = dict(gpus=gpus, layers=4, cv=0.1, max_tokens=8192, iterations=2, redundant_experts=0)
    measured = SimConfig(owner_load=tuple(float(c) for c in dep_expert_counts(256, gpus)), **base)
    assert measured.owner_factors() == pytest.approx([1.0] * gpus, rel=1e-12)
    a, b = simulate(measured), simulate(SimConfig(**base))
    for key in ("tps_per_gpu", "iteration_ms"):
        assert a["dep"][key] == pytest.approx(b["dep"][key], rel=1e-12)
    assert a["model"]["dep_rows_per_rank_per_layer"] == pytest.approx(b["model"]["dep_rows_per_rank_per_layer"],
                                                                      rel=1e-12)


@pytest.mark.parametrize("gpus, load", [(2, (0.55, 1.45)), (4, (1.0, 2.0, 0.5, 3.0)), (8, (1.0,) * 7 + (2.5,))])
def test_owner_factors_where_the_gpus_divide_the_experts_are_the_loads_scaled_to_mean_1(gpus, load):
    """Bit for bit what they were: the loads over their mean (scaled to the largest first)."""
    top = max(load)
    mean = sum(x / top for x in load) / gpus
    assert SimConfig(gpus=gpus, owner_load=load).owner_factors() == [x / top / mean for x in load]


@pytest.mark.parametrize("null", ["cv", "ratio"])
def test_validate_refuses_a_null_cv_or_ratio(null, tmp_path, capsys):
    """A measured point with "cv": null (or "ratio": null) passed the exactly-one check (the key is there) and reached
    SimConfig with neither, which then took its default ratio 0.8: validate() compared a CV point with a ratio-0.8
    prediction without a word, and --validate's table raised a TypeError formatting None."""
    import json

    from dwdp_ops.sim.analysis import validate

    point = {k: v for k, v in POINT.items() if k != "cv"} | {null: None}
    with pytest.raises(ValueError, match=f"measured point 0: {null} must be a number"):
        validate([point], layers=5, iterations=2)
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps({"dtype": "bfloat16", "points": [dict(point, layers=5, iterations=2)]}))
    code, out, err = _run_cli(["--validate", str(path)], capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"error: argument --validate: measured point 0: {null} must be a number" in err, err


@pytest.mark.parametrize("hardware", [5, None, "", b"h200"])
def test_hardware_that_is_no_name_or_path_is_refused_by_simconfig(hardware):
    """SimConfig took any hardware, and simulate() then raised os.fspath's TypeError from inside load_calibration
    (validate() too, without naming the measured point)."""
    from dwdp_ops.sim.analysis import validate

    with pytest.raises(ValueError, match="hardware must be a profile name"):
        SimConfig(hardware=hardware)
    with pytest.raises(ValueError, match="measured point 0: hardware must be a profile name"):
        validate([dict(POINT, hardware=hardware)], layers=5, iterations=2)


def test_hardware_given_as_a_path_is_kept_as_a_string():
    """A calibration file's path may be a pathlib.Path; the result's config stays JSON."""
    import json
    from pathlib import Path

    from dwdp_ops.sim import costs

    path = Path(costs.__file__).parent / "calibration" / "h200.json"
    cfg = SimConfig(hardware=path, layers=4, iterations=2, max_tokens=8192)
    assert cfg.hardware == str(path)
    json.dumps(simulate(cfg)["config"])


def test_validate_refuses_a_point_whose_n_and_gpus_differ():
    """"N (or gpus)": a point giving both, different, was simulated at N without a word; the same value twice is
    taken."""
    from dwdp_ops.sim.analysis import validate

    with pytest.raises(ValueError, match="measured point 0: N and gpus name the same group size"):
        validate([dict(POINT, gpus=4)], layers=5, iterations=2)
    v = validate([dict(POINT, gpus=2)], layers=5, iterations=2)
    assert v["points"][0]["predicted_iteration_ms"] > 0


def test_iterations_and_warmup_are_bounded_as_the_cli_bounds_iterations():
    """SimConfig took any iterations and warmup, and simulate() builds every one of them: a --validate file whose
    point (or header) said 10^8 ran for hours with no word; the CLI's --iterations is at most 10000."""
    from dwdp_ops.sim.analysis import validate
    from dwdp_ops.sim.model import MAX_ITERATIONS

    assert MAX_ITERATIONS == 10000
    SimConfig(iterations=MAX_ITERATIONS, warmup=MAX_ITERATIONS)
    for name in ("iterations", "warmup"):
        with pytest.raises(ValueError, match=f"{name} must be at most 10000 per rank, got 10001"):
            SimConfig(**{name: MAX_ITERATIONS + 1})
        with pytest.raises(ValueError, match=f"measured point 0: {name} must be at most 10000"):
            validate([dict(POINT, **{name: 10**8})], layers=5)


def test_products_of_the_bounds_are_bounded(capsys):
    """Each bound alone held, their product did not: --gpus 256 --iterations 10000 (every value in range) ran for
    about 20 minutes, and --gpus 256 --iterations 100 --isl 1 --max-tokens 1024 --layers 1 took 48 s and 4.6 GB
    (with --iterations 10000: hours, hundreds of GB), while docs/simulator.md said the bounds keep a run within
    seconds and megabytes. SimConfig and the CLI now refuse what exceeds MAX_LAYER_STEPS or MAX_REQUESTS."""
    from dwdp_ops.sim.cli import main
    from dwdp_ops.sim.model import MAX_LAYER_STEPS, MAX_REQUESTS

    with pytest.raises(ValueError, match="gpus x iterations x layers must be at most"):
        SimConfig(gpus=256, iterations=10000)
    with pytest.raises(ValueError, match=r"gpus x \(iterations \+ warmup\) x max_tokens / isl"):
        SimConfig(gpus=256, iterations=100, isl=1, max_tokens=1024, layers=1)
    with pytest.raises(ValueError, match=r"gpus x \(iterations \+ warmup\)"):  # the warmup is built too
        SimConfig(gpus=2, iterations=10, warmup=10000, isl=1, max_tokens=1024, layers=1)
    SimConfig(gpus=256, iterations=MAX_LAYER_STEPS // (256 * 61), layers=61)  # at the bounds: taken
    SimConfig(gpus=4, iterations=MAX_REQUESTS // (4 * 1024), isl=1, max_tokens=1024, layers=1)
    for argv in (["--gpus", "256", "--iterations", "10000"],
                 ["--gpus", "256", "--iterations", "100", "--isl", "1", "--max-tokens", "1024", "--layers", "1"],
                 ["--gpus", "256", "--iterations", "200", "--isl", "32", "--max-tokens", "32", "--layers", "1",
                  "--sweep"]):  # --sweep's budgets (32768) count
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "error: argument --iterations:" in err[-1] and "must be at most" in err[-1]


@pytest.mark.parametrize("as_json", [False, True])
def test_cli_plot_that_cannot_be_written_keeps_the_results(tmp_path, capsys, monkeypatch, as_json):
    """--plot's path is checked when parsed, but the write can still fail at the end (as root, --plot /proc/x.png
    passes the check): the OSError's traceback came after the whole run and before any result was printed, so the
    run was lost. Now the results are printed first and the failed figure is one error line, exit 1."""
    pytest.importorskip("matplotlib")
    import json

    from dwdp_ops.sim import cli

    def fail(res, path, rows):
        raise FileNotFoundError(2, "No such file or directory", path)

    monkeypatch.setattr(cli, "plot", fail)
    path = tmp_path / "x.png"
    code, out, err = _run_cli(["--layers", "5", "--iterations", "2", "--plot", str(path)]
                              + (["--json"] if as_json else []), capsys)
    assert code == 1
    if as_json:
        assert json.loads(out)["ratio"] > 0
    else:
        assert "TPS/GPU: DWDP" in out and "figure:" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error: argument --plot: the figure was not written" in lines[0], err
    assert str(path) in lines[0]
