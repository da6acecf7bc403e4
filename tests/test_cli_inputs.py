"""Every command line refuses bad input the argparse way: exit code 2, the usage, and one ``PROG: error: ...`` line
on stderr that names the option; never a traceback, a silent default or a run that fails only at its end. Each class
of bad input (not an integer / number, zero, negative, out of range, not finite, missing file, directory instead of a
file, unwritable output, inconsistent options) is covered for every option it applies to. Also: good inputs still
run, help texts name their program and show defaults, and the top-level command lists its commands."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dwdp_ops import __main__ as top
from dwdp_ops import demo, launch
from dwdp_ops.models import train_can

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(Path(__file__).resolve())  # an existing file for the launcher cases that must fail before running it


def run_main(main, argv, capsys, **kw):
    """(exit code, stdout, stderr) of ``main(argv)`` run in-process; SystemExit is the exit code."""
    try:
        code = main(argv, **kw)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code, err, option, prog=None):
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert option in errors[0], errors[0]
    if prog is not None:
        assert errors[0].startswith(f"{prog}: error: "), errors[0]
    return errors[0]


# ---------------------------------------------------------------------------------------------------------- demo
NOT_INT = ["x", "1.5", "", "2e3"]
DEMO_INT_OPTIONS = ["--ranks", "--prompts", "--steps", "--seed", "--moe-layers", "--vocab", "--min-len", "--max-len"]
DEMO_POSITIVE = ["--ranks", "--prompts", "--steps", "--moe-layers", "--vocab", "--min-len", "--max-len"]

DEMO_BAD = (
    [(opt, [opt, v]) for opt in DEMO_INT_OPTIONS for v in NOT_INT]
    + [(opt, [opt, "0"]) for opt in DEMO_POSITIVE]
    + [(opt, [opt, "-2"]) for opt in DEMO_INT_OPTIONS]
    + [("--ranks", ["--ranks", v]) for v in ("3", "5", "6", "100", "512")]  # do not divide R1's 256 experts
    + [("--timeout", ["--timeout", v]) for v in ("0", "-1", "nan", "inf", "soon")]
    + [("--vocab", ["--vocab", "129281"])]
    + [("--min-len", ["--min-len", "100", "--max-len", "99"])]
    + [("--max-len", ["--max-len", v]) for v in ("16384", "20000")]  # R1's max_seq_len leaves no step: on every path
    + [("--dtype", ["--dtype", v]) for v in ("fp8", "float32", "int4")]
    + [("--policy", ["--policy", v]) for v in ("fast", "")]
    + [("--bogus", ["--bogus"])]
    + [("--seed", ["--seed", v]) for v in ("4294967296", str(2**40))]  # init_weights' seeds are 32-bit
)


@pytest.mark.parametrize("option, argv", DEMO_BAD, ids=[" ".join(a) or "empty" for _, a in DEMO_BAD])
def test_demo_rejects_bad_values(option, argv, capsys):
    code, out, err = run_main(demo.main, argv, capsys)
    assert_usage_error(code, err, option, prog="dwdp-demo")
    assert out == ""


def test_demo_ranks_error_says_why(capsys):
    code, _, err = run_main(demo.main, ["--ranks", "3"], capsys)
    line = assert_usage_error(code, err, "--ranks")
    assert "256" in line and "[1, 2, 4, 8, 16, 32, 64, 128, 256]" in line


def test_demo_cpu_json_runs_and_keeps_explicit_counts(capsys):
    code, out, err = run_main(demo.main, ["--cpu", "--ranks", "2", "--prompts", "1", "--steps", "1", "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["dtype"] == "float8_e4m3fn" and len(rep["plans"]) == 2
    reqs = rep["cpu_reference"]["requests"]
    assert [(r["rank"], r["request"]) for r in reqs] == [(0, 0), (1, 0)]
    assert all(len(r["tokens"]) == 1 for r in reqs)  # --steps 1 is used, not a default


@pytest.mark.parametrize("ranks", ["1", "4"])
def test_demo_text_names_the_dtype_of_every_size(ranks, capsys):
    sizes = {}
    for dtype in ("bfloat16", "float8_e4m3fn"):
        code, out, err = run_main(demo.main, ["--cpu", "--ranks", ranks, "--prompts", "1", "--steps", "1",
                                              "--dtype", dtype], capsys)
        assert code == 0, err
        plan_lines = [line for line in out.splitlines() if "GiB per MoE layer" in line]
        assert len(plan_lines) == int(ranks)
        assert all(line.endswith(f"GiB per MoE layer in {dtype})") for line in plan_lines)
        assert " fp8" not in out and " bf16" not in out
        sizes[dtype] = demo.plan_report(int(ranks), dtype)[0]["fetch_GiB_per_layer"]
    assert sizes["bfloat16"] == 2 * sizes["float8_e4m3fn"]


def _one_line(text):
    return " ".join(text.split())


def test_demo_cpu_steps_are_bounded_by_the_tiny_config(capsys):
    """The CPU path's --steps limit comes from the tiny config's max_seq_len and the longest prompt: one more step
    was a ValueError traceback from the reference model (rc 1) after the fetch plans; now a usage error naming the
    limit, which the help names too."""
    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig

    seq = DeepSeekConfig.tiny().max_seq_len
    code, out, err = run_main(demo.main, ["--cpu", "--ranks", "1", "--steps", str(seq + 1)], capsys)
    assert_usage_error(code, err, "--steps", prog="dwdp-demo")  # too many for any prompt
    most = demo.cpu_max_steps()
    assert most == seq - demo.CPU_PROMPT_LENS[1] + 1
    for steps in (most + 1, 10 * most):
        code, out, err = run_main(demo.main, ["--cpu", "--ranks", "1", "--steps", str(steps)], capsys)
        line = assert_usage_error(code, err, "--steps", prog="dwdp-demo")
        assert f"at most {most} on the CPU path" in line and f"got {steps}" in line
        assert out == ""
    assert f"at most {most} on CPU" in _one_line(demo.build_parser().format_help())


def test_demo_cpu_step_limit_is_exact_for_the_longest_prompt():
    """cpu_max_steps() steps fit a prompt of the longest CPU length; one more does not (the reference model's own
    check), so the limit refuses nothing that would have run."""
    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig, ReferenceModel, init_weights

    cfg = DeepSeekConfig.tiny()
    w = init_weights(cfg, 0)
    prompt = [1] * demo.CPU_PROMPT_LENS[1]
    tokens, _ = ReferenceModel(cfg, w).generate(prompt, demo.cpu_max_steps())
    assert len(tokens) == demo.cpu_max_steps()
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        ReferenceModel(cfg, w).generate(prompt, demo.cpu_max_steps() + 1)


@pytest.fixture
def two_gpus(monkeypatch):
    """The demo sees two GPUs; starting the ranks fails the test (every check must come before it)."""
    monkeypatch.setattr(demo, "usable_gpus", lambda: (2, ""))
    monkeypatch.setattr(demo, "run_gpu", lambda ns, gpus: pytest.fail("the GPU ranks started"))


def test_demo_gpu_steps_are_bounded_by_r1_max_seq_len(two_gpus, capsys):
    """On GPUs a request holds up to --max-len + --steps positions, at most R1's max_seq_len: more failed only in
    the ranks, after the expert store was built; now a usage error before they start, in the demo and its worker."""
    from dwdp_ops import demo_gpu
    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig

    seq = DeepSeekConfig.r1().max_seq_len
    most = seq - 4096
    code, out, err = run_main(demo.main, ["--max-len", "4096", "--steps", str(most + 1)], capsys)
    line = assert_usage_error(code, err, "--steps", prog="dwdp-demo")
    assert f"at most {most} on GPUs" in line and str(seq) in line and out == ""
    code, out, err = run_main(demo_gpu.main, ["--out", "/tmp/x.json", "--max-len", "4096", "--steps", str(most + 1)],
                              capsys)
    assert_usage_error(code, err, "--steps", prog="dwdp_ops.demo_gpu")
    code, out, err = run_main(demo_gpu.main, ["--out", "/tmp/x.json", "--max-len", str(seq), "--steps", "1"], capsys)
    assert_usage_error(code, err, "--max-len", prog="dwdp_ops.demo_gpu")
    assert f"at most {seq} minus --max-len on GPUs" in _one_line(demo.build_parser().format_help())


def test_demo_gpu_path_runs_the_ranks_asked_for(monkeypatch, capsys):
    """--ranks on GPUs: that many ranks, one per GPU (the GPU path had ignored it and run every usable GPU); without
    it every usable GPU, as before; more than the GPUs (or one) a usage error before any rank starts. The CPU path
    plans for 4 without it, as before."""
    started = []
    monkeypatch.setattr(demo, "usable_gpus", lambda: (4, ""))
    monkeypatch.setattr(demo, "run_gpu", lambda ns, gpus: started.append(gpus) or {"ranks": []})
    monkeypatch.setattr(demo, "print_gpu", lambda rep: None)
    for argv, want in ((["--ranks", "2"], 2), ([], 4), (["--ranks", "4"], 4)):
        code, out, err = run_main(demo.main, argv, capsys)
        assert code == 0 and started[-1] == want, (argv, err)
    for bad in ("8", "1"):
        code, out, err = run_main(demo.main, ["--ranks", bad], capsys)
        line = assert_usage_error(code, err, "--ranks", prog="dwdp-demo")
        assert "from 2 to the 4 usable here" in line and out == ""
    assert len(started) == 3
    cmd = demo.gpu_command(demo.build_parser().parse_args(["--prompts", "1", "--steps", "1"]), 2, "/tmp/r.json")
    assert cmd[cmd.index("-n") + 1] == "2"
    code, out, err = run_main(demo.main, ["--cpu", "--prompts", "1", "--steps", "1", "--json"], capsys)
    assert code == 0 and len(json.loads(out)["plans"]) == demo.CPU_RANKS


def test_demo_default_ranks_must_divide_r1_experts(monkeypatch, capsys):
    """Without --ranks the GPU demo runs every usable GPU; on 6 (or 3, 5, 7) that count does not divide R1's 256
    experts and the ranks started, then each failed in the memory plan ('world must divide'). Now a usage error
    before any rank starts, naming --ranks and the counts that work; --ranks 4 on the same machine still runs."""
    started = []
    monkeypatch.setattr(demo, "usable_gpus", lambda: (6, ""))
    monkeypatch.setattr(demo, "run_gpu", lambda ns, gpus: started.append(gpus) or {"ranks": []})
    monkeypatch.setattr(demo, "print_gpu", lambda rep: None)
    code, out, err = run_main(demo.main, [], capsys)
    line = assert_usage_error(code, err, "--ranks", prog="dwdp-demo")
    assert "6 usable GPUs" in line and "[2, 4]" in line and out == "" and started == []
    code, out, err = run_main(demo.main, ["--ranks", "4"], capsys)
    assert code == 0 and started == [4], err


@pytest.mark.parametrize("value", ["59", "100"])
def test_demo_moe_layers_are_bounded_by_r1(value, capsys):
    """--moe-layers above R1's MoE layer count (58) passed parsing: ignored on CPU, an error only in the GPU ranks."""
    from dwdp_ops import demo_gpu
    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig

    most = DeepSeekConfig.r1().n_moe_layers
    code, out, err = run_main(demo.main, ["--cpu", "--moe-layers", value], capsys)
    line = assert_usage_error(code, err, "--moe-layers", prog="dwdp-demo")
    assert f"[1, {most}]" in line and repr(value) in line and out == ""
    code, out, err = run_main(demo_gpu.main, ["--out", "/tmp/x.json", "--moe-layers", value], capsys)
    assert_usage_error(code, err, "--moe-layers", prog="dwdp_ops.demo_gpu")
    assert demo_gpu.moe_layers_arg(str(most)) == demo_gpu.moe_layers_arg("all") == most


