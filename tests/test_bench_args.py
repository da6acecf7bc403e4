"""Bad command-line values of bench/*.py end in one ``error:`` line and exit code 2, checked right after parsing and
before any GPU import or work (no traceback, no GPU needed)."""

from __future__ import annotations

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
    ("fetch_bandwidth.py", ["--sizes-mib", "x"], "--sizes-mib"),
    ("fetch_bandwidth.py", ["--dtypes", "nope"], "--dtypes"),
    ("fetch_bandwidth.py", ["--repeats", "0"], "--repeats"),
    ("deepseek_forward.py", ["--tokens", "1,x"], "--tokens"),
    ("deepseek_forward.py", ["--requests", "0"], "--requests"),
    ("prefetch_overlap.py", ["--tokens", "1,,2"], "--tokens"),
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


def run(script: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(("script", "args", "names"), CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_value_is_one_error_line(script, args, names):
    r = run(script, args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith(f"{script}: error:")]
    assert len(errors) == 1 and names in errors[0], r.stderr


def test_gemm_probe_help():
    r = run("gemm_probe.py", ["--help"])
    assert r.returncode == 0 and "usage: gemm_probe.py" in r.stdout, r.stderr
