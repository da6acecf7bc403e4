"""Bad command-line values of bench/*.py end in one ``error:`` line and exit code 2, checked right after parsing and
before any GPU import or work (no traceback, no GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("coaction_bench.py", ["--sizes", "8x"], "--sizes"),
    ("coaction_bench.py", ["--repeats", "0"], "--repeats"),
    ("coaction_bench.py", ["--pipeline", "0"], "--pipeline"),
    ("coaction_host.py", ["--calls", "-1"], "--calls"),
    ("coaction_host.py", ["--repeats", "0"], "--repeats"),
    ("coaction_profile.py", ["--B", "0"], "--B"),
    ("coaction_split.py", ["--ks", "2,4"], "--ks"),
    ("coaction_split.py", ["--ks", "1,3"], "--ks"),
    ("coaction_split.py", ["--T", "0"], "--T"),
    ("coaction_split.py", ["--B", "1,x"], "--B"),
    ("coaction_split.py", ["--calls", "0"], "--calls"),
    ("coaction_split.py", ["--shape", "o9"], "--shape"),
    ("coaction_split.py", ["--dtype", "fp16"], "--dtype"),
    ("fetch_bandwidth.py", ["--sizes-mib", "x"], "--sizes-mib"),
    ("fetch_bandwidth.py", ["--dtypes", "nope"], "--dtypes"),
    ("fetch_bandwidth.py", ["--repeats", "0"], "--repeats"),
    ("deepseek_forward.py", ["--tokens", "1,x"], "--tokens"),
    ("deepseek_forward.py", ["--requests", "0"], "--requests"),
    ("prefetch_overlap.py", ["--tokens", "1,,2"], "--tokens"),
    ("prefetch_overlap.py", ["--layers", "1"], "--layers"),
    ("gemm_probe.py", ["0"], "argument m"),
    ("demo_policies.py", ["--gpus", "-3", "--dry-run"], "--gpus"),
    ("demo_policies.py", ["--gpus", "0", "--dry-run"], "--gpus"),
    ("demo_policies.py", ["--vocab", "0", "--dry-run"], "--vocab"),
    ("demo_policies.py", ["--timeout", "0", "--dry-run"], "--timeout"),
    ("decode_breakdown.py", ["--vocab", "0", "--dry-run"], "--vocab"),
    ("decode_breakdown.py", ["--top", "-1", "--dry-run"], "--top"),
    ("e2e_dwdp_vs_dep.py", ["--world", "0", "--dry-run"], "--world"),
    ("e2e_dwdp_vs_dep.py", ["--vocab", "0", "--dry-run"], "--vocab"),
    ("e2e_dwdp_vs_dep.py", ["--moe-layers", "0", "--dry-run"], "--moe-layers"),
    ("dispatch_bandwidth.py", ["--world", "0", "--dry-run"], "--world"),
    ("dispatch_bandwidth.py", ["--num-sms", "0", "--dry-run"], "--num-sms"),
    ("dispatch_bandwidth.py", ["--check-max", "-1", "--dry-run"], "--check-max"),
    ("attention_probe.py", ["--warmup", "-1"], "--warmup"),
    ("attention_probe.py", ["--math-max", "-5"], "--math-max"),
]


def run(script: str, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.mark.parametrize(("script", "args", "names"), CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_value_is_one_error_line(script, args, names):
    r = run(script, args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith(f"{script}: error:")]
    assert len(errors) == 1 and names in errors[0], r.stderr


def test_coaction_bench_refuses_an_unknown_compile_mode():
    """The check asks this PyTorch for its torch.compile modes; without PyTorch there is no compiled variant and no
    check (CI may run without PyTorch: .ci/run installs it only where a local wheel is at hand)."""
    pytest.importorskip("torch")
    r = run("coaction_bench.py", ["--compile-mode", "max-autotun"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("coaction_bench.py: error:")]
    assert len(errors) == 1 and "--compile-mode" in errors[0], r.stderr


def test_gemm_probe_help():
    r = run("gemm_probe.py", ["--help"])
    assert r.returncode == 0 and "usage: gemm_probe.py" in r.stdout, r.stderr


@pytest.mark.parametrize("script", ["fetch_bandwidth.py", "prefetch_overlap.py"])
def test_peer_benchmarks_refuse_one_rank(script):
    """One rank has no peer to read from: one error line before any GPU work (fetch_bandwidth had run its size sweep
    and then failed on an empty list of peers' figures; prefetch_overlap measures a fetch rate of 0 bytes and divides
    by it), with or without a launcher's variables (Open MPI's too)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD_", "RANK", "WORLD_SIZE"))}
    for extra in ({}, {"RANK": "0", "WORLD_SIZE": "1"}, {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"}):
        r = run(script, ["--repeats", "2"], {**env, **extra})
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith(f"{script}: error:")]
        assert len(errors) == 1 and "at least 2 ranks" in errors[0], r.stderr


def test_demo_policies_result_record():
    """The result record names the script's own command line once (``machine_facts`` has a ``command`` of its own:
    passing both had raised TypeError at the end of every GPU run) and keeps the machine's other facts."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import demo_policies
    finally:
        sys.path.remove(str(ROOT / "bench"))
    ns = demo_policies.parse(["--pairs", "1", "--prompts", "2"])
    facts = {"card": "NVIDIA H200", "sms": 132, "driver": "580", "cuda_runtime": 13000, "date": "2026-12-01",
             "command": "python3 -m something"}
    rep = {"config": {"moe_layers": 3}, "ranks": []}
    rec = demo_policies.result(ns, rep, ["python3", "-m", "dwdp_ops.launch", "-n", "2"], facts, ["--pairs", "1"])
    assert rec["command"] == "python bench/demo_policies.py --pairs 1"
    assert rec["demo_command"] == "-m dwdp_ops.launch -n 2"
    assert rec["card"] == "NVIDIA H200" and rec["moe_layers"] == 3 and rec["report"] is rep


def test_fetch_bandwidth_refuses_sizes_too_small_for_every_peer():
    """The every_peer pattern reads 1/(N-1) of the largest size from each peer in whole 2 MiB slices: on 4 ranks
    --sizes-mib 2 made that 0 bytes, and the run failed on min() of an empty list after its whole size sweep. Now one
    error line before any GPU work (--layer-only has no pattern and is not refused by this check)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD_", "RANK", "WORLD_SIZE"))}
    r = run("fetch_bandwidth.py", ["--repeats", "2", "--sizes-mib", "2"], {**env, "RANK": "0", "WORLD_SIZE": "4"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("fetch_bandwidth.py: error:")]
    assert len(errors) == 1 and "--sizes-mib" in errors[0] and "at least 6 MiB" in errors[0], r.stderr


@pytest.mark.parametrize(("script", "args"), [
    ("fetch_bandwidth.py", ["--repeats", "2"]),
    ("prefetch_overlap.py", ["--repeats", "2"]),
    ("dispatch_bandwidth.py", ["--repeats", "2"]),
    ("e2e_dwdp_vs_dep.py", ["--iterations", "3"]),
])
def test_expert_split_benchmarks_refuse_a_world_that_does_not_divide_256(script, args):
    """Their layers split DeepSeek-R1's 256 experts disjointly over the ranks (``ExpertPartition.disjoint``, which
    refuses N not dividing 256): on 3 ranks fetch_bandwidth had run its whole size sweep and patterns before failing
    in the DWDP layer case, e2e_dwdp_vs_dep had built the model's weights and run its all-local check; the others
    failed after starting NVSHMEM. Now one error line before any GPU work, naming the world size."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD_", "RANK", "WORLD_SIZE"))}
    r = run(script, args, {**env, "RANK": "0", "WORLD_SIZE": "3"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith(f"{script}: error:")]
    assert len(errors) == 1 and "divide 256" in errors[0] and "got 3" in errors[0], r.stderr
