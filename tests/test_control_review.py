"""Control-plane review: races and state errors of the rendezvous, the runtime's lifecycle and the symmetric
module's argument checks, each found failing on the code before its fix (CPU only)."""

from __future__ import annotations

import threading
import time

import pytest
from dwdp_ops.launch import free_port
from dwdp_ops.rendezvous import Rendezvous
from test_runtime_host import FakeBackend


@pytest.mark.timeout(120)
def test_second_rendezvous_on_the_same_port_waits_for_the_first_to_close():
    """Two rendezvous one after the other on one port: rank 1 is done with the first and dials the second while rank
    0 still holds the first (it closes it a moment later). Rank 1's hello reached the first one's doorman, which
    answered "arrived after all 2 ranks had joined", and the second rendezvous failed on rank 1 (then on rank 0,
    which waited the whole timeout for it)."""
    port, out = free_port(), {}

    def rank(r):
        try:
            with Rendezvous(r, 2, "127.0.0.1", port, 30.0) as first:
                first.barrier("first")
                if r == 0:
                    time.sleep(2.0)  # rank 1 dials the next rendezvous meanwhile
            with Rendezvous(r, 2, "127.0.0.1", port, 30.0) as second:
                out[r] = second.allgather("second", bytes([r]))
        except Exception as e:  # noqa: BLE001
            out[r] = e

    _run_ranks(rank)
    assert out == {0: [b"\x00", b"\x01"], 1: [b"\x00", b"\x01"]}, out


class _Backend(FakeBackend):
    """test_runtime_host's fake ``_C`` with failures injected: ``fail`` maps a method name to the exception it
    raises."""

    def __init__(self, fail=None):
        super().__init__()
        self.fail = fail or {}

    def _maybe_fail(self, name):
        if name in self.fail:
            raise self.fail[name]

    def get_unique_id(self, device):
        self._maybe_fail("get_unique_id")
        return super().get_unique_id(device)

    def finalize(self):
        self._maybe_fail("finalize")
        super().finalize()


def _run_ranks(rank, world: int = 2, join_s: float = 100) -> None:
    """Runs ``rank(r)`` for every rank of ``world`` in threads and joins them."""
    ts = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(join_s)


def _environ(rank, world, port):
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_PORT": str(port)}


@pytest.mark.timeout(120)
def test_finalize_closes_the_control_plane_when_nvshmem_finalize_raises():
    """NVSHMEM's finalize raising on rank 0 left rank 0's control plane open for the life of the process (``rdv.close``
    came after ``be.finalize()`` in the same ``finally``): its listener kept MASTER_PORT, its doorman thread ran on."""
    import socket

    from dwdp_ops.runtime import Runtime

    port, out = free_port(), {}

    def rank(r):
        rt = Runtime(_Backend({"finalize": RuntimeError("nvshmem finalize failed")} if r == 0 else None))
        try:
            rt.init(environ=_environ(r, 2, port), timeout=20)
            rt.finalize()
            out[r] = rt.state
        except Exception as e:  # noqa: BLE001
            out[r] = e

    _run_ranks(rank)
    assert out[1] == "finalized", out
    assert isinstance(out[0], RuntimeError) and "nvshmem finalize failed" in str(out[0]), out
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # what a new control plane at this port does
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(1)


@pytest.mark.timeout(60)
def test_init_lets_system_exit_through():
    """``sys.exit`` during ``init()`` (a signal handler's, or a backend's) became "DwdpError: NVSHMEM initialisation
    failed: 3", exiting with 1 instead of the code asked for; KeyboardInterrupt already went through unchanged."""
    from dwdp_ops.runtime import Runtime

    rt = Runtime(_Backend({"get_unique_id": SystemExit(3)}))
    with pytest.raises(SystemExit) as info:
        rt.init(environ={}, timeout=5)
    assert info.value.code == 3
    assert rt.state == "new"  # NVSHMEM was never touched


@pytest.mark.parametrize("shape", [2.0, None, object()], ids=["float", "none", "object"])
def test_symmetric_empty_names_a_shape_that_is_not_a_sequence(shape):
    """A shape that is neither an int nor iterable raised Python's own "'float' object is not iterable", naming
    neither the argument nor what it must be; checked before the runtime is asked for anything."""
    from dwdp_ops.symmetric import symmetric_empty

    with pytest.raises(TypeError, match=r"shape must be an int or a sequence of ints, got "):
        symmetric_empty(shape)


