"""The launcher: per-rank environment, output prefixes, failure propagation and the job timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest


def _launch(tmp_path, body, *args, n=3):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(body))
    cmd = [sys.executable, "-m", "dwdp_ops.launch", "-n", str(n), *args, str(script)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - t0


def test_environment_and_prefixes(tmp_path):
    proc, _ = _launch(
        tmp_path,
        """
        import os
        print("hello", os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"],
              os.environ["MASTER_ADDR"], os.environ["NVSHMEM_DISABLE_NVLS"])
        print("second line")
        """,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for r in range(3):
        assert f"[rank {r}] hello {r} 3 {r} 127.0.0.1 1" in lines
        assert f"[rank {r}] second line" in lines
    assert all(line.startswith("[rank ") for line in lines)


def test_one_failure_ends_the_others(tmp_path):
    proc, took = _launch(
        tmp_path,
        """
        import os, sys, time
        if os.environ["RANK"] == "1":
            print("failing", flush=True)
            sys.exit(3)
        time.sleep(60)
        """,
    )
    assert proc.returncode == 3
    assert "rank 1 failed (exit code 3); terminating rank(s) [0, 2]" in proc.stdout
    assert took < 30


def test_keep_going_lets_survivors_finish(tmp_path):
    proc, _ = _launch(
        tmp_path,
        """
        import os, sys, time
        if os.environ["RANK"] == "0":
            sys.exit(5)
        time.sleep(1.0)
        print("finished")
        """,
        "--keep-going",
    )
    assert proc.returncode == 5
    assert "[rank 1] finished" in proc.stdout and "[rank 2] finished" in proc.stdout


def test_killed_rank_is_reported_as_signal(tmp_path):
    proc, took = _launch(
        tmp_path,
        """
        import os, signal, time
        if os.environ["RANK"] == "2":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
        """,
    )
    assert proc.returncode == 128 + 9
    assert "rank 2 failed (signal 9)" in proc.stdout
    assert took < 30


def test_timeout_names_running_ranks(tmp_path):
    # (5 s, not 2: rank 0 must have started and exited by then, which a loaded 2-core CI machine can take seconds for)
    proc, took = _launch(
        tmp_path,
        """
        import os, time
        if os.environ["RANK"] != "0":
            time.sleep(60)
        """,
        "--timeout",
        "5",
    )
    assert proc.returncode == 124
    assert "timed out after 5 s; rank(s) [1, 2] still running" in proc.stdout
    assert took < 25


def test_missing_script_is_a_usage_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dwdp_ops.launch", "-n", "2", str(tmp_path / "nope.py")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_prefix_wraps_every_rank(tmp_path):
    proc, _ = _launch(tmp_path, """
        import os
        print("wrapped", os.environ.get("WRAPPED"))
        """, "--prefix", "env WRAPPED=yes", n=2)
    assert proc.returncode == 0, proc.stdout
    assert "[rank 0] wrapped yes" in proc.stdout and "[rank 1] wrapped yes" in proc.stdout


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


_HELPER_JOB = """
    import os, subprocess, sys, time
    r = int(os.environ["RANK"])
    h = subprocess.Popen(["sleep", "300"])
    open(os.path.join(sys.argv[1], f"pids{r}"), "w").write(f"{os.getpid()} {h.pid}")
    if r == 1 and sys.argv[2] == "fail":
        time.sleep(0.5); sys.exit(3)
    time.sleep(60)
    """


def _pids(tmp_path, n):
    return [int(x) for r in range(n) for x in (tmp_path / f"pids{r}").read_text().split()]


def _wait_pids(tmp_path, n):
    """The pids the job's ranks record (``_HELPER_JOB``), once all have (20 s at most)."""
    end = time.monotonic() + 20
    while not all((tmp_path / f"pids{r}").exists() for r in range(n)) and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(0.2)
    return _pids(tmp_path, n)


