"""The NCCL baseline of DEP token dispatch/combine: the contract of ``dispatch_plan``'s docstring (issue 12) through
``torch.distributed.all_to_all_single`` (NCCL on GPUs, gloo on CPU for tests), as users would otherwise write it.

Semantics are ``dwdp_ops.dispatch_plan``'s (owner rule, send order, grouped receive layout, reduction orders); the
planning here is the same computation in torch ops on the tensors' device (no numpy round trip, no per-token
Python loop; Python loops only over the k slots and the N ranks).

Per ``dispatch`` (collective over the group, every rank calls it, T = 0 included):
  1. plan on the device: dest per pair, the tokens per dest, and per (dest, local expert) pair counts;
  2. one ``all_gather_into_tensor`` of int64 counts, ``N (L + 1) + 2`` per rank: a bad-ids flag, the rank's
     ``max_rows`` (-1: none), its rows for every dest and its pairs for every (dest, local expert); then ONE host
     synchronisation (``.cpu()`` of the gathered counts) to get the split sizes, as every user of
     ``all_to_all_single`` with uneven splits must. Every rank then knows every rank's counts, so a bad
     ``topk_ids`` on any rank, or a rank whose step needs more grouped rows than its ``max_rows``, raises on every
     rank (no rank is left waiting in the next collective). The gathered counts grow as N^2 L (18 KB at N = 8 and
     L = 32; ~210 KB at N = 72 and L = 4, where an ``all_to_all_single`` of N (L + 2) would do without ``max_rows``);
  3. one ``all_to_all_single`` of the packed rows: each row is the token's hidden state (input dtype, bit-exact)
     followed by k int32 local expert ids (-1 = not for that dest) and k float32 weights (bit-exact), sent as bytes;
  4. the grouped layout at the dest (groups by local expert, (s, row, j) order, starts aligned to ``align``, zero
     padding), ready for ``torch._grouped_mm(x_grouped, W.transpose(-2, -1), offs=handle.offs)``.
``combine`` (collective; no host synchronisation): float32 partial per received row over slots j ascending, one
``all_to_all_single`` of the partials back (``combine_dtype``, float32 by default as the contract's "rounded once";
bfloat16 halves the bytes but rounds twice), then the sum over dests ascending in float32, rounded once to x's dtype.

All ranks must pass the same x dtype, hidden size and top_k. Capacity is not bounded here (buffers are allocated per
step); the NVLink kernels are the capacity-bounded, graph-capturable path.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import os
import time
from dataclasses import dataclass
from typing import Any

from ._checks import is_int, rank_counts
from .env import DistEnv, timeout_from_environ
from .errors import DwdpError, RendezvousError
from .partition import ExpertPartition
from .rendezvous import _GRACE_S, _TELL_S, _ranks

__all__ = ["NcclDispatchHandle", "NcclDispatcher", "init_process_group_from_env"]


def _torch():
    try:
        import torch
        import torch.distributed as dist
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError("dwdp_ops.dispatch_nccl needs PyTorch with torch.distributed; install torch") from e
    return torch, dist


def init_process_group_from_env(backend: str | None = None, timeout_s: float | None = None) -> DistEnv:
    """Initialises ``torch.distributed`` for this process from our launcher's environment (``python -m
    dwdp_ops.launch``, torchrun or mpirun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ...).

    The group's store is a ``TCPStore`` at ``MASTER_ADDR:PORT``, hosted by rank 0, with PORT = ``DWDP_NCCL_PORT`` when
    set, else ``MASTER_PORT + 1`` (``MASTER_PORT`` itself is ``dwdp_ops.init``'s control plane; both can run in one
    job). Before the group forms, a join check on that store (``_join``) raises RendezvousError on every arrived
    rank naming the ranks that did not arrive within the timeout (ranks > 0 wait ``rendezvous._GRACE_S`` longer,
    then name rank 0 when it never answered). Backend: ``backend``,
    else ``nccl`` when CUDA is available, else ``gloo``; with nccl the current CUDA device is set to ``LOCAL_RANK``.
    Timeout: ``timeout_s``, else ``DWDP_TIMEOUT`` (default 300 s; ``env.timeout_from_environ``, checked before
    anything starts: a bad value raises ValueError naming it). Collective (every rank calls it). A group already
    initialised with this world is kept (returns at once); one with another world raises DwdpError.
    Returns this process's ``DistEnv``."""
    torch, dist = _torch()
    env = DistEnv.from_environ()
    t = timeout_from_environ(timeout_s)  # before anything is touched; a bad DWDP_TIMEOUT is named
    raw = os.environ.get("DWDP_NCCL_PORT", "").strip()
    try:
        port = int(raw) if raw else env.master_port + 1
    except ValueError:
        raise ValueError(f"DWDP_NCCL_PORT={raw!r} is not an integer") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"the torch.distributed port {port} (DWDP_NCCL_PORT or MASTER_PORT + 1) is not a TCP port")
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size):
            raise DwdpError(f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                            f"{dist.get_world_size()}, but the environment says rank {env.rank} of {env.world_size}")
        return env
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise DwdpError("backend 'nccl' needs CUDA, but torch sees no GPU")
        torch.cuda.set_device(env.local_rank)
    store = _join(env, port, t)
    dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size,
                            timeout=_dt.timedelta(seconds=t))
    global _WATCH, _world_seq, _world_gen
    _WATCH = _Watch(store, env.rank, env.world_size, t, dist.group.WORLD) if backend == "gloo" else None
    _world_seq = 0  # a new world numbers its dispatches from 1, as its progress keys (set to 0 by _join) expect
    _world_gen += 1  # ... and keys its failure reports apart from an earlier world's (the store's server outlives it)
    return env


