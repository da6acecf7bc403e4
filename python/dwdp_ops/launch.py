"""``python -m dwdp_ops.launch -n N [--timeout S] script.py args...`` (also ``dwdp-launch``): N ranks on this node,
one per GPU.

Each rank gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1`` and a free
``MASTER_PORT`` (the torchrun convention, read by ``dwdp_ops.init``), plus ``PYTHONUNBUFFERED=1`` and the variables
that keep NVLink multicast off (``NVSHMEM_DISABLE_NVLS=1``, ``NCCL_NVLS_ENABLE=0``,
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``) unless already set. Every line a rank prints is prefixed with ``[rank r]``.
When a rank fails, the others are terminated (SIGTERM, then SIGKILL after a grace period) and the launcher exits with
that rank's code; ``--keep-going`` lets the others run to their end instead. ``--timeout`` ends the whole job,
naming the ranks still running, with exit code 124. SIGINT, SIGTERM and SIGHUP (the terminal closed) end every
rank the same way and exit with 128 + the signal (SIGHUP only where it is not ignored: under ``nohup`` the job
outlives the terminal). Whatever happens, each rank's process group (its helpers, even
after the rank itself exited) is ended before the launcher returns; a closed stdout (``| head``) does not stop it,
and ranks' output is still drained so that they never block. ``DWDP_JOB_ID`` (a fresh nonce unless already set)
identifies the job to ``dwdp_ops.rendezvous``, which turns away ranks of another job on the same port.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from ._checks import is_int, is_real
from ._cli import HelpFormatter, plain, positive_float, positive_int

SAFE_ENV = {"NVSHMEM_DISABLE_NVLS": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
GRACE_S = 5.0
KILL_WAIT_S = 5.0  # after SIGKILL: how long _terminate waits for a rank to exit


def free_port(addr: str = "127.0.0.1") -> int:
    """A free TCP port P of ``addr`` whose neighbour P + 1 is free too: a job uses both (``MASTER_PORT`` for
    ``dwdp_ops.init``'s control plane, ``MASTER_PORT + 1`` for ``dispatch_nccl``'s torch.distributed by default), so
    the neighbour must neither be in use nor past 65535."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((addr, 0))
            port = s.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s1:
                try:
                    s1.bind((addr, port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError(f"found no two adjacent free TCP ports on {addr} in 100 tries")


class _ReadClock:
    """Seconds a pump has spent waiting for its rank's output (not writing ours): what bounds the final drain."""

    def __init__(self) -> None:
        self.waited = 0.0
        self.since: float | None = None  # when the pending read began; None while a line is being written

    def reading(self) -> float:
        since = self.since
        return self.waited + (time.monotonic() - since if since is not None else 0.0)


def _pump(rank: int, stream, out, lock: threading.Lock, clock: _ReadClock | None = None) -> None:
    """Copies a rank's output, prefixed, until the rank closes it; when our own output is gone (``| head``), keeps
    draining so that the rank never blocks on a full pipe. ``clock`` counts the time spent waiting to read."""
    clock = clock or _ReadClock()
    prefix = f"[rank {rank}] ".encode()
    while True:
        clock.since = time.monotonic()
        line = stream.readline()
        clock.waited += time.monotonic() - clock.since
        clock.since = None
        if not line:
            break
        with lock:
            try:
                out.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
                out.flush()
            except (OSError, ValueError):
                pass
    stream.close()


def _say(msg: str, lock: threading.Lock) -> None:
    """Best effort: a closed stdout must not keep the launcher from cleaning up. Never waits long for the lock (a
    signal handler may interrupt the main thread while it holds it)."""
    got = lock.acquire(timeout=1.0)
    try:
        sys.stdout.buffer.write(f"[launch] {msg}\n".encode())
        sys.stdout.buffer.flush()
    except (OSError, ValueError):
        pass
    finally:
        if got:
            lock.release()


def _reap_groups(procs: dict[int, subprocess.Popen]) -> None:
    """Ends what is left in every rank's process group (helpers of ranks that already exited included): SIGTERM,
    then SIGKILL after the grace period."""

    def signal_all(sig) -> list[int]:
        alive = []
        for p in procs.values():
            try:
                os.killpg(p.pid, sig)
                alive.append(p.pid)
            except (ProcessLookupError, PermissionError):
                pass
        return alive

    if not signal_all(signal.SIGTERM):
        return
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        for p in procs.values():
            p.poll()
        if not signal_all(0):
            return
        time.sleep(0.05)
    signal_all(signal.SIGKILL)


def _status(p: subprocess.Popen) -> int | None:
    """``p``'s exit status as ``Popen.returncode`` gives it (None while running) WITHOUT reaping it: the zombie keeps
    its pid, and with it the rank's process-group id, from being reused by an unrelated process until the launcher's
    clean-up has signalled that group (``_reap_groups``, which reaps)."""
    if p.returncode is not None:
        return p.returncode
    try:
        r = os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # already reaped elsewhere
        return p.poll()
    if r is None:
        return None
    return r.si_status if r.si_code == os.CLD_EXITED else -r.si_status


def _exited(procs: dict[int, subprocess.Popen], ranks: list[int], seconds: float) -> list[int]:
    """Waits up to ``seconds`` for ``ranks`` to exit; returns those still running. Polls ``_status``: it neither reaps
    nor takes ``Popen``'s wait lock (see ``_terminate``)."""
    deadline = time.monotonic() + seconds
    while True:
        running = [r for r in ranks if _status(procs[r]) is None]
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.02)


def _terminate(procs: dict[int, subprocess.Popen], ranks: list[int]) -> None:
    """SIGTERM to each rank's process group, SIGKILL to the ranks still running ``GRACE_S`` later, then up to
    ``KILL_WAIT_S`` for those to exit (a process stuck in the kernel, e.g. in a GPU driver call, may outlive even
    SIGKILL: it is left to ``_reap_groups``, never waited for without a bound). Never calls ``Popen.wait``: the
    signal handler runs this while the main thread may be inside ``Popen.wait`` in this same function (a rank failed
    or the job timed out, then Ctrl-C), holding that ``Popen``'s non-reentrant wait lock, and a blocking wait on it
    would hang the launcher for good."""
    for r in ranks:
        try:
            os.killpg(procs[r].pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for r in _exited(procs, ranks, GRACE_S):
        try:
            os.killpg(procs[r].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _exited(procs, ranks, KILL_WAIT_S)


def run(
    nprocs: int,
    command: list[str],
    *,
    timeout: float | None = None,
    keep_going: bool = False,
    env: dict[str, str] | None = None,
) -> int:
    """Runs ``command`` (an argv list, for example ``[sys.executable, 'script.py']``) as ``nprocs`` ranks; returns the
    job's exit code (0 when every rank succeeded). Bad arguments (``nprocs`` not an integer >= 1, ``timeout`` not a
    number > 0 or None, ``command`` a string or empty) raise ValueError before any rank starts."""
    if not is_int(nprocs) or nprocs < 1:
        raise ValueError(f"nprocs must be an integer >= 1, got {nprocs!r}")
    nprocs = int(nprocs)
    if timeout is not None and not is_real(timeout):
        raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r} ({type(timeout).__name__})")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
    if isinstance(command, (str, bytes)):
        raise ValueError(f"command must be an argv list (one string per word, e.g. [sys.executable, 'job.py']), got "
                         f"the string {command!r}")
    if not command:
        raise ValueError("command must be a non-empty argv list")
    base = dict(os.environ if env is None else env)
    for k, v in SAFE_ENV.items():
        base.setdefault(k, v)
    base.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
        PYTHONUNBUFFERED="1",
        DWDP_LAUNCHER="dwdp_ops.launch",
    )
    base.setdefault("DWDP_JOB_ID", f"dwdp-launch-{os.getpid()}-{os.urandom(6).hex()}")  # rendezvous.job_id
    lock = threading.Lock()
    procs: dict[int, subprocess.Popen] = {}
    pumps = []

    stopping = []

    def on_signal(signum, _frame):
        if stopping:  # already cleaning up: let it finish (a second signal only cuts the final output drain short)
            stopping.append(signum)
            return
        stopping.append(signum)
        _say(f"received signal {signum}; terminating every rank", lock)
        _terminate(procs, [r for r, p in procs.items() if _status(p) is None])
        sys.exit(128 + signum)

    # Installed before the first rank starts, so that a signal (or a failed Popen) while spawning leaves none behind.
    # SIGHUP only where it is not ignored: under ``nohup`` the job must outlive the terminal, as before
    sigs = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN
                                              else [])
    old = {s: signal.signal(s, on_signal) for s in sigs}
    try:
        for r in range(nprocs):
            e = dict(base, RANK=str(r), LOCAL_RANK=str(r))
            p = subprocess.Popen(command, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            procs[r] = p
            clock = _ReadClock()
            t = threading.Thread(target=_pump, args=(r, p.stdout, sys.stdout.buffer, lock, clock), daemon=True)
            t.start()
            pumps.append((t, clock))
        return _supervise(procs, lock, timeout, keep_going)
    finally:
        stopping.append(0)
        running = [r for r, p in procs.items() if _status(p) is None]
        if running:
            _terminate(procs, running)
        _reap_groups(procs)
        # Every rank's output reaches our stdout, however slowly that is read (``| tee`` to a slow disk, ssh): a pump
        # is given up only after 2 s spent waiting for more output (a helper that left the rank's process group still
        # holds the pipe) or on a second signal; the time spent writing ours does not count.
        signals = len(stopping)
        start = [clock.reading() for _, clock in pumps]
        for (t, clock), t0 in zip(pumps, start):
            while t.is_alive() and clock.reading() - t0 < 2.0 and len(stopping) == signals:
                t.join(timeout=0.05)
        for s, h in old.items():
            signal.signal(s, h)


def _supervise(procs: dict[int, subprocess.Popen], lock: threading.Lock, timeout: float | None,
               keep_going: bool) -> int:
    start = time.monotonic()
    code = 0
    while True:
        status = {r: _status(p) for r, p in procs.items()}  # not reaped: see _status
        running = [r for r, rc in status.items() if rc is None]
        failed = [r for r, rc in status.items() if rc not in (None, 0)]
        if failed and code == 0:
            r = failed[0]
            rc = status[r]
            code = rc if rc > 0 else 128 - rc
            how = f"exit code {rc}" if rc > 0 else f"signal {-rc}"
            if running and not keep_going:
                _say(f"rank {r} failed ({how}); terminating rank(s) {running}", lock)
                _terminate(procs, running)
                running = []
            else:
                _say(f"rank {r} failed ({how})", lock)
        if not running:
            break
        if timeout is not None and time.monotonic() - start > timeout:
            _say(f"timed out after {timeout:g} s; rank(s) {running} still running; terminating them", lock)
            _terminate(procs, running)
            code = 124
            break
        time.sleep(0.05)
    return code


def build_parser(prog: str = "dwdp-launch") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=plain(__doc__.split("\n\n")[0]), formatter_class=HelpFormatter)
    ap.add_argument("-n", "--nprocs", type=positive_int, required=True, help="number of ranks (one per GPU)")
    ap.add_argument("--timeout", type=positive_float, default=None,
                    help="seconds before the whole job is ended with exit code 124 (default: no limit)")
    ap.add_argument("--keep-going", action="store_true", help="when a rank fails, let the others finish")
    ap.add_argument("-m", dest="module", default=None, help="run a module (like python -m) instead of a script")
    ap.add_argument("--prefix", default="",
                    help="a command put before python for every rank, e.g. 'compute-sanitizer --tool racecheck' "
                         "(default: none)")
    ap.add_argument("script", nargs="?", help="the Python script each rank runs")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    return ap


