"""The control plane under torchrun, on CPU: torchrun's own TCPStore listens at MASTER_PORT, so our rendezvous takes
its port from that store (rank 0 publishes a free one) instead of listening there. Real torchrun jobs of
tests/multiproc/launcher_check.py --control-plane; skipped with a reason where torch is not installed."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import MULTIPROC, ROOT, launcher_free_env
from dwdp_ops.env import under_torchrun
from dwdp_ops.launch import free_port

SCRIPT = str(MULTIPROC / "launcher_check.py")


def _torch_distributed() -> str | None:
    try:
        import torch.distributed as dist
    except ImportError as e:
        return f"torch is not installed ({e}); pip install torch to test the torchrun path"
    if not dist.is_available():
        return "this torch build has no torch.distributed"
    return None


needs_torch = pytest.mark.skipif(_torch_distributed() is not None, reason=str(_torch_distributed()))


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"RANK": "0", "WORLD_SIZE": "2"}, False),  # set by hand or by another tool: MASTER_PORT is ours
        ({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}, True),
        ({"RANK": "1", "WORLD_SIZE": "2", "GROUP_RANK": "0"}, True),
        ({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x", "DWDP_LAUNCHER": "dwdp_ops.launch"}, False),
        ({"TORCHELASTIC_RUN_ID": "x"}, False),  # no rank: not a worker
    ],
)
def test_under_torchrun_reads_the_agent_environment(env, expected):
    assert under_torchrun(env) is expected


@needs_torch
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "launcher_args",
    [
        ["--standalone"],  # c10d rendezvous, agent store on a free port
        ["--master-addr", "127.0.0.1", "--master-port", "PORT"],  # static rendezvous at a given MASTER_PORT
    ],
    ids=["standalone", "static"],
)
@pytest.mark.parametrize("torch_pg", [False, True], ids=["ours-only", "with-gloo"])
def test_torchrun_job_uses_the_torchrun_store(launcher_args, torch_pg):
    args = [str(free_port()) if a == "PORT" else a for a in launcher_args]
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, "--nproc-per-node", "2", SCRIPT,
           "--control-plane", "--expect", "torchrun"] + (["--torch-pg"] if torch_pg else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=launcher_free_env(), cwd=ROOT)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    for r in range(2):
        assert f"launcher_check ok rank={r} world=2 launcher=torchrun torchrun_store=True" in out.stdout, text


@needs_torch
@pytest.mark.timeout(120)
def test_without_the_agent_store_rank0_hosts_the_store():
    """TORCHELASTIC_USE_AGENT_STORE=False (torchrun's other mode): nobody listens at MASTER_PORT until rank 0 hosts a
    multi-tenant TCPStore there, which a later torch process group shares."""
    port = free_port()
    base = dict(launcher_free_env(), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                TORCHELASTIC_RUN_ID="test", TORCHELASTIC_USE_AGENT_STORE="False", TORCHELASTIC_RESTART_COUNT="0")
    procs = [subprocess.Popen([sys.executable, SCRIPT, "--control-plane", "--torch-pg"],
                              env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=ROOT) for r in range(2)]
    outs = [p.communicate(timeout=100)[0] for p in procs]
    both = "".join(f"--- rank {r} (exit {p.returncode}) ---\n{text}" for r, (p, text) in enumerate(zip(procs, outs)))
    for r, (p, text) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, both
        assert f"launcher_check ok rank={r} world=2 launcher=torchrun torchrun_store=True" in text, both


@needs_torch
@pytest.mark.timeout(60)
def test_rank0s_hosted_store_outlives_its_rendezvous(monkeypatch):
    """Without the agent store, the TCPStore server rank 0 hosts at MASTER_PORT stays up after its rendezvous closes.
    It used to stop with its last TCPStore object: rank 1, already connected to it for the next rendezvous, lost its
    connection and rank 0 then waited the whole timeout for it ("rank(s) [1] of 2 never arrived")."""
    from datetime import timedelta

    from dwdp_ops.rendezvous import Rendezvous
    from torch.distributed import TCPStore

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    port = free_port()
    code = ("import sys; from dwdp_ops.rendezvous import Rendezvous\n"
            f"with Rendezvous(1, 2, '127.0.0.1', {port}, 30.0, torchrun=True) as r: r.barrier('b')\n"
            "print('rank 1 ok', flush=True)")
    peer = subprocess.Popen([sys.executable, "-c", code], env=dict(launcher_free_env(), TORCHELASTIC_USE_AGENT_STORE="False"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        with Rendezvous(0, 2, "127.0.0.1", port, 30.0, torchrun=True) as rdv:
            rdv.barrier("b")
        out = peer.communicate(timeout=30)[0]
    finally:
        peer.kill()
    assert peer.returncode == 0 and "rank 1 ok" in out, out
    client = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=3), wait_for_workers=False)
    client.set("after", "1")
    assert client.get("after") == b"1"


@needs_torch
@pytest.mark.timeout(60)
def test_missing_rank0_is_reported_through_the_store():
    """Rank 1 alone under a torchrun environment: it names the store and the missing port instead of hanging."""
    from dwdp_ops.errors import RendezvousError
    from dwdp_ops.rendezvous import Rendezvous
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with pytest.raises(RendezvousError, match=r"rank 1 did not find rank 0's control-plane port in torchrun's store"):
        Rendezvous(1, 2, "127.0.0.1", store.port, 1.0, torchrun=True)
    del store


@needs_torch
@pytest.mark.timeout(60)
def test_no_store_at_master_port_is_reported():
    from dwdp_ops.errors import RendezvousError
    from dwdp_ops.rendezvous import Rendezvous

    with pytest.raises(RendezvousError, match=r"rank 1 cannot reach torchrun's store at 127\.0\.0\.1:\d+"):
        Rendezvous(1, 2, "127.0.0.1", free_port(), 1.0, torchrun=True)


@needs_torch
@pytest.mark.timeout(60)
def test_a_late_store_without_rank0s_port_fails_within_the_timeout(monkeypatch):
    """Rank 1 may wait for torchrun's store to come up (rank 0 hosts it without the agent store), then for rank 0's
    port in it: the wait for the port took a whole timeout more after the store answered, so a store that came up
    late and never got the port kept rank 1 for up to twice the timeout. Both now share the set-up's deadline."""
    import threading
    import time
    from datetime import timedelta

    from dwdp_ops.errors import RendezvousError
    from dwdp_ops.rendezvous import Rendezvous
    from torch.distributed import TCPStore

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    port, timeout, out = free_port(), 4.0, {}

    def rank1():
        t0 = time.monotonic()
        try:
            Rendezvous(1, 2, "127.0.0.1", port, timeout, torchrun=True)
        except RendezvousError as e:
            out["error"] = e
        out["took"] = time.monotonic() - t0

    t = threading.Thread(target=rank1)
    t.start()
    time.sleep(timeout * 0.75)  # the store comes up late, and rank 0's port never reaches it
    store = TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    t.join(30)
    del store
    assert "did not find rank 0's control-plane port" in str(out.get("error")), out
    assert out["took"] < timeout * 1.5, out  # had been about timeout * 1.75
