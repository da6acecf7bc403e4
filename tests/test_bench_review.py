"""Review of the CPU-reachable parts of bench/*.py: bad command-line values end in one ``error:`` line naming the
option and exit code 2 before any GPU work (no traceback, no value passed on to fail later), and the host-side
helpers (plots, records) do what their docstrings say. No GPU needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def run(script: str, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


def _no_launcher_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD_", "RANK", "WORLD_SIZE"))}


def one_error(r: subprocess.CompletedProcess, script: str, name: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith(f"{script}: error:")]
    assert len(errors) == 1 and name in errors[0], r.stderr


@pytest.mark.parametrize(("args", "name"), [
    (["--budgets", "16384,x"], "--budgets"),  # had said only "invalid literal for int() with base 10: 'x'"
    (["--dists", "ratio0.8,zz"], "--dists"),  # had said "a distribution is ..." without the option
    (["--modes", "dep,dep", "--iterations", "2"], "--modes"),  # had been accepted (see below)
    (["--modes", "dwdp,dep,dep", "--iterations", "3"], "--modes"),
    (["--seed", "-1"], "--seed"),  # had been a numpy traceback in the dry run's plan
])
def test_e2e_bad_values_name_their_option(args, name):
    """A repeated mode had been accepted: its rows of every iteration fell into one list of twice the iterations, and
    ``summarise`` raised ValueError (rows not the same iterations) after the whole GPU run, or mixed two runs of one
    mode into its figures."""
    one_error(run("e2e_dwdp_vs_dep.py", ["--dry-run", *args]), "e2e_dwdp_vs_dep.py", name)


@pytest.mark.parametrize("script", ["e2e_dwdp_vs_dep.py", "dispatch_bandwidth.py"])
@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_dry_run_world_from_a_bad_world_size_is_one_error_line(script, value):
    """--dry-run without --world reads WORLD_SIZE: a malformed one had been a ValueError traceback; 0 had printed an
    empty plan ("tokens per iteration per rank []") with exit code 0 in e2e_dwdp_vs_dep."""
    r = run(script, ["--dry-run"], {**_no_launcher_env(), "WORLD_SIZE": value})
    one_error(r, script, "WORLD_SIZE")
    assert run(script, ["--dry-run"], {**_no_launcher_env(), "WORLD_SIZE": "4"}).returncode == 0


def test_dispatch_bandwidth_refuses_a_bad_heap_before_any_gpu_work():
    """--heap went to dwdp_ops.init unchecked: a ValueError traceback from runtime._parse_size after the imports of
    torch and NCCL (on a GPU machine, after the launcher started every rank)."""
    one_error(run("dispatch_bandwidth.py", ["--heap", "abc"], _no_launcher_env()), "dispatch_bandwidth.py", "--heap")
    one_error(run("dispatch_bandwidth.py", ["--heap", "0"], _no_launcher_env()), "dispatch_bandwidth.py", "--heap")


def test_expert_gemm_refuses_a_negative_seed():
    """numpy's generator refuses a negative seed: a traceback in the dry run (and in the GPU run after the weights)."""
    one_error(run("expert_gemm.py", ["--dry-run", "--seed", "-1", "--tokens", "8"]), "expert_gemm.py", "--seed")


@pytest.mark.parametrize(("args", "name"), [
    (["--seed", "-1"], "--seed"),  # prompts_for refuses it after the weights were built on the GPU
    (["--moe-layers", "100"], "--moe-layers"),  # R1 has 58 MoE layers: the dry run had printed 1127 GB of experts
    (["--vocab", "1000000"], "--vocab"),  # beyond R1's vocabulary, which the model is cut to
])
def test_decode_breakdown_bad_values(args, name):
    one_error(run("decode_breakdown.py", ["--dry-run", *args]), "decode_breakdown.py", name)


@pytest.mark.parametrize(("args", "name"), [
    (["--seed", "-1"], "--seed"),
    (["--moe-layers", "59"], "--moe-layers"),
    (["--vocab", "1000000"], "--vocab"),
    (["--steps", "200000"], "--steps"),
])
def test_demo_policies_checks_what_its_job_would_refuse(args, name):
    """demo_policies passes these to every rank worker of ``dwdp_ops.demo_gpu``, which refuses them: the dry run had
    printed a command that fails, and a real run launched the job on every GPU to fail there."""
    one_error(run("demo_policies.py", ["--dry-run", *args]), "demo_policies.py", name)


def test_coaction_split_plot_when_the_pick_was_not_forced(tmp_path):
    """``--ks 1,2`` times K = 1 and 2, while the launch may pick 4: the plot had raised KeyError ('K4') after the JSON
    was written (no plot). The pick's line now leaves such cases out."""
    pytest.importorskip("matplotlib")
    import coaction_split

    cases = [dict(B=1, T=100, us={"K1": 9.0, "K2": 5.0}, pick=4), dict(B=16, T=100, us={"K1": 9.5, "K2": 6.0}, pick=2)]
    path = tmp_path / "split.png"
    coaction_split.plot(cases, [100], path)
    assert path.stat().st_size > 0


def test_fetch_bandwidth_refuses_a_repeated_dtype():
    """A repeated --dtypes had timed the layer twice under one case name: render.tables merged the two runs' rows
    under one heading and the plot drew their bars over each other."""
    r = run("fetch_bandwidth.py", ["--dtypes", "bfloat16,bfloat16"], {**_no_launcher_env(), "RANK": "0",
                                                                       "WORLD_SIZE": "2"})
    one_error(r, "fetch_bandwidth.py", "--dtypes")


def test_render_refuses_a_doc_without_its_markers(tmp_path, monkeypatch):
    """docs/benchmarks.md without the generated section's markers: render had left it as it was and printed "wrote
    ...", so the tables were silently not regenerated. Now it exits naming the markers and leaves the file alone."""
    pytest.importorskip("matplotlib")
    import render

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nno markers here\n")
    monkeypatch.setattr(render, "RESULTS", tmp_path)
    monkeypatch.setattr(render, "DOC", doc)
    with pytest.raises(SystemExit, match="fetch_bandwidth:begin"):
        render.main([])
    assert doc.read_text() == "# Benchmarks\n\nno markers here\n"


@pytest.mark.parametrize("script, extra", [
    ("e2e_dwdp_vs_dep.py", ["--dry-run"]),
    ("dispatch_bandwidth.py", ["--dry-run"]),
    ("fetch_bandwidth.py", []),
    ("prefetch_overlap.py", []),
    ("decode_breakdown.py", []),
    ("demo_policies.py", []),
])
def test_a_tag_that_is_no_file_name_suffix_is_a_usage_error(script, extra):
    """--tag ends the result file's name: 'a/b' had put it in a directory that does not exist, so the write failed
    with FileNotFoundError after the whole (GPU) run. Every script now refuses it when parsing, naming --tag."""
    one_error(run(script, ["--tag", "a/b", *extra], env=_no_launcher_env()), script, "--tag")


def test_file_tag_keeps_a_plain_suffix():
    from common import file_tag

    assert file_tag("") == "" and file_tag("_session20-b.1") == "_session20-b.1"