@dataclass(frozen=True)
class _Watch:
    """The store and timeout of the world that ``init_process_group_from_env`` set up with gloo (``pg``: its group,
    to tell it from a later one)."""

    store: Any
    rank: int
    world: int
    timeout: float
    pg: Any


_WATCH: _Watch | None = None


@atexit.register
def _drop_watch() -> None:
    """Lets go of ``_WATCH``'s store at exit, before the interpreter's teardown: rank 0's store, kept there past
    ``destroy_process_group``, was otherwise destroyed during that teardown, and its server thread sometimes ended
    rank 0 with "terminate called without an active exception" (SIGABRT) after a clean run."""
    global _WATCH
    _WATCH = None


_world_seq = 0  # dispatches entered on the default group since init_process_group_from_env formed it (every rank's)
_world_gen = 0  # worlds init_process_group_from_env formed in this process (every rank's: each forms the same ones)


# Keys of the join check in torch.distributed's store (torch's own keys there live under the group's prefix).
_JOINED = "dwdp/joined/"  # + rank: set by each rank when it has reached the store
_VERDICT = "dwdp/joined/verdict"  # set by rank 0: "ok", or the error every rank raises
_ACK = "dwdp/joined/ack/"  # + rank: a rank > 0 has read a failed verdict (rank 0 then stops hosting the store)
_OKS = "dwdp/joined/oks"  # how many ranks > 0 have read an "ok" verdict (the last one deletes the verdict)
_AT = "dwdp/nccl/at/"  # + rank: the last dispatch # this rank entered (0: none yet), for the collectives' messages
_READ = "dwdp/nccl/read/"  # + world/collective/rank: a failed rank has read the progress keys (rank 0 may stop hosting)


