"""Packed layout and copy schedules: pure host logic."""

from __future__ import annotations

import re

import numpy as np
import pytest
from dwdp_ops.layout import (
    PAGE,
    REGISTER_UNIT,
    ExpertLayout,
    TensorSpec,
    fp8_scale_shape,
    local_allocation_bytes,
    registration_overhead,
)
from dwdp_ops.schedule import Copy, order_copies, peer_order, slice_copy


@pytest.mark.parametrize("dtype, w13_mib, w2_mib", [("float8_e4m3fn", 28, 14), ("bfloat16", 56, 28), ("float16", 56, 28)])
def test_deepseek_r1_strides_are_whole_pages(dtype, w13_mib, w2_mib):
    lay = ExpertLayout.moe(7168, 2048, dtype)
    assert lay.stride("w13") == w13_mib << 20 and lay.stride("w2") == w2_mib << 20
    assert lay.inflation == 0.0
    assert lay.expert_bytes == 3 * 2048 * 7168 * (1 if dtype == "float8_e4m3fn" else 2)
    assert all(s % PAGE == 0 for s in lay.strides)
    assert fp8_scale_shape((4096, 7168)) == (32, 56) and fp8_scale_shape((7168, 2048)) == (56, 16)


def test_small_layout_reports_inflation_and_offsets():
    lay = ExpertLayout.moe(256, 128, "float16")
    assert lay.tensors[0].nbytes == 2 * 128 * 256 * 2 and lay.stride("w13") == PAGE
    assert lay.inflation > 1.0
    assert lay.tensor_offset("w13", 5) == 0 and lay.tensor_offset("w2", 5) == 5 * PAGE
    with pytest.raises(KeyError, match="no tensor 'w3'"):
        lay.stride("w3")
    with pytest.raises(ValueError, match="dtype must be one of"):
        ExpertLayout.moe(256, 128, "int4")


@pytest.mark.parametrize("L", [1, 7, 32, 64, 128])
def test_local_allocations_are_registration_units(L):
    lay = ExpertLayout.moe(7168, 2048, "float8_e4m3fn")
    for t in lay.tensors:
        n = local_allocation_bytes(lay, t.name, L)
        assert n % REGISTER_UNIT == 0 and L * lay.stride(t.name) <= n < L * lay.stride(t.name) + REGISTER_UNIT
    assert registration_overhead(lay, 64) == pytest.approx((2048 + 1024) / (64 * 42) - 1)
    with pytest.raises(ValueError, match="experts_per_rank must be a positive integer, got 0"):
        local_allocation_bytes(lay, "w13", 0)


def _copies(world, rank, per_peer=3, size=5 << 20):
    out, dst = [], 0
    for p in range(world):
        if p == rank:
            continue
        for k in range(per_peer):
            out.append(Copy(p, dst, (p << 40) + k * size, size))
            dst += size
    return out


def _bytes(copies):
    return sorted((c.dst + i, c.src + i) for c in copies for i in range(0, c.nbytes, 1 << 20))


@pytest.mark.parametrize("world, rank", [(2, 0), (4, 1), (4, 3), (8, 5)])
def test_interleaved_moves_the_same_bytes_round_robin(world, rank):
    copies = _copies(world, rank)
    inter = order_copies(copies, rank, world, "interleaved", 2 << 20)
    serial = order_copies(copies, rank, world, "per_peer")
    stag = order_copies(copies, rank, world, "staggered")
    assert _bytes(inter) == _bytes(serial) == _bytes(stag) == _bytes(copies)
    assert [c.peer for c in stag][:: len(stag) // (world - 1)] == peer_order(rank, world)
    assert all(c.nbytes <= 2 << 20 for c in inter)
    first_round = [c.peer for c in inter[: world - 1]]
    assert first_round == peer_order(rank, world)  # staggered start, one slice per peer per round
    assert [c.peer for c in serial] == sorted(c.peer for c in serial)


def test_stagger_spreads_first_owners():
    firsts = [peer_order(r, 4)[0] for r in range(4)]
    assert sorted(firsts) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="schedule must be"):
        order_copies([], 0, 2, "random")


