"""The pure dispatch/combine plan (dwdp_ops.dispatch_plan) against brute-force per-pair loops written from the
contract (dispatch_plan's docstring), over random routings and the edge cases of issue 12."""

from __future__ import annotations

import numpy as np
import pytest
from dwdp_ops import ExpertPartition
from dwdp_ops.dispatch_plan import (
    RecvPlan,
    SendPlan,
    default_max_pairs,
    owner_dest,
    plan_recv,
    plan_send,
    reference_moe,
    round_to_bfloat16,
)

PARTITIONS = [
    ExpertPartition.disjoint(16, 2),
    ExpertPartition.disjoint(12, 3),
    ExpertPartition.disjoint(16, 4),
    ExpertPartition(10, 3, 6, 2),  # replication: stride < L, up to 3 owners
    ExpertPartition(9, 2, 6, 3),
    ExpertPartition(8, 1, 8, 8),
]


def routing(rng, T, k, E, skip=0.0):
    """T tokens choosing k distinct experts each, a fraction ``skip`` of slots set to -1."""
    ids = np.array([rng.choice(E, size=k, replace=False) for _ in range(T)], np.int32).reshape(T, k)
    ids[rng.random((T, k)) < skip] = -1
    w = rng.random((T, k)).astype(np.float32)
    return ids, w


# -- brute force from the contract -------------------------------------------------------------------------------------
def brute_dest(ids, part, src):
    T, k = ids.shape
    out = np.full((T, k), -1)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            if e < 0:
                continue
            owners = part.owners(e)
            out[t, j] = src if src in owners else owners[(t + e) % len(owners)]
    return out


def brute_send_rows(ids, w, part, src):
    """{d: [(t, [le per j], [w per j])]} in send order."""
    dest = brute_dest(ids, part, src)
    rows = {d: [] for d in range(part.world_size)}
    for d in range(part.world_size):
        for t in range(ids.shape[0]):
            if (dest[t] == d).any():
                les = [int(ids[t, j]) - d * part.stride if dest[t, j] == d else -1 for j in range(ids.shape[1])]
                rows[d].append((t, les, list(w[t])))
    return rows


