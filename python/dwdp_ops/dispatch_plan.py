"""Token dispatch/combine planning for expert parallelism (DEP): the pure numpy reference of issue 12's contract,
stated in this docstring, shared by the NCCL baseline and the NVLink kernels. No CUDA here.

Routing of one step on a source rank ``src``: ``x [T, H]``, ``topk_ids [T, k]`` (expert ids in ``[0, E)`` or ``-1``
= skipped slot; the ids of one token are distinct, only ``-1`` may repeat in a row), ``topk_weights [T, k]`` float32,
and an ``ExpertPartition(E, N, L, stride)`` (rank r stores experts ``[r * stride, r * stride + L)``).

Owner rule, per pair ``(t, j)`` with ``e = topk_ids[t, j] >= 0`` (deterministic, per pair, device-friendly):
    owners = partition.owners(e) (ascending); dest = src if src in owners else owners[(t + e) % len(owners)].
With ``stride == L`` every expert has one owner (DEP's placement); with replication the ``(t + e)`` rotation
spreads a source's pairs of a replicated expert evenly over its owners. The owners of ``e`` are the contiguous
ranks ``lo..hi`` with ``lo = max(0, ceil((e - L + 1) / stride))`` and ``hi = min(N - 1, e // stride)``.

Send side (``SendPlan``, per source): a token goes ONCE to each distinct dest among its pairs (dest == src is a
local "send": same layout, no traffic). The packed send buffer is dest-major: for d = 0..N-1 the tokens with a pair
going to d, ascending; ``send_pos[t, d]`` is t's rank among them (-1 if none), ``send_offsets`` the exclusive prefix
of ``send_counts``. Each row carries, per slot j, the local expert index at its dest (``e - d * stride``, or -1 when
the pair goes elsewhere or is skipped) and the weight ``topk_weights[t, j]``.

Receive side (``RecvPlan``, per dest d; every ``SendPlan`` must come from the same ownership: E, N, L and stride,
which each plan records): rows from src s = 0..N-1, rows of s in send order (``recv_offsets``).
Pairs ``(s, row, j)`` with local expert ``le >= 0`` are grouped by le ascending, ``(s, row, j)`` ascending inside a
group (the reference order; a kernel may order a group differently). Group le holds ``expert_counts[le]`` rows
starting at a multiple of ``align``; ``offs[le]`` (int32, cumulative) is the group's end rounded up to ``align``, so
every group start and every offs is a multiple of ``align`` and ``offs[L-1] == num_rows``; rows of a group past its
count are padding, never read back. ``torch._grouped_mm(x_grouped, W.transpose(-2, -1), offs=offs)`` works.

Combine (``reference_moe``): at d, ``partial[r] = sum_j (ascending j, le >= 0) w_j * y[pair(r, j)]`` in float32;
at the source ``out[t] = sum_d (ascending d, send_pos[t, d] >= 0) partial_d[send_pos[t, d]]`` in float32, rounded
once to the storage dtype; a token with no pair gets 0.

Capacity: ``T <= max_tokens`` (so rows per (src, dest) <= max_tokens); grouped rows ``<= max_pairs``, by default
``N * max_tokens * min(k, L) + L * (align - 1)``. A step needing more raises ``ValueError`` naming need and capacity.

Bad arguments of ``plan_send`` / ``plan_recv`` (as ``partition``, ``layout`` and ``schedule``): a wrong type raises
TypeError (a partition that is not an ``ExpertPartition``, ``send_plans`` that are not a sequence of ``SendPlan``,
``topk_ids`` / ``topk_weights`` that are not arrays of an integer / float32 dtype, a rank, ``max_tokens``, ``align``
or ``max_pairs`` that is not an int, bools included), a wrong value ValueError (a shape, an id outside ``[-1, E)``, an
id repeated in a row, a NaN or infinite weight of a selected slot (a skipped slot's weight is never read), a rank
outside the world, a size below its bound, plans of another ownership, a capacity exceeded). Every message names the
argument, what was wrong and what is expected.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ._checks import int_at_least, is_int
from .partition import ExpertPartition

__all__ = [
    "RecvPlan",
    "SendPlan",
    "default_max_pairs",
    "owner_dest",
    "plan_recv",
    "plan_send",
    "reference_moe",
    "round_to_bfloat16",
]


# -- helpers -----------------------------------------------------------------------------------------------------------
def _check_partition(partition) -> None:
    if not isinstance(partition, ExpertPartition):
        raise TypeError(f"partition must be an ExpertPartition, got {type(partition).__name__}")


def _check_rank(partition: ExpertPartition, rank) -> None:
    """TypeError unless ``rank`` is an integer (Python or numpy; bools refused), ValueError unless it is in the
    partition's world."""
    if not is_int(rank):
        raise TypeError(f"rank must be an int in the partition's world [0, {partition.world_size}), got {rank!r} "
                        f"({type(rank).__name__})")
    if not 0 <= rank < partition.world_size:
        raise ValueError(f"rank {rank!r} is outside the partition's world [0, {partition.world_size}); expected an int "
                         f"in [0, {partition.world_size})")


