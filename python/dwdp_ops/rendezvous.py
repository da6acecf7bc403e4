"""TCP control plane for the ranks of one job: the NVSHMEM unique-ID exchange, small all-gathers and barriers that
fail with a message instead of hanging.

Rank 0 is the hub: it listens at ``MASTER_ADDR:MASTER_PORT``; every other rank connects and stays connected until
``close()``. Frames are a 4-byte big-endian length followed by a JSON object; payload bytes travel base64-encoded.

Under ``torchrun`` (``env.under_torchrun``) torchrun's own TCPStore already listens at ``MASTER_ADDR:MASTER_PORT``.
There rank 0 listens on a free port of ``MASTER_ADDR`` (bound before it is published, so it cannot be taken) and
publishes it in torchrun's store under a key unique to this rendezvous; the other ranks read it from the store and
connect as usual. The store is torchrun's agent store when torchrun says so (``TORCHELASTIC_USE_AGENT_STORE=True``),
otherwise rank 0 hosts a multi-tenant TCPStore at ``MASTER_PORT``, as ``torch.distributed``'s ``env://`` does, and
keeps it for the life of the process: the server stops with its last TCPStore object, and a rank > 0 that had already
connected to it for the next rendezvous would lose its connection (and rank 0 would wait for it to the timeout).

Invariants:
  * Every collective (``allgather``, ``broadcast``, ``barrier``) carries a name and a sequence number; rank 0 checks
    that all ranks called the same collective in the same order and fails all of them if not.
  * Nobody waits longer than ``timeout`` seconds (a rank > 0 ``_GRACE_S`` more, for rank 0's report). When rank 0
    gives up it tells every connected rank why (the ranks that never arrived, or that disconnected) before raising, so
    the message is the same on every survivor.
    Sending is bounded too: a frame that a peer does not read in time fails the collective naming that peer, and
    a frame over ``_MAX_FRAME`` is refused by its sender before anything is sent.
  * A rank whose connection to rank 0 breaks raises at once, naming rank 0. A rank that gives up on rank 0 tells it
    (an ``abort`` frame, best effort) and closes, so rank 0 fails that collective naming it.
  * During set-up a client that does not say a valid hello (a port scanner, an HTTP request, garbage), or that says
    it belongs to another job (``job_id``: ``DWDP_JOB_ID``, which ``dwdp_ops.launch`` exports, ``TORCHELASTIC_RUN_ID``,
    ``PMIX_NAMESPACE``, ``OMPI_MCA_ess_base_jobid``, ``SLURM_JOB_ID``), is turned away and rank 0 keeps waiting; if
    set-up then fails, the error lists those clients by address. Without any of these variables two jobs on one port
    cannot be told apart. After set-up a late client (a duplicate ``RANK``) is answered with an error at once,
    except a rank > 0 whose previous rendezvous at that address this process closed (rank 0 may not have closed
    its side yet): it dials again until its timeout (``_dial``).
  * When rank 0 cannot deliver a result to some ranks, it still delivers it to the others, then raises naming them;
    any failed collective leaves the rendezvous broken (further collectives raise).
"""

from __future__ import annotations

import base64
import json
import math
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Sequence
from datetime import timedelta

from ._checks import is_int, is_real
from .env import MAX_TIMEOUT, under_torchrun
from .errors import RendezvousError

_HEADER = struct.Struct(">I")
_MAX_FRAME = 64 << 20
_TELL_S = 1.0  # how long a best-effort error or abort frame may take to send
_JOB_VARS = ("DWDP_JOB_ID", "TORCHELASTIC_RUN_ID", "PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid", "SLURM_JOB_ID")
_DOORMAN_S = 0.25  # seconds the doorman gives a late client to say hello, and to take its answer
# Rank 0 enforces the timeout and reports why it gave up; a rank > 0 waits this much longer for that report, so that
# it learns the missing ranks even when it started its wait before rank 0 did.
_GRACE_S = 5.0


