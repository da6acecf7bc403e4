"""Review of the user-facing command lines (``demo``, ``sim``, ``can-train``): each test failed on the code before its
fix. A bad argument is an argparse usage error (exit 2, one ``error:`` line naming the option) before any work; a
``--json`` output is valid JSON; no traceback and no silent wrong answer."""

from __future__ import annotations

import json
import shutil

import pytest
from dwdp_ops.models import train_can
from test_cli_inputs import run_main


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


def assert_usage_error(code, err, option):
    assert code == 2, err
    assert "Traceback" not in err
    errors = error_lines(err)
    assert len(errors) == 1, err
    assert option in errors[0], errors[0]
    return errors[0]


def _strict_json(text: str):
    """``json.loads`` refusing NaN and Infinity, which are not JSON."""
    def bad(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=bad)


# ----------------------------------------------------------------------------------------------------- can-train
@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if training starts: every check must come before it."""
    calls = []
    monkeypatch.setattr(train_can, "train", lambda *a, **k: calls.append(a) or pytest.fail("training started"))
    return calls


CAN_SMALL = ["--samples", "300", "--epochs", "1", "--quiet", "--model", "dnn", "--device", "cpu"]


def test_can_train_plot_format_matplotlib_cannot_write_is_a_usage_error(tmp_path, capsys, no_training):
    """--plot out.xyz had trained every model and then ended in matplotlib's ValueError traceback ('Format 'xyz' is
    not supported')."""
    pytest.importorskip("matplotlib")
    code, _, err = run_main(train_can.main, ["--quiet", "--plot", str(tmp_path / "out.xyz")], capsys)
    line = assert_usage_error(code, err, "argument --plot")
    assert ".xyz" in line


def test_can_train_plot_without_extension_is_written_at_its_path(tmp_path, capsys):
    """--plot FILE (no extension) had been written to FILE.png by matplotlib: the checked path was not the written
    one, so '--json r.png --plot r' passed the same-file check and the PNG overwrote the JSON."""
    pytest.importorskip("matplotlib")
    plot, report = tmp_path / "curves", tmp_path / "curves.png"
    code, _, err = run_main(train_can.main, [*CAN_SMALL, "--plot", str(plot), "--json", str(report)], capsys)
    assert code == 0, err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(report.read_text())["results"]["dnn"]["curve"][0]["epoch"] == 1


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_can_train_output_the_file_system_refuses_at_the_end_is_one_error_line(option, tmp_path, capsys,
                                                                              monkeypatch):
    """An output whose directory went away during training (checked when parsed) had ended in an OSError
    traceback; now the curves are printed and the failure is one error line naming the option, exit 1."""
    if option == "--plot":
        pytest.importorskip("matplotlib")
    gone = tmp_path / "gone"
    gone.mkdir()
    real = train_can.train

    def train_then_remove(*a, **k):
        curve = real(*a, **k)
        shutil.rmtree(gone)
        return curve

    monkeypatch.setattr(train_can, "train", train_then_remove)
    code, out, err = run_main(train_can.main, [*CAN_SMALL, option, str(gone / "out.png")], capsys)
    assert code == 1, err
    assert "Traceback" not in err
    errors = error_lines(err)
    assert len(errors) == 1 and f"argument {option}" in errors[0], err
    assert "dnn (cpu): epoch 1" in out


# ----------------------------------------------------------------------------------------------------------- sim
def test_sim_text_states_the_shortest_request_the_workload_draws(capsys):
    """--ratio R with R x ISL < 1 draws lengths in [1, ISL] (workload.request_lengths: at least one token), but the
    header had said 'uniform in [0, ISL]'."""
    from dwdp_ops.sim import cli

    argv = ["--ratio", "1e-12", "--isl", "100", "--max-tokens", "1000", "--layers", "4", "--iterations", "1"]
    code, out, err = run_main(cli.main, argv, capsys)
    assert code == 0, err
    assert "request lengths uniform in [1, 100]" in out.splitlines()[0]


# ---------------------------------------------------------------------------------------------------------- demo
def _gpu_report(err: float) -> dict:
    """A GPU demo report (rank 0's, as ``demo_gpu`` writes it) whose check against the all-local run found ``err``."""
    from dwdp_ops.models.deepseek_r1.serve import StepStats, summarize

    step = StepStats(kind="prefill", policy="prefetch_all", tokens=100, step_ms=50.0, attn_ms=10.0, experts_ms=5.0,
                     wait_ms=1.0, attn_flops=1e12, expert_flops=1e12, fetch_bytes=10**9, fetch_ms=2.0)
    check = {"max_rel_err": err, "comparable_rel_err": err, "tokens_equal": False, "flips": [], "steps": 4}
    return {"gpus": 2, "card": "X", "policy": "auto", "graphs": True,
            "config": {"layers": 4, "dense_layers": 3, "moe_layers": 1, "experts": 256, "top_k": 8, "vocab": 32768},
            "ranks": [{"rank": r, "summary": summarize([step]), "dense_tflops": 600.0, "check": dict(check)}
                      for r in range(2)]}