def _await_listener(host: str, port: int, deadline: float) -> None:
    """Returns once something accepts TCP connections at ``host:port``; TimeoutError at ``deadline`` (monotonic)."""
    import socket

    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"nothing accepted a connection at {host}:{port}")
        try:
            socket.create_connection((host, port), timeout=min(left, 1.0)).close()
            return
        except OSError:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def _join(env: DistEnv, port: int, t: float):
    """The store of ``init_process_group_from_env``, and a join check on it that names missing ranks.

    ``torch.distributed``'s own rendezvous fails after the timeout with "Timed out after T seconds waiting for
    clients. 1/2 clients joined" (rank 0) or "The client socket has timed out ... while trying to connect" (the
    others): no rank named. Here every rank sets ``dwdp/joined/<rank>`` in a TCPStore at ``MASTER_ADDR:port``
    (hosted by rank 0); rank 0 waits up to ``t`` seconds for all of them and sets a verdict that every rank waits for:
    "ok", or a message naming the ranks whose keys are absent, which every arrived rank raises (RendezvousError).
    A rank > 0 waits ``rendezvous._GRACE_S`` longer than ``t`` (for the store to answer, and for the verdict), so
    that one started before rank 0 still gets rank 0's report; past that it raises naming rank 0. The keys are
    deleted once read (the joined keys by rank 0 before its verdict, an "ok" by the last rank to read it, a failed
    verdict by rank 0 once told): rank 0's store outlives the group (``_WATCH``), and a later set-up on the same port
    in this process reuses it (multi-tenant), so a key left there would pass that set-up's check or answer it with
    this verdict. Set-up only: the steps after it are untouched. Returns the store (``init_process_group(store=...)``
    keeps it)."""
    _, dist = _torch()
    me, n, addr = env.rank, env.world_size, f"{env.master_addr}:{port}"
    wait = t if me == 0 else t + _GRACE_S
    t0 = time.monotonic()
    try:
        if me > 0:  # torch's own connect retries back off past its timeout (17 s for 8): wait for the port here
            _await_listener(env.master_addr, port, t0 + wait)
        store = dist.TCPStore(env.master_addr, port, n, me == 0, timeout=_dt.timedelta(seconds=wait),
                              wait_for_workers=False, multi_tenant=True)
    except Exception as e:  # noqa: BLE001 - torch raises DistNetworkError, DistStoreError or RuntimeError by version
        if me == 0:
            raise RendezvousError(f"torch.distributed set-up: rank 0 could not host the store at {addr}: {e}") from e
        raise RendezvousError(f"torch.distributed set-up: rank {me} of {n} waited {time.monotonic() - t0:.1f} s "
                              f"(the timeout {t:g} s + {_GRACE_S:g} s) for rank 0, which hosts the store at {addr}, "
                              f"and it did not answer: rank 0 is missing (or late, or the address is wrong); the "
                              f"other ranks cannot be checked without it") from e
    store.set(f"{_AT}{me}", "0")  # before the join: every rank's key exists once set-up has passed
    store.set(f"{_JOINED}{me}", "1")
    if me == 0:
        missing = []
        try:
            store.wait([f"{_JOINED}{r}" for r in range(n)],
                       _dt.timedelta(seconds=max(t - (time.monotonic() - t0), 1e-3)))
        except Exception:  # noqa: BLE001 - the wait's timeout (DistStoreError or RuntimeError by version)
            missing = [r for r in range(n) if not store.check([f"{_JOINED}{r}"])]
        if not missing:
            _forget(store, [f"{_JOINED}{r}" for r in range(n)])
            if n > 1:
                store.set(_VERDICT, "ok")
            return store
        came = [r for r in range(1, n) if r not in missing]
        msg = (f"torch.distributed set-up at {addr}: rank(s) {_ranks(missing)} of {n} did not arrive within "
               f"{t:g} s (DWDP_TIMEOUT or timeout_s); arrived: {_ranks([0, *came])}")
        store.set(_VERDICT, msg)
        if came:  # keep hosting the store until they have read it (at most rendezvous._TELL_S)
            try:
                store.wait([f"{_ACK}{r}" for r in came], _dt.timedelta(seconds=_TELL_S))
            except Exception:  # noqa: BLE001 - best effort
                pass
        _forget(store, [_VERDICT, *(f"{_ACK}{r}" for r in range(1, n)), *(f"{_JOINED}{r}" for r in range(n))])
        raise RendezvousError(msg)
    try:
        store.wait([_VERDICT], _dt.timedelta(seconds=max(wait - (time.monotonic() - t0), 1e-3)))
        verdict = store.get(_VERDICT).decode()
    except Exception as e:  # noqa: BLE001 - the wait's timeout, or rank 0 gone
        raise RendezvousError(f"torch.distributed set-up: rank {me} of {n} reached rank 0's store at {addr} but got "
                              f"no verdict from rank 0 within {wait:g} s (the timeout {t:g} s + {_GRACE_S:g} s): "
                              f"rank 0 stalled or died ({type(e).__name__}: {e})") from e
    if verdict != "ok":
        try:
            store.set(f"{_ACK}{me}", "1")
        except Exception:  # noqa: BLE001 - rank 0 may be gone already
            pass
        raise RendezvousError(f"{verdict} (rank 0's verdict, raised on rank {me})")
    if store.add(_OKS, 1) == n - 1:  # the last rank to read it: every rank has
        _forget(store, [_VERDICT, _OKS])
    return store


def _forget(store, keys) -> None:
    """Deletes ``keys`` from ``store``, best effort (``_join``'s keys once read; rank 0 may be gone already)."""
    for k in keys:
        try:
            store.delete_key(k)
        except Exception:  # noqa: BLE001 - best effort
            pass