@pytest.mark.parametrize("where", ["missing/r.json", "", "dir"])
def test_demo_gpu_out_is_checked_before_the_run(where, tmp_path, capsys):
    """The worker's --out was opened only by rank 0 after the whole run (store, prefill, decode, the all-local
    check): a path in a missing directory, or a directory, failed there with open()'s traceback and lost the
    report. Now a usage error naming --out when the arguments are parsed."""
    from dwdp_ops import demo_gpu

    (tmp_path / "dir").mkdir()
    out = str(tmp_path / where) if where else ""
    code, _, err = run_main(demo_gpu.main, ["--out", out], capsys)
    assert_usage_error(code, err, "--out", prog="dwdp_ops.demo_gpu")


DEMO_GPU_BAD = (
    [(opt, [opt, "0"]) for opt in ("--prompts", "--check-steps", "--vocab", "--min-len", "--max-len", "--steps")]
    + [(opt, [opt, "-1"]) for opt in ("--prompts", "--check-steps", "--seed")]
    + [("--seed", ["--seed", "4294967296"]), ("--vocab", ["--vocab", "129281"]),
       ("--min-len", ["--min-len", "9", "--max-len", "8"])]
)


@pytest.mark.parametrize("option, argv", DEMO_GPU_BAD, ids=[" ".join(a) for _, a in DEMO_GPU_BAD])
def test_demo_gpu_refuses_bad_counts_before_the_ranks_initialise(option, argv, capsys):
    """The worker took its counts as any int: --prompts 0 failed after init with max()'s 'empty sequence',
    --min-len > --max-len, --vocab 0 or > R1's and a negative --seed in the ranks, and --check-steps 0 or -1 was
    silently 1. Now usage errors naming the option, as the demo's own."""
    from dwdp_ops import demo_gpu

    code, _, err = run_main(demo_gpu.main, ["--out", "/tmp/x.json"] + argv, capsys)
    assert_usage_error(code, err, option, prog="dwdp_ops.demo_gpu")