@pytest.mark.parametrize("err, spelled", [(float("nan"), "NaN"), (float("inf"), "Infinity")])
def test_demo_gpu_json_is_valid_json_when_the_check_is_not_finite(err, spelled, monkeypatch, capsys):
    """NaN logits make the check's errors NaN (serve.compare); --json had printed them as NaN, which is not JSON
    (a strict parser refuses the whole report). Now the string JavaScript and Python spell it with; the text still
    prints nan / inf."""
    from dwdp_ops import demo

    monkeypatch.setattr(demo, "usable_gpus", lambda: (2, ""))
    monkeypatch.setattr(demo, "run_gpu", lambda ns, gpus: _gpu_report(err))
    code, out, err_text = run_main(demo.main, ["--json"], capsys)
    assert code == 0, err_text
    rep = _strict_json(out)
    assert [r["check"]["max_rel_err"] for r in rep["ranks"]] == [spelled, spelled]
    code, out, err_text = run_main(demo.main, [], capsys)
    assert code == 0, err_text
    assert f"max logits rel err {err:.2e}" in out


# ---------------------------------------------------------------------------------------- coaction (autograd op)
def _coaction_inputs(B: int = 4, T: int = 3):
    torch = pytest.importorskip("torch")
    from dwdp_ops.coaction import CoActionSpec

    spec = CoActionSpec()
    return (spec, torch.zeros(B, spec.induction_dim), torch.zeros(B, T, spec.feed_dim), torch.ones(B, T))


@pytest.mark.parametrize("which", ["induction", "feed", "mask"])
def test_coaction_names_a_sparse_tensor_instead_of_sending_it_to_cuda(which):
    """A sparse (COO) tensor passed the checks up to the device's: on the CPU the op said 'move them with .cuda()',
    and on a GPU ``.contiguous()`` then raised PyTorch's 'unsupported memory format option Contiguous'. Now a
    TypeError naming the tensor and its layout, before the device check."""
    from dwdp_ops.coaction import coaction

    spec, ind, feed, mask = _coaction_inputs()
    args = {"induction": ind, "feed": feed, "mask": mask}
    args[which] = args[which].to_sparse()
    with pytest.raises(TypeError, match=rf"{which} must be a dense \(strided\) tensor, got torch.sparse_coo"):
        coaction(args["induction"], args["feed"], args["mask"], spec)


def test_coaction_names_a_nested_tensor_instead_of_failing_on_its_shape():
    """A nested tensor as ``feed`` (3 dims) reached the shape message, whose ``feed.shape`` raised PyTorch's
    'NestedTensorImpl doesn't support sizes' RuntimeError."""
    import warnings

    torch = pytest.importorskip("torch")
    from dwdp_ops.coaction import coaction

    spec, ind, feed, mask = _coaction_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (PyTorch's prototype-stage warning)
        nested = torch.nested.nested_tensor([feed[0], feed[1, :2], feed[2], feed[3]])
    with pytest.raises(TypeError, match=r"feed must be a dense \(strided\) tensor, got a nested tensor"):
        coaction(ind, nested, mask, spec)


def _dien(path, rows) -> str:
    path.write_text("".join(f"{label}\tu{i}\t{item}\tc{i % 3}\ti1\x02i2\tc1\x02c2\n" for i, (label, item) in
                            enumerate(rows)))
    return str(path)


def test_can_train_json_args_hold_only_the_data_source_options_used(tmp_path, capsys):
    """The report's ``args`` had held --samples 20000 for a --data FILE run (whose samples are its lines) and
    --max-len 100 for a synthetic one (which has its own history length): the defaults of the options the run
    refuses for its source, as if used."""
    data = _dien(tmp_path / "train.txt", [(i % 2, f"i{i % 7}") for i in range(60)])
    report = tmp_path / "r.json"
    code, _, err = run_main(train_can.main, ["--data", data, "--epochs", "1", "--quiet", "--model", "dnn", "--device",
                                             "cpu", "--json", str(report)], capsys)
    assert code == 0, err
    args = json.loads(report.read_text())["args"]
    assert args["samples"] is None and args["max_len"] == train_can.FILE_MAX_LEN
    code, _, err = run_main(train_can.main, [*CAN_SMALL, "--json", str(report)], capsys)
    assert code == 0, err
    args = json.loads(report.read_text())["args"]
    assert args["samples"] == 300 and args["max_len"] is None
