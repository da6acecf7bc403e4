"""The NCCL baseline's multi-process failures on the CPU (gloo; the house rule: anything multi-process times out with
a message naming the missing ranks). Each test starts the ranks of tests/multiproc/nccl_timeouts.py itself (no
launcher), with DWDP_TIMEOUT=3, and leaves some out, kills one or stalls one.

Before: a rank missing at set-up gave torch's "Timed out after 4 seconds waiting for clients. 1/2 clients joined."
(rank 0) or "The client socket has timed out after 3000ms while trying to connect" (the others); a silent rank in a
dispatch gave gloo's "Timed out waiting 3000ms for send operation to complete"; a dead one "Connection reset by
peer": no rank named anywhere."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from conftest import MULTIPROC, ROOT, launcher_free_env

dist = pytest.importorskip("torch.distributed", reason="the NCCL baseline needs torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed has no gloo", allow_module_level=True)

from dwdp_ops.launch import free_port  # noqa: E402

TIMEOUT = 3


def _start(scenario: str, rank: int, world: int, port: int):
    env = launcher_free_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port - 1), DWDP_TIMEOUT=str(TIMEOUT))
    return subprocess.Popen([sys.executable, str(MULTIPROC / "nccl_timeouts.py"), scenario], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _result(proc, limit: float = 30) -> tuple[float, str]:
    """(seconds, message) of the rank's RESULT line; (None, its output) without one (a rank that exits or aborts)."""
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the rank did not finish within {limit} s:\n{out[-4000:]}")
    m = re.search(r"^RESULT rank \d+ after ([\d.]+) s: (.*)$", out, re.M)
    return (float(m.group(1)), m.group(2)) if m else (None, "no RESULT line; output:\n" + out[-4000:])


def _run(scenario: str, world: int, ranks, delays=None) -> dict[int, tuple[float, str]]:
    port, delays = free_port(), delays or {}
    procs = {}
    t0 = time.monotonic()
    for r in sorted(ranks, key=lambda r: delays.get(r, 0)):
        time.sleep(max(0.0, delays.get(r, 0) - (time.monotonic() - t0)))
        procs[r] = _start(scenario, r, world, port)
    return {r: _result(p) for r, p in procs.items()}


@pytest.mark.timeout(20)
def test_a_rank_missing_at_set_up_is_named_by_rank_0():
    (s, msg), = _run("init", 2, [0]).values()
    assert msg.startswith("RendezvousError: torch.distributed set-up at 127.0.0.1:"), msg
    assert "rank(s) [1] of 2 did not arrive within 3 s" in msg and "arrived: [0]" in msg, msg
    assert TIMEOUT - 0.5 < s < TIMEOUT + 3


@pytest.mark.timeout(20)
def test_a_missing_rank_0_is_named_by_the_others():
    (s, msg), = _run("init", 2, [1]).values()
    assert msg.startswith("RendezvousError: torch.distributed set-up: rank 1 of 2 waited"), msg
    assert "for rank 0, which hosts the store at 127.0.0.1:" in msg and "rank 0 is missing" in msg, msg
    assert s < TIMEOUT + 5 + 4  # the timeout and the grace


@pytest.mark.timeout(20)
def test_an_early_rank_gets_rank_0s_report_of_a_missing_rank():
    """Rank 1 starts 2 s before rank 0 and rank 2 never comes: without the grace rank 1 would give up at 3 s, before
    rank 0 (at 2 + 3 s) knows who is missing; with it, both raise rank 0's message naming rank 2."""
    res = _run("init", 3, [0, 1], delays={1: 0.0, 0: 2.0})
    for r in (0, 1):
        assert "rank(s) [2] of 3 did not arrive within 3 s" in res[r][1] and "arrived: [0, 1]" in res[r][1], res
    assert "rank 0's verdict, raised on rank 1" in res[1][1], res


@pytest.mark.timeout(20)
def test_all_ranks_present_set_up_passes():
    res = _run("init", 3, [0, 1, 2], delays={2: 1.0})
    assert all(msg == "ok" for _, msg in res.values()), res


@pytest.mark.timeout(20)
def test_a_silent_rank_in_a_dispatch_is_named():
    """The last rank is alive but never dispatches: gloo's wait times out on the others."""
    res = _run("silent", 3, [0, 1, 2])
    for r in (0, 1):
        s, msg = res[r]
        assert msg.startswith("DwdpError: NcclDispatcher: all_gather_into_tensor of the counts in dispatch #1 failed "
                              f"on rank {r} of 3 after "), res
        assert "(timeout 3 s): rank(s) [2] had not reached dispatch #1 (last dispatch entered: rank 2 #0)" in msg, res
        assert "torch.distributed said: " in msg and s < TIMEOUT + 4, res


@pytest.mark.timeout(20)
@pytest.mark.parametrize("mode, head, who", [
    # the last rank exits after set-up: the others' dispatch fails at once ("Connection reset by peer")
    ("dead", "all_gather_into_tensor of the counts in dispatch #1 failed on rank 0 of 2",
     "rank(s) [1] had not reached dispatch #1 (last dispatch entered: rank 1 #0)"),
    # the last rank skips the combine of dispatch #1 and enters dispatch #2: the others' combine names it
    ("combine", "all_to_all_single of the partials in the combine of dispatch #1 failed on rank 0 of 2",
     "rank(s) [1] had moved on to a later dispatch without this combine (rank 1 #2)"),
], ids=["dead-rank-in-a-dispatch", "rank-skipping-a-combine"])
def test_a_rank_that_breaks_a_collective_is_named(mode, head, who):
    res = _run(mode, 2, [0, 1])
    s, msg = res[0]
    assert msg.startswith(f"DwdpError: NcclDispatcher: {head}"), res
    assert who in msg, res


@pytest.mark.timeout(30)
def test_a_second_set_up_on_the_same_port_checks_afresh():
    """A second set-up in the same processes, on the same port, after destroy_process_group: rank 0's store (kept
    alive by the module for the dispatches' messages) still held the first set-up's keys, so rank 0 found every rank
    joined at once and said "ok" with rank 2 gone, and rank 1 read the first verdict before rank 0 had come back.
    Both must raise rank 0's new verdict naming rank 2."""
    res = _run("reinit", 3, [0, 1, 2])
    assert res[2][1] == "ok", res
    for r in (0, 1):
        s, msg = res[r]
        assert msg.startswith("RendezvousError: torch.distributed set-up at 127.0.0.1:"), res
        assert "rank(s) [2] of 3 did not arrive within 3 s" in msg and "arrived: [0, 1]" in msg, res
    assert "rank 0's verdict, raised on rank 1" in res[1][1], res
    assert TIMEOUT - 0.5 < res[0][0] < TIMEOUT + 3, res