@dataclass(frozen=True, eq=False)
class NcclDispatchHandle:
    """What ``NcclDispatcher.dispatch`` returns; tensors on the dispatcher's device, returned (owned by the handle).
    R = received rows, S = sent rows, P = pairs at this rank.

    x_grouped   [num_rows, H] x dtype   hidden states grouped by local expert, zero padding between groups
    offs        [L] int32               cumulative group ends rounded up to align (offs[-1] == num_rows)
    num_rows    int                     grouped rows incl. padding
    expert_counts tuple[int]            pairs per local expert (host)
    pair_pos    [R, k] int64            grouped row of (received row, slot j), -1 where the slot is not for this rank
    recv_local_expert [R, k] int32      local expert per received row and slot (-1 = none)
    recv_weight [R, k] float32          the source's weight per received row and slot
    send_token  [S] int64               token of each packed send row (dest-major, tokens ascending)
    send_pos    [T, N] int64            row of token t among the tokens sent to d, -1 if none
    send_counts, recv_counts tuple[int] rows sent to / received from each rank (host)
    num_tokens  int                     T of this rank; dtype: x's dtype (the output's)
    seq         int                     the dispatch # it came from (1, 2, ... per group), named by failures
    """

    x_grouped: Any
    offs: Any
    num_rows: int
    expert_counts: tuple
    pair_pos: Any
    recv_local_expert: Any
    recv_weight: Any
    send_token: Any
    send_pos: Any
    send_counts: tuple
    recv_counts: tuple
    num_tokens: int
    dtype: Any
    seq: int = 0  # the dispatch # (``NcclDispatcher``'s failure messages)

    @property
    def rows(self) -> int:
        """Grouped rows (``num_rows``): the name ``TokenDispatcher``'s handle uses."""
        return self.num_rows

    def torch(self):
        """``(x_grouped, offs)``, as ``DispatchHandle.torch()`` (already PyTorch tensors)."""
        return self.x_grouped, self.offs

    @property
    def num_recv(self) -> int:
        return sum(self.recv_counts)

    @property
    def num_sent(self) -> int:
        return sum(self.send_counts)