# ------------------------------------------------------------------------------------------- validation of the specs
BAD_SPECS = [
    # (name, shape, dtype), exception, message
    (("w", (0, 4), "float16"), ValueError,
     r"every dimension of 'w' \(shape \(0, 4\)\) must be a positive integer, got 0"),
    (("w", (4, -1), "float16"), ValueError, r"must be a positive integer, got -1"),
    (("w", (4.0, 4), "float16"), TypeError, r"must be a positive integer, got 4.0 \(float\)"),
    (("w", (4, 2.5), "float16"), TypeError, r"got 2.5 \(float\)"),
    (("w", (True, 4), "float16"), TypeError, r"got True \(bool\)"),
    (("w", ("4", 4), "float16"), TypeError, r"got '4' \(str\)"),
    (("w", (None,), "float16"), TypeError, r"got None \(NoneType\)"),
    (("w", (), "float16"), ValueError, r"shape of 'w' must have at least one dimension"),
    (("w", 4, "float16"), TypeError, r"shape of 'w' must be a tuple of positive integers, got 4"),
    (("w", "44", "float16"), TypeError, r"must be a tuple of positive integers, got '44'"),
    (("w", (4, 4), "int4"), ValueError,
     r"dtype must be one of \['bfloat16', 'float16', 'float32', 'float8_e4m3fn'\], got 'int4'"),
    (("w", (4, 4), "fp8"), ValueError, r"dtype must be one of .*got 'fp8'"),
    (("w", (4, 4), None), TypeError, r"dtype must be one of .*\(a string\), got None \(NoneType\)"),
    (("w", (4, 4), np.float16), TypeError, r"dtype must be one of .*\(a string\), got <class 'numpy.float16'>"),
    ((3, (4, 4), "float16"), TypeError, r"tensor name must be a string, got 3 \(int\)"),
    ((None, (4, 4), "float16"), TypeError, r"tensor name must be a string, got None"),
    (("", (4, 4), "float16"), ValueError, r"tensor name must be a non-empty string"),
]


@pytest.mark.parametrize("args, exc, match", BAD_SPECS, ids=[repr(a) for a, _, _ in BAD_SPECS])
def test_tensor_spec_rejects_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        TensorSpec(*args)


@pytest.mark.parametrize("shape", [(4, 8), [4, 8], (np.int64(4), np.int32(8))])
def test_tensor_spec_normalises_integer_shapes(shape):
    t = TensorSpec("w", shape, "bfloat16")
    assert t.shape == (4, 8) and all(type(d) is int for d in t.shape) and t.nbytes == 64
    assert hash(t) == hash(TensorSpec("w", (4, 8), "bfloat16"))


BAD_LAYOUTS = [
    (dict(page=0), ValueError, r"page \(bytes\) must be a positive integer, got 0"),
    (dict(page=-16), ValueError, r"got -16"),
    (dict(page=24), ValueError, r"page must be a positive multiple of 16 bytes, got 24"),
    (dict(page=PAGE + 8), ValueError, r"multiple of 16 bytes"),
    (dict(page=16.0), TypeError, r"page \(bytes\) must be a positive integer, got 16.0 \(float\)"),
    (dict(page="2M"), TypeError, r"got '2M' \(str\)"),
    (dict(page=True), TypeError, r"got True \(bool\)"),
    (dict(tensors=()), ValueError, r"at least one tensor"),
    (dict(tensors=("w13",)), TypeError, r"tensors must be a tuple of TensorSpec"),
    (dict(tensors=TensorSpec("w", (4,), "float16")), TypeError, r"tensors must be a tuple of TensorSpec"),
    (dict(tensors=(TensorSpec("w", (4,), "float16"),) * 2), ValueError, r"tensor names must be unique"),
]


@pytest.mark.parametrize("kw, exc, match", BAD_LAYOUTS, ids=[repr(k) for k, _, _ in BAD_LAYOUTS])
def test_expert_layout_rejects_bad_input(kw, exc, match):
    kw = dict({"tensors": (TensorSpec("w", (4, 4), "float16"),)}, **kw)
    with pytest.raises(exc, match=match):
        ExpertLayout(**kw)


