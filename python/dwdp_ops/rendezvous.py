"""TCP control plane for the ranks of one job: the NVSHMEM unique-ID exchange, small all-gathers and barriers that
fail with a message instead of hanging.

Rank 0 is the hub: it listens at ``MASTER_ADDR:MASTER_PORT``; every other rank connects and stays connected until
``close()``. Frames are a 4-byte big-endian length followed by a JSON object; payload bytes travel base64-encoded.

Under ``torchrun`` (``env.under_torchrun``) torchrun's own TCPStore already listens at ``MASTER_ADDR:MASTER_PORT``.
There rank 0 listens on a free port of ``MASTER_ADDR`` (bound before it is published, so it cannot be taken) and
publishes it in torchrun's store under a key unique to this rendezvous; the other ranks read it from the store and
connect as usual. The store is torchrun's agent store when torchrun says so (``TORCHELASTIC_USE_AGENT_STORE=True``),
otherwise rank 0 hosts a multi-tenant TCPStore at ``MASTER_PORT``, as ``torch.distributed``'s ``env://`` does.

Invariants:
  * Every collective (``allgather``, ``broadcast``, ``barrier``) carries a name and a sequence number; rank 0 checks
    that all ranks called the same collective in the same order and fails all of them if not.
  * Nobody waits longer than ``timeout`` seconds. When rank 0 gives up it tells every connected rank why (the ranks
    that never arrived, or that disconnected) before raising, so the message is the same on every survivor.
  * A rank whose connection to rank 0 breaks raises at once, naming rank 0.
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Sequence
from datetime import timedelta

from .env import under_torchrun
from .errors import RendezvousError

_HEADER = struct.Struct(">I")
_MAX_FRAME = 64 << 20


def _ranks(ranks: Sequence[int]) -> str:
    return "[" + ", ".join(str(r) for r in sorted(ranks)) + "]"


class _Conn:
    """One framed, non-blocking-friendly TCP connection."""

    def __init__(self, sock: socket.socket, peer_rank: int | None = None):
        self.sock = sock
        self.rank = peer_rank
        self.buf = bytearray()

    def send(self, msg: dict) -> None:
        data = json.dumps(msg).encode()
        self.sock.setblocking(True)
        self.sock.sendall(_HEADER.pack(len(data)) + data)

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
        while len(self.buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(self.buf)
            if n > _MAX_FRAME:
                raise RendezvousError(f"rendezvous: frame of {n} bytes from rank {self.rank} exceeds {_MAX_FRAME}")
            if len(self.buf) < _HEADER.size + n:
                break
            out.append(json.loads(bytes(self.buf[_HEADER.size : _HEADER.size + n])))
            del self.buf[: _HEADER.size + n]
        return out

    def recv(self, deadline: float, what: str) -> dict | None:
        """Blocks until one message or the deadline; None when the peer closed; raises TimeoutError on deadline."""
        while True:
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
            if len(self.buf) >= _HEADER.size:
                (n,) = _HEADER.unpack_from(self.buf)
                if len(self.buf) >= _HEADER.size + n:
                    msg = json.loads(bytes(self.buf[_HEADER.size : _HEADER.size + n]))
                    del self.buf[: _HEADER.size + n]
                    return msg

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _TorchrunPort:
    """Publishes rank 0's control-plane port through torchrun's TCPStore at ``addr:port`` and reads it elsewhere."""

    _uses = 0  # rendezvous made through the store in this process; every rank makes them in the same order

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

    def publish(self, port: int) -> None:
        self.store.set(self.key, str(port))

    def lookup(self, rank: int) -> int:
        try:
            self.store.wait([self.key], timedelta(seconds=self.timeout))
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
    False force either way. ``port`` is then the store's port, and ``self.port`` becomes the control plane's."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        addr: str = "127.0.0.1",
        port: int = 29531,
        timeout: float = 60.0,
        *,
        torchrun: bool | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rendezvous: rank {rank} is outside [0, {world_size})")
        if timeout <= 0:
            raise ValueError(f"rendezvous: timeout must be > 0 seconds, got {timeout}")
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
                self.port = self._store.lookup(self.rank)
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
        conn.send({"op": "hello", "rank": self.rank, "world": self.world_size})
        try:
            msg = conn.recv(deadline, "welcome")
        except TimeoutError:
            conn.close()
            raise RendezvousError(
                f"rendezvous: rank {self.rank} connected to {where} but rank 0 did not admit it within "
                f"{self.timeout:g} s"
            ) from None
        if msg is None:
            conn.close()
            raise RendezvousError(f"rendezvous: rank 0 at {where} closed the connection during set-up")
        if msg.get("op") == "error":
            conn.close()
            raise RendezvousError(msg["msg"])
        return conn

    def _accept_all(self, deadline: float, where: str) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        pending: list[_Conn] = []
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
                    break
                for key, _ in sel.select(timeout=min(remaining, 0.5)):
                    if key.data is None:
                        sock, _addr = self._listener.accept()
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        sock.setblocking(False)
                        conn = _Conn(sock)
                        pending.append(conn)
                        sel.register(sock, selectors.EVENT_READ, conn)
                        continue
                    conn = key.data
                    msgs = conn.feed()
                    if msgs is None:
                        sel.unregister(conn.sock)
                        pending.remove(conn)
                        conn.close()
                        continue
                    for msg in msgs:
                        error = self._admit(conn, msg)
                        if error is None:
                            sel.unregister(conn.sock)
                            pending.remove(conn)
                        break
        finally:
            sel.close()
        if error is not None:
            for conn in list(self._peers.values()) + pending:
                try:
                    conn.send({"op": "error", "msg": error})
                except OSError:
                    pass
            raise RendezvousError(error)
        for conn in self._peers.values():
            conn.send({"op": "welcome"})

    def _admit(self, conn: _Conn, msg: dict) -> str | None:
        if msg.get("op") != "hello":
            return f"rendezvous: unexpected first message {msg.get('op')!r} from a client (not a dwdp_ops rank?)"
        rank, world = int(msg["rank"]), int(msg["world"])
        if world != self.world_size:
            return (
                f"world size disagrees between ranks: rank 0 has world size {self.world_size}, rank {rank} has "
                f"{world}; every rank must be started with the same WORLD_SIZE"
            )
        if not 1 <= rank < self.world_size:
            return f"rendezvous: a client says it is rank {rank}, outside [1, {self.world_size})"
        if rank in self._peers:
            return f"rendezvous: rank {rank} arrived twice; check the RANK of every process"
        conn.rank = rank
        self._peers[rank] = conn
        return None

    # -- collectives ------------------------------------------------------------------------------------------
    def allgather(self, name: str, payload: bytes = b"") -> list[bytes]:
        """Every rank's ``payload``, indexed by rank. Collective: all ranks call it with the same ``name``.
        Thread-safe: collectives of one process run one at a time (a second thread waits), so two threads can never
        receive each other's replies; their order must still agree across ranks, which the name check verifies."""
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
        if not 0 <= root < self.world_size:
            raise ValueError(f"broadcast root {root} is outside [0, {self.world_size})")
        return self.allgather(name, payload if self.rank == root else b"")[root]

    def barrier(self, name: str = "barrier") -> None:
        self.allgather(name)

    def _gather_at_leaf(self, name: str, payload: bytes) -> list[bytes]:
        hub = self._hub
        msg = {"op": "gather", "name": name, "seq": self._seq, "data": base64.b64encode(payload).decode()}
        try:
            hub.send(msg)
        except OSError:
            raise RendezvousError(
                f"{name}: rank {self.rank} lost its connection to rank 0 (rank 0's process exited or was killed)"
            ) from None
        # Rank 0 enforces the timeout and reports; allow it a grace period to do so.
        try:
            reply = hub.recv(time.monotonic() + self.timeout + 5.0, name)
        except TimeoutError:
            raise RendezvousError(f"{name}: rank 0 did not answer rank {self.rank} within {self.timeout:g} s") from None
        if reply is None:
            raise RendezvousError(
                f"{name}: rank {self.rank} lost its connection to rank 0 (rank 0's process exited or was killed)"
            )
        if reply.get("op") == "error":
            raise RendezvousError(reply["msg"])
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
        try:
            while len(got) + len(dead) < self.world_size and error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in sel.select(timeout=min(remaining, 0.5)):
                    conn = key.data
                    msgs = conn.feed()
                    if msgs is None:
                        dead.append(conn.rank)
                        sel.unregister(conn.sock)
                        continue
                    for m in msgs:
                        if m.get("name") != name or m.get("seq") != self._seq:
                            error = (
                                f"collective mismatch: rank 0 called {name!r} (#{self._seq}) while rank {conn.rank} "
                                f"called {m.get('name')!r} (#{m.get('seq')}); every rank must make the same "
                                f"collective calls in the same order"
                            )
                            break
                        got[conn.rank] = base64.b64decode(m["data"])
                    if error:
                        break
        finally:
            sel.close()
        if error is None and dead:
            error = (
                f"{name}: rank(s) {_ranks(dead)} disconnected (their process exited or was killed); "
                f"{len(got)} of {self.world_size} ranks arrived"
            )
        if error is None and len(got) < self.world_size:
            missing = sorted(set(range(self.world_size)) - set(got))
            error = f"{name}: rank(s) {_ranks(missing)} did not arrive within {self.timeout:g} s"
        if error is not None:
            for r, conn in self._peers.items():
                if r not in dead:
                    try:
                        conn.send({"op": "error", "msg": error})
                    except OSError:
                        pass
            raise RendezvousError(error)
        data = [base64.b64encode(got[r]).decode() for r in range(self.world_size)]
        for conn in self._peers.values():
            conn.send({"op": "result", "data": data})
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
        for conn in self._peers.values():
            conn.close()
        if self._hub is not None:
            self._hub.close()
        if self._listener is not None:
            self._listener.close()
        self._store = None

    def __enter__(self) -> Rendezvous:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