def brute_grouped(all_rows, d, L, align):
    """The reference pair order at dest d: [(le, s, row, j)] sorted, and each pair's grouped position."""
    pairs = []
    for s, rows in enumerate(all_rows):
        for row, (_t, les, _w) in enumerate(rows[d]):
            for j, le in enumerate(les):
                if le >= 0:
                    pairs.append((le, s, row, j))
    pairs.sort()
    pos, nxt, cur = {}, 0, -1
    for le, s, row, j in pairs:
        if le != cur:
            for _ in range(cur + 1, le + 1):  # groups in between are empty: start where the last ended
                nxt = -(-nxt // align) * align
            cur = le
        pos[(s, row, j)] = nxt
        nxt += 1
    return pairs, pos


# -- the owner rule and the send side ----------------------------------------------------------------------------------
@pytest.mark.parametrize("part", PARTITIONS, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_owner_rule_and_send_plan_equal_brute_force(part, seed):
    rng = np.random.default_rng(seed)
    k = min(4, part.num_experts)
    for src in range(part.world_size):
        ids, w = routing(rng, 23, k, part.num_experts, skip=0.2)
        assert np.array_equal(owner_dest(ids, part, src), brute_dest(ids, part, src))
        sp = plan_send(ids, w, part, src)
        rows = brute_send_rows(ids, w, part, src)
        assert isinstance(sp, SendPlan) and sp.dest.dtype == np.int32 and sp.send_pos.dtype == np.int32
        for d in range(part.world_size):
            got = sp.rows_for(d)
            assert sp.send_counts[d] == len(rows[d])
            assert [int(t) for t in sp.send_token[got]] == [r[0] for r in rows[d]]
            assert sp.row_local_expert[got].tolist() == [r[1] for r in rows[d]]
            assert np.array_equal(sp.row_weight[got], np.array([r[2] for r in rows[d]], np.float32).reshape(-1, k))
            for i, (t, _, _) in enumerate(rows[d]):
                assert sp.send_pos[t, d] == i
            sent = {r[0] for r in rows[d]}
            assert all(sp.send_pos[t, d] == -1 for t in range(ids.shape[0]) if t not in sent)
        assert np.array_equal(sp.send_offsets, np.concatenate([[0], np.cumsum(sp.send_counts)[:-1]]))


def test_local_pairs_stay_local_and_remote_ones_rotate_over_owners():
    part = ExpertPartition(10, 3, 6, 2)  # rank 0: 0-5, rank 1: 2-7, rank 2: 4-9
    ids = np.array([[3, 9], [4, 6], [5, 6]], np.int32)
    d = owner_dest(ids, part, 0)
    assert d[:, 0].tolist() == [0, 0, 0]  # 3, 4, 5 are rank 0's own
    # expert 6: owners [1, 2]; (t + 6) % 2 -> t=1: 1 -> rank 2, t=2: 0 -> rank 1;  expert 9: owner 2 only
    assert d[:, 1].tolist() == [2, 2, 1]


def test_token_sent_once_per_dest_even_with_all_k_experts_there():
    part = ExpertPartition.disjoint(16, 2)
    ids = np.array([[8, 9, 10, 11], [0, 9, 1, 15]], np.int32)
    sp = plan_send(ids, np.ones((2, 4), np.float32), part, 0)
    assert sp.send_counts.tolist() == [1, 2]
    assert sp.row_local_expert[sp.rows_for(1)].tolist() == [[0, 1, 2, 3], [-1, 1, -1, 7]]
    assert sp.row_local_expert[sp.rows_for(0)].tolist() == [[0, -1, 1, -1]]


# -- the receive side --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("part", PARTITIONS, ids=str)
@pytest.mark.parametrize("align", [1, 4, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_recv_plan_equals_brute_force_and_inverse_maps_round_trip(part, align, seed):
    rng = np.random.default_rng(100 + seed)
    k = min(3, part.num_experts)
    N, L = part.world_size, part.experts_per_rank
    Ts = [int(rng.integers(0, 30)) for _ in range(N)]
    Ts[0] = 0  # an empty rank still takes part
    routs = [routing(rng, T, k, part.num_experts, skip=0.15) for T in Ts]
    sends = [plan_send(i, w, part, r) for r, (i, w) in enumerate(routs)]
    all_rows = [brute_send_rows(i, w, part, r) for r, (i, w) in enumerate(routs)]
    for d in range(N):
        rp = plan_recv(sends, part, d, align)
        assert isinstance(rp, RecvPlan)
        pairs, pos = brute_grouped(all_rows, d, L, align)
        assert rp.recv_counts.tolist() == [len(all_rows[s][d]) for s in range(N)]
        counts = np.bincount([p[0] for p in pairs], minlength=L)
        assert rp.expert_counts.tolist() == counts.tolist()
        ends = np.cumsum(-(-counts // align) * align)
        assert rp.offs.dtype == np.int32 and rp.offs.tolist() == ends.tolist()
        assert rp.num_rows == (int(ends[-1]) if L else 0)
        assert all(int(a) % align == 0 for a in rp.group_starts)
        for (_le, s, row, j) in pairs:
            r = int(rp.recv_offsets[s]) + row
            assert rp.pair_pos[r, j] == pos[(s, row, j)]
            assert rp.grouped_row[rp.pair_pos[r, j]] == r and rp.grouped_slot[rp.pair_pos[r, j]] == j
            assert rp.recv_token[r] == all_rows[s][d][row][0]
        assert (rp.pair_pos >= 0).sum() == len(pairs)
        assert np.array_equal(rp.pair_pos < 0, rp.local_expert < 0)
        assert (rp.grouped_row >= 0).sum() == len(pairs)  # the rest is padding


# -- the reference MoE -------------------------------------------------------------------------------------------------
def scaled(rank, le, x):
    return x * np.float32(le + 1)


@pytest.mark.parametrize("part", PARTITIONS, ids=str)
@pytest.mark.parametrize("case", ["random", "empty_rank", "one_expert", "all_k_on_one_rank", "skipped"])
def test_reference_moe_equals_all_local_computation(part, case):
    """out[t] = sum_j w_j * expert_{e_j}(x_t): the expert at dest d with local index le is global e = d*stride + le,
    so y = x * (le + 1) is a different function per (dest, le); the all-local sum uses the dest the rule picks."""
    rng = np.random.default_rng(7)
    N, E, H = part.world_size, part.num_experts, 8
    k = min(3, E)
    Ts = [17, 5, 0, 9][:N] if N > 1 else [11]
    if case == "empty_rank":
        Ts[-1] = 0
    xs, ids, ws = [], [], []
    for T in Ts:
        i, w = routing(rng, T, k, E, skip=0.3 if case == "skipped" else 0.0)
        if case == "one_expert":
            i[:, 0] = E - 1
            i[:, 1:] = -1
        if case == "all_k_on_one_rank":
            lo, hi = part.local_range(N - 1)
            i = np.array([rng.choice(np.arange(lo, hi), size=k, replace=False) for _ in range(T)]).reshape(T, k)
        xs.append(rng.standard_normal((T, H)).astype(np.float32))
        ids.append(i.astype(np.int32))
        ws.append(w)
    outs = reference_moe(xs, ids, ws, part, scaled, align=4)
    for s in range(N):
        dest = owner_dest(ids[s], part, s)
        want = np.zeros((Ts[s], H))
        for t in range(Ts[s]):
            for j in range(k):
                e = ids[s][t, j]
                if e >= 0:
                    le = e - dest[t, j] * part.stride
                    want[t] += float(ws[s][t, j]) * xs[s][t].astype(np.float64) * (le + 1)
        assert outs[s].shape == (Ts[s], H) and outs[s].dtype == np.float32
        np.testing.assert_allclose(outs[s], want, rtol=2e-6, atol=1e-6)


def test_reference_moe_identity_bf16_storage_is_x_times_weight_sum_for_one_dest():
    """With every pair of a token at one dest, the fixed order gives exactly bf16(sum_j w_j * x) in float32."""
    part = ExpertPartition.disjoint(8, 2)
    rng = np.random.default_rng(3)
    x = [round_to_bfloat16(rng.standard_normal((6, 16)).astype(np.float32)) for _ in range(2)]
    ids = [np.array([[0, 1, 2]] * 6, np.int32), np.array([[4, 5, -1]] * 6, np.int32)]
    ws = [rng.random((6, 3)).astype(np.float32) for _ in range(2)]
    outs = reference_moe(x, ids, ws, part, lambda d, le, v: v, align=16, storage=round_to_bfloat16)
    for s in range(2):
        acc = np.zeros_like(x[s])
        for j in range(3):
            if ids[s][0, j] >= 0:
                acc = acc + ws[s][:, j:j + 1] * x[s]
        assert np.array_equal(outs[s], round_to_bfloat16(acc))


def test_round_to_bfloat16_ties_to_even_and_nan():
    a = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, np.nan, np.inf], np.float32)
    r = round_to_bfloat16(a)
    assert r[0] == 1.0 and r[1] == 1.0 and r[2] == 1.0 + 2**-6 and r[3] == -2.5
    assert np.isnan(r[4]) and r[5] == np.inf
    assert not (r[:4].view(np.uint32) & 0xFFFF).any()
    torch = pytest.importorskip("torch", reason="torch not installed: the comparison with torch's rounding is skipped")
    v = np.random.default_rng(0).standard_normal(10000).astype(np.float32)
    assert np.array_equal(round_to_bfloat16(v), torch.from_numpy(v).bfloat16().float().numpy())


@pytest.mark.parametrize("a", [np.float32(1.0 + 2**-8), 1.0 + 2**-8, np.array(1.0 + 2**-8, np.float32)])
def test_round_to_bfloat16_keeps_a_scalars_shape(a):
    """A scalar or 0-d array came back as a [1] array (np.ascontiguousarray makes 0-d inputs 1-D and the result was
    reshaped to that); now the result has the input's shape, ()."""
    r = round_to_bfloat16(a)
    assert r.shape == () and r.dtype == np.float32 and r == 1.0


# -- bad input and capacity --------------------------------------------------------------------------------------------
P2 = ExpertPartition.disjoint(8, 2)
OK_IDS = np.array([[0, 5]], np.int32)
OK_W = np.ones((1, 2), np.float32)
SENDS = [plan_send(OK_IDS, OK_W, P2, r) for r in range(2)]


@pytest.mark.parametrize("ids, w, err, match", [
    (np.array([0, 5], np.int32), OK_W, ValueError, r"\[T, k\]"),
    (OK_IDS.astype(np.float32), OK_W, TypeError, "integer"),
    (OK_IDS, np.ones((1, 3), np.float32), ValueError, "shape"),
    (OK_IDS, OK_W.astype(np.float64), TypeError, "float32"),
    (np.array([[0, 8]], np.int32), OK_W, ValueError, r"topk_ids\[0, 1\] = 8 is outside \[-1, 8\)"),
    (np.array([[-2, 1]], np.int32), OK_W, ValueError, r"= -2 is outside"),
    (np.zeros((1, 9), np.int32), np.ones((1, 9), np.float32), ValueError, r"top_k .* \[1, 8\].* got 9"),
])
def test_plan_send_rejects_bad_input(ids, w, err, match):
    with pytest.raises(err, match=match):
        plan_send(ids, w, P2, 0)


def test_capacity_errors_name_need_and_capacity():
    ids = np.array([[0, 5]] * 5, np.int32)
    w = np.ones((5, 2), np.float32)
    with pytest.raises(ValueError, match=r"T=5 tokens .* max_tokens=4"):
        plan_send(ids, w, P2, 0, max_tokens=4)
    sends = [plan_send(ids, w, P2, r, max_tokens=5) for r in range(2)]
    # default capacity holds the worst case
    assert default_max_pairs(P2, 5, 2, 16) == 2 * 5 * 2 + 4 * 15
    plan_recv(sends, P2, 1, align=16)
    with pytest.raises(ValueError, match=r"needs 16 grouped rows .* max_pairs=15"):
        plan_recv(sends, P2, 1, align=16, max_pairs=15)


def test_partition_mismatch_and_bad_ranks():
    sends = [plan_send(OK_IDS, OK_W, P2, r) for r in range(2)]
    with pytest.raises(ValueError, match="one SendPlan per rank"):
        plan_recv(sends[:1], P2, 0)
    with pytest.raises(ValueError, match="rank 1's plan"):
        plan_recv([sends[1], sends[0]], P2, 0)
    with pytest.raises(ValueError, match="outside the partition's world"):
        plan_send(OK_IDS, OK_W, P2, 2)
    with pytest.raises(ValueError, match="over world 2"):
        plan_recv(sends + [sends[0]], ExpertPartition.disjoint(12, 3), 0)
    with pytest.raises(TypeError, match="ExpertPartition"):
        plan_send(OK_IDS, OK_W, (8, 2, 4, 4), 0)
    with pytest.raises(ValueError, match="align"):
        plan_recv(sends, P2, 0, align=0)
    with pytest.raises(ValueError, match="one entry per rank"):
        reference_moe([np.zeros((1, 4), np.float32)], [OK_IDS], [OK_W], P2, scaled)


# -- review fixes: partition identity, repeated ids, argument types ----------------------------------------------------
def test_plan_recv_rejects_send_plans_of_another_partition():
    """Plans made over E=16 (L=8) given to plan_recv with E=8 (L=4) used to give 8 expert counts and local expert 7."""
    big = ExpertPartition(16, 2, 8, 8)
    ids, w = np.array([[7, 15], [3, 12]], np.int32), np.ones((2, 2), np.float32)
    sends = [plan_send(ids, w, big, r) for r in (0, 1)]
    assert all(sp.partition is big for sp in sends)
    with pytest.raises(ValueError, match=r"send_plans\[0\] was planned over ExpertPartition\(num_experts=16, "
                                         r"world_size=2, experts_per_rank=8, stride=8\) but plan_recv got "
                                         r"ExpertPartition\(num_experts=8, world_size=2, experts_per_rank=4, stride=4\)"):
        plan_recv(sends, P2, 1)
    rep = ExpertPartition(12, 2, 8, 4)  # another stride and L over the same world
    sends = [plan_send(np.array([[9, 2]], np.int32), OK_W, rep, r) for r in (0, 1)]
    with pytest.raises(ValueError, match=r"stride=4\) but plan_recv got .*stride=4\)"):
        plan_recv(sends, P2, 1)
    # the owner policy does not change dispatch ownership: plans over 'lowest' are accepted for 'balanced'
    lowest = ExpertPartition(10, 3, 6, 2, "lowest")
    balanced = ExpertPartition(10, 3, 6, 2)
    ids = np.array([[0, 9], [4, 5]], np.int32)
    a = plan_recv([plan_send(ids, OK_W.repeat(2, 0), lowest, r) for r in range(3)], balanced, 1)
    b = plan_recv([plan_send(ids, OK_W.repeat(2, 0), balanced, r) for r in range(3)], balanced, 1)
    assert np.array_equal(a.pair_pos, b.pair_pos) and np.array_equal(a.offs, b.offs)


@pytest.mark.parametrize("ids, match", [
    ([[0, 0]], r"topk_ids\[0\] selects expert 0 more than once \(slots \[0, 1\]\)"),
    ([[0, 5, 1], [3, -1, 3], [2, 2, 2]], r"topk_ids\[1\] selects expert 3 more than once \(slots \[0, 2\]\)"),
    ([[1, -1, 1]], r"topk_ids\[0\] selects expert 1 .*only -1, a skipped slot, may repeat"),
])
def test_plan_send_rejects_repeated_expert_ids(ids, match):
    """A repeated id used to pass plan_send and then break the capacity bound (plan_recv blamed max_pairs)."""
    ids = np.array(ids, np.int32)
    with pytest.raises(ValueError, match=match):
        plan_send(ids, np.ones(ids.shape, np.float32), ExpertPartition.disjoint(8, 2), 0, max_tokens=4)


def test_repeated_skipped_slots_are_accepted():
    ids = np.array([[-1, -1, 5], [-1, -1, -1]], np.int32)
    sp = plan_send(ids, np.ones(ids.shape, np.float32), P2, 0)
    assert sp.dest.tolist() == [[-1, -1, 1], [-1, -1, -1]]


@pytest.mark.parametrize("rank", ["0", 1.0, True, None])
def test_a_rank_of_the_wrong_type_is_a_type_error(rank):
    with pytest.raises(TypeError, match=rf"rank must be an int in the partition's world \[0, 2\), got {rank!r}"):
        plan_send(OK_IDS, OK_W, P2, rank)
    sends = [plan_send(OK_IDS, OK_W, P2, r) for r in range(2)]
    with pytest.raises(TypeError, match="rank must be an int"):
        plan_recv(sends, P2, rank)
    assert plan_send(OK_IDS, OK_W, P2, np.int64(1)).rank == 1


@pytest.mark.parametrize("call, exc, match", [
    # a wrong type is a TypeError, a wrong value a ValueError (as partition, layout, schedule and plan_recv's
    # max_pairs); max_tokens and align had raised ValueError for a string, a float or a bool
    (lambda: plan_send(OK_IDS, OK_W, P2, 0, max_tokens="3"), TypeError,
     r"max_tokens must be an int >= 0 or None, got '3' \(str\)"),
    (lambda: plan_send(OK_IDS, OK_W, P2, 0, max_tokens=2.5), TypeError, r"max_tokens .* got 2.5 \(float\)"),
    (lambda: plan_send(OK_IDS, OK_W, P2, 0, max_tokens=True), TypeError, r"max_tokens .* got True \(bool\)"),
    (lambda: plan_send(OK_IDS, OK_W, P2, 0, max_tokens=-1), ValueError, r"max_tokens must be an int >= 0 or None, got -1"),
    (lambda: plan_recv(SENDS, P2, 0, align="16"), TypeError, r"align must be an int >= 1, got '16' \(str\)"),
    (lambda: plan_recv(SENDS, P2, 0, align=1.0), TypeError, r"align must be an int >= 1, got 1.0 \(float\)"),
    (lambda: plan_recv(SENDS, P2, 0, align=True), TypeError, r"align .* got True \(bool\)"),
    (lambda: plan_recv(SENDS, P2, 0, align=0), ValueError, r"align must be an int >= 1, got 0"),
    # not arrays: None had been "must be [T, k], got shape ()" (a ValueError), a ragged list numpy's own message
    (lambda: plan_send(None, OK_W, P2, 0), TypeError, r"topk_ids must be an integer \[T, k\] array, got None"),
    (lambda: plan_send(OK_IDS, None, P2, 0), TypeError, r"topk_weights must be a float32 \[T, k\] array, got None"),
    (lambda: plan_send([[0, 1], [2]], OK_W, P2, 0), ValueError,
     r"topk_ids must be an integer \[T, k\] array, got a list that is not one rectangular array"),
    (lambda: plan_send(OK_IDS, [[1.0], [1.0, 2.0]], P2, 0), ValueError, r"topk_weights must be a float32 \[T, k\]"),
    (lambda: plan_send([[0, None]], OK_W, P2, 0), TypeError, r"topk_ids .* got a list of non-numeric objects"),
    # send_plans that are not a sequence had raised "object of type 'NoneType' has no len()"
    (lambda: plan_recv(None, P2, 0), TypeError,
     r"send_plans must be a sequence \(list or tuple\) of SendPlan, one per rank of the partition's world \(2\), "
     r"got NoneType"),
    (lambda: plan_recv(iter(SENDS), P2, 0), TypeError, r"send_plans must be a sequence .* got list_iterator"),
    (lambda: plan_recv("ab", P2, 0), TypeError, r"send_plans must be a sequence .* got str"),
    # messages name the argument and what is expected
    (lambda: plan_recv(SENDS[:1], P2, 0), ValueError,
     r"send_plans must hold one SendPlan per rank of the partition's world \(2\), got 1"),
    (lambda: plan_recv([SENDS[0], plan_send(np.array([[0, 5, 1]], np.int32), np.ones((1, 3), np.float32), P2, 1)],
                       P2, 0), ValueError, r"send_plans must all have the same top_k .* got top_k \[2, 3\]"),
    (lambda: plan_send(OK_IDS, OK_W, P2, 2), ValueError,
     r"rank 2 is outside the partition's world \[0, 2\); expected an int in \[0, 2\)"),
    (lambda: plan_send(OK_IDS.repeat(5, 0), np.ones((5, 2), np.float32), P2, 0, max_tokens=4), ValueError,
     r"rank 0: topk_ids has T=5 tokens \(rows\) but the dispatch capacity is max_tokens=4; expected T <= max_tokens"),
])
def test_bad_arguments_raise_the_house_exception_types_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_plan_arguments_of_numpy_types_and_tuples_are_accepted():
    sp = plan_send(OK_IDS, OK_W, P2, 0, max_tokens=np.int64(3))
    assert sp.max_tokens == 3 and type(sp.max_tokens) is int
    rp = plan_recv(tuple(SENDS), P2, 1, align=np.int32(4))
    assert rp.align == 4 and type(rp.align) is int and rp.num_rows == 4


@pytest.mark.parametrize("max_pairs, exc, match", [
    ("3", TypeError, r"max_pairs must be an int >= 0 or None, got '3' \(str\)"),
    (2.5, TypeError, r"got 2.5 \(float\)"),
    (True, TypeError, r"got True \(bool\)"),
    (-1, ValueError, r"max_pairs must be an int >= 0 or None, got -1"),
])
def test_plan_recv_validates_max_pairs(max_pairs, exc, match):
    sends = [plan_send(OK_IDS, OK_W, P2, r) for r in range(2)]
    with pytest.raises(exc, match=match):
        plan_recv(sends, P2, 0, max_pairs=max_pairs)
    rp = plan_recv(sends, P2, 0, max_pairs=np.int64(2))
    assert rp.max_pairs == 2 and type(rp.max_pairs) is int


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_plan_send_refuses_a_non_finite_weight_of_a_selected_slot(bad):
    """A NaN or infinite weight had been planned without a word and made the token's combined output NaN or infinite
    (NaN where the expert output is 0). A skipped slot's weight (id -1) is never read: it stays accepted, as by the
    kernels."""
    ids = np.array([[0, 5], [1, -1], [2, 6]], np.int32)
    w = np.full(ids.shape, 0.5, np.float32)
    w[2, 1] = bad
    with pytest.raises(ValueError, match=rf"topk_weights\[2, 1\] = {bad} \(token 2's weight of expert 6\) is not "
                                         r"finite \(1 selected slot\(s\) are not\).*expected finite weights where "
                                         r"topk_ids >= 0"):
        plan_send(ids, w, P2, 0)
    with pytest.raises(ValueError, match=r"topk_weights\[2, 1\]"):
        reference_moe([np.ones((3, 4), np.float32), np.ones((0, 4), np.float32)],
                      [ids, np.zeros((0, 2), np.int32)], [w, np.zeros((0, 2), np.float32)], P2, scaled)
    w[2, 1] = 0.5
    w[1, 1] = bad  # the skipped slot
    sp = plan_send(ids, w, P2, 0)
    outs = reference_moe([np.ones((3, 4), np.float32), np.ones((0, 4), np.float32)],
                         [ids, np.zeros((0, 2), np.int32)], [w, np.zeros((0, 2), np.float32)], P2,
                         lambda d, le, v: v)
    assert np.isfinite(outs[0]).all() and outs[0][1].tolist() == [0.5] * 4 and sp.num_tokens == 3


@pytest.mark.parametrize("x1, exc, match", [
    (np.ones((1, 4), np.int32), TypeError, r"xs_per_rank\[1\] must be a floating-point \[T, H\] array, got dtype "
                                           r"int32 \(shape \(1, 4\)\)"),
    (np.ones((1, 4), np.complex64), TypeError, r"xs_per_rank\[1\] must be a floating-point .* got dtype complex64"),
    ([["a", "b", "c", "d"]], TypeError, r"xs_per_rank\[1\] must be a floating-point .* got dtype <U1"),
    (np.ones(4, np.float32), ValueError, r"xs_per_rank\[1\] must be a float \[T, H\] array \(2-D\), got shape \(4,\)"),
])
def test_reference_moe_names_hidden_states_of_a_wrong_dtype_with_a_type_error(x1, exc, match):
    """A wrong dtype of xs_per_rank[r] had been a ValueError (the house rule: TypeError for a wrong type); a wrong
    shape stays a ValueError. The routing arrays' dtypes were TypeErrors already (plan_send)."""
    ids, w = [OK_IDS, OK_IDS], [OK_W, OK_W]
    with pytest.raises(exc, match=match):
        reference_moe([np.ones((1, 4), np.float32), x1], ids, w, P2, scaled)
    with pytest.raises(TypeError, match="topk_weights must be float32"):
        reference_moe([np.ones((1, 4), np.float32)] * 2, ids, [OK_W, OK_W.astype(np.float64)], P2, scaled)
