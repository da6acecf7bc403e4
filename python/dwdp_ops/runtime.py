"""Lifecycle of the dwdp_ops runtime in one process: rendezvous, NVSHMEM init, symmetric buffers, finalize.

One process per GPU. ``init()`` reads the launcher's environment (``env.DistEnv``), checks every condition that would
otherwise make NVSHMEM ``exit()`` the process (no GPU, too few GPUs, ranks that disagree on the world size), opens
the TCP control plane (``rendezvous.Rendezvous``), shares rank 0's NVSHMEM unique ID through it and initialises
NVSHMEM from ``_C`` (the module that holds the device code).

Invariants:
  * States go ``new -> initialized -> finalized``; nothing goes back. NVSHMEM cannot start twice in a process, so
    ``init()`` after ``finalize()`` raises, and a second ``init()`` is a no-op only with the same arguments.
  * A failed ``init()`` rolls back what it opened (the control plane) and the ``NVSHMEM_*`` variables it set (each
    back to its value before, or unset), and leaves the runtime ``new`` if NVSHMEM was never touched, ``finalized``
    otherwise.
  * Collective calls (``barrier``, symmetric allocation and free, ``finalize``) first meet on the control plane,
    which has a timeout naming the missing ranks, so a dead rank makes the survivors raise instead of hanging in
    NVSHMEM.
  * Symmetric buffers are freed explicitly and collectively, in the same order on every rank; ``finalize()`` frees
    the ones still alive, in allocation order, after checking that every rank holds the same list.
  * Every native call runs with this rank's device current and restores the caller's device (``_C``'s guard).

Environment variables read here (set before ``init()``):
  ``DWDP_TIMEOUT``   seconds any collective waits for the other ranks (default 300; ``env.timeout_from_environ``: a
                     value that is not a finite number in (0, 1e9] raises ValueError naming it).
  ``NVSHMEM_*``      passed through to NVSHMEM; ``init()`` sets these defaults when unset: ``NVSHMEM_DISABLE_NVLS=1``
                     (NVLink multicast stays off: it can take shared hosts' GPUs out of service), ``NVSHMEM_REMOTE_TRANSPORT=none`` (one node),
                     ``NVSHMEM_CUMEM_GRANULARITY=2097152`` (registered expert buffers of any 2 MiB multiple),
                     ``NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo`` and ``NVSHMEM_BOOTSTRAP_UID_SOCK_FAMILY=AF_INET`` when
                     ``MASTER_ADDR`` is a loopback address, and ``NVSHMEM_SYMMETRIC_SIZE`` from ``heap_size``.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._checks import is_bool, is_int
from ._native import native
from .env import DEFAULT_TIMEOUT, DistEnv, timeout_from_environ
from .errors import DwdpError, RendezvousError
from .rendezvous import Rendezvous


@dataclass
class SymmetricBuffer:
    """One allocation on the symmetric heap: same size and allocation index on every rank."""

    ptr: int
    nbytes: int
    index: int
    label: str


@dataclass(frozen=True)
class _InitArgs:
    rank: int
    world_size: int
    local_rank: int
    device: int
    heap_size: int | None
    master: str
    timeout: float


def _parse_size(size: int | str | None) -> int | None:
    """``heap_size`` in bytes: None, an int, or a string of bytes or a number with k/m/g/t ('4g', '1.5g'). Raises
    TypeError for a bool, ValueError for anything else that is not a whole number of bytes > 0."""
    if is_bool(size):
        raise TypeError(f"heap_size must be a size in bytes (an int or a string like '4g'), got {size!r}")
    if size is None or is_int(size):
        if size is not None and size <= 0:
            raise ValueError(f"heap_size must be positive, got {size}")
        return None if size is None else int(size)
    s = str(size).strip().lower()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    try:
        x = float(s[:-1]) * mult[s[-1]] if s and s[-1] in mult else int(s)
        n = int(x)
    except (ValueError, OverflowError):
        raise ValueError(f"heap_size {size!r} is not a size (bytes, or a number with k/m/g/t)") from None
    if n != x:  # '1.3k' is 1331.2 bytes: refused, not truncated
        raise ValueError(f"heap_size {size!r} is {x!r} bytes, not a whole number of bytes")
    if n <= 0:
        raise ValueError(f"heap_size {size!r} is {n} bytes; it must be positive")
    return n


def _is_loopback(addr: str) -> bool:
    """True for ``localhost`` and any IPv4 loopback address (127.0.0.0/8: Debian maps the host name to 127.0.1.1), as
    docs/environment.md says; the control plane is IPv4 only."""
    if addr.strip().lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(addr.strip())
    except ValueError:
        return False
    return ip.version == 4 and ip.is_loopback


def _restore_environ(saved: Mapping[str, str | None]) -> None:
    """Puts back the variables ``Runtime._set_nvshmem_env`` changed: each to its value before, or unset."""
    for name, old in saved.items():
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class Runtime:
    """The per-process runtime. ``backend`` is the native module (``_C``); tests pass a fake with the same
    functions to exercise the host logic without a GPU."""

    def __init__(self, backend: Any = None):
        self._backend = backend
        self.state = "new"
        self.env: DistEnv | None = None
        self.device = -1
        self._args: _InitArgs | None = None
        self._rdv: Rendezvous | None = None
        self._buffers: dict[int, SymmetricBuffer] = {}
        self._next_index = 0
        self._atexit = False

    @property
    def backend(self):
        if self._backend is None:
            self._backend = native()
        return self._backend

    # -- lifecycle --------------------------------------------------------------------------------------------
    def init(
        self,
        *,
        device: int | None = None,
        heap_size: int | str | None = None,
        timeout: float | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Runtime:
        if self.state == "finalized":
            raise DwdpError(
                "dwdp_ops.init(): the runtime was finalized in this process and NVSHMEM cannot be initialised twice "
                "in one process; start a new process"
            )
        env = DistEnv.from_environ(environ)
        timeout = timeout_from_environ(timeout, default=DEFAULT_TIMEOUT)  # names DWDP_TIMEOUT when it is bad
        heap = _parse_size(heap_size)
        if device is not None and not is_int(device):
            raise TypeError(f"dwdp_ops.init(): device must be an int (a CUDA device index) or None, got {device!r} "
                            f"({type(device).__name__})")
        dev = env.local_rank if device is None else int(device)
        args = _InitArgs(env.rank, env.world_size, env.local_rank, dev, heap, f"{env.master_addr}:{env.master_port}",
                         timeout)  # (a second init with another timeout had been a silent no-op)
        if self.state == "initialized":
            if args != self._args:
                raise DwdpError(f"dwdp_ops.init() called again with other arguments: first {self._args}, now {args}")
            return self

        be = self.backend
        count, why = be.cuda_device_count()
        where = f"rank {env.rank} of {env.world_size}"
        if count == 0:
            from ._native import describe_cuda_error

            raise DwdpError(f"{where}: no CUDA GPU is usable ({describe_cuda_error(why)}); dwdp_ops kernels need an NVIDIA GPU")
        if env.local_world_size > count:
            raise DwdpError(
                f"{where}: {env.local_world_size} ranks run on this node but only {count} GPU(s) are visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); start at most {count} "
                "ranks per node, one per GPU"
            )
        if not 0 <= dev < count:
            raise DwdpError(f"{where}: device {dev} does not exist; {count} GPU(s) are visible")

        saved = self._set_nvshmem_env(env, heap)
        try:
            rdv = Rendezvous(env.rank, env.world_size, env.master_addr, env.master_port, timeout)
        except BaseException:
            _restore_environ(saved)
            raise
        touched = False
        try:
            uid = be.get_unique_id(dev) if env.rank == 0 else b""
            uid = rdv.broadcast("init:unique_id", uid)
            if len(uid) != be.unique_id_size():
                raise DwdpError(f"{where}: received a unique ID of {len(uid)} bytes, expected {be.unique_id_size()}")
            touched = True
            be.init(uid, env.rank, env.world_size, dev)
            if be.n_pes() != env.world_size or be.my_pe() != env.rank:
                raise DwdpError(
                    f"{where}: NVSHMEM reports PE {be.my_pe()} of {be.n_pes()}; another component initialised it with "
                    "a different world"
                )
            rdv.barrier("init:done")
        except BaseException as e:
            rdv.close()
            _restore_environ(saved)
            if touched:
                self.state = "finalized"
            if isinstance(e, (DwdpError, ValueError)) or not isinstance(e, Exception):  # SystemExit, Ctrl-C: as is
                raise
            raise DwdpError(f"{where}: NVSHMEM initialisation failed: {e}") from e
        self.env, self.device, self._args, self._rdv = env, dev, args, rdv
        self.state = "initialized"
        if not self._atexit:
            atexit.register(self._finalize_at_exit)
            self._atexit = True
        return self

    @staticmethod
    def _set_nvshmem_env(env: DistEnv, heap: int | None) -> dict[str, str | None]:
        """Sets the module docstring's ``NVSHMEM_*`` defaults; returns each variable it changed with its value before
        (None: it was unset), for ``_restore_environ`` when init fails."""
        saved: dict[str, str | None] = {}

        def put(name: str, value: str, *, override: bool = False) -> None:  # a default unless override
            if override or name not in os.environ:
                saved[name] = os.environ.get(name)
                os.environ[name] = value

        put("NVSHMEM_DISABLE_NVLS", "1")
        put("NVSHMEM_REMOTE_TRANSPORT", "none")
        # 2 MiB lets NVSHMEM register any page-multiple buffer (measured on NVSHMEM 3.4.5: the 512 MiB default refuses
        # smaller buffers), so each layer's local experts can be one allocation that is also mapped, whole, into
        # the layer's composite view (cuMemMap maps whole allocations only).
        put("NVSHMEM_CUMEM_GRANULARITY", str(2 << 20))
        if _is_loopback(env.master_addr):
            put("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo")
            put("NVSHMEM_BOOTSTRAP_UID_SOCK_FAMILY", "AF_INET")
        if heap is not None:
            put("NVSHMEM_SYMMETRIC_SIZE", str(heap), override=True)
        return saved

    def finalize(self) -> None:
        """Frees the symmetric buffers still alive and shuts NVSHMEM down. Idempotent; collective."""
        if self.state != "initialized":
            return
        rdv, be = self._rdv, self.backend
        clean = False  # NVSHMEM's finalize is collective: call it only after every rank met us here
        try:
            if self._buffers:
                live = sorted(self._buffers.values(), key=lambda b: b.index)
                mine = json.dumps([[b.index, b.nbytes] for b in live]).encode()
                views = rdv.allgather("finalize:buffers", mine)
                if all(v == mine for v in views):
                    for b in live:
                        be.symmetric_free(b.ptr)
                else:
                    warnings.warn("dwdp_ops.finalize(): ranks hold different symmetric buffers; not freeing them", stacklevel=2)
                self._buffers.clear()
            rdv.barrier("finalize")
            clean = True
        except RendezvousError as e:
            warnings.warn(f"dwdp_ops.finalize(): skipping NVSHMEM finalize because a peer is gone: {e}", stacklevel=2)
        except BaseException as e:  # noqa: BLE001 - any failure before the barrier: never enter a collective alone
            warnings.warn(f"dwdp_ops.finalize(): skipping NVSHMEM finalize after {type(e).__name__}: {e}", stacklevel=2)
            raise
        finally:
            self.state = "finalized"
            try:
                if clean:
                    be.finalize()
            finally:  # even when NVSHMEM's finalize raises: the listener and doorman must not outlive the runtime
                rdv.close()

    def _finalize_at_exit(self) -> None:
        try:
            self.finalize()
        except Exception as e:  # noqa: BLE001 - nothing can be raised at exit
            warnings.warn(f"dwdp_ops: finalize at exit failed: {e}", stacklevel=2)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.finalize()

    # -- queries ----------------------------------------------------------------------------------------------
    def require(self, what: str) -> None:
        if self.state == "finalized":
            raise DwdpError(f"{what}: the dwdp_ops runtime was finalized")
        if self.state != "initialized":
            raise DwdpError(f"{what}: call dwdp_ops.init() first")

    @property
    def rendezvous(self) -> Rendezvous:
        self.require("rendezvous")
        return self._rdv

    def rank(self) -> int:
        self.require("rank()")
        return self.env.rank

    def world_size(self) -> int:
        self.require("world_size()")
        return self.env.world_size

    def local_rank(self) -> int:
        self.require("local_rank()")
        return self.env.local_rank

    def barrier(self) -> None:
        """All ranks meet on the control plane (raises naming missing ranks), then in NVSHMEM (orders memory)."""
        self.require("barrier()")
        self._rdv.barrier("barrier")
        self.backend.barrier_all()

    # -- symmetric heap ---------------------------------------------------------------------------------------
    def symmetric_alloc(self, nbytes: int, label: str, alignment: int = 512) -> SymmetricBuffer:
        self.require("symmetric allocation")
        if nbytes <= 0:
            raise ValueError(f"symmetric allocation of {nbytes} bytes: the size must be positive")
        me = json.dumps([nbytes, label]).encode()
        views = self._rdv.allgather("symmetric_alloc", me)
        differ = [r for r, v in enumerate(views) if v != me]
        if differ:
            detail = ", ".join(f"rank {r}: {json.loads(v)}" for r, v in enumerate(views))
            raise DwdpError(
                f"symmetric allocation is collective and every rank must ask for the same size; got {detail}"
            )
        failure = None
        try:
            ptr = self.backend.symmetric_malloc(nbytes, alignment)
        except Exception as e:  # noqa: BLE001 - the other ranks must learn of it
            failure = e
        views = self._rdv.allgather("symmetric_alloc:done", b"" if failure is None else str(failure).encode())
        failed = [r for r, v in enumerate(views) if v]
        if failed:
            if failure is None:  # freeing is collective too, and the failed ranks have nothing to free
                warnings.warn(
                    f"symmetric allocation of {nbytes} bytes ({label}) failed on rank(s) {failed}; this rank's "
                    "allocation stays on the heap until finalize", stacklevel=2)
            raise DwdpError(
                f"symmetric allocation of {nbytes} bytes ({label}) failed on rank(s) {failed}: "
                + "; ".join(f"rank {r}: {views[r].decode(errors='replace')}" for r in failed)
            ) from failure
        buf = SymmetricBuffer(ptr, nbytes, self._next_index, label)
        self._next_index += 1
        self._buffers[ptr] = buf
        return buf

    def symmetric_free(self, buf: SymmetricBuffer) -> None:
        self.require("symmetric free")
        if self._buffers.get(buf.ptr) is not buf:
            raise DwdpError(f"symmetric free: buffer {buf.label!r} at {buf.ptr:#x} is not live (freed twice?)")
        me = str(buf.index).encode()
        views = self._rdv.allgather("symmetric_free", me)
        differ = [r for r, v in enumerate(views) if v != me]
        if differ:
            raise DwdpError(
                f"symmetric free is collective and must free the same buffer everywhere: rank {self.env.rank} frees "
                f"allocation #{buf.index}, rank(s) {differ} free #{[int(views[r]) for r in differ]}"
            )
        del self._buffers[buf.ptr]
        self.backend.symmetric_free(buf.ptr)

    def find_buffer(self, ptr: int, nbytes: int) -> SymmetricBuffer | None:
        """The live buffer holding ``[ptr, ptr + nbytes)``, or None."""
        for b in self._buffers.values():
            if b.ptr <= ptr and ptr + nbytes <= b.ptr + b.nbytes:
                return b
        return None


_RUNTIME = Runtime()


def get_runtime() -> Runtime:
    """This process's ``Runtime`` (one per process; its state is ``new`` until ``init()``)."""
    return _RUNTIME


