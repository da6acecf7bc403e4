"""The TCP control plane: payload exchange between real processes, and every failure naming the ranks concerned."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import struct
import threading
import time

import numpy as np
import pytest
from dwdp_ops.errors import RendezvousError
from dwdp_ops.launch import free_port
from dwdp_ops.rendezvous import Rendezvous, job_id


def _ranks_in_threads(world, fn, *, port=None, timeout=10.0, worlds=None, join_s=None):
    """Runs fn(rdv_or_exception, rank) for every rank in its own thread; returns {rank: result or exception}."""
    port = port or free_port()
    out = {}

    def body(r):
        try:
            rdv = Rendezvous(r, (worlds or {}).get(r, world), "127.0.0.1", port, timeout)
        except Exception as e:  # noqa: BLE001
            out[r] = e
            return
        try:
            out[r] = fn(rdv, r)
        except Exception as e:  # noqa: BLE001
            out[r] = e
        finally:
            rdv.close()

    ts = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(join_s or timeout * 3)
    return out


def _proc_rank(rank, world, port, q):
    with Rendezvous(rank, world, "127.0.0.1", port, 20.0) as rdv:
        got = rdv.allgather("exchange", f"payload-from-{rank}-pid-{os.getpid()}".encode() * (rank + 1))
        uid = rdv.broadcast("uid", os.urandom(128) if rank == 0 else b"")
        q.put((rank, [g.decode() for g in got], uid.hex()))


def test_two_processes_exchange_payload():
    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_proc_rank, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: (g, u) for r, g, u in (q.get(timeout=60) for _ in procs)}
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for r in range(2):
        gathered, uid = results[r]
        assert [g.split("-pid-")[0] for g in gathered] == ["payload-from-0", "payload-from-1"]
        assert gathered[1].count("payload-from-1") == 2
        assert len(bytes.fromhex(uid)) == 128
    assert results[0] == results[1]  # every rank sees the same bytes, rank 0's unique ID included


@pytest.mark.parametrize("world", [1, 3, 4])
def test_allgather_orders_by_rank(world):
    out = _ranks_in_threads(world, lambda rdv, r: [rdv.allgather(f"step{i}", bytes([r, i])) for i in range(5)])
    for r in range(world):
        assert out[r] == [[bytes([q, i]) for q in range(world)] for i in range(5)]


def test_world_size_disagreement_is_named():
    out = _ranks_in_threads(2, lambda rdv, r: None, worlds={0: 2, 1: 3}, timeout=5.0)
    for r in (0, 1):
        assert isinstance(out[r], RendezvousError), out[r]
        assert "world size disagrees" in str(out[r]) and "rank 1 has 3" in str(out[r])


def test_missing_ranks_are_named_on_timeout():
    port = free_port()
    t0 = time.monotonic()
    out = {}

    def rank1():
        try:
            out[1] = Rendezvous(1, 4, "127.0.0.1", port, 5.0)
        except RendezvousError as e:
            out[1] = e

    th = threading.Thread(target=rank1)
    th.start()
    try:
        with pytest.raises(RendezvousError, match=r"rank\(s\) \[2, 3\] of 4 never arrived"):
            Rendezvous(0, 4, "127.0.0.1", port, 1.5)
    finally:
        th.join(10)
    # the rank that did arrive is told the same reason instead of waiting for its own timeout
    assert isinstance(out[1], RendezvousError) and "[2, 3] of 4 never arrived" in str(out[1])
    assert time.monotonic() - t0 < 5


@pytest.mark.timeout(60)
def test_rank_that_starts_before_rank0_learns_the_missing_ranks():
    """Same timeout everywhere, rank 1 started 0.5 s before rank 0, rank 2 never comes: rank 1 waited for its welcome
    only until its own deadline, so it gave up half a second before rank 0's report and said just 'rank 0 did not
    admit it', naming no missing rank. It now waits a grace period for rank 0's report, as in a collective."""
    port, out = free_port(), {}

    def rank(r, delay):
        time.sleep(delay)
        try:
            Rendezvous(r, 3, "127.0.0.1", port, 2.0).close()
        except RendezvousError as e:
            out[r] = e

    ts = [threading.Thread(target=rank, args=a) for a in ((1, 0.0), (0, 0.5))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    for r in (0, 1):
        assert isinstance(out.get(r), RendezvousError) and "rank(s) [2] of 3 never arrived" in str(out[r]), out


def test_rank_without_root_times_out():
    with pytest.raises(RendezvousError, match=r"rank 1 could not reach rank 0 at 127.0.0.1:\d+ within 0.5 s"):
        Rendezvous(1, 2, "127.0.0.1", free_port(), 0.5)


def test_collective_mismatch_is_reported_everywhere():
    out = _ranks_in_threads(2, lambda rdv, r: rdv.allgather("barrier" if r == 0 else "symmetric_alloc"))
    for r in (0, 1):
        assert isinstance(out[r], RendezvousError)
        assert "collective mismatch" in str(out[r]) and "'symmetric_alloc'" in str(out[r])


def test_late_rank_in_collective_times_out_with_name():
    def fn(rdv, r):
        if r == 2:
            time.sleep(3.0)
            return "late"
        return rdv.barrier("step")

    out = _ranks_in_threads(3, fn, timeout=1.0)
    for r in (0, 1):
        assert isinstance(out[r], RendezvousError)
        assert "step: rank(s) [2] did not arrive within 1 s" in str(out[r])


def test_broken_rendezvous_refuses_further_use():
    def fn(rdv, r):
        if r == 1:
            return "gone"  # closes without joining the barrier
        try:
            rdv.barrier("b1")
        except RendezvousError:
            pass
        return rdv.barrier("b2")

    out = _ranks_in_threads(2, fn, timeout=3.0)
    assert isinstance(out[0], RendezvousError) and "failed earlier" in str(out[0])


def _victim(rank, world, port, ready, victim):
    rdv = Rendezvous(rank, world, "127.0.0.1", port, 30.0)
    rdv.barrier("ready")
    ready.set()
    if rank == victim:
        time.sleep(60)  # killed by the test
    t0 = time.monotonic()
    try:
        rdv.barrier("after-kill")
    except RendezvousError as e:
        print(f"SURVIVOR {rank} {time.monotonic() - t0:.2f}s: {e}", flush=True)
        os._exit(7)
    os._exit(0)


@pytest.mark.parametrize("victim", [1, 2])  # a middle rank and the last one (rank 0 serves the rendezvous)
def test_killed_rank_makes_survivors_fail_fast(victim, capfd):
    ctx = mp.get_context("fork")
    port = free_port()
    ready = ctx.Event()
    procs = [ctx.Process(target=_victim, args=(r, 3, port, ready, victim)) for r in range(3)]
    for p in procs:
        p.start()
    assert ready.wait(30)
    time.sleep(0.3)
    os.kill(procs[victim].pid, signal.SIGKILL)
    t0 = time.monotonic()
    for r, p in enumerate(procs):
        p.join(20)
        if r != victim:
            assert p.exitcode == 7, f"rank {r} did not fail cleanly: exit {p.exitcode}"
    assert time.monotonic() - t0 < 15
    err = capfd.readouterr().out
    assert f"rank(s) [{victim}] disconnected" in err


def test_collectives_from_several_threads_of_one_rank_never_mix_replies():
    """Two threads of every rank issue collectives at once: each call must get back a complete gather whose own entry
    is its own payload (without the per-process lock the threads read each other's replies)."""

    def fn(rdv, r):
        errors = []

        def worker(tid):
            for i in range(30):
                mine = f"{r}:{tid}:{i}".encode()
                got = rdv.allgather("work", mine)
                if len(got) != 3 or got[r] != mine:
                    errors.append((tid, i, got))

        ts = [threading.Thread(target=worker, args=(tid,)) for tid in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        return errors

    out = _ranks_in_threads(3, fn, timeout=20.0)
    assert all(out[r] == [] for r in range(3)), out


def _raw_client(port, frames, deadline_s=5.0):
    """A non-rank client: connects (retrying until rank 0 listens) and sends raw bytes."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            break
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.02)
    for f in frames:
        s.sendall(f)
    return s


def _frame(obj) -> bytes:
    data = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    return struct.pack(">I", len(data)) + data


@pytest.mark.timeout(60)
def test_send_to_a_rank0_that_does_not_read_is_bounded():
    """Rank 0 is alive but stuck before the collective; rank 1's send of more than the socket buffers hold must fail
    within its timeout, naming rank 0, instead of blocking forever in sendall."""
    port, stop = free_port(), threading.Event()

    def rank0():
        with Rendezvous(0, 2, "127.0.0.1", port, 5.0):
            stop.wait(30)

    th = threading.Thread(target=rank0, daemon=True)
    th.start()
    try:
        with Rendezvous(1, 2, "127.0.0.1", port, 1.0) as rdv:
            t0 = time.monotonic()
            with pytest.raises(RendezvousError, match=r"x: rank 1 could not send its 32000000-byte payload to rank 0"):
                rdv.allgather("x", b"a" * 32_000_000)
            assert time.monotonic() - t0 < 5 and rdv.broken
    finally:
        stop.set()
        th.join(10)


@pytest.mark.timeout(60)
def test_oversized_frame_is_refused_by_its_sender_and_reported_to_all():
    out = _ranks_in_threads(3, lambda rdv, r: rdv.allgather("big", b"a" * (60_000_000 if r == 1 else 10)), timeout=3.0)
    for r in range(3):
        assert isinstance(out[r], RendezvousError), (r, out[r])
        assert "rank 1 cannot send its payload of 60000000 bytes" in str(out[r]) and "exceeds" in str(out[r])
    assert "rank 1 gave up" in str(out[0]) and "rank 1 gave up" in str(out[2])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("junk", [
    _frame(b"abc"), _frame([1]), _frame({"op": "hello"}), _frame({"op": "hello", "rank": "one", "world": 2}),
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["not-json", "list", "no-rank", "str-rank", "http"])
def test_stray_client_during_setup_is_ignored(junk):
    """The stray client arrives between rank 0 and rank 1; rank 0 drops it and the job proceeds."""
    port, out, socks = free_port(), {}, []

    def rank(r):
        try:
            with Rendezvous(r, 2, "127.0.0.1", port, 5.0) as rdv:
                out[r] = rdv.allgather("g", bytes([r]))
        except RendezvousError as e:
            out[r] = e

    ts = [threading.Thread(target=rank, args=(0,))]
    ts[0].start()
    try:
        socks.append(_raw_client(port, [junk]))
        time.sleep(0.3)
        ts.append(threading.Thread(target=rank, args=(1,)))
        ts[1].start()
    finally:
        for t in ts:
            t.join(30)
        for s in socks:
            s.close()
    assert out == {0: [b"\0", b"\1"], 1: [b"\0", b"\1"]}, out


@pytest.mark.timeout(60)
def test_stray_client_is_named_when_setup_times_out():
    port = free_port()
    socks = []

    def stray():
        socks.append(_raw_client(port, [_frame([1])]))

    th = threading.Thread(target=stray)
    th.start()
    try:
        with pytest.raises(RendezvousError, match=r"rank\(s\) \[1\] of 2 never arrived; ignored client\(s\) .*127\.0\.0\.1:\d+ \(malformed"):
            Rendezvous(0, 2, "127.0.0.1", port, 1.5)
    finally:
        th.join(10)
        for s in socks:
            s.close()


@pytest.mark.timeout(60)
def test_rank_that_dies_before_the_reply_is_named_and_breaks_the_rendezvous():
    port, out = free_port(), {}

    def real(r):
        try:
            with Rendezvous(r, 3, "127.0.0.1", port, 3.0) as rdv:
                time.sleep(0.5)
                try:
                    out[r] = rdv.allgather("x", b"a" * 1000)
                except RendezvousError as e:
                    out[r] = e
                out[f"broken{r}"] = rdv.broken
        except RendezvousError as e:
            out[r] = e

    ts = [threading.Thread(target=real, args=(r,)) for r in (0, 2)]
    for t in ts:
        t.start()
    s = None
    try:
        s = _raw_client(port, [_frame({"op": "hello", "rank": 1, "world": 3, "job": job_id()})])
        s.recv(100)  # welcome
        s.sendall(_frame({"op": "gather", "name": "x", "seq": 1, "data": ""}))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # crash-like reset
        s.close()
    finally:
        for t in ts:
            t.join(20)
    assert isinstance(out[0], RendezvousError) and "rank(s) [1]" in str(out[0]), out
    assert out["broken0"] is True
    assert isinstance(out[2], RendezvousError) and "[1]" in str(out[2]), out


@pytest.mark.timeout(60)
def test_rank_that_gives_up_tells_rank0():
    """Rank 0 reaches the collective after rank 1 stopped waiting: rank 0 must fail naming rank 1, not succeed."""
    def fn(rdv, r):
        if r == 0:
            time.sleep(7.0)  # rank 1 waits timeout + 5 s of grace
        return rdv.allgather("x", bytes([r]))

    out = _ranks_in_threads(2, fn, timeout=1.0, join_s=20)
    assert isinstance(out[1], RendezvousError) and "rank 0 did not answer rank 1 within 1 s" in str(out[1])
    assert isinstance(out[0], RendezvousError) and "x: rank 1 gave up" in str(out[0]), out[0]


@pytest.mark.timeout(60)
def test_rank_that_gives_up_does_not_hide_the_missing_rank():
    """Rank 0 comes 6.5 s late (past rank 1's timeout + grace) and rank 2 never comes: rank 1 can only blame rank 0,
    and rank 0's error (the one it tells every survivor) said just 'rank 1 gave up', naming rank 2 nowhere."""
    def fn(rdv, r):
        if r == 2:
            time.sleep(8.0)
            return "silent"
        if r == 0:
            time.sleep(6.5)
        return rdv.barrier("b")

    out = _ranks_in_threads(3, fn, timeout=1.0, join_s=20)
    assert isinstance(out[1], RendezvousError) and "rank 0 did not answer rank 1" in str(out[1]), out
    assert isinstance(out[0], RendezvousError) and "b: rank 1 gave up" in str(out[0]), out
    assert "rank(s) [2] had not arrived" in str(out[0]), out[0]


@pytest.mark.timeout(60)
def test_client_of_another_job_is_turned_away():
    port, out = free_port(), {}

    def body(key, rank, job, delay):
        time.sleep(delay)
        try:
            with Rendezvous(rank, 2, "127.0.0.1", port, 3.0, job=job) as rdv:
                out[key] = rdv.allgather("g", job.encode())
        except RendezvousError as e:
            out[key] = e

    ts = [threading.Thread(target=body, args=a) for a in [("A0", 0, "A", 0), ("B1", 1, "B", 0.2), ("A1", 1, "A", 0.6)]]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert out["A0"] == [b"A", b"A"] and out["A1"] == [b"A", b"A"], out
    assert isinstance(out["B1"], RendezvousError) and "job B" in str(out["B1"]) and "job A" in str(out["B1"])


@pytest.mark.timeout(60)
def test_late_duplicate_rank_is_answered_at_once():
    port, stop = free_port(), threading.Event()
    ready = threading.Barrier(3)

    def rank(r):
        with Rendezvous(r, 2, "127.0.0.1", port, 10.0) as rdv:
            ready.wait(10)
            stop.wait(20)
            rdv.barrier()

    ts = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in ts:
        t.start()
    try:
        ready.wait(10)
        t0 = time.monotonic()
        with pytest.raises(RendezvousError, match=r"rank 1 \(from 127\.0\.0\.1:\d+\) arrived after all 2 ranks"):
            Rendezvous(1, 2, "127.0.0.1", port, 10.0)
        assert time.monotonic() - t0 < 3
    finally:
        stop.set()
        for t in ts:
            t.join(20)


@pytest.mark.parametrize("timeout, exc, match", [
    (float("nan"), ValueError, r"timeout must be a finite number of seconds > 0, got nan"),
    (float("inf"), ValueError, r"timeout must be a finite number of seconds > 0, got inf"),
    ("5", TypeError, r"timeout must be a number of seconds, got '5' \(str\)"),
    (True, TypeError, r"timeout must be a number of seconds, got True \(bool\)"),
    (None, TypeError, r"timeout must be a number of seconds, got None \(NoneType\)"),
    (1e10, ValueError, r"timeout must be at most 1e\+09 seconds \(about 31 years\), got 10000000000.0"),
], ids=["nan", "inf", "str", "bool", "none", "past-a-socket"])
def test_bad_timeout_is_refused_at_construction(timeout, exc, match):
    """A NaN timeout passed the '<= 0' check and made a rank > 0 wait for rank 0 forever (every deadline was NaN);
    inf (and 1e10, finite) raised OverflowError from the socket layer, '5' a comparison TypeError, True meant 1
    second. Refused before any socket opens (world 1 included, where no wait happens): a wrong type a TypeError, a bad
    number a ValueError, each naming the value."""
    for rank, world in ((0, 1), (1, 2)):
        with pytest.raises(exc, match=f"^rendezvous: {match}$"):
            Rendezvous(rank, world, "127.0.0.1", free_port(), timeout)


@pytest.mark.parametrize("rank, world", [(0, 1.5), (True, 2), ("0", 1), (0.0, 1), (1, True)])
def test_rank_and_world_must_be_ints(rank, world):
    """rank 0.0 of world 1 was accepted, rank True took part as rank 1 (its messages said 'rank True'), a float
    world or a string rank failed with Python's own TypeError naming neither."""
    with pytest.raises(TypeError, match="rendezvous: rank and world_size must be ints"):
        Rendezvous(rank, world, "127.0.0.1", free_port(), 1.0)


@pytest.mark.parametrize("root, message", [
    (0.0, r"broadcast root must be a rank \(an int\), got 0\.0 \(float\)"),
    (True, r"broadcast root must be a rank \(an int\), got True \(bool\)"),
    ("0", r"broadcast root must be a rank \(an int\), got '0' \(str\)"),
    (1, r"broadcast root 1 is outside \[0, 1\)"), (-1, r"broadcast root -1 is outside \[0, 1\)"),
], ids=["float", "bool", "str", "past", "negative"])
def test_broadcast_names_why_its_root_is_refused(root, message):
    """A root that is not an int was refused as 'outside [0, world)', false for 0.0 or True in a world of two; the
    message says it must be an int, and 'outside' is kept for an int out of range."""
    with Rendezvous(0, 1, "127.0.0.1", free_port(), 1.0) as one:
        with pytest.raises(ValueError, match=f"^{message}$"):
            one.broadcast("uid", b"x", root=root)
        assert one.broadcast("uid", b"x", root=np.int64(0)) == b"x"


def test_a_bad_argument_leaves_the_collective_sequence_intact():
    """allgather counted the call before looking at its arguments: a str payload (or a name that is not a str) then
    failed in bytes() / JSON on one rank only, after its sequence number had advanced, so the next, valid collective
    failed on every rank as a 'collective mismatch' (#1 against #2) and broke the rendezvous. An int payload was
    silently sent as that many zero bytes (bytes(5)). Each is a TypeError before the call counts."""
    def fn(rdv, r):
        if r == 1:
            for name, payload, why in (("a", "text", r"\('a'\): payload must be bytes, got str"),
                                       ("a", 5, r"\('a'\): payload must be bytes, got int"),
                                       ("a", None, r"\('a'\): payload must be bytes, got NoneType"),
                                       (7, b"", r" name must be a str, got 7 \(int\)")):
                with pytest.raises(TypeError, match=f"^rendezvous: allgather{why}"):
                    rdv.allgather(name, payload)
            with pytest.raises(TypeError, match=r"^rendezvous: broadcast\('uid'\): payload must be bytes, got str"):
                rdv.broadcast("uid", "not bytes", root=1)
        return rdv.allgather("a", bytes([r])), rdv.broadcast("uid", bytearray(b"x") if r == 1 else b"", root=1)

    out = _ranks_in_threads(2, fn, timeout=5.0)
    assert out == {0: ([b"\x00", b"\x01"], b"x"), 1: ([b"\x00", b"\x01"], b"x")}
    with Rendezvous(0, 1, "127.0.0.1", free_port(), 1.0) as one:
        with pytest.raises(TypeError, match="payload must be bytes"):
            one.allgather("a", 5)  # had returned [b"\x00" * 5]
        assert one.allgather("a", memoryview(b"ok")) == [b"ok"]