def job_id(environ=None) -> str | None:
    """The job this process belongs to, from its launcher's environment: the first of ``_JOB_VARS`` that is set, as
    ``NAME=value`` (``SLURM_STEP_ID`` appended to ``SLURM_JOB_ID``); None when no launcher says."""
    env = os.environ if environ is None else environ
    for k in _JOB_VARS:
        v = env.get(k, "").strip()
        if v:
            if k == "SLURM_JOB_ID" and env.get("SLURM_STEP_ID", "").strip():
                v += "." + env["SLURM_STEP_ID"].strip()
            return f"{k}={v}"
    return None


def _ranks(ranks: Sequence[int]) -> str:
    return "[" + ", ".join(str(r) for r in sorted(ranks)) + "]"


def _check_args(what: str, name, payload) -> None:
    """TypeError unless ``name`` is a str and ``payload`` bytes-like (bytes(5) would be five zero bytes)."""
    if not isinstance(name, str):
        raise TypeError(f"rendezvous: {what} name must be a str, got {name!r} ({type(name).__name__})")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"rendezvous: {what}({name!r}): payload must be bytes, got {type(payload).__name__}; encode "
                        "it first")


def _encode(msg: dict, to: str) -> bytes:
    """``msg`` as one frame (length header + JSON); a _FrameTooLarge naming ``to`` when it exceeds ``_MAX_FRAME``."""
    data = json.dumps(msg).encode()
    if len(data) > _MAX_FRAME:
        raise _FrameTooLarge(
            f"a frame of {len(data)} bytes for {to} exceeds the control plane's limit of {_MAX_FRAME} "
            f"bytes; it is for small payloads (unique IDs, handles, barriers)"
        )
    return _HEADER.pack(len(data)) + data