def test_demo_cpu_names_the_gpu_options_it_did_not_use(capsys):
    """GPU-only options are accepted on the CPU path (as --vocab, --policy, ... always were) but no longer silently:
    the closing note names those given, and the help says so."""
    base = ["--cpu", "--ranks", "1", "--prompts", "1", "--steps", "1", "--json"]
    code, out, err = run_main(demo.main, base + ["--moe-layers", "2", "--policy", "dispatch"], capsys)
    assert code == 0, err
    assert json.loads(out)["note"].endswith("Not used on this path (GPU only): --moe-layers, --policy.")
    code, out, err = run_main(demo.main, base, capsys)
    assert code == 0, err
    assert "Not used" not in json.loads(out)["note"]
    assert "used only by the GPU demo" in _one_line(demo.build_parser().format_help())


# ----------------------------------------------------------------------------------------------------- can-train
@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if training starts: every check must come before it."""
    calls = []
    monkeypatch.setattr(train_can, "train", lambda *a, **k: calls.append(a) or pytest.fail("training started"))
    return calls


def _dien(path: Path, rows: list[tuple[int, str]]) -> str:
    path.write_text("".join(f"{label}\tu{i}\t{item}\tc{i % 3}\ti1\x02i2\tc1\x02c2\n" for i, (label, item) in
                            enumerate(rows)))
    return str(path)


CAN_BAD = (
    [(opt, [opt, v]) for opt in ("--epochs", "--batch-size", "--samples", "--max-len", "--seed") for v in NOT_INT]
    + [(opt, [opt, "0"]) for opt in ("--epochs", "--batch-size", "--samples", "--max-len")]
    + [(opt, [opt, "-5"]) for opt in ("--epochs", "--batch-size", "--samples", "--max-len", "--seed")]
    + [("--lr", ["--lr", v]) for v in ("0", "-0.1", "nan", "inf", "fast")]
    + [("--data", ["--data", "{tmp}/missing.txt"]), ("--data", ["--data", "{tmp}"]), ("--data", ["--data", "{bad}"]),
       ("--test", ["--data", "{good}", "--test", "{tmp}/missing.txt"]),
       ("--test", ["--data", "{good}", "--test", "{bad}"]),
       ("--test", ["--test", "{good}"]),  # --test with synthetic data
       ("--samples", ["--samples", "3"]),  # too few for a test set with both labels
       # an option of the other data source (each had been ignored without a word)
       ("--samples", ["--data", "{good}", "--samples", "100"]), ("--max-len", ["--max-len", "50"])]
    + [(opt, [opt, "{tmp}/no/such/dir/out"]) for opt in ("--json", "--plot")]
    + [(opt, [opt, "{tmp}"]) for opt in ("--json", "--plot")]  # a directory, not a file
    # a path that names a directory by its form (had passed, and open() failed with IsADirectoryError after training)
    + [(opt, [opt, v]) for opt in ("--json", "--plot") for v in ("{tmp}/out.json/", "{tmp}/new/.", "{tmp}/new/..")]
    + [("--plot", ["--json", "{tmp}/r.out", "--plot", "{tmp}/r.out"]),  # the PNG had overwritten the JSON
       ("--plot", ["--json", "{tmp}/r.out", "--plot", "{tmp}/./r.out"])]
    + [("--model", ["--model", "gbdt"]), ("--device", ["--device", "tpu"])]
)


@pytest.fixture
def can_files(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("not\tenough fields\n")
    good = _dien(tmp_path / "good.txt", [(i % 2, f"i{i % 5}") for i in range(40)])
    return {"tmp": str(tmp_path), "bad": str(bad), "good": good}


@pytest.mark.parametrize("option, argv", CAN_BAD, ids=[" ".join(a) or "empty" for _, a in CAN_BAD])
def test_can_train_rejects_bad_values_before_training(option, argv, can_files, capsys, no_training):
    argv = [a.format(**can_files) for a in argv]
    code, _, err = run_main(train_can.main, ["--quiet", *argv], capsys)
    assert_usage_error(code, err, option, prog="dwdp-can-train")
    assert not no_training


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any directory")
@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_can_train_rejects_unwritable_outputs(option, tmp_path, capsys, no_training):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run_main(train_can.main, [option, str(ro / "out")], capsys)
    finally:
        ro.chmod(0o700)
    line = assert_usage_error(code, err, option)
    assert "not writable" in line


def test_can_train_gpu_without_gpu_says_so(monkeypatch, capsys, no_training):
    monkeypatch.setattr(train_can, "usable_gpus", lambda: (0, "no NVIDIA driver found"))
    code, _, err = run_main(train_can.main, ["--device", "gpu"], capsys)
    line = assert_usage_error(code, err, "--device")
    assert "no NVIDIA driver found" in line and "--device cpu" in line


def test_can_train_plot_needs_matplotlib(monkeypatch, capsys, no_training, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code, _, err = run_main(train_can.main, ["--plot", str(tmp_path / "p.png")], capsys)
    line = assert_usage_error(code, err, "--plot")
    assert "matplotlib" in line


@pytest.mark.parametrize("option, argv, loader", [
    ("--samples", ["--samples", "100000000000"], "synthetic"),
    ("--data", ["--data", "{good}", "--max-len", "100000000000"], "load_amazon_books"),
    ("--test", ["--data", "{good}", "--test", "{good}", "--max-len", "100000000000"], "load_amazon_books"),
])
def test_can_train_data_too_large_for_memory_is_one_error_line(option, argv, loader, can_files, capsys, monkeypatch,
                                                               no_training):
    """--samples 10**11 or --max-len 10**11 had ended in numpy's MemoryError traceback ('Unable to allocate 745. GiB
    for an array with shape (100000000000,)'); now one usage error naming the option (the loaders raise it here, for
    the same result on a machine that would overcommit the memory)."""
    real = getattr(train_can, loader)
    calls = []

    def oom(*a, **k):
        calls.append(1)
        if option == "--test" and len(calls) == 1:
            return real(*a, **{**k, "max_len": 5})
        raise MemoryError("Unable to allocate 745. GiB for an array with shape (100000000000,) and data type int64")

    monkeypatch.setattr(train_can, loader, oom)
    code, _, err = run_main(train_can.main, ["--quiet", *(a.format(**can_files) for a in argv)], capsys)
    line = assert_usage_error(code, err, f"argument {option}:", prog="dwdp-can-train")
    assert "Unable to allocate 745. GiB" in line


class _DivergingModel:
    class cfg:  # noqa: N801 - mimics CanModel.cfg
        lr = 10.0

    def __init__(self, bad_step: int):
        self.steps, self.bad_step = 0, bad_step

    def train_step(self, _batch) -> float:
        self.steps += 1
        return float("nan") if self.steps == self.bad_step else 0.5

    def evaluate(self, _data) -> float:
        return 0.5


@pytest.mark.parametrize("bad_step, epoch, step", [(1, 1, 1), (3, 1, 3), (6, 2, 1), (7, 2, 2)])
def test_non_finite_loss_names_epoch_and_step(bad_step, epoch, step):
    data, _ = train_can.synthetic(50, seed=0)  # 5 batches of 10 per epoch
    match = rf"at epoch {epoch}, step {step} \(learning rate 10\); try a lower --lr"
    with pytest.raises(FloatingPointError, match=match):
        train_can.train(_DivergingModel(bad_step), data, data, 3, 10, 0, progress=False)


@pytest.mark.parametrize("epochs, batch_size, exc, message", [
    (0, 10, ValueError, "epochs must be an integer >= 1, got 0"),
    (1, 0, ValueError, "batch_size must be an integer >= 1, got 0"),
    (1, -5, ValueError, "batch_size must be an integer >= 1, got -5"),
    (1.0, 10, TypeError, "epochs must be an integer >= 1, got 1.0 (float)"),
    (True, 10, TypeError, "epochs must be an integer >= 1, got True (bool)"),
    (2, "10", TypeError, "batch_size must be an integer >= 1, got '10' (str)"),
])
def test_train_rejects_bad_counts(epochs, batch_size, exc, message):
    """The error names the argument that is wrong and its value (both arguments share the message's tail); a wrong
    type is a TypeError (it had been a ValueError, against the package's rule), a wrong value a ValueError."""
    data, _ = train_can.synthetic(50, seed=0)
    with pytest.raises(exc, match=f"^{re.escape(message)}$"):
        train_can.train(_DivergingModel(99), data, data, epochs, batch_size, 0, progress=False)


def test_can_train_stops_on_nan_with_one_error_line(monkeypatch, capsys):
    monkeypatch.setattr(train_can.CanModel, "train_step", lambda self, b, **kw: float("inf"))
    code, out, err = run_main(train_can.main, ["--samples", "200", "--quiet", "--device", "cpu"], capsys)
    assert code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "epoch 1, step 1" in errors[0] and "--lr" in errors[0], err
    assert "test AUC" not in out


def test_can_train_good_run_writes_its_outputs(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the bench extra)")
    argv = ["--samples", "400", "--epochs", "1", "--quiet", "--model", "dnn", "--device", "cpu",
            "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")]
    code, out, err = run_main(train_can.main, argv, capsys)
    assert code == 0, err
    assert "dnn (cpu): epoch 1" in out
    assert json.loads((tmp_path / "r.json").read_text())["results"]["dnn"]["curve"][0]["epoch"] == 1
    assert (tmp_path / "r.png").stat().st_size > 0


def test_can_train_reads_a_separate_test_file(tmp_path, capsys):
    train_file = _dien(tmp_path / "train.txt", [(i % 2, f"i{i % 7}") for i in range(60)])
    test_file = _dien(tmp_path / "test.txt", [(i % 2, f"i{i % 7}") for i in range(20)])
    argv = ["--data", train_file, "--test", test_file, "--epochs", "1", "--quiet", "--model", "dnn", "--device", "cpu"]
    code, out, err = run_main(train_can.main, argv, capsys)
    assert code == 0, err
    assert "dnn (cpu): epoch 1" in out and "test AUC" in out


# -------------------------------------------------------------------------------------------------------- launch
LAUNCH_BAD = (
    [("--nprocs", ["-n", v, SCRIPT]) for v in ("0", "-2", "x", "1.5")]
    + [("--timeout", ["-n", "1", "--timeout", v, SCRIPT]) for v in ("0", "-3", "nan", "inf", "later")]
    + [("--prefix", ["-n", "1", "--prefix", p, SCRIPT]) for p in ("definitely-not-a-tool-7f3a", "./nope --x", "'a")]
    + [("does not exist", ["-n", "1", "/definitely/missing.py"]), ("is not a file", ["-n", "1", str(ROOT)])]
    + [("give a script", ["-n", "1"]), ("--nprocs", [SCRIPT])]
)


@pytest.mark.parametrize("what, argv", LAUNCH_BAD,
                         ids=[" ".join(a[:-1] if a[-1] == SCRIPT else a) for _, a in LAUNCH_BAD])
def test_launch_rejects_bad_values(what, argv, capsys):
    code, out, err = run_main(launch.main, argv, capsys)
    assert_usage_error(code, err, what, prog="dwdp-launch")


@pytest.mark.parametrize("kw, match", [
    ({"nprocs": 0, "command": ["true"]}, r"nprocs must be an integer >= 1, got 0"),
    ({"nprocs": 2.0, "command": ["true"]}, r"nprocs must be an integer >= 1, got 2.0"),
    ({"nprocs": 1, "command": ["true"], "timeout": 0}, r"timeout must be > 0 seconds or None, got 0"),
    ({"nprocs": 1, "command": []}, r"command must be a non-empty argv list"),
])
def test_launch_run_api_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        launch.run(**kw)


def test_launch_missing_prefix_tool_in_a_subprocess(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("raise SystemExit('must not run')\n")
    proc = subprocess.run([sys.executable, "-m", "dwdp_ops.launch", "-n", "2", "--prefix", "missing-tool --flag",
                           str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == ["python -m dwdp_ops.launch: error: argument --prefix: 'missing-tool' is not an executable on "
                      "PATH"], proc.stderr
    assert "must not run" not in proc.stdout


# ------------------------------------------------------------------------------------- python -m dwdp_ops, help
def test_bare_invocation_lists_the_commands(capsys):
    code, out, err = run_main(top.main, [], capsys)
    assert code == 2 and out == ""
    for cmd in ("info", "demo", "can-train", "launch"):
        assert f"\n    {cmd}" in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "python -m dwdp_ops info" in errors[0]


def test_version_and_unknown_command(capsys):
    from dwdp_ops import __version__

    code, out, _ = run_main(top.main, ["--version"], capsys)
    assert code == 0 and out.strip() == f"dwdp_ops {__version__}"
    code, _, err = run_main(top.main, ["serve"], capsys)
    assert_usage_error(code, err, "invalid choice: 'serve'", prog="python -m dwdp_ops")


def test_info_still_works(capsys):
    code, out, err = run_main(top.main, ["info", "--json"], capsys)
    assert code == 0, err
    assert "dwdp_ops" in json.loads(out)


@pytest.mark.parametrize("cmd, bad", [("demo", ["--ranks", "3"]), ("can-train", ["--epochs", "0"]),
                                      ("launch", ["-n", "0", SCRIPT])])
def test_subcommands_report_under_their_own_name(cmd, bad, capsys):
    code, out, _ = run_main(top.main, [cmd, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: python -m dwdp_ops {cmd} ")
    code, _, err = run_main(top.main, [cmd, *bad], capsys)
    assert_usage_error(code, err, bad[0], prog=f"python -m dwdp_ops {cmd}")


@pytest.mark.parametrize("main, prog", [(demo.main, "dwdp-demo"), (train_can.main, "dwdp-can-train"),
                                        (launch.main, "dwdp-launch")])
def test_console_script_program_names(main, prog, capsys):
    code, out, _ = run_main(main, ["--help"], capsys)
    assert code == 0 and out.startswith(f"usage: {prog} ")


@pytest.mark.skipif(shutil.which("dwdp-demo") is None, reason="console scripts not on PATH")
def test_installed_console_script_help():
    proc = subprocess.run(["dwdp-demo", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: dwdp-demo ")


PARSERS = {"demo": demo.build_parser, "can-train": train_can.build_parser, "launch": launch.build_parser,
           "top": top.build_parser}


@pytest.mark.parametrize("name", list(PARSERS))
def test_help_has_no_markup_and_every_option_explains_its_default(name, capsys):
    ap = PARSERS[name]()
    text = ap.format_help()
    assert "`" not in text
    for action in ap._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        assert action.help, f"{action.option_strings} has no help"
        shown = ap.formatter_class(ap.prog)._get_help_string(action)
        if action.default is not None and action.default is not False:
            assert "default" in shown, f"{action.option_strings}: {shown!r} does not show its default"


def test_render_help_does_not_render(tmp_path):
    doc = ROOT / "docs" / "benchmarks.md"
    before = doc.stat().st_mtime_ns if doc.exists() else None
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "render.py"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python bench/render.py")
    assert "`" not in proc.stdout
    assert (doc.stat().st_mtime_ns if doc.exists() else None) == before
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "render.py"), "--bogus"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "error: unrecognized arguments: --bogus" in proc.stderr


def test_gpu_demo_runs_its_worker_as_a_module_with_its_options_intact():
    """Run as a script, demo_gpu.py's directory came first on sys.path and ``import torch`` found dwdp_ops/torch.py
    (the 2 x H200 run of 2026-12-01 failed so): the launcher must run ``python -m dwdp_ops.demo_gpu`` with every
    option the demo passes."""
    import argparse

    from dwdp_ops.launch import build_parser, worker_command

    ns = argparse.Namespace(timeout=60.0, prompts=3, steps=4, min_len=8, max_len=16, vocab=1024, policy="auto",
                            seed=1, dtype="float8_e4m3fn", moe_layers=2, no_check=True, no_graphs=False)
    cmd = demo.gpu_command(ns, 2, "/tmp/r.json")
    assert cmd[1:3] == ["-m", "dwdp_ops.launch"]
    worker = worker_command(build_parser("x").parse_args(cmd[3:]))
    assert worker[1:3] == ["-m", "dwdp_ops.demo_gpu"] and not any(a.endswith(".py") for a in worker)
    assert worker[3:] == ["--out", "/tmp/r.json", "--prompts", "3", "--steps", "4", "--min-len", "8", "--max-len", "16",
                          "--vocab", "1024", "--policy", "auto", "--seed", "1", "--dtype", "float8_e4m3fn",
                          "--router", "balanced", "--moe-layers", "2", "--no-check"]