def _kill_all(pids, launcher=None) -> None:
    """Test clean-up: the launcher (a Popen, if any) and every recorded pid, whatever the test saw."""
    if launcher is not None:
        launcher.kill()
        launcher.wait()
    for q in pids:
        try:
            os.kill(q, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.timeout(60)
def test_helpers_of_exited_ranks_are_ended(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(_HELPER_JOB))
    proc = subprocess.run([sys.executable, "-m", "dwdp_ops.launch", "-n", "2", str(script), str(tmp_path), "fail"],
                          capture_output=True, text=True, timeout=50)
    pids = _pids(tmp_path, 2)
    try:
        assert proc.returncode == 3, proc.stdout
        assert not [p for p in pids if _alive(p)], pids
    finally:
        _kill_all(pids)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_hangup_ends_every_rank(tmp_path, sig):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(_HELPER_JOB))
    p = subprocess.Popen([sys.executable, "-m", "dwdp_ops.launch", "-n", "2", str(script), str(tmp_path), "ok"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = []
    try:
        pids = _wait_pids(tmp_path, 2)
        p.send_signal(sig)
        assert p.wait(30) == 128 + sig
        assert not [q for q in pids if _alive(q)], pids
    finally:
        _kill_all(pids, p)


@pytest.mark.timeout(60)
def test_closed_stdout_does_not_leave_ranks_running(tmp_path):
    """``launch ... | head -1``: rank 0 prints a lot, rank 1 fails; the launcher still ends rank 0 and exits."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        open(os.path.join(sys.argv[1], "pid" + os.environ["RANK"]), "w").write(str(os.getpid()))
        if os.environ["RANK"] == "1":
            time.sleep(1.0); sys.exit(3)
        for i in range(200000):
            print("x" * 50, i)
        time.sleep(60)
        """))
    p = subprocess.Popen([sys.executable, "-m", "dwdp_ops.launch", "-n", "2", str(script), str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    pids = []
    try:
        p.stdout.readline()
        p.stdout.close()
        assert p.wait(30) == 3
        pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(2)]
        assert not [q for q in pids if _alive(q)], pids
    finally:
        _kill_all(pids, p)


@pytest.mark.timeout(60)
def test_under_nohup_a_hangup_leaves_the_job_running(tmp_path):
    """A launcher started with SIGHUP ignored (``nohup``) keeps ignoring it: the job outlives the terminal, as before
    SIGHUP was handled; SIGTERM still ends it."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(_HELPER_JOB))
    p = subprocess.Popen([sys.executable, "-m", "dwdp_ops.launch", "-n", "2", str(script), str(tmp_path), "ok"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    pids = []
    try:
        pids = _wait_pids(tmp_path, 2)
        p.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert p.poll() is None and all(_alive(q) for q in pids)
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 128 + signal.SIGTERM
        assert not [q for q in pids if _alive(q)], pids
    finally:
        _kill_all(pids, p)


@pytest.mark.parametrize("kw, match", [
    ({"command": "python job.py"}, r"command must be an argv list .* got the string 'python job.py'"),
    ({"timeout": True}, r"timeout must be a number of seconds > 0 or None, got True"),
    ({"timeout": "5"}, r"timeout must be a number of seconds > 0 or None, got '5'"),
    ({"timeout": float("nan")}, r"timeout must be > 0 seconds or None, got nan"),
])
def test_run_checks_its_arguments_before_starting_a_rank(kw, match):
    """A command given as one string reached Popen, which raised FileNotFoundError for 'python job.py';
    timeout=True meant 1 second, '5' raised a comparison TypeError. ValueError, like run's other argument checks."""
    from dwdp_ops import launch

    args = {"command": [sys.executable, "-c", "pass"], **kw}
    with pytest.raises(ValueError, match=match):
        launch.run(2, args.pop("command"), **args)


def test_the_port_chosen_has_a_free_neighbour(monkeypatch):
    """A job uses MASTER_PORT and MASTER_PORT + 1 (dispatch_nccl's torch.distributed port by default), but free_port
    checked only the first: a port whose neighbour was in use (or 65535, whose neighbour is no TCP port) was handed
    out, and the NCCL baseline then failed to bind or refused the port. Here the first ports offered are 65535 and
    one whose neighbour is held; neither may come back."""
    import socket

    from dwdp_ops import launch

    real = socket.socket
    busy = []  # held until the end
    try:
        for _ in range(50):
            busy.append(real(socket.AF_INET, socket.SOCK_STREAM))
            busy[-1].bind(("127.0.0.1", 0))
            held = busy[-1].getsockname()[1]
            try:
                with real(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    probe.bind(("127.0.0.1", held - 1))
                break
            except OSError:
                continue
        offered = [65535, held - 1]

        class Offering(real):
            def bind(self, address):
                if address[1] == 0 and offered:
                    address = (address[0], offered.pop(0))
                return super().bind(address)

        monkeypatch.setattr(socket, "socket", Offering)
        port = launch.free_port()
        monkeypatch.undo()
        assert not offered and port not in (65535, held - 1)
        for p in (port, port + 1):
            with real(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", p))
    finally:
        for s in busy:
            s.close()


def test_a_slow_reader_still_gets_every_line(tmp_path):
    """A rank that printed a lot and exited while our stdout was read slowly (``| tee`` to a slow disk, ssh): its
    last lines were still in its pipe, and the launcher gave each rank's output 2 s after the job ended, then exited
    without them (the last ~1000 lines and the final 'LAST' line lost, exit code 0). Only time spent waiting for
    more output now bounds that drain, not time spent writing ours."""
    import fcntl

    script = tmp_path / "job.py"
    script.write_text("for i in range(1200):\n    print(f'line {i:05d} ' + 'x' * 48)\nprint('LAST')\n")
    proc = subprocess.Popen([sys.executable, "-m", "dwdp_ops.launch", "-n", "1", str(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)  # a small pipe: the backlog stays with the launcher
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        chunk = proc.stdout.read1(1024)  # about 20 KB/s: the rank's 64 KB pipe takes > 3 s to drain
        if not chunk:
            break
        out += chunk
        time.sleep(0.05)
    proc.stdout.close()
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    lines = out.decode().splitlines()
    assert len(lines) == 1201 and lines[-1] == "[rank 0] LAST", lines[-3:]



@pytest.mark.timeout(60)
def test_terminate_does_not_wait_on_a_held_popen_lock(monkeypatch):
    """The signal handler runs ``_terminate`` in the main thread, which it may have interrupted inside
    ``Popen.wait`` while that held the Popen's (non-reentrant) wait lock: ``_terminate`` must end the rank anyway,
    never block on the lock (it did: ``wait()`` after SIGKILL, a hang for good). The lock is held here by the test."""
    from dwdp_ops import launch
    monkeypatch.setattr(launch, "GRACE_S", 0.2)
    p = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "print('ready', flush=True); time.sleep(60)"],
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    t = None
    try:
        assert p.stdout.readline().strip() == "ready"  # SIGTERM is ignored from here on
        assert p._waitpid_lock.acquire(False)
        t = threading.Thread(target=launch._terminate, args=({0: p}, [0]), daemon=True)
        t.start()
        t.join(15)
        hung = t.is_alive()
        p._waitpid_lock.release()
        assert not hung, "_terminate blocked on the Popen's wait lock"
        assert launch._status(p) == -signal.SIGKILL  # killed after the grace period, and not reaped (see _status)
    finally:
        p.kill()
        p.wait()
        if t is not None:
            t.join(15)