class _Conn:
    """One framed, non-blocking-friendly TCP connection."""

    def __init__(self, sock: socket.socket, peer_rank: int | None = None, addr: str = ""):
        self.sock = sock
        self.rank = peer_rank
        self.addr = addr
        self.buf = bytearray()

    def who(self) -> str:
        return f"rank {self.rank}" if self.rank is not None else f"the client at {self.addr or '?'}"

    def send(self, msg: dict, deadline: float) -> None:
        """Sends one frame by ``deadline`` (monotonic). Raises RendezvousError for a frame over ``_MAX_FRAME`` (before
        sending anything), TimeoutError when the peer does not read it in time, OSError when the connection broke."""
        self.send_frame(_encode(msg, self.who()), deadline)

    def send_frame(self, frame: bytes, deadline: float) -> None:
        """``send`` of a frame ``_encode`` made (one encoding for a message that goes to every rank)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no time left to send to {self.who()}")
        self.sock.settimeout(remaining)  # since Python 3.5 the limit bounds the whole sendall
        self.sock.sendall(frame)

    def _take(self) -> dict | None:
        """Removes one complete message from the buffer; raises RendezvousError for a malformed frame."""
        if len(self.buf) < _HEADER.size:
            return None
        (n,) = _HEADER.unpack_from(self.buf)
        if n > _MAX_FRAME:
            raise RendezvousError(f"rendezvous: frame of {n} bytes from {self.who()} exceeds {_MAX_FRAME}")
        if len(self.buf) < _HEADER.size + n:
            return None
        raw = bytes(self.buf[_HEADER.size : _HEADER.size + n])
        del self.buf[: _HEADER.size + n]
        try:
            msg = json.loads(raw)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            raise RendezvousError(f"rendezvous: malformed frame from {self.who()} (not a dwdp_ops rank?)")
        return msg

    def feed(self) -> list[dict] | None:
        """Reads what is available; returns the complete messages, or None when the peer closed."""
        try:
            chunk = self.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return []
        except (ConnectionResetError, ConnectionAbortedError, OSError):
            return None
        if not chunk:
            return None
        self.buf += chunk
        out = []
        while (msg := self._take()) is not None:
            out.append(msg)
        return out

    def recv(self, deadline: float, what: str) -> dict | None:
        """Blocks until one message or the deadline; None when the peer closed; raises TimeoutError on deadline."""
        while True:
            msg = self._take()
            if msg is not None:
                return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(what)
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except (ConnectionResetError, ConnectionAbortedError, OSError):
                return None
            if not chunk:
                return None
            self.buf += chunk

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _FrameTooLarge(RendezvousError):
    pass


class _TorchrunPort:
    """Publishes rank 0's control-plane port through torchrun's TCPStore at ``addr:port`` and reads it elsewhere."""

    _uses = 0  # rendezvous made through the store in this process; every rank makes them in the same order
    _hosted: dict = {}  # (addr, port) -> the first TCPStore rank 0 hosted there: keeps the server up for the process

    def __init__(self, rank: int, addr: str, port: int, timeout: float):
        try:
            from torch.distributed import TCPStore
        except ImportError as e:
            raise RendezvousError(
                f"rendezvous: this process runs under torchrun, whose store at {addr}:{port} carries the rendezvous, "
                f"but torch.distributed cannot be imported ({e})"
            ) from None
        _TorchrunPort._uses += 1
        self.key = f"dwdp_ops/rendezvous/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_TorchrunPort._uses}"
        self.where, self.timeout = f"{addr}:{port}", timeout
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "") == "True"
        try:
            self.store = TCPStore(
                host_name=addr, port=port, is_master=rank == 0 and not agent, timeout=timedelta(seconds=timeout),
                wait_for_workers=False, multi_tenant=True,
            )
        except (RuntimeError, ValueError) as e:
            raise RendezvousError(
                f"rendezvous: rank {rank} cannot reach torchrun's store at {self.where} ({e}); check MASTER_ADDR and "
                "MASTER_PORT"
            ) from None
        if rank == 0 and not agent:
            _TorchrunPort._hosted.setdefault((addr, port), self.store)

    def publish(self, port: int) -> None:
        self.store.set(self.key, str(port))

    def lookup(self, rank: int, deadline: float | None = None) -> int:
        """Rank 0's control-plane port, waiting for it until ``deadline`` (``time.monotonic()``; None: ``timeout``
        from now): the set-up's own deadline, so that reaching the store and this wait take ``timeout`` together."""
        wait = self.timeout if deadline is None else max(deadline - time.monotonic(), 1e-3)
        try:
            self.store.wait([self.key], timedelta(seconds=wait))
            return int(self.store.get(self.key))
        except (RuntimeError, ValueError) as e:
            raise RendezvousError(
                f"rendezvous: rank {rank} did not find rank 0's control-plane port in torchrun's store at "
                f"{self.where} within {self.timeout:g} s (is rank 0 running?): {e}"
            ) from None