BAD_MOE = [
    ((0, 2048), ValueError, r"hidden must be a positive integer, got 0"),
    ((7168, -1), ValueError, r"intermediate must be a positive integer, got -1"),
    ((7168.0, 2048), TypeError, r"hidden must be a positive integer, got 7168.0 \(float\)"),
    (("7168", 2048), TypeError, r"hidden .* got '7168' \(str\)"),
    ((7168, None), TypeError, r"intermediate .* got None"),
    ((True, 2048), TypeError, r"hidden .* got True \(bool\)"),
    ((7168, 2048, "int8"), ValueError, r"dtype must be one of .*got 'int8'"),
    ((7168, 2048, "bfloat16", 100), ValueError, r"multiple of 16 bytes, got 100"),
]


@pytest.mark.parametrize("args, exc, match", BAD_MOE, ids=[repr(a) for a, _, _ in BAD_MOE])
def test_moe_layout_rejects_bad_sizes(args, exc, match):
    with pytest.raises(exc, match=match):
        ExpertLayout.moe(*args)


def test_moe_layout_accepts_numpy_sizes():
    assert ExpertLayout.moe(np.int64(7168), np.int32(2048), "bfloat16") == ExpertLayout.moe(7168, 2048, "bfloat16")


@pytest.mark.parametrize("page, granularity, ok", [
    (PAGE, PAGE, True), (PAGE, 64 << 10, True), (4 * PAGE, PAGE, True), (1 << 20, PAGE, False), (3 << 20, PAGE, False),
    (PAGE, 4 * PAGE, False),
])
def test_check_page_against_vmm_granularity(page, granularity, ok):
    lay = ExpertLayout.moe(256, 128, "float16", page=page)
    if ok:
        lay.check_page(granularity)
    else:
        with pytest.raises(ValueError, match=rf"layout page \({page} bytes\) is not a multiple of the VMM allocation "
                                             rf"granularity \({granularity} bytes\)"):
            lay.check_page(granularity)


@pytest.mark.parametrize("granularity, exc", [(0, ValueError), (-PAGE, ValueError), (2.0 * PAGE, TypeError),
                                              ("2MiB", TypeError), (None, TypeError)])
def test_check_page_rejects_bad_granularity(granularity, exc):
    # the value as given (a float not shown as the int it was rounded to), its type for a TypeError
    shown = repr(granularity) + (f" ({type(granularity).__name__})" if exc is TypeError else "")
    with pytest.raises(exc, match=rf"^granularity \(bytes\) must be a positive integer, got {re.escape(shown)}$"):
        ExpertLayout.moe(256, 128).check_page(granularity)