def worker_command(ns) -> list[str]:
    """Each rank's command for ``-m module``: ``python -m module`` and what follows it (after ``--`` when the
    module's own options come first: ``-m pkg.mod -- --out x``)."""
    return [sys.executable, "-m", ns.module] + ([ns.script] if ns.script else []) + ns.args


def main(argv: list[str] | None = None, prog: str = "dwdp-launch") -> int:
    """Entry point of ``dwdp-launch``, ``python -m dwdp_ops.launch`` and ``python -m dwdp_ops launch``."""
    ap = build_parser(prog)
    ns = ap.parse_args(argv)
    if ns.module is None and ns.script is None:
        ap.error("give a script, or -m module")
    if ns.module is not None:
        command = worker_command(ns)
    else:
        if not os.path.exists(ns.script):
            ap.error(f"script {ns.script!r} does not exist")
        if not os.path.isfile(ns.script):
            ap.error(f"script {ns.script!r} is not a file")
        command = [sys.executable, ns.script] + ns.args
    try:
        prefix = shlex.split(ns.prefix)
    except ValueError as e:
        ap.error(f"argument --prefix: cannot split {ns.prefix!r} into words ({e})")
    if prefix and shutil.which(prefix[0]) is None:
        ap.error(f"argument --prefix: {prefix[0]!r} is not an executable on PATH")
    return run(ns.nprocs, prefix + command, timeout=ns.timeout, keep_going=ns.keep_going)


if __name__ == "__main__":
    sys.exit(main(prog="python -m dwdp_ops.launch"))