def init(
    *, device: int | None = None, heap_size: int | str | None = None, timeout: float | None = None
) -> Runtime:
    """Initialises dwdp_ops (NVSHMEM, one PE per process) from the launcher's environment. Returns the runtime,
    which is also a context manager that finalizes on exit. ``heap_size`` sets NVSHMEM's symmetric heap
    (bytes or '4g'); ``timeout`` bounds every wait for other ranks."""
    return _RUNTIME.init(device=device, heap_size=heap_size, timeout=timeout)


def finalize() -> None:
    """Frees live symmetric buffers and finalizes NVSHMEM. Idempotent; also runs at interpreter exit."""
    _RUNTIME.finalize()


def rank() -> int:
    """This process's rank (NVSHMEM PE) in ``[0, world_size())``; raises DwdpError before ``init()`` and after
    ``finalize()``."""
    return _RUNTIME.rank()


def world_size() -> int:
    """The number of ranks (one per GPU) in the job; raises DwdpError before ``init()`` and after
    ``finalize()``."""
    return _RUNTIME.world_size()


def local_rank() -> int:
    """This process's rank on its node (the GPU it uses by default); raises DwdpError before ``init()`` and after
    ``finalize()``."""
    return _RUNTIME.local_rank()


def barrier() -> None:
    """Collective: all ranks meet on the control plane (raises naming the missing ranks), then in NVSHMEM."""
    _RUNTIME.barrier()


def is_initialized() -> bool:
    """True between a successful ``init()`` and ``finalize()``."""
    return _RUNTIME.state == "initialized"