def _optional_size(name: str, value) -> int | None:
    """None, or ``value`` as an int >= 0: TypeError unless an integer (bools refused), ValueError if negative."""
    if value is None:
        return None
    if not is_int(value):
        raise TypeError(f"{name} must be an int >= 0 or None, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0 or None, got {value!r}")
    return int(value)


def _world_index(name: str, value, world: int) -> int:
    """``value`` as a rank in ``[0, world)``: TypeError unless an integer (bools refused), ValueError outside (a
    negative index would have picked a rank from the end)."""
    if not is_int(value):
        raise TypeError(f"{name} must be a rank in [0, {world}) (an int), got {value!r} ({type(value).__name__})")
    if not 0 <= value < world:
        raise ValueError(f"{name} must be a rank in [0, {world}), got {value!r}")
    return int(value)


def _array(name: str, value, expected: str) -> np.ndarray:
    """``value`` as a numpy array; a ragged nesting is a ValueError and anything numpy holds only as objects (None, a
    mix of types) a TypeError, both naming ``name`` and ``expected``."""
    try:
        a = np.asarray(value)
    except ValueError as e:  # ragged nested sequences
        raise ValueError(f"{name} must be {expected}, got a {type(value).__name__} that is not one rectangular "
                         f"array (rows of different lengths?): {e}") from None
    except TypeError as e:  # an object numpy cannot convert
        raise TypeError(f"{name} must be {expected}, got a {type(value).__name__} numpy cannot convert: {e}") from None
    if a.dtype == object:
        raise TypeError(f"{name} must be {expected}, got "
                        + (f"a {type(value).__name__} of non-numeric objects, shape {a.shape}" if a.ndim
                           else f"{value!r} ({type(value).__name__})"))
    return a


def _ownership(partition: ExpertPartition) -> tuple[int, int, int, int]:
    """What the owner rule and the local expert ids depend on (``owner_policy`` only affects weight fetches)."""
    return partition.num_experts, partition.world_size, partition.experts_per_rank, partition.stride


def _describe(partition: ExpertPartition) -> str:
    E, N, L, s = _ownership(partition)
    return f"ExpertPartition(num_experts={E}, world_size={N}, experts_per_rank={L}, stride={s})"


def default_max_pairs(partition: ExpertPartition, max_tokens: int, top_k: int, align: int) -> int:
    """The contract's worst case of grouped rows at one dest: ``N * max_tokens * min(k, L) + L * (align - 1)``.
    TypeError for a partition that is not an ``ExpertPartition`` or sizes that are not ints (bools refused),
    ValueError for ``max_tokens < 0``, ``top_k < 1`` or ``align < 1``."""
    if not isinstance(partition, ExpertPartition):
        raise TypeError(f"default_max_pairs: partition must be an ExpertPartition, got {type(partition).__name__}")
    for name, v, lo in (("max_tokens", max_tokens, 0), ("top_k", top_k, 1), ("align", align, 1)):
        if not is_int(v):
            raise TypeError(f"default_max_pairs: {name} must be an int, got {v!r} ({type(v).__name__})")
        if v < lo:
            raise ValueError(f"default_max_pairs: {name} must be >= {lo}, got {v}")
    max_tokens, top_k, align = int(max_tokens), int(top_k), int(align)
    L = partition.experts_per_rank
    return partition.world_size * max_tokens * min(top_k, L) + L * (align - 1)