# ------------------------------------------------------------------- review fixes: counts, units, dtypes, schedules
R1 = ExpertLayout.moe(7168, 2048)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: local_allocation_bytes(R1, "w13", 1.5), TypeError, r"experts_per_rank must be a positive integer, got 1.5"),
    (lambda: local_allocation_bytes(R1, "w13", 4.0), TypeError, r"experts_per_rank .* got 4.0 \(float\)"),
    (lambda: local_allocation_bytes(R1, "w13", "4"), TypeError, r"experts_per_rank .* got '4' \(str\)"),
    (lambda: local_allocation_bytes(R1, "w13", True), TypeError, r"experts_per_rank .* got True \(bool\)"),
    (lambda: local_allocation_bytes(R1, "w13", 4, 3.5), TypeError, r"unit \(bytes\) must be a positive integer, got 3.5"),
    (lambda: local_allocation_bytes(R1, "w13", 4, 0), ValueError, r"unit \(bytes\) must be a positive integer, got 0"),
    (lambda: registration_overhead(R1, 8.0), TypeError, r"experts_per_rank .* got 8.0 \(float\)"),
    (lambda: registration_overhead(R1, 8, -PAGE), ValueError, r"unit \(bytes\) must be a positive integer"),
    (lambda: R1.tensor_offset("w2", -3), ValueError, r"experts_per_rank must be a positive integer, got -3"),
    (lambda: R1.tensor_offset("w2", 2.0), TypeError, r"experts_per_rank .* got 2.0 \(float\)"),
])
def test_allocation_helpers_name_bad_counts(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_allocation_helpers_accept_numpy_counts_and_return_ints():
    n = local_allocation_bytes(R1, "w2", np.int64(8), np.int64(PAGE))
    assert n == 8 * R1.stride("w2") and type(n) is int
    assert registration_overhead(R1, np.int32(8), PAGE) == 0.0
    assert R1.tensor_offset("w2", np.int64(5)) == 5 * R1.stride("w13")


def test_a_dtype_that_is_not_a_string_is_a_type_error():
    with pytest.raises(TypeError, match=r"dtype must be one of .*\(a string\), got <class 'numpy.float32'>"):
        TensorSpec("w", (2, 2), np.float32)
    with pytest.raises(TypeError, match=r"\(a string\), got dtype\('float16'\)"):
        ExpertLayout.moe(256, 128, np.dtype(np.float16))


@pytest.mark.parametrize("args, exc, match", [
    ((5, 4), ValueError, r"rank must be in \[0, world_size=4\), got 5"),
    ((-1, 4), ValueError, r"rank must be in \[0, world_size=4\), got -1"),
    ((0, 0), ValueError, r"world_size must be an int >= 1, got 0"),
    (("0", 4), TypeError, r"rank must be an int in \[0, world_size=4\), got '0' \(str\)"),
    ((0, 4.0), TypeError, r"world_size must be an int >= 1, got 4.0 \(float\)"),
    ((0, 2, "staggered", True), TypeError, r"slice_bytes must be a positive int \(bytes\), got True \(bool\)"),
    ((0, 2, "interleaved", 2.5), TypeError, r"slice_bytes .* got 2.5 \(float\)"),
    ((0, 2, "interleaved", 0), ValueError, r"slice_bytes must be a positive int \(bytes\), got 0"),
    ((0, 2, "interleaved", None), TypeError, r"slice_bytes must be a positive int .* 'interleaved' schedule, got None"),
])
@pytest.mark.parametrize("copies", [[], [Copy(1, 0, 0, 28 << 20)]], ids=["no copies", "one copy"])
def test_order_copies_checks_every_argument_up_front(copies, args, exc, match):
    with pytest.raises(exc, match=match):
        order_copies(copies, *args)


def test_schedule_arguments_that_are_fine():
    c = [Copy(1, 0, 0, 10), Copy(2, 10, 10, 10), Copy(3, 20, 20, 10)]
    assert order_copies(c, 0, 4, "staggered", None) == order_copies(c, 0, 4, "staggered")
    assert order_copies(c, 0, 4, "per_peer", None) == order_copies(c, 0, 4, "per_peer")
    assert order_copies(c, np.int64(0), np.int32(4), "interleaved", np.int64(4)) == order_copies(c, 0, 4, "interleaved", 4)
    assert peer_order(np.int64(1), 4) == [2, 3, 0]
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=4\), got 5"):
        peer_order(5, 4)
    with pytest.raises(TypeError, match=r"slice_bytes .* got True \(bool\)"):
        slice_copy(Copy(1, 0, 0, 10), True)


@pytest.mark.parametrize("schedule", ["per_peer", "staggered", "interleaved"])
@pytest.mark.parametrize("nbytes, exc", [(-5, ValueError), (2.5, TypeError), (True, TypeError)])
def test_a_copy_of_negative_or_non_integer_bytes_is_refused(schedule, nbytes, exc):
    """The three schedules move the same bytes (module invariant): a hand-built copy of -5 bytes had been kept by
    per_peer and staggered and dropped by interleaved's slicing. Every schedule refuses it, naming the copy."""
    c = [Copy(1, 0, 0, 10), Copy(2, 10, 10, nbytes)]
    with pytest.raises(exc, match=r"every copy must move an int >= 0 of bytes, got Copy\(peer=2"):
        order_copies(c, 0, 4, schedule)
    assert order_copies([Copy(1, 0, 0, 0)], 0, 4, schedule) in ([], [Copy(1, 0, 0, 0)])  # zero bytes: fine