class NcclDispatcher:
    """DEP dispatch/combine over ``torch.distributed.all_to_all_single`` (module docstring). ``group``: a process
    group of exactly ``partition.world_size`` ranks (default: the world; its ranks are the partition's ranks).
    ``align``: grouped-row alignment (16 for ``torch._grouped_mm``). ``combine_dtype``: dtype of the partials sent
    back (default float32). Tensors live on the current CUDA device with nccl, on the CPU with gloo."""

    def __init__(self, partition: ExpertPartition, hidden: int, top_k: int, *, group: Any = None, align: int = 16,
                 combine_dtype: Any = None):
        torch, dist = _torch()
        if not isinstance(partition, ExpertPartition):
            raise TypeError(f"partition must be an ExpertPartition, got {type(partition).__name__}")
        for name, v, lo in (("hidden", hidden, 1), ("top_k", top_k, 1), ("align", align, 1)):
            if not is_int(v) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        hidden, top_k, align = int(hidden), int(top_k), int(align)
        if top_k > partition.num_experts:
            raise ValueError(f"top_k must be in [1, {partition.num_experts}] (the layer's experts), got {top_k}")
        if not dist.is_initialized():
            raise DwdpError("torch.distributed is not initialised; call init_process_group_from_env() first")
        world = dist.get_world_size(group)
        if world != partition.world_size:
            raise ValueError(f"the process group has {world} ranks but the partition's world_size is "
                             f"{partition.world_size}")
        self.partition, self.hidden, self.top_k, self.align, self.group = partition, hidden, top_k, align, group
        self.rank = dist.get_rank(group)
        self.combine_dtype = torch.float32 if combine_dtype is None else combine_dtype
        if not self.combine_dtype.is_floating_point:
            raise TypeError(f"combine_dtype must be a floating dtype, got {self.combine_dtype}")
        if dist.get_backend(group) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.max_tokens = 2**31 - 1  # no capacity: buffers are allocated per step
        self._seq = 0  # dispatches entered on a group other than the default one
        w = _WATCH
        # the progress keys: only on the world that init_process_group_from_env set up with gloo (see _collective)
        self._watch = w if group is None and w is not None and w.pg is dist.group.WORLD and w.world == world else None
        self.capturable = False  # one host synchronisation per dispatch: never inside a CUDA graph

    # -- helpers -------------------------------------------------------------------------------------------------
    def _enter(self) -> int:
        """Numbers the dispatch about to start its collectives (1, 2, ... per group; every rank calls the same
        collectives in the same order, so the numbers agree) and, when watched, records it in the store under
        ``dwdp/nccl/at/<rank>``: one ``store.set``, a TCP round trip to rank 0's store, per dispatch (combine sets
        none). That is the only cost on the step, and only on the gloo world of ``init_process_group_from_env``;
        with nccl nothing is set (the benchmarked baseline stays as users would write it)."""
        global _world_seq
        if self.group is None:
            _world_seq += 1
            seq = _world_seq
        else:
            self._seq += 1
            seq = self._seq
        if self._watch is not None:
            self._watch.store.set(f"{_AT}{self._watch.rank}", str(seq))
        return seq

    def _collective(self, what: str, seq: int, combine: bool, fn):
        """``fn()``; a RuntimeError from torch.distributed in it (gloo's "Timed out waiting 3000ms for send
        operation to complete", "Connection reset by peer", ...) becomes a DwdpError naming the collective, the
        dispatch #, the timeout and, when watched (gloo world of ``init_process_group_from_env``), the ranks that had
        not reached it, from their ``dwdp/nccl/at/<rank>`` keys (read on failure only). With nccl the collectives
        are asynchronous: a peer that never comes leaves the host in dispatch's ``.cpu()`` until NCCL's watchdog
        ends the process with its own message, which this cannot wrap. An allocation failing in ``fn``
        (torch.OutOfMemoryError, also a RuntimeError) is no rank's failure: it passes through unwrapped."""
        t0 = time.monotonic()
        try:
            return fn()
        except RuntimeError as e:
            if isinstance(e, (DwdpError, _torch()[0].OutOfMemoryError)):
                raise
            raise DwdpError(self._failure(what, seq, combine, time.monotonic() - t0, e)) from e

    def _failure(self, what: str, seq: int, combine: bool, waited: float, e: Exception) -> str:
        w = self._watch
        step = f"the combine of dispatch #{seq}" if combine else f"dispatch #{seq}"
        head = (f"NcclDispatcher: {what} in {step} failed on rank {self.rank} of {self.partition.world_size} after "
                f"{waited:.1f} s (timeout " + (f"{w.timeout:g} s" if w else "the process group's") + ")")
        if w is None:
            who = ("which ranks had not reached it is not recorded (only on the default group of "
                   "init_process_group_from_env with gloo)")
        else:
            try:
                at = [int(v) for v in w.store.multi_get([f"{_AT}{r}" for r in range(w.world)])]
            except Exception as err:  # noqa: BLE001 - the store's host (rank 0) may be gone
                at = None
                who = f"the ranks' progress could not be read from rank 0's store ({type(err).__name__}: {err})"
            if at is not None:
                done = f"{_READ}{_world_gen}/{'c' if combine else 'd'}{seq}/"
                try:  # rank 0 hosts the store: it waits (up to rendezvous._TELL_S) for the others that fail too
                    if w.rank == 0:
                        peers = [f"{done}{r}" for r in range(1, w.world) if at[r] >= seq]
                        if peers:
                            w.store.wait(peers, _dt.timedelta(seconds=_TELL_S))
                    else:
                        w.store.set(f"{done}{w.rank}", "1")
                except Exception:  # noqa: BLE001 - best effort
                    pass

                def last(rs):
                    return ", ".join(f"rank {r} #{at[r]}" for r in rs)

                behind = [r for r in range(w.world) if at[r] < seq]
                ahead = [r for r in range(w.world) if at[r] > seq]
                parts = []
                if behind:
                    parts.append(f"rank(s) {_ranks(behind)} had not reached dispatch #{seq} (last dispatch entered: "
                                 f"{last(behind)})")
                if ahead:
                    parts.append(f"rank(s) {_ranks(ahead)} had moved on to a later dispatch without this combine "
                                 f"({last(ahead)})")
                same = [r for r in range(w.world) if at[r] == seq and r != self.rank]
                if combine and same:
                    parts.append(f"rank(s) {_ranks(same)} had entered dispatch #{seq} (whether they reached its "
                                 f"combine is not recorded)")
                if not behind and not ahead and not (combine and same):
                    parts.append(f"every rank had entered dispatch #{seq}: a rank died or stalled inside it")
                who = "; ".join(parts)
        return f"{head}: {who}. torch.distributed said: {e}"

    def _a2a_rows(self, inp, out_rows: int, out_splits: list[int], in_splits: list[int]):
        """all_to_all_single of 2-D rows of any dtype, moved as bytes (bit-exact, any backend)."""
        torch, dist = _torch()
        width = inp.shape[1]
        nb = width * inp.element_size()
        out = torch.empty((out_rows, width), dtype=inp.dtype, device=inp.device)
        ib = inp.contiguous().reshape(-1).view(torch.uint8).reshape(inp.shape[0], nb)
        ob = out.reshape(-1).view(torch.uint8).reshape(out_rows, nb)
        dist.all_to_all_single(ob, ib, output_split_sizes=out_splits, input_split_sizes=in_splits, group=self.group)
        return out

    def _dest(self, e, valid):
        """The owner rule on the device: dest [T, k] int64, -1 for skipped slots."""
        torch, _ = _torch()
        p = self.partition
        N, L, s, me = p.world_size, p.experts_per_rank, p.stride, self.rank
        ec = e.clamp(0, p.num_experts - 1)
        lo = (-torch.div(L - 1 - ec, s, rounding_mode="floor")).clamp(min=0)
        hi = torch.div(ec, s, rounding_mode="floor").clamp(max=N - 1)
        t = torch.arange(e.shape[0], device=e.device).unsqueeze(1)
        local = (lo <= me) & (me <= hi)
        dest = torch.where(local, torch.full_like(lo, me), lo + torch.remainder(t + ec, hi - lo + 1))
        return torch.where(valid, dest, torch.full_like(dest, -1))

    def _check_inputs(self, x, topk_ids, topk_weights) -> None:
        torch, _ = _torch()
        for name, a in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
            if not isinstance(a, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(a).__name__}")
            if a.device != self.device:
                raise ValueError(f"{name} is on {a.device}, the dispatcher works on {self.device}")
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x must be [T, {self.hidden}], got {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating tensor (bf16, fp16, fp32, fp8), got {x.dtype}")
        want = (x.shape[0], self.top_k)
        if tuple(topk_ids.shape) != want:
            raise ValueError(f"topk_ids must be [T, top_k] = {list(want)}, got {tuple(topk_ids.shape)}")
        if topk_ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
        if tuple(topk_weights.shape) != want:
            raise ValueError(f"topk_weights must be [T, top_k] = {list(want)}, got {tuple(topk_weights.shape)}")
        if topk_weights.dtype != torch.float32:
            raise TypeError(f"topk_weights must be float32 (the contract's weight dtype), got {topk_weights.dtype}")

    # -- the protocol the scheduler drives (the same as TokenDispatcher's) -------------------------------------------
    def rows_for(self, tokens_per_rank) -> int:
        """The most grouped rows a step with these per-rank token counts can fill (``TokenDispatcher.rows_for``):
        the grouped rows are sized exactly per step here, but the scheduler passes this bound to ``dispatch`` as
        ``max_rows``. ``tokens_per_rank``: every rank's T (``N`` ints >= 0, numpy integers taken); anything else raises
        ValueError (a negative or truncated count would give a bound too small, and the step would raise)."""
        L = self.partition.experts_per_rank
        counts = rank_counts("rows_for", tokens_per_rank, self.partition.world_size)
        return sum(counts) * min(self.top_k, L) + L * (self.align - 1)

    def check_errors(self) -> None:
        """Nothing is deferred: bad ids raise in ``dispatch`` on every rank."""

    def abandon(self) -> None:
        """Nothing to forget (no state between dispatch and combine lives in the dispatcher). The peers of a rank
        that skips a combine wait in their ``all_to_all_single`` until the process group's timeout."""

    def _on(self, stream):
        """A context running PyTorch work on ``stream`` (any handle ``interop.stream_handle`` takes; None: the
        current stream)."""
        import contextlib

        torch, _ = _torch()
        if stream is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        from .interop import stream_handle

        return torch.cuda.stream(torch.cuda.ExternalStream(stream_handle(stream), device=self.device))

    # -- the two collectives -------------------------------------------------------------------------------------
    def dispatch(self, x, topk_ids, topk_weights, stream: Any = None, *, max_rows: int | None = None) -> NcclDispatchHandle:
        """Sends each token once to every distinct owner its pairs go to; returns the grouped receive layout.
        Collective over the group. ``x [T, H]`` (any float dtype, every rank the same), ``topk_ids [T, k]`` integer
        in ``[-1, E)``, ``topk_weights [T, k]`` float32, all on the dispatcher's device; T may be 0. One host
        synchronisation (the split sizes). Raises ValueError on every rank when any rank passed ids outside
        ``[-1, E)``. ``stream``: where the work goes (default: PyTorch's current stream). ``max_rows``: the grouped
        rows this rank's caller can take (an int >= 1, or None: any); a step needing more on any rank raises
        ValueError on every rank, naming the ranks and the rows they needed, before any token moves (ranks may pass
        different bounds; a ``max_rows`` that is not an int >= 1 raises ValueError on its own rank, before the
        collective). Every rank calls it for the same layer, in the same order. Returns a new ``NcclDispatchHandle``
        whose tensors (allocated per call, owned by the handle) are valid on ``stream`` in stream order. Before the
        collective, on its own rank: TypeError for a non-tensor, a non-float ``x``, non-integer ids or non-float32
        weights; ValueError for a tensor on another device or a shape other than the above."""
        if max_rows is not None and (not is_int(max_rows) or max_rows < 1):
            raise ValueError(f"dispatch: max_rows must be None or an int >= 1, got {max_rows!r}")
        with self._on(stream):
            return self._dispatch(x, topk_ids, topk_weights, -1 if max_rows is None else int(max_rows))

    def _dispatch(self, x, topk_ids, topk_weights, max_rows: int) -> NcclDispatchHandle:
        torch, dist = _torch()
        self._check_inputs(x, topk_ids, topk_weights)
        p, dev = self.partition, self.device
        N, L, E, s, k, me = p.world_size, p.experts_per_rank, p.num_experts, p.stride, self.top_k, self.rank
        T = x.shape[0]
        e = topk_ids.to(torch.int64)
        valid = e >= 0
        bad = ((e < -1) | (e >= E)).any().to(torch.int64)
        dest = self._dest(e, valid)
        ranks = torch.arange(N, device=dev)
        to_d = (dest.unsqueeze(-1) == ranks).any(dim=1)  # [T, N]
        send_counts = to_d.sum(dim=0)
        send_pos = torch.where(to_d, torch.cumsum(to_d.to(torch.int64), dim=0) - 1, -1)
        le = e - dest.clamp(min=0) * s
        key = torch.where(valid, dest * L + le, N * L).reshape(-1)
        pair_counts = torch.zeros(N * L + 1, dtype=torch.int64, device=dev)
        pair_counts.scatter_add_(0, key, torch.ones_like(key))
        # [bad ids, max_rows, rows to each dest (N), pairs to each (dest, local expert) (N L)], every rank's
        mine = torch.cat([bad.view(1), torch.full((1,), max_rows, dtype=torch.int64, device=dev),
                          send_counts.to(torch.int64), pair_counts[:-1]])
        every = torch.empty((N, mine.numel()), dtype=torch.int64, device=dev)
        seq = self._enter()

        def counts():
            dist.all_gather_into_tensor(every.view(-1), mine, group=self.group)
            return every.cpu()  # the one host sync

        host = self._collective("all_gather_into_tensor of the counts", seq, False, counts)
        bad_ranks = [r for r in range(N) if int(host[r, 0])]
        if bad_ranks:
            raise ValueError(f"topk_ids of rank(s) {bad_ranks} hold expert ids outside [-1, {E}) (-1 = skipped "
                             f"slot); every rank raises")
        ec_all = host[:, 2 + N:].view(N, N, L).sum(dim=0)  # [dest, local expert]: pairs each rank receives
        rows_all = ((ec_all + self.align - 1) // self.align * self.align).sum(dim=1)
        over = [(r, int(rows_all[r]), int(host[r, 1])) for r in range(N) if 0 <= host[r, 1] < rows_all[r]]
        if over:
            raise ValueError("dispatch: the step needs more grouped rows than max_rows on rank(s) "
                             + ", ".join(f"{r} ({need} > {cap})" for r, need, cap in over)
                             + "; every rank raises, no token moved (rows_for(every rank's tokens) bounds a step)")
        sc = [int(c) for c in host[me, 2:2 + N]]
        rc = [int(c) for c in host[:, 2 + me]]
        ec = ec_all[me]
        num_rows = int(rows_all[me])
        S, R, P = sum(sc), sum(rc), int(ec.sum())

        # the packed send rows: dest-major, tokens ascending
        send_offsets = torch.cumsum(send_counts, 0) - send_counts
        slot = torch.where(to_d, send_offsets.unsqueeze(0) + send_pos, S).reshape(-1)
        tok_of = torch.empty(S + 1, dtype=torch.int64, device=dev)
        tok_of.scatter_(0, slot, torch.arange(T, device=dev).repeat_interleave(N))
        d_of = torch.empty(S + 1, dtype=torch.int64, device=dev)
        d_of.scatter_(0, slot, ranks.repeat(T))
        send_token, row_d = tok_of[:S], d_of[:S].unsqueeze(1)
        row_le = torch.where(dest[send_token] == row_d, e[send_token] - row_d * s, -1).to(torch.int32)
        row_w = topk_weights[send_token].contiguous().reshape(-1).view(torch.int32).reshape(S, k)
        hb = self.hidden * x.element_size()
        xs = x[send_token]  # a new contiguous [S, H] (x itself may have odd strides when empty)
        packed = torch.cat([xs.reshape(-1).view(torch.uint8).reshape(S, hb),
                            row_le.reshape(-1).view(torch.uint8).reshape(S, 4 * k),
                            row_w.reshape(-1).view(torch.uint8).reshape(S, 4 * k)], 1)
        got = self._collective("all_to_all_single of the rows", seq, False, lambda: self._a2a_rows(packed, R, rc, sc))
        x_recv = got[:, :hb].contiguous().reshape(-1).view(x.dtype).reshape(R, self.hidden)
        meta = got[:, hb:].contiguous().reshape(-1).view(torch.int32).reshape(R, 2 * k)
        recv_le = meta[:, :k].contiguous()
        recv_w = meta[:, k:].contiguous().reshape(-1).view(torch.float32).reshape(R, k)

        # the grouped layout: by local expert, (s, row, j) ascending inside a group
        ec_d = every[:, 2 + N + me * L:2 + N + (me + 1) * L].sum(dim=0)
        pad_d = (ec_d + self.align - 1) // self.align * self.align
        offs = torch.cumsum(pad_d, 0)
        starts = offs - pad_d
        first = torch.cumsum(ec_d, 0) - ec_d
        flat = recv_le.reshape(-1).to(torch.int64)
        gkey = torch.where(flat >= 0, flat, L)
        order = torch.sort(gkey, stable=True).indices[:P]
        g = gkey[order]
        pos = starts[g] + torch.arange(P, device=dev) - first[g]
        pair_pos = torch.full((R * k,), -1, dtype=torch.int64, device=dev)
        pair_pos.scatter_(0, order, pos)
        x_grouped = torch.zeros((num_rows, self.hidden), dtype=x.dtype, device=dev)
        x_grouped[pos] = x_recv[torch.div(order, k, rounding_mode="floor")]
        return NcclDispatchHandle(
            x_grouped=x_grouped, offs=offs.to(torch.int32), num_rows=num_rows,
            expert_counts=tuple(int(c) for c in ec), pair_pos=pair_pos.view(R, k), recv_local_expert=recv_le,
            recv_weight=recv_w, send_token=send_token, send_pos=send_pos, send_counts=tuple(sc),
            recv_counts=tuple(rc), num_tokens=T, dtype=x.dtype, seq=seq)

    def combine(self, y_grouped, handle: NcclDispatchHandle, out: Any = None, stream: Any = None):
        """Weighted sum of each token's expert outputs, back at its source. Collective over the group.
        ``y_grouped [rows >= num_rows, H]`` (the experts' outputs in ``handle.x_grouped``'s layout, any float dtype;
        padding rows and rows past ``num_rows`` are not read). Returns ``out [T, H]`` in x's dtype: the caller's
        tensor when given (written in place), else a new one. No host synchronisation. ``stream`` as ``dispatch``.
        Every rank calls it for the layer whose dispatch it follows. Before the collective, on its own rank:
        TypeError for a ``handle`` that is not an ``NcclDispatchHandle``, a ``y_grouped`` or ``out`` that is not a
        tensor (as ``dispatch``), or a non-float ``y_grouped`` (or one on another device); ValueError for a
        ``y_grouped`` tensor of another shape, or an ``out`` tensor that is not ``[T, H]`` of x's dtype on the
        dispatcher's device."""
        torch, _ = _torch()
        if not isinstance(handle, NcclDispatchHandle):
            raise TypeError(f"handle must be an NcclDispatchHandle, got {type(handle).__name__}")
        for name, a in (("y_grouped", y_grouped), ("out", out)):  # as dispatch: a non-tensor is a TypeError
            if not (a is None and name == "out") and not isinstance(a, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(a).__name__}")
        if y_grouped.dim() != 2 or y_grouped.shape[0] < handle.num_rows or y_grouped.shape[1] != self.hidden:
            raise ValueError(f"y_grouped must be a [>= {handle.num_rows}, {self.hidden}] tensor (the handle's grouped "
                             f"rows), got {tuple(y_grouped.shape)}")
        if out is not None and (tuple(out.shape) != (handle.num_tokens, self.hidden) or out.dtype != handle.dtype
                                or out.device != self.device):
            raise ValueError(f"out must be a [{handle.num_tokens}, {self.hidden}] {handle.dtype} tensor on "
                             f"{self.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
        with self._on(stream):
            res = self._combine(y_grouped[: handle.num_rows], handle)
            if out is None:
                return res
            out.copy_(res)
        return out

    def _combine(self, y_grouped, handle: NcclDispatchHandle):
        torch, _ = _torch()
        if not y_grouped.dtype.is_floating_point or y_grouped.device != self.device:
            raise TypeError(f"y_grouped must be a floating tensor on {self.device}, got {y_grouped.dtype} on "
                            f"{y_grouped.device}")
        R, H = handle.num_recv, self.hidden
        acc = torch.zeros((R, H), dtype=torch.float32, device=self.device)
        if handle.num_rows:
            for j in range(self.top_k):  # slots ascending, float32, one product then one add per slot
                pp = handle.pair_pos[:, j]
                term = handle.recv_weight[:, j:j + 1] * y_grouped[pp.clamp(min=0)].to(torch.float32)
                acc = acc + torch.where((pp >= 0).unsqueeze(1), term, torch.zeros((), device=self.device))
        back = self._collective("all_to_all_single of the partials", handle.seq, True, lambda: self._a2a_rows(
            acc.to(self.combine_dtype), handle.num_sent, list(handle.send_counts), list(handle.recv_counts)))
        out = torch.zeros((handle.num_tokens, H), dtype=torch.float32, device=self.device)
        a = 0
        for c in handle.send_counts:  # dests ascending; a token appears at most once per dest
            if c:
                tok = handle.send_token[a:a + c]
                out[tok] = out[tok] + back[a:a + c].to(torch.float32)
            a += c
        return out.to(handle.dtype)