@pytest.mark.parametrize("addr, lo", [("127.0.1.1", True), ("127.0.0.1", True), ("localhost", True),
                                      ("10.0.0.5", False), ("node1", False)])
def test_loopback_master_addr_sets_the_uid_bootstrap_to_lo(monkeypatch, addr, lo):
    """docs/environment.md: ``init()`` defaults NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME / _FAMILY to lo / AF_INET "when
    MASTER_ADDR is a loopback address"; only the strings '127.0.0.1' and 'localhost' were recognised, so 127.0.1.1
    (Debian's address of the host's own name) left NVSHMEM's unique-ID bootstrap on another interface."""
    from dwdp_ops.env import DistEnv
    from dwdp_ops.runtime import Runtime, _restore_environ

    for name in ("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "NVSHMEM_BOOTSTRAP_UID_SOCK_FAMILY"):
        monkeypatch.delenv(name, raising=False)
    import os

    saved = Runtime._set_nvshmem_env(DistEnv(master_addr=addr), None)
    try:
        got = (os.environ.get("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME"), os.environ.get("NVSHMEM_BOOTSTRAP_UID_SOCK_FAMILY"))
    finally:
        _restore_environ(saved)
    assert got == (("lo", "AF_INET") if lo else (None, None))


@pytest.mark.timeout(120)
def test_a_rank_that_sent_its_part_and_died_fails_the_collective_at_once_naming_the_ranks_missing():
    """Rank 0 counted a rank that had sent its part and then died both as arrived and as dead: with rank 2 not yet
    there it stopped waiting and said "rank(s) [1] disconnected; 2 of 3 ranks arrived", counting the dead rank and
    naming nobody missing (and a rank that died before sending made it wait the whole timeout). It now fails at once
    on a death, counting only the live ranks that arrived and naming those that had not."""
    import subprocess
    import sys

    from dwdp_ops.errors import RendezvousError

    port, timeout = free_port(), 40.0
    code = ("import os, threading; from dwdp_ops.rendezvous import Rendezvous\n"
            f"r = Rendezvous(1, 3, '127.0.0.1', {port}, {timeout})\n"
            "threading.Timer(1.0, os._exit, (3,)).start()\n"  # dies after it has sent its part
            "r.allgather('g', b'one')\n")
    peer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    late, stop = {}, threading.Event()

    def rank2():  # joins the job but has not reached the collective
        try:
            with Rendezvous(2, 3, "127.0.0.1", port, timeout):
                stop.wait(60)
        except Exception as e:  # noqa: BLE001
            late["error"] = e

    t = threading.Thread(target=rank2, daemon=True)
    t.start()
    try:
        with Rendezvous(0, 3, "127.0.0.1", port, timeout) as rdv:
            t0 = time.monotonic()
            with pytest.raises(RendezvousError) as info:
                rdv.allgather("g", b"zero")
            took = time.monotonic() - t0
    finally:
        stop.set()
        peer.kill()
        peer.wait(30)
        t.join(30)
    msg = str(info.value)
    assert "rank(s) [1] disconnected" in msg and "1 of 3 ranks arrived" in msg, msg
    assert "rank(s) [2] had not arrived" in msg, msg
    assert took < timeout / 2, took  # at once, not at the timeout


def test_a_second_init_with_another_timeout_is_not_a_silent_noop(monkeypatch):
    """A second init with another timeout returned the runtime unchanged: the first timeout kept, without a word. The
    timeout is now one of the arguments a second init must repeat (DWDP_TIMEOUT's included)."""
    from dwdp_ops.errors import DwdpError
    from dwdp_ops.runtime import Runtime
    from test_runtime_host import FakeBackend

    monkeypatch.setenv("DWDP_TIMEOUT", "7")
    rt = Runtime(FakeBackend())
    rt.init(environ={})
    assert rt.rendezvous.timeout == 7.0
    assert rt.init(environ={}) is rt and rt.init(environ={}, timeout=7) is rt
    with pytest.raises(DwdpError, match=r"called again with other arguments.*timeout=7\.0.*timeout=9\.0"):
        rt.init(environ={}, timeout=9)
    rt.finalize()