@pytest.mark.parametrize("schedule", ["per_peer", "staggered", "interleaved"])
def test_order_copies_of_a_generator_orders_every_copy(schedule):
    """The up-front check of every copy's bytes iterated ``copies`` once, so a generator reached the ordering
    exhausted and every schedule returned [] (nothing fetched, no error). It is read once now."""
    c = [Copy(1, 0, 0, 10), Copy(2, 10, 10, 10), Copy(3, 20, 20, 10)]
    assert order_copies((x for x in c), 0, 4, schedule, 4) == order_copies(c, 0, 4, schedule, 4) != []


@pytest.mark.parametrize("c, exc, match", [
    (Copy(1, 0, 0, -5), ValueError, r"every copy must move an int >= 0 of bytes, got Copy\(peer=1"),
    (Copy(1, 0, 0, 2.5), TypeError, r"every copy must move an int >= 0 of bytes, got Copy\(peer=1"),
    (Copy(1, 0, 0, True), TypeError, r"every copy must move an int >= 0 of bytes, got Copy\(peer=1"),
    ((1, 0, 0, 10), TypeError, r"every copy must be a Copy\(peer, dst, src, nbytes\), got \(1, 0, 0, 10\) \(tuple\)"),
])
def test_slice_copy_refuses_a_bad_copy(c, exc, match):
    """slice_copy checked slice_bytes only: a copy of -5 bytes was cut into [] (nothing, no error), one of 2.5 bytes
    or a plain tuple failed inside range() / attribute access without naming the copy."""
    with pytest.raises(exc, match=match):
        slice_copy(c, 4)
    assert slice_copy(Copy(1, 0, 0, 0), 4) == []
    assert slice_copy(Copy(1, 8, 16, np.int64(10)), 4) == [Copy(1, 8, 16, 4), Copy(1, 12, 20, 4), Copy(1, 16, 24, 2)]


@pytest.mark.parametrize("schedule", ["per_peer", "staggered", "interleaved"])
def test_order_copies_refuses_a_copy_that_is_not_a_copy(schedule):
    with pytest.raises(TypeError, match=r"every copy must be a Copy\(peer, dst, src, nbytes\), got \(2, 10, 10, 10\)"):
        order_copies([Copy(1, 0, 0, 10), (2, 10, 10, 10)], 0, 4, schedule)


@pytest.mark.parametrize("shape, exc, match", [
    ((0, 5), ValueError, r"every dimension of the weight shape \(0, 5\) must be a positive integer, got 0"),
    ((-128, 128), ValueError, r"every dimension of the weight shape \(-128, 128\) must be a positive integer, got -128"),
    ((1.5, 128), TypeError, r"every dimension .* got 1.5 \(float\)"),
    ((True, 128), TypeError, r"every dimension .* got True \(bool\)"),
    ((256,), ValueError, r"shape must be a 2-D \[out, in\] tuple .*, got \(256,\) \(1 dimensions\)"),
    ((256, 256, 3), ValueError, r"shape must be a 2-D \[out, in\] tuple .* \(3 dimensions\)"),
    (256, TypeError, r"shape must be a 2-D \[out, in\] tuple of positive integers, got 256"),
])
def test_fp8_scale_shape_refuses_a_bad_shape(shape, exc, match):
    """fp8_scale_shape checked nothing: (0, 5) gave (0, 1), (-128, 128) gave (-1, 1), (1.5, 128) gave (1.0, 1), a 3-D
    shape silently used its first two dimensions and a 1-D one raised IndexError."""
    with pytest.raises(exc, match=match):
        fp8_scale_shape(shape)


def test_fp8_scale_shape_rounds_up_and_accepts_numpy_dims():
    assert fp8_scale_shape((1, 129)) == (1, 2) and fp8_scale_shape([128, 256]) == (1, 2)
    s = fp8_scale_shape((np.int64(4096), np.int32(7168)))
    assert s == (32, 56) and all(type(v) is int for v in s)