def owner_dest(topk_ids: np.ndarray, partition: ExpertPartition, src: int) -> np.ndarray:
    """The owner rule (module docstring), vectorised: ``dest [T, k]`` int32, -1 for skipped slots. ``topk_ids``
    must already be validated (integers in ``[-1, E)``)."""
    N, L, s = partition.world_size, partition.experts_per_rank, partition.stride
    ids = np.asarray(topk_ids, dtype=np.int64)
    e = np.maximum(ids, 0)
    lo = np.maximum(0, -((L - 1 - e) // s))  # ceil((e - L + 1) / s), clipped
    hi = np.minimum(N - 1, e // s)
    cnt = hi - lo + 1
    t = np.arange(ids.shape[0], dtype=np.int64)[:, None]
    dest = np.where((lo <= src) & (src <= hi), src, lo + (t + e) % cnt)
    return np.where(ids >= 0, dest, -1).astype(np.int32)


def round_to_bfloat16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even, as torch's conversion), returned as float32 of
    ``a``'s shape (a scalar or 0-d array gives a 0-d array). NaN stays NaN. Used as ``storage`` of ``reference_moe``
    for bf16 hidden states."""
    shape = np.shape(a)
    a = np.ascontiguousarray(a, dtype=np.float32)  # ndim >= 1: a 0-d input comes back [1]
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(a), a, rounded).reshape(shape)


# -- the send side -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SendPlan:
    """One source rank's dispatch plan (module docstring). Arrays are host numpy arrays owned by the plan.

    rank, world_size, num_tokens (T), top_k (k), hidden-independent; max_tokens: the capacity it was checked against
    (None = unchecked); partition: the ``ExpertPartition`` it was planned over (``plan_recv`` refuses plans whose
    ownership, i.e. num_experts, world_size, experts_per_rank and stride, differs from its partition's).
    dest             [T, k] int32   dest rank of each pair, -1 for a skipped slot
    send_pos         [T, N] int32   row of token t among the tokens sent to d, -1 if t sends nothing to d
    send_counts      [N]    int64   rows sent to each dest (dest == rank included: the local rows)
    send_offsets     [N]    int64   exclusive prefix of send_counts (start of dest d in the packed send buffer)
    send_token       [S]    int32   token of each packed send row (S = send_counts.sum(), dest-major, t ascending)
    row_local_expert [S, k] int32   per packed row and slot: local expert index at the row's dest, else -1
    row_weight       [S, k] float32 per packed row and slot: topk_weights[t, j]
    Invariants: send_pos[t, d] >= 0 iff some dest[t, j] == d; send_token[send_offsets[d] + send_pos[t, d]] == t.
    """

    rank: int
    world_size: int
    num_tokens: int
    top_k: int
    max_tokens: int | None
    dest: np.ndarray
    send_pos: np.ndarray
    send_counts: np.ndarray
    send_offsets: np.ndarray
    send_token: np.ndarray
    row_local_expert: np.ndarray
    row_weight: np.ndarray
    partition: ExpertPartition

    def rows_for(self, d: int) -> slice:
        """The packed send rows going to dest ``d``, a rank in ``[0, world_size)`` (TypeError / ValueError
        otherwise)."""
        d = _world_index("d", d, self.world_size)
        a = int(self.send_offsets[d])
        return slice(a, a + int(self.send_counts[d]))


def _validate_routing(topk_ids, topk_weights, partition: ExpertPartition) -> tuple[np.ndarray, np.ndarray]:
    ids = _array("topk_ids", topk_ids, "an integer [T, k] array")
    w = _array("topk_weights", topk_weights, "a float32 [T, k] array")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"topk_ids must be an integer [T, k] array, got dtype {ids.dtype}")
    if ids.ndim != 2:
        raise ValueError(f"topk_ids must be [T, k] (2-D), got shape {ids.shape}")
    if w.dtype != np.float32:
        raise TypeError(f"topk_weights must be float32 (the contract's weight dtype), got {w.dtype}")
    if w.shape != ids.shape:
        raise ValueError(f"topk_weights must have topk_ids' shape {ids.shape}, got {w.shape}")
    T, k = ids.shape
    E = partition.num_experts
    if k < 1 or k > E:
        raise ValueError(f"top_k (topk_ids.shape[1]) must be in [1, {E}] (the layer's experts), got {k}")
    if ids.size:
        bad = (ids < -1) | (ids >= E)
        if bad.any():
            t, j = np.argwhere(bad)[0]
            raise ValueError(f"topk_ids[{t}, {j}] = {ids[t, j]} is outside [-1, {E}) (-1 = skipped slot)")
        if k > 1:
            srt = np.sort(ids, axis=1)
            rep = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
            if rep.any():
                t, j = np.argwhere(rep)[0]
                e = int(srt[t, j + 1])
                slots = np.flatnonzero(ids[t] == e).tolist()
                raise ValueError(f"topk_ids[{t}] selects expert {e} more than once (slots {slots}); a token's expert "
                                 "ids must be distinct (only -1, a skipped slot, may repeat)")
        # a selected pair's weight scales its expert output in the combine: NaN or inf would make the token's output
        # NaN or inf (inf * 0: NaN) without a word. A skipped slot's weight is never read (by reference_moe nor by
        # the kernels).
        nonfinite = (ids >= 0) & ~np.isfinite(w)
        if nonfinite.any():
            t, j = np.argwhere(nonfinite)[0]
            raise ValueError(f"topk_weights[{t}, {j}] = {w[t, j]} (token {t}'s weight of expert {ids[t, j]}) is not "
                             f"finite ({int(nonfinite.sum())} selected slot(s) are not): the token's combined output "
                             "would be NaN or infinite; expected finite weights where topk_ids >= 0")
    return ids.astype(np.int64), w


def plan_send(topk_ids, topk_weights, partition: ExpertPartition, rank: int, max_tokens: int | None = None) -> SendPlan:
    """Plans source ``rank``'s dispatch of one step (pure, host). ``topk_ids [T, k]`` integer in ``[-1, E)``,
    distinct within a row except -1, ``topk_weights [T, k]`` float32, finite where the id is >= 0 (a skipped slot's
    weight is not read), ``max_tokens`` None (unchecked) or an int >= 0. TypeError for a wrong type (``partition``,
    not an array, an array's dtype, a ``rank`` or ``max_tokens`` that is not an int), ValueError for a wrong value (a
    shape, ``k`` outside ``[1, E]``, an id outside ``[-1, E)`` or repeated in its row, naming the row and the id, a
    NaN or infinite weight of a selected slot, naming the token and the slot, a rank outside the world, a negative
    ``max_tokens``, and ``T > max_tokens``, naming the step's T and the capacity)."""
    _check_partition(partition)
    _check_rank(partition, rank)
    max_tokens = _optional_size("max_tokens", max_tokens)
    ids, w = _validate_routing(topk_ids, topk_weights, partition)
    T, k = ids.shape
    if max_tokens is not None and T > max_tokens:
        raise ValueError(f"rank {rank}: topk_ids has T={T} tokens (rows) but the dispatch capacity is "
                         f"max_tokens={max_tokens}; expected T <= max_tokens")
    N, s = partition.world_size, partition.stride
    dest = owner_dest(ids, partition, rank)
    to_d = (dest[:, :, None] == np.arange(N)[None, None, :]).any(axis=1)  # [T, N]
    send_counts = to_d.sum(axis=0).astype(np.int64)
    send_offsets = np.concatenate([[0], np.cumsum(send_counts)[:-1]]).astype(np.int64)
    send_pos = np.where(to_d, np.cumsum(to_d, axis=0) - 1, -1).astype(np.int32)
    d_idx, t_idx = np.nonzero(to_d.T)  # dest-major, tokens ascending
    send_token = t_idx.astype(np.int32)
    row_dest = d_idx.astype(np.int64)
    row_ids = ids[t_idx]  # [S, k]
    goes = dest[t_idx] == row_dest[:, None]
    row_local_expert = np.where(goes, row_ids - row_dest[:, None] * s, -1).astype(np.int32)
    row_weight = w[t_idx].astype(np.float32)
    return SendPlan(int(rank), N, T, k, max_tokens, dest, send_pos,
                    send_counts, send_offsets, send_token, row_local_expert, row_weight, partition)


# -- the receive side --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RecvPlan:
    """One dest rank's receive layout (module docstring). R = recv_counts.sum() rows, P = expert_counts.sum() pairs.

    rank, align; num_rows: grouped rows incl. alignment padding (== offs[-1]); max_pairs: the capacity checked.
    recv_counts      [N]    int64   rows from each source s (= send_plans[s].send_counts[rank])
    recv_offsets     [N]    int64   exclusive prefix: rows of s are recv_offsets[s] + row
    recv_token       [R]    int32   the source-side token of each received row (for tests; a kernel need not know it)
    local_expert     [R, k] int32   per received row and slot: local expert, -1 = not for this rank / skipped
    weight           [R, k] float32 per received row and slot: the token's weight
    expert_counts    [L]    int64   pairs per local expert
    offs             [L]    int32   cumulative group ends, each rounded up to align (group le starts at offs[le-1])
    pair_pos         [R, k] int32   grouped row of pair (row, j), -1 where local_expert < 0
    grouped_row      [num_rows] int32  received row of each grouped row, -1 for padding
    grouped_slot     [num_rows] int32  slot j of each grouped row, -1 for padding
    Invariants: grouped_row[pair_pos[r, j]] == r and grouped_slot[pair_pos[r, j]] == j for every valid pair; group
    le's rows are [start_le, start_le + expert_counts[le]) with start_le = offs[le-1] (0 for le = 0), start_le %
    align == 0, in (s, row, j) ascending order.
    """

    rank: int
    align: int
    num_rows: int
    max_pairs: int | None
    recv_counts: np.ndarray
    recv_offsets: np.ndarray
    recv_token: np.ndarray
    local_expert: np.ndarray
    weight: np.ndarray
    expert_counts: np.ndarray
    offs: np.ndarray
    pair_pos: np.ndarray
    grouped_row: np.ndarray
    grouped_slot: np.ndarray

    @property
    def group_starts(self) -> np.ndarray:
        """[L] int64: first grouped row of each local expert."""
        return np.concatenate([[0], self.offs[:-1]]).astype(np.int64)

    def rows_from(self, s: int) -> slice:
        """The received rows from source ``s``, a rank in ``[0, N)`` (TypeError / ValueError otherwise)."""
        s = _world_index("s", s, len(self.recv_counts))
        a = int(self.recv_offsets[s])
        return slice(a, a + int(self.recv_counts[s]))


def plan_recv(send_plans: Sequence[SendPlan], partition: ExpertPartition, rank: int, align: int = 1,
              max_pairs: int | None = None) -> RecvPlan:
    """Plans dest ``rank``'s receive layout from every source's ``SendPlan`` (``send_plans[s]`` is source s's).
    ``align`` an int >= 1; ``max_pairs`` None: the contract's default when every plan has a ``max_tokens`` (the
    largest), else unchecked; otherwise an int >= 0. TypeError for a wrong type (``partition``, ``send_plans`` not a
    sequence of ``SendPlan``, a ``rank``, ``align`` or ``max_pairs`` that is not an int), ValueError for a wrong value
    (a rank outside the world, ``align < 1``, ``max_pairs < 0``, not one plan per rank, plans that do not match the
    partition: rank, world, or ownership, a plan made over another partition, naming both; plans of different top_k),
    and when the grouped rows exceed ``max_pairs`` (naming need and capacity)."""
    _check_partition(partition)
    _check_rank(partition, rank)
    N, L = partition.world_size, partition.experts_per_rank
    align = int_at_least("align", align, 1)
    max_pairs = _optional_size("max_pairs", max_pairs)
    if isinstance(send_plans, (str, bytes)) or not isinstance(send_plans, Sequence):
        raise TypeError(f"send_plans must be a sequence (list or tuple) of SendPlan, one per rank of the partition's "
                        f"world ({N}), got {type(send_plans).__name__}")
    if len(send_plans) != N:
        raise ValueError(f"send_plans must hold one SendPlan per rank of the partition's world ({N}), got "
                         f"{len(send_plans)}")
    for s, p in enumerate(send_plans):
        if not isinstance(p, SendPlan):
            raise TypeError(f"send_plans[{s}] must be a SendPlan (plan_send's result), got {type(p).__name__}")
        if p.rank != s or p.world_size != N:
            raise ValueError(f"send_plans[{s}] is rank {p.rank}'s plan over world {p.world_size}; expected rank {s} "
                             f"over world {N}")
        if _ownership(p.partition) != _ownership(partition):
            raise ValueError(f"send_plans[{s}] was planned over {_describe(p.partition)} but plan_recv got "
                             f"{_describe(partition)}: its local expert ids would index another partition's experts")
    ks = [p.top_k for p in send_plans]
    if len(set(ks)) != 1:
        raise ValueError(f"send_plans must all have the same top_k (one layer's routing), got top_k {ks} "
                         "(send_plans[s]'s at position s)")
    k = ks[0]
    if max_pairs is None and all(p.max_tokens is not None for p in send_plans):
        max_pairs = default_max_pairs(partition, max(p.max_tokens for p in send_plans), k, align)
    rows = [p.rows_for(rank) for p in send_plans]
    recv_counts = np.array([p.send_counts[rank] for p in send_plans], dtype=np.int64)
    recv_offsets = np.concatenate([[0], np.cumsum(recv_counts)[:-1]]).astype(np.int64)
    recv_token = np.concatenate([p.send_token[r] for p, r in zip(send_plans, rows)]).astype(np.int32)
    local_expert = np.concatenate([p.row_local_expert[r] for p, r in zip(send_plans, rows)]).reshape(-1, k)
    weight = np.concatenate([p.row_weight[r] for p, r in zip(send_plans, rows)]).reshape(-1, k)
    R = local_expert.shape[0]
    le = local_expert.reshape(-1)
    valid = le >= 0
    expert_counts = np.bincount(le[valid], minlength=L).astype(np.int64)
    padded = (expert_counts + align - 1) // align * align
    ends = np.cumsum(padded)
    num_rows = int(ends[-1]) if L else 0
    if max_pairs is not None and num_rows > max_pairs:
        raise ValueError(f"rank {rank}: this step needs {num_rows} grouped rows ({int(expert_counts.sum())} pairs + "
                         f"alignment padding to {align}) but the capacity is max_pairs={max_pairs}; expected at most "
                         "max_pairs (raise max_pairs, or plan fewer tokens)")
    starts = ends - padded
    flat = np.nonzero(valid)[0]  # (row, j) ascending == (s, row, j) ascending
    order = flat[np.argsort(le[flat], kind="stable")]
    sorted_le = le[order]
    first = np.concatenate([[0], np.cumsum(expert_counts)[:-1]])
    pos = starts[sorted_le] + np.arange(order.size) - first[sorted_le]
    pair_pos = np.full(R * k, -1, dtype=np.int64)
    pair_pos[order] = pos
    grouped_row = np.full(num_rows, -1, dtype=np.int32)
    grouped_slot = np.full(num_rows, -1, dtype=np.int32)
    grouped_row[pos] = order // k
    grouped_slot[pos] = order % k
    return RecvPlan(int(rank), int(align), num_rows, max_pairs, recv_counts, recv_offsets, recv_token,
                    local_expert.astype(np.int32), weight.astype(np.float32), expert_counts,
                    ends.astype(np.int32), pair_pos.reshape(R, k).astype(np.int32), grouped_row, grouped_slot)


# -- the whole MoE, reference ------------------------------------------------------------------------------------------
ExpertFn = Callable[[int, int, np.ndarray], np.ndarray]


def reference_moe(xs_per_rank: Sequence[np.ndarray], ids_per_rank: Sequence[np.ndarray],
                  w_per_rank: Sequence[np.ndarray], partition: ExpertPartition, expert_fn: ExpertFn, align: int = 1,
                  *, storage: Callable[[np.ndarray], np.ndarray] | None = None,
                  max_tokens: int | None = None) -> list[np.ndarray]:
    """Every rank's combined MoE output, exactly as the contract computes it (the oracle for the kernels and the NCCL
    path). Not collective: it sees every rank's inputs.

    - ``xs_per_rank[r]``: ``[T_r, H]`` float array (float32 holding bf16 values for a bf16 run)
    - ``ids_per_rank[r]``: ``[T_r, k]`` integer, ``w_per_rank[r]``: ``[T_r, k]`` float32
    - ``expert_fn(rank, local_expert, x [n, H] float32) -> y [n, H]``: the expert MLP at dest ``rank`` for one group
      (called once per non-empty group, rows in the group's reference order).
    - ``storage(float32 array) -> float32 array``: rounding to the hidden states' storage dtype, applied to expert
      outputs and to the final sums (``round_to_bfloat16`` for bf16); default: cast to each rank's x dtype.

    Returns ``[out_r [T_r, H]]`` in each rank's x dtype (float32 for a custom storage). Every rank's three inputs are
    checked before any planning, each error naming the argument and the rank (``ids_per_rank[1]``): TypeError for a
    wrong type (``partition``, an ``expert_fn`` or ``storage`` that is not callable, one of the three not a sequence
    with one entry per rank, a dict included, an entry that is not an array: None, an object numpy holds only as an
    object; an ``xs_per_rank[r]`` whose dtype is not floating-point, an ``ids_per_rank[r]`` not integer, a
    ``w_per_rank[r]`` not float32; an ``expert_fn`` result that is not real numbers, a ``storage`` result that is
    not a float array), ValueError for a wrong value (not
    one entry per rank, a ragged entry, a shape, tokens, hidden sizes or ranks' top_k that disagree, routing
    ``plan_send`` refuses, an ``expert_fn`` or ``storage`` result of another shape).
    """
    _check_partition(partition)
    if not callable(expert_fn):
        raise TypeError(f"expert_fn must be a callable (rank, local_expert, x [n, H] float32) -> y [n, H], got "
                        f"{expert_fn!r} ({type(expert_fn).__name__})")
    if storage is not None and not callable(storage):
        raise TypeError(f"storage must be None or a callable (float32 array) -> float32 array, got {storage!r} "
                        f"({type(storage).__name__})")
    N = partition.world_size
    per_rank = (("xs_per_rank", xs_per_rank, "floating-point [T, H] array"),
                ("ids_per_rank", ids_per_rank, "integer [T, k] array"),
                ("w_per_rank", w_per_rank, "float32 [T, k] array"))
    for name, seq, noun in per_rank:
        try:  # a numpy scalar or 0-d array has __len__ but no length
            n = None if isinstance(seq, (str, bytes)) or not hasattr(seq, "__getitem__") else len(seq)
        except TypeError:
            n = None
        if n is None:
            raise TypeError(f"{name} must be a sequence of {noun}s, one per rank ({N}), got {seq!r} "
                            f"({type(seq).__name__})")
        if isinstance(seq, Mapping):  # indexed by its keys: rank r's entry would be seq[r], a KeyError unless keyed so
            raise TypeError(f"{name} must be a sequence of {noun}s, one per rank ({N}), got a "
                            f"{type(seq).__name__} with keys {list(seq)[:8]!r}; expected a list or tuple whose "
                            "entry r is rank r's")
        if n != N:
            raise ValueError(f"{name} must have one entry per rank ({N}), got {n}")
    xs, ids, ws = [], [], []
    H = None
    for r in range(N):
        x, i, w = (_array(f"{name}[{r}]", seq[r], ("an " if noun[0] == "i" else "a ") + noun)
                   for name, seq, noun in per_rank)
        if x.dtype.kind != "f":
            raise TypeError(f"xs_per_rank[{r}] must be a floating-point [T, H] array, got dtype {x.dtype} (shape "
                            f"{x.shape})")
        if x.ndim != 2:
            raise ValueError(f"xs_per_rank[{r}] must be a float [T, H] array (2-D), got shape {x.shape}")
        if i.dtype.kind not in "iu":
            raise TypeError(f"ids_per_rank[{r}] must be an integer [T, k] array (rank {r}'s topk_ids), got dtype "
                            f"{i.dtype} (shape {i.shape})")
        if i.ndim != 2:
            raise ValueError(f"ids_per_rank[{r}] must be an integer [T, k] array (2-D), got shape {i.shape}")
        if i.shape[0] != x.shape[0]:
            raise ValueError(f"ids_per_rank[{r}] has {i.shape[0]} tokens (rows), xs_per_rank[{r}] has {x.shape[0]}; "
                             "expected one row per token")
        if w.dtype != np.float32:
            raise TypeError(f"w_per_rank[{r}]: rank {r}'s topk_weights must be float32 (the contract's weight dtype), "
                            f"got {w.dtype}")
        if w.shape != i.shape:
            raise ValueError(f"w_per_rank[{r}] must have ids_per_rank[{r}]'s shape {i.shape}, got {w.shape}")
        if H is not None and x.shape[1] != H:
            raise ValueError(f"every rank needs the same hidden size, got {H} and {x.shape[1]} (rank {r})")
        if ids and i.shape[1] != ids[0].shape[1]:
            raise ValueError(f"ids_per_rank[{r}] has top_k={i.shape[1]} slots per token but ids_per_rank[0] has "
                             f"{ids[0].shape[1]}; expected every rank's routing to have the same top_k (one layer's)")
        H = x.shape[1]
        xs.append(x)
        ids.append(i)
        ws.append(w)

    def stored(a: np.ndarray) -> np.ndarray:
        """``storage(a)`` as float32, checked: a result of another shape would broadcast into the grouped rows (a
        scalar) or become the output (rows dropped), silently."""
        got = storage(a)
        want = f"storage must return a float array of its argument's shape {a.shape}, got"
        if not (isinstance(got, np.ndarray) or np.isscalar(got)) or np.asarray(got).dtype.kind != "f":
            raise TypeError(f"{want} {got!r} ({type(got).__name__})"[:300])
        if np.shape(got) != a.shape:
            raise ValueError(f"{want} shape {np.shape(got)}")
        return np.asarray(got).astype(np.float32)

    def store(a: np.ndarray, like: np.ndarray) -> np.ndarray:
        return stored(a) if storage is not None else a.astype(like.dtype).astype(np.float32)

    sends = [plan_send(ids[r], ws[r], partition, r, max_tokens) for r in range(N)]
    partials = []  # partials[d]: [R_d, H] float32
    for d in range(N):
        rp = plan_recv(sends, partition, d, align)
        x_recv = np.concatenate([xs[s][sends[s].send_token[sends[s].rows_for(d)]] for s in range(N)]
                                ).astype(np.float32).reshape(-1, H)
        y = np.zeros((rp.num_rows, H), dtype=np.float32)
        for le, (a, c) in enumerate(zip(rp.group_starts, rp.expert_counts)):
            if c:
                rows = x_recv[rp.grouped_row[a:a + c]]
                got = expert_fn(d, le, rows)
                try:  # (not around the call: expert_fn's own errors pass as they are)
                    out = np.asarray(got)
                except (TypeError, ValueError) as e:
                    out, why = None, f"numpy cannot read it ({e})"
                else:
                    why = f"dtype {out.dtype}"
                if out is None or out.dtype.kind not in "fiu":  # a string, None, objects, complex (had lost .imag)
                    raise TypeError(f"expert_fn({d}, {le}, x {rows.shape}) must return a real [n, H] array of x's "
                                    f"shape, got {type(got).__name__}: {why}"[:400])
                out = out.astype(np.float32)
                if out.shape != rows.shape:
                    raise ValueError(f"expert_fn({d}, {le}, x {rows.shape}) returned shape {out.shape}")
                y[a:a + c] = store(out, xs[d])
        R, k = rp.local_expert.shape
        part = np.zeros((R, H), dtype=np.float32)
        for j in range(k):
            ok = rp.local_expert[:, j] >= 0
            part[ok] = part[ok] + rp.weight[ok, j:j + 1] * y[rp.pair_pos[ok, j]]
        partials.append(part)
    outs = []
    for s in range(N):
        sp = sends[s]
        acc = np.zeros((sp.num_tokens, H), dtype=np.float32)
        offs = [sum(int(sends[q].send_counts[d]) for q in range(s)) for d in range(N)]  # s's rows start at d
        for d in range(N):
            ok = sp.send_pos[:, d] >= 0
            acc[ok] = acc[ok] + partials[d][offs[d] + sp.send_pos[ok, d]]
        outs.append(stored(acc) if storage is not None else acc.astype(xs[s].dtype))
    return outs