class Rendezvous:
    """The control plane of one job. Use as a context manager or call ``close()``.

    ``torchrun``: None (default) detects torchrun from this process's environment (``env.under_torchrun``) and, when
    ``addr``/``port`` are its ``MASTER_ADDR``/``MASTER_PORT``, exchanges the port through torchrun's store; True /
    False force either way. ``port`` is then the store's port, and ``self.port`` becomes the control plane's.
    ``job``: this job's identity, sent in the hello; None (default) takes it from the launcher's environment
    (``job_id``). Rank 0 turns away a client whose job differs (another job on the same port) and keeps waiting."""

    # (addr, port, rank) -> the session of the last rendezvous this process closed there as that rank > 0
    _closed_sessions: dict = {}

    def __init__(
        self,
        rank: int,
        world_size: int,
        addr: str = "127.0.0.1",
        port: int = 29531,
        timeout: float = 60.0,
        *,
        torchrun: bool | None = None,
        job: str | None = None,
    ):
        if not (is_int(rank) and is_int(world_size)):
            raise TypeError(f"rendezvous: rank and world_size must be ints, got rank={rank!r} ({type(rank).__name__}), "
                            f"world_size={world_size!r} ({type(world_size).__name__})")
        rank, world_size = int(rank), int(world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rendezvous: rank {rank} is outside [0, {world_size})")
        if not is_real(timeout):
            raise TypeError(f"rendezvous: timeout must be a number of seconds, got {timeout!r} "
                            f"({type(timeout).__name__})")
        if not (math.isfinite(timeout) and timeout > 0):  # NaN would make every deadline NaN: a wait with no end
            raise ValueError(f"rendezvous: timeout must be a finite number of seconds > 0, got {timeout}")
        if timeout > MAX_TIMEOUT:  # a socket's timeout past the platform's time_t: OverflowError deep in a dial
            raise ValueError(f"rendezvous: timeout must be at most {MAX_TIMEOUT:g} seconds (about 31 years), got "
                             f"{timeout}")
        timeout = float(timeout)
        self.rank, self.world_size, self.addr, self.port, self.timeout = rank, world_size, addr, port, timeout
        if torchrun is None:
            torchrun = under_torchrun() and os.environ.get("MASTER_PORT", "").strip() == str(port)
        self._torchrun = bool(torchrun)
        self._store: _TorchrunPort | None = None
        self._seq = 0
        self._lock = threading.Lock()
        self._peers: dict[int, _Conn] = {}  # rank 0 only
        self._hub: _Conn | None = None  # ranks > 0
        self._listener: socket.socket | None = None
        self._closed = False
        self._broken: str | None = None
        self._doorman: threading.Thread | None = None
        # rank 0: a fresh token, sent in the welcome and in its doorman's answers; a rank > 0: the one it was welcomed
        # with, recorded in _closed_sessions when it closes (see _dial)
        self._session: str | None = os.urandom(8).hex() if rank == 0 else None
        self.job = job if job is not None else job_id()
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    # -- set-up -----------------------------------------------------------------------------------------------
    def _connect(self) -> None:
        if self.world_size == 1:
            return
        deadline = time.monotonic() + self.timeout
        if self._torchrun:
            self._store = _TorchrunPort(self.rank, self.addr, self.port, self.timeout)
            if self.rank != 0:
                self.port = self._store.lookup(self.rank, deadline)  # (a full timeout more had been waited here)
        where = f"{self.addr}:{self.port}"
        if self.rank == 0:
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                ls.bind((self.addr, 0 if self._store else self.port))
            except OSError as e:
                ls.close()
                raise RendezvousError(
                    f"rendezvous: rank 0 cannot listen on {where} ({e.strerror}); choose a free MASTER_PORT"
                ) from None
            ls.listen(self.world_size * 2)
            self._listener = ls
            if self._store is not None:
                self.port = ls.getsockname()[1]
                where = f"{self.addr}:{self.port}"
                self._store.publish(self.port)
            self._accept_all(deadline, where)
        else:
            self._hub = self._dial(deadline, where)

    def _dial(self, deadline: float, where: str) -> _Conn:
        """Connects and says hello until admitted. A rendezvous at ``addr:port`` after an earlier one there may reach
        rank 0 while it still holds the earlier one: when that one's doorman answers (its session is the one this rank
        closed last there), or its listener closes before answering, this rank dials again until ``deadline``."""
        while True:
            conn = self._dial_once(deadline, where)
            if isinstance(conn, _Conn):
                return conn
            if time.monotonic() >= deadline:
                raise RendezvousError(
                    f"rendezvous: rank {self.rank} could not join at {where} within {self.timeout:g} s: rank 0 there "
                    f"still held the previous rendezvous, which rank {self.rank} had closed ({conn})"
                )
            time.sleep(0.05)

    def _dial_once(self, deadline: float, where: str) -> _Conn | str:
        """One dial: the admitted connection, or why to dial again (rank 0 still holds an earlier rendezvous)."""
        key = (self.addr, self.port, self.rank)
        while True:
            try:
                sock = socket.create_connection((self.addr, self.port), timeout=max(0.1, deadline - time.monotonic()))
                break
            except OSError:
                if time.monotonic() >= deadline:
                    raise RendezvousError(
                        f"rendezvous: rank {self.rank} could not reach rank 0 at {where} within {self.timeout:g} s "
                        f"(is rank 0 running, and do MASTER_ADDR/MASTER_PORT agree?)"
                    ) from None
                time.sleep(0.05)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock, 0)
        try:  # rank 0 may have started later: give its report of the missing ranks the grace period to come
            conn.send({"op": "hello", "rank": self.rank, "world": self.world_size, "job": self.job},
                      deadline + _GRACE_S)
            msg = conn.recv(deadline + _GRACE_S, "welcome")
        except TimeoutError:
            conn.close()
            raise RendezvousError(
                f"rendezvous: rank {self.rank} connected to {where} but rank 0 did not admit it within "
                f"{self.timeout:g} s"
            ) from None
        except OSError:
            msg = None
        except RendezvousError as e:
            conn.close()
            raise RendezvousError(f"rendezvous: rank {self.rank} got a bad answer from {where}: {e}") from None
        if msg is None:
            conn.close()
            if key in Rendezvous._closed_sessions:  # the earlier rendezvous's listener closed with us in its backlog
                return "its listener closed before answering"
            raise RendezvousError(f"rendezvous: rank 0 at {where} closed the connection during set-up")
        if msg.get("op") == "error":
            conn.close()
            if msg.get("session") is not None and msg.get("session") == Rendezvous._closed_sessions.get(key):
                return "its doorman answered"
            raise RendezvousError(str(msg.get("msg")))
        if msg.get("op") != "welcome":
            conn.close()
            raise RendezvousError(f"rendezvous: unexpected answer {msg.get('op')!r} from {where} during set-up")
        self._session = msg.get("session")
        return conn

    @staticmethod
    def _tell(conns, msg: dict, seconds: float = _TELL_S) -> list[_Conn]:
        """Best-effort ``msg`` to every conn, each bounded by ``seconds``; returns the conns it could not reach."""
        failed = []
        for conn in conns:
            try:
                conn.send(msg, time.monotonic() + seconds)
            except (OSError, RendezvousError):
                failed.append(conn)
        return failed

    def _accept_all(self, deadline: float, where: str) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        pending: list[_Conn] = []
        dropped: list[str] = []  # clients that did not say a valid hello, for the error message

        def drop(conn: _Conn, why: str, tell: str | None = None) -> None:
            dropped.append(f"{conn.addr} ({why})")
            sel.unregister(conn.sock)
            pending.remove(conn)
            if tell:
                self._tell([conn], {"op": "error", "msg": tell})
            conn.close()

        error = None
        try:
            while len(self._peers) < self.world_size - 1 and error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(1, self.world_size)) - set(self._peers))
                    error = (
                        f"rendezvous timed out after {self.timeout:g} s at {where}: rank(s) {_ranks(missing)} of "
                        f"{self.world_size} never arrived"
                    )
                    if dropped:
                        error += f"; ignored client(s) that were not ranks of this job: {'; '.join(dropped)}"
                    break
                for key, _ in sel.select(timeout=min(remaining, 0.5)):
                    if key.data is None:
                        try:
                            sock, addr = self._listener.accept()
                        except OSError:
                            continue
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        sock.setblocking(False)
                        conn = _Conn(sock, addr=f"{addr[0]}:{addr[1]}")
                        pending.append(conn)
                        sel.register(sock, selectors.EVENT_READ, conn)
                        continue
                    conn = key.data
                    if conn not in pending:
                        continue
                    try:
                        msgs = conn.feed()
                    except RendezvousError as e:
                        drop(conn, str(e).removeprefix("rendezvous: "))
                        continue
                    if msgs is None:
                        if conn.buf:
                            dropped.append(f"{conn.addr} (closed after {len(conn.buf)} bytes that are not a hello)")
                        sel.unregister(conn.sock)
                        pending.remove(conn)
                        conn.close()
                        continue
                    if not msgs:
                        continue
                    verdict, why = self._admit(conn, msgs[0], where)
                    if verdict == "ok":
                        sel.unregister(conn.sock)
                        pending.remove(conn)
                    elif verdict == "drop":
                        drop(conn, why, tell=why if msgs[0].get("op") == "hello" else None)
                    else:
                        error = why
                        break
        finally:
            sel.close()
        if error is not None:
            self._tell(list(self._peers.values()) + pending, {"op": "error", "msg": error})
            raise RendezvousError(error)
        send_deadline = time.monotonic() + self.timeout
        failed = [
            c.rank for c in self._peers.values()
            if self._tell([c], {"op": "welcome", "session": self._session},
                          max(_TELL_S, send_deadline - time.monotonic()))
        ]
        if failed:
            error = (
                f"rendezvous at {where}: rank(s) {_ranks(failed)} disconnected during set-up (their process exited "
                f"or was killed)"
            )
            self._tell([c for r, c in self._peers.items() if r not in failed], {"op": "error", "msg": error})
            raise RendezvousError(error)
        self._start_doorman(where)

    def _admit(self, conn: _Conn, msg: dict, where: str) -> tuple[str, str]:
        """("ok", ""), ("drop", why) for a client that is not a rank of this job, or ("abort", error)."""
        rank, world = msg.get("rank"), msg.get("world")
        if msg.get("op") != "hello" or not all(type(x) is int for x in (rank, world)):
            return "drop", f"first message is not a dwdp_ops hello: {json.dumps(msg)[:80]}"
        job = msg.get("job")
        if job != self.job:
            return "drop", (
                f"rendezvous at {where}: a client from {conn.addr} says it is rank {rank} of job "
                f"{job or '(no job id)'}, but rank 0 there belongs to job {self.job or '(no job id)'}; two jobs share "
                f"MASTER_ADDR:MASTER_PORT; give each its own MASTER_PORT"
            )
        if world != self.world_size:
            return "abort", (
                f"world size disagrees between ranks: rank 0 has world size {self.world_size}, rank {rank} has "
                f"{world} (client at {conn.addr}); every rank must be started with the same WORLD_SIZE"
            )
        if not 1 <= rank < self.world_size:
            return "abort", (f"rendezvous: a client at {conn.addr} says it is rank {rank}, outside "
                             f"[1, {self.world_size})")
        if rank in self._peers:
            return "abort", (
                f"rendezvous: rank {rank} arrived twice (from {self._peers[rank].addr} and {conn.addr}); check the "
                f"RANK of every process"
            )
        conn.rank = rank
        self._peers[rank] = conn
        return "ok", ""

    def _start_doorman(self, where: str) -> None:
        """After set-up, answers every late client (a duplicate RANK, a second job on the port) with an error at once
        instead of letting it wait for its timeout."""
        ls = self._listener
        ls.setblocking(False)
        world = self.world_size
        self._wake_r, self._wake_w = socket.socketpair()
        sel = selectors.DefaultSelector()
        sel.register(ls, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)

        def serve():
            try:
                while not self._closed:
                    if not any(key.fileobj is ls for key, _ in sel.select()):
                        continue
                    try:
                        sock, addr = ls.accept()
                    except OSError:
                        continue
                    conn = _Conn(sock, addr=f"{addr[0]}:{addr[1]}")
                    try:  # short reads: close() joins this thread for 2 s at most (_DOORMAN_S each, twice)
                        hello = conn.recv(time.monotonic() + _DOORMAN_S, "hello")
                    except (TimeoutError, RendezvousError):
                        hello = None
                    who = f"rank {hello.get('rank')}" if isinstance(hello, dict) else "a client"
                    self._tell([conn], {"op": "error", "msg": (
                        f"rendezvous at {where}: {who} (from {conn.addr}) arrived after all {world} ranks had "
                        f"joined; check the RANK of every process, or whether another job uses this MASTER_PORT"
                    ), "session": self._session}, _DOORMAN_S)
                    conn.close()
            finally:
                sel.close()

        self._doorman = threading.Thread(target=serve, name="dwdp-rendezvous-doorman", daemon=True)
        self._doorman.start()

    # -- collectives ------------------------------------------------------------------------------------------
    def allgather(self, name: str, payload: bytes = b"") -> list[bytes]:
        """Every rank's ``payload``, indexed by rank. Collective: all ranks call it with the same ``name``.
        Thread-safe: collectives of one process run one at a time (a second thread waits), so two threads can never
        receive each other's replies; their order must still agree across ranks, which the name check verifies."""
        _check_args("allgather", name, payload)  # before the call counts: a local error must not shift the sequence
        with self._lock:
            self._check_usable(name)
            self._seq += 1
            if self.world_size == 1:
                return [bytes(payload)]
            try:
                if self.rank == 0:
                    return self._gather_at_root(name, bytes(payload))
                return self._gather_at_leaf(name, bytes(payload))
            except RendezvousError as e:
                self._broken = str(e)
                raise

    def broadcast(self, name: str, payload: bytes = b"", root: int = 0) -> bytes:
        """``root``'s payload on every rank."""
        _check_args("broadcast", name, payload)
        if not is_int(root):  # (bools refused: True is not rank 1)
            raise ValueError(f"broadcast root must be a rank (an int), got {root!r} ({type(root).__name__})")
        if not 0 <= root < self.world_size:
            raise ValueError(f"broadcast root {root} is outside [0, {self.world_size})")
        return self.allgather(name, payload if self.rank == root else b"")[root]

    def barrier(self, name: str = "barrier") -> None:
        self.allgather(name)

    def _give_up(self, why: str, *, tell: bool) -> RendezvousError:
        """A rank > 0 abandons rank 0: tells it why (best effort, when the stream is at a frame boundary) and closes
        the connection, so that rank 0 fails this collective naming this rank instead of completing it."""
        if tell and self._hub is not None:
            self._tell([self._hub], {"op": "abort", "rank": self.rank, "msg": why})
        if self._hub is not None:
            self._hub.close()
        return RendezvousError(why)

    def _gather_at_leaf(self, name: str, payload: bytes) -> list[bytes]:
        hub = self._hub
        lost = f"{name}: rank {self.rank} lost its connection to rank 0 (rank 0's process exited or was killed)"
        msg = {"op": "gather", "name": name, "seq": self._seq, "data": base64.b64encode(payload).decode()}
        try:
            hub.send(msg, time.monotonic() + self.timeout)
        except _FrameTooLarge as e:
            raise self._give_up(f"{name}: rank {self.rank} cannot send its payload of {len(payload)} bytes: {e}",
                                tell=True) from None
        except TimeoutError:
            raise self._give_up(
                f"{name}: rank {self.rank} could not send its {len(payload)}-byte payload to rank 0 within "
                f"{self.timeout:g} s (rank 0 is not reading: is it stuck before this collective?)", tell=False
            ) from None
        except OSError:
            raise RendezvousError(lost) from None
        # Rank 0 enforces the timeout and reports; allow it a grace period to do so.
        try:
            reply = hub.recv(time.monotonic() + self.timeout + _GRACE_S, name)
        except TimeoutError:
            raise self._give_up(f"{name}: rank 0 did not answer rank {self.rank} within {self.timeout:g} s",
                                tell=True) from None
        if reply is None:
            raise RendezvousError(lost)
        if reply.get("op") == "error":
            raise RendezvousError(str(reply.get("msg")))
        return [base64.b64decode(x) for x in reply["data"]]

    def _gather_at_root(self, name: str, payload: bytes) -> list[bytes]:
        deadline = time.monotonic() + self.timeout
        got: dict[int, bytes] = {0: payload}
        dead: list[int] = []
        error = None
        sel = selectors.DefaultSelector()
        for conn in self._peers.values():
            conn.sock.setblocking(False)
            sel.register(conn.sock, selectors.EVENT_READ, conn)

        def take(conn: _Conn) -> str | None:
            """Reads what conn has sent; returns an error, or None."""
            try:
                msgs = conn.feed()
            except RendezvousError as e:
                return f"{name}: {e}"
            if msgs is None:
                dead.append(conn.rank)
                sel.unregister(conn.sock)
                return None
            for m in msgs:
                if m.get("op") == "abort":  # its reason may only blame rank 0: name the ranks still missing too
                    late = sorted(set(range(self.world_size)) - set(got) - {conn.rank})
                    return f"{name}: rank {conn.rank} gave up: {m.get('msg')}" + (
                        f"; rank(s) {_ranks(late)} had not arrived either" if late else "")
                if m.get("name") != name or m.get("seq") != self._seq:
                    return (
                        f"collective mismatch: rank 0 called {name!r} (#{self._seq}) while rank {conn.rank} "
                        f"called {m.get('name')!r} (#{m.get('seq')}); every rank must make the same "
                        f"collective calls in the same order"
                    )
                got[conn.rank] = base64.b64decode(m.get("data", ""))
            return None

        try:
            # (a death fails the collective at once: a rank that had sent its part and died was counted twice, as
            # arrived and as dead, and one that died before sending left rank 0 waiting the whole timeout)
            while len(got) < self.world_size and not dead and error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in sel.select(timeout=min(remaining, 0.5)):
                    error = take(key.data)
                    if error:
                        break
            # A rank that gave up (or died) after sending its part must not be answered as if it were waiting.
            while error is None and not dead:
                ready = sel.select(timeout=0)
                if not ready:
                    break
                for key, _ in ready:
                    error = take(key.data)
                    if error:
                        break
        finally:
            sel.close()
        if error is None and dead:
            arrived = set(got) - set(dead)
            waiting = sorted(set(range(self.world_size)) - arrived - set(dead))
            error = (
                f"{name}: rank(s) {_ranks(dead)} disconnected (their process exited or was killed); "
                f"{len(arrived)} of {self.world_size} ranks arrived"
                + (f"; rank(s) {_ranks(waiting)} had not arrived" if waiting else "")
            )
        if error is None and len(got) < self.world_size:
            missing = sorted(set(range(self.world_size)) - set(got))
            error = f"{name}: rank(s) {_ranks(missing)} did not arrive within {self.timeout:g} s"
        data = [base64.b64encode(got.get(r, b"")).decode() for r in range(self.world_size)]
        frame = None
        if error is None:
            try:  # encoded once for every rank
                frame = _encode({"op": "result", "data": data}, "every rank")
            except _FrameTooLarge:
                pass
        if error is None and frame is None:
            error = (
                f"{name}: the gathered payloads ({sum(len(v) for v in got.values())} bytes) exceed the control "
                f"plane's frame limit of {_MAX_FRAME} bytes; it is for small payloads (unique IDs, handles, barriers)"
            )
        if error is not None:
            self._tell([c for r, c in self._peers.items() if r not in dead], {"op": "error", "msg": error})
            raise RendezvousError(error)
        send_deadline = time.monotonic() + self.timeout
        failed = []
        for r, conn in self._peers.items():
            try:
                conn.send_frame(frame, max(send_deadline, time.monotonic() + _TELL_S))
            except (OSError, RendezvousError):
                failed.append(r)
        if failed:
            raise RendezvousError(
                f"{name}: rank 0 could not deliver the result to rank(s) {_ranks(failed)} (their process exited, was "
                f"killed, or stopped reading within {self.timeout:g} s); the other ranks received it"
            )
        return [got[r] for r in range(self.world_size)]

    def _check_usable(self, name: str) -> None:
        if self._closed:
            raise RendezvousError(f"{name}: the rendezvous is closed")
        if self._broken:
            raise RendezvousError(f"{name}: the rendezvous failed earlier and cannot be used: {self._broken}")

    # -- teardown ---------------------------------------------------------------------------------------------
    @property
    def torchrun_store(self) -> bool:
        """True when the control plane's port was exchanged through torchrun's store."""
        return self._torchrun

    @property
    def broken(self) -> bool:
        return self._broken is not None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._doorman is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
            self._doorman.join(2.0)
            self._wake_r.close()
            self._wake_w.close()
        for conn in self._peers.values():
            conn.close()
        if self._hub is not None:
            self._hub.close()
            if self._session is not None:
                Rendezvous._closed_sessions[(self.addr, self.port, self.rank)] = self._session
        if self._listener is not None:
            self._listener.close()
        self._store = None

    def __enter__(self) -> Rendezvous:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
