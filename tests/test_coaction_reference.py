"""CAN co-action reference: semantics, variants, gradients against finite differences, error messages."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from dwdp_ops.coaction import CoActionSpec, coaction_backward, coaction_forward

CONFIGS = [
    dict(layer_dims=((16, 8), (8, 4)), orders=3, bias=False),
    dict(layer_dims=((4, 3),), orders=2, bias=True),
    dict(layer_dims=((5, 4), (4, 4), (4, 2)), orders=3, bias=True),
    dict(layer_dims=((6, 3), (3, 2)), orders=2, bias=False, order_independent=True),
    dict(layer_dims=((6, 3), (3, 2)), orders=3, bias=True, variant="paper"),
]


def inputs(spec: CoActionSpec, B=3, T=5, seed=0):
    rng = np.random.default_rng(seed)
    ind = rng.normal(0, 0.5, (B, spec.induction_dim))
    feed = rng.normal(0, 0.7, (B, T, spec.feed_dim))
    mask = (rng.random((B, T)) < 0.7).astype(np.float64)
    mask[:, 0] = 1
    return ind, feed, mask


def loop_forward(ind, feed, mask, spec: CoActionSpec):
    """Sample-by-sample, position-by-position restatement of the semantics (independent of the vectorised code)."""
    B, T, _ = feed.shape
    out = []
    for b in range(B):
        orders = []
        for c in range(1, spec.orders + 1):
            off = (c - 1) * spec.order_width if spec.order_independent else 0
            acc = np.zeros(spec.out_per_order)
            for t in range(T):
                if not mask[b, t]:
                    continue
                h, pos, outs = feed[b, t] ** c, off, []
                for layer, (i, o) in enumerate(spec.layer_dims):
                    w = ind[b, pos : pos + i * o].reshape(i, o)
                    pos += i * o
                    z = h @ w
                    if spec.bias:
                        z = z + ind[b, pos : pos + o]
                        pos += o
                    last = layer == len(spec.layer_dims) - 1
                    h = np.tanh(z) if (spec.variant == "paper" or not last) else z
                    outs.append(h)
                acc += np.concatenate(outs)
            orders.append(acc)
        out.append(sum(orders) if spec.variant == "paper" else np.concatenate(orders))
    return np.array(out)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: str(c))
def test_forward_matches_the_per_sample_loop(cfg):
    spec = CoActionSpec(**cfg)
    ind, feed, mask = inputs(spec)
    got = coaction_forward(ind, feed, mask, **cfg)
    assert got.shape == (3, spec.out_dim)
    np.testing.assert_allclose(got, loop_forward(ind, feed, mask, spec), rtol=1e-12, atol=1e-12)


def test_default_sizes_are_the_reference_code():
    spec = CoActionSpec()
    assert (spec.induction_dim, spec.feed_dim, spec.out_dim) == (160, 16, 36)
    assert CoActionSpec(order_independent=True).induction_dim == 480
    assert CoActionSpec(layer_dims=((16, 8), (8, 4), (4, 4))).induction_dim == 176


def test_single_linear_unit_is_an_fm_term():
    rng = np.random.default_rng(3)
    ind, feed = rng.normal(size=(4, 6)), rng.normal(size=(4, 7, 6))
    mask = np.ones((4, 7))
    got = coaction_forward(ind, feed, mask, layer_dims=((6, 1),), orders=1)
    np.testing.assert_allclose(got[:, 0], np.einsum("btd,bd->b", feed, ind), rtol=1e-12)


def test_masked_positions_do_not_matter():
    spec = CoActionSpec()
    ind, feed, mask = inputs(spec)
    a = coaction_forward(ind, feed, mask)
    feed2 = feed.copy()
    feed2[mask == 0] = 1e3
    np.testing.assert_array_equal(a, coaction_forward(ind, feed2, mask))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_a_masked_position_adds_nothing_whatever_its_values(bad):
    """A masked position's feed row may hold NaN or infinities (padding): the kernels never read it, and the reference
    leaves it out too (it had multiplied by the mask, and NaN x 0 is NaN): the same output and gradients as with an
    ordinary row there, and a feed gradient of 0 at that position."""
    spec = CoActionSpec(bias=True)
    ind, feed, mask = inputs(spec)
    mask[0, 2] = 0
    g = np.random.default_rng(5).normal(size=(3, spec.out_dim))
    poisoned = feed.copy()
    poisoned[0, 2] = bad
    np.testing.assert_array_equal(coaction_forward(ind, poisoned, mask, spec), coaction_forward(ind, feed, mask, spec))
    gi, gf = coaction_backward(ind, poisoned, mask, g, spec)
    wi, wf = coaction_backward(ind, feed, mask, g, spec)
    np.testing.assert_array_equal(gi, wi)
    np.testing.assert_array_equal(gf, wf)
    assert not gf[0, 2].any()


def test_any_nonzero_mask_value_marks_a_present_behaviour_once():
    """The kernels count a position where mask != 0 once, whatever the value; the reference agrees (it had weighted
    the position by the value): a mask of 2.0 or 0.5 or -1.0 gives what 1.0 gives."""
    spec = CoActionSpec()
    ind, feed, mask = inputs(spec)
    g = np.random.default_rng(6).normal(size=(3, spec.out_dim))
    want, (wi, wf) = coaction_forward(ind, feed, mask, spec), coaction_backward(ind, feed, mask, g, spec)
    for v in (2.0, 0.5, -1.0):
        m = np.where(mask != 0, v, 0.0)
        np.testing.assert_array_equal(coaction_forward(ind, feed, m, spec), want)
        gi, gf = coaction_backward(ind, feed, m, g, spec)
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_array_equal(gf, wf)


def _fd(f, x, eps=1e-6):
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        up = f()
        x[i] = old - eps
        down = f()
        x[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: str(c))
def test_gradients_match_finite_differences(cfg):
    spec = CoActionSpec(**cfg)
    ind, feed, mask = inputs(spec, B=2, T=3, seed=7)
    w = np.random.default_rng(11).normal(size=(2, spec.out_dim))

    def loss():
        return float((coaction_forward(ind, feed, mask, **cfg) * w).sum())

    g_ind, g_feed = coaction_backward(ind, feed, mask, w, **cfg)
    np.testing.assert_allclose(g_ind, _fd(loss, ind), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(g_feed, _fd(loss, feed), rtol=1e-6, atol=1e-8)
    assert np.all(g_feed[mask == 0] == 0)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda i, f, m: (i[:, :-1], f, m), r"induction rows hold 159 floats .* need D' = 160"),
        (lambda i, f, m: (i, f[:, :, :-1], m), r"feed has D = 15 but the first layer takes 16"),
        (lambda i, f, m: (i, f, m[:, :-1]), r"mask must be \[B, T\]"),
        (lambda i, f, m: (i[:-1], f, m), r"induction has 2 rows but feed has batch 3"),
        (lambda i, f, m: (i, f[0], m), r"feed must be \[B, T, D\]"),
    ],
)
def test_bad_shapes_are_explained(change, match):
    spec = CoActionSpec()
    args = change(*inputs(spec))
    with pytest.raises(ValueError, match=match):
        coaction_forward(*args)


def test_bad_specs_are_explained():
    with pytest.raises(ValueError, match="do not chain"):
        CoActionSpec(layer_dims=((16, 8), (4, 4)))
    with pytest.raises(ValueError, match="orders must be >= 1"):
        CoActionSpec(orders=0)
    with pytest.raises(ValueError, match="variant must be"):
        CoActionSpec(variant="sum")
    spec = CoActionSpec()
    ind, feed, mask = inputs(spec)
    with pytest.raises(ValueError, match=r"grad_out must be \[B, 36\]"):
        coaction_backward(ind, feed, mask, np.zeros((3, 12)))


PAIRS = "a non-empty sequence of positive integer (d_in, d_out) pairs"


@pytest.mark.parametrize(
    "kwargs, must",
    [
        (dict(layer_dims=((16.9, 8), (8, 4))), PAIRS),  # was truncated to 16
        (dict(layer_dims=(16, 8)), PAIRS),  # a flat pair
        (dict(orders=2.5), "an int"),
        (dict(orders="3"), "an int"),
        (dict(orders=True), "an int"),
        (dict(bias="no"), "a bool"),  # was truthy: bias on
        (dict(order_independent=1), "a bool"),
        (dict(layer_dims=((16, True),)), PAIRS),  # was taken as 1 (a bool is refused as orders)
        (dict(layer_dims=((np.True_, 8), (8, 4))), PAIRS),
    ],
    ids=["float-dim", "flat-pair", "float-orders", "str-orders", "bool-orders", "str-bias", "int-oi", "bool-dim",
         "numpy-bool-dim"],
)
def test_spec_fields_of_the_wrong_type_are_named(kwargs, must):
    """The whole message: the field, what it must be and the value given ('positive integer' alone would pass a
    message naming another field, or none)."""
    ((field, value),) = kwargs.items()
    with pytest.raises(TypeError, match="^" + re.escape(f"{field} must be {must}, got {value!r}") + "$"):
        CoActionSpec(**kwargs)
    assert CoActionSpec(orders=np.int64(2), bias=np.bool_(True)) == CoActionSpec(orders=2, bias=True)
    assert CoActionSpec(layer_dims=((np.int32(16), 8), [8, np.int64(4)])) == CoActionSpec()


def test_spec_fields_given_as_generators_or_of_a_wrong_type_are_named():
    """layer_dims given as a generator had been read twice: the bool check found it exhausted and (16, True) became a
    layer of 1 output; a variant that is not a string (None, 1) was a ValueError, not the TypeError of a wrong type."""
    pairs = "layer_dims must be " + PAIRS
    with pytest.raises(TypeError, match=re.escape(pairs)):
        CoActionSpec(layer_dims=(d for d in [(16, True)]))
    with pytest.raises(TypeError, match=re.escape(pairs)):
        CoActionSpec(layer_dims=[(x for x in (16, True))])
    for bad in (None, 1):
        with pytest.raises(TypeError, match=rf"variant must be 'code' or 'paper', got {bad!r} \("):
            CoActionSpec(variant=bad)
    assert CoActionSpec(layer_dims=(d for d in [(16, 8), (x for x in (8, 4))])) == CoActionSpec()


def test_a_spec_and_the_older_keywords_together_are_refused():
    """The keywords would be ignored beside a CoActionSpec (an orders=1 call returned all 3 orders)."""
    spec = CoActionSpec()
    ind, feed, mask = inputs(spec)
    for kw in (dict(orders=1), dict(variant="paper"), dict(bias=True)):
        with pytest.raises(TypeError, match="either as a CoActionSpec or as keywords"):
            coaction_forward(ind, feed, mask, spec, **kw)
        with pytest.raises(TypeError, match="either as a CoActionSpec or as keywords"):
            coaction_backward(ind, feed, mask, np.zeros((3, spec.out_dim)), spec, **kw)


@pytest.mark.parametrize("kw", [dict(orders=3), dict(bias=False), dict(variant="code"), dict(order_independent=False),
                                dict(layer_dims=((16, 8), (8, 4)))], ids=lambda kw: next(iter(kw)))
def test_a_spec_and_a_keyword_of_the_default_value_together_are_refused(kw):
    """A keyword equal to its default had passed unseen beside a CoActionSpec: CoActionSpec(orders=2) with orders=3
    returned 2 orders, the keyword ignored without a word (the refusal compared each keyword with its default)."""
    spec = CoActionSpec(orders=2, bias=True, order_independent=True, variant="paper", layer_dims=((16, 4),))
    ind, feed, mask = inputs(spec)
    name = next(iter(kw))
    with pytest.raises(TypeError, match=rf"as keywords, not both \(got a CoActionSpec and {name}\)"):
        coaction_forward(ind, feed, mask, spec, **kw)
    with pytest.raises(TypeError, match="either as a CoActionSpec or as keywords"):
        coaction_backward(ind, feed, mask, np.zeros((3, spec.out_dim)), spec, **kw)
    # the keyword form alone: the defaults as before
    base = CoActionSpec()
    ind, feed, mask = inputs(base)
    np.testing.assert_array_equal(coaction_forward(ind, feed, mask, **kw), coaction_forward(ind, feed, mask, base))


def test_positional_layer_dims_and_the_layer_dims_keyword_together_are_refused():
    """The older positional form (layer_dims as the fourth argument) beside a layer_dims keyword had silently used the
    positional dims and ignored the keyword; now a TypeError, as for a CoActionSpec beside the keywords."""
    spec = CoActionSpec(((4, 3),), orders=2)
    ind, feed, mask = inputs(spec)
    for kw in (dict(layer_dims=((4, 2),)), dict(layer_dims=((4, 3),))):  # even the same dims: one place to say it
        with pytest.raises(TypeError, match="layer_dims twice"):
            coaction_forward(ind, feed, mask, ((4, 3),), 2, **kw)
        with pytest.raises(TypeError, match="layer_dims twice"):
            coaction_backward(ind, feed, mask, np.zeros((3, spec.out_dim)), ((4, 3),), 2, **kw)
    np.testing.assert_array_equal(coaction_forward(ind, feed, mask, ((4, 3),), 2),
                                  coaction_forward(ind, feed, mask, layer_dims=((4, 3),), orders=2))


def test_integer_inputs_are_refused_by_the_reference():
    """x ** c in an integer dtype wraps (an int8 100 squared gave 16)."""
    spec = CoActionSpec()
    ind, feed, mask = inputs(spec)
    with pytest.raises(TypeError, match="feed must hold floating-point values, got int8"):
        coaction_forward(ind, (feed * 100).astype(np.int8), mask, spec)
    with pytest.raises(TypeError, match="induction must hold floating-point values, got int64"):
        coaction_forward(ind.astype(np.int64), feed, mask, spec)


@pytest.mark.parametrize("dtype", [np.complex128, np.bool_, "<U1", object])
def test_a_grad_out_that_is_not_real_numbers_is_refused(dtype):
    """grad_out's dtype had not been checked: a complex one gave complex gradients without a word, a bool one was
    taken as 0 / 1, a string one failed in numpy's dtype promotion naming no argument."""
    spec = CoActionSpec()
    ind, feed, mask = inputs(spec)
    with pytest.raises(TypeError, match="grad_out must hold real numbers"):
        coaction_backward(ind, feed, mask, np.ones((3, spec.out_dim)).astype(dtype), spec)
    want = coaction_backward(ind, feed, mask, np.ones((3, spec.out_dim)), spec)
    for ok in (np.int64, np.float32):
        for a, b in zip(coaction_backward(ind, feed, mask, np.ones((3, spec.out_dim), ok), spec), want):
            np.testing.assert_allclose(a, b, rtol=1e-6)


def test_fused_launch_shape_fits_the_default_and_refuses_what_cannot_fit():
    from dwdp_ops.coaction import launch_shape
    from dwdp_ops.coaction.fused import uses_specialized_kernels

    warps, smem = launch_shape(CoActionSpec())
    # the reference shape runs on the specialised kernels (two samples a block) unless they are turned off
    specialised = os.environ.get("DWDP_COACTION_SPECIALIZED") != "0"
    assert uses_specialized_kernels(CoActionSpec()) == specialised
    assert warps == (2 if specialised else 4) and 0 < smem <= 227 * 1024
    assert launch_shape(CoActionSpec(orders=5))[0] == 4
    bw, bsmem = launch_shape(CoActionSpec(), backward=True)
    assert bsmem > smem  # the backward keeps gradients and dz rows too
    assert launch_shape(CoActionSpec(order_independent=True), backward=True)[1] > bsmem
    assert launch_shape(CoActionSpec(layer_dims=((256, 256), (256, 256))), backward=True)[0] == 0


@pytest.mark.parametrize(
    "spec, match",
    [
        (CoActionSpec(orders=9), r"orders must be in \[1, 8\]"),
        (CoActionSpec(layer_dims=((300, 8),)), r"layer dims must be in \[1, 256\]"),
        (CoActionSpec(layer_dims=((4, 4),) * 9), "1 to 8 layers"),
    ],
    ids=["orders", "width", "layers"],
)
def test_launch_shape_names_the_limit_a_spec_is_beyond(spec, match):
    """The forward and backward refuse these; launch_shape had returned a shape for them."""
    from dwdp_ops.coaction import launch_shape
    from dwdp_ops.coaction.fused import uses_fast_kernels

    with pytest.raises(ValueError, match=match):
        launch_shape(spec)
    with pytest.raises(ValueError, match=match):
        uses_fast_kernels(spec, backward=True)


@pytest.mark.parametrize(
    "spec, match",
    [
        (CoActionSpec(orders=2**31), r"orders must be in \[1, 8\]"),
        (CoActionSpec(orders=10**30), r"orders must be in \[1, 8\]"),
        (CoActionSpec(layer_dims=((2**31, 8),)), r"layer dims must be in \[1, 256\]"),
        (CoActionSpec(layer_dims=((16, 2**70), (2**70, 4))), r"layer dims must be in \[1, 256\]"),
        (CoActionSpec(layer_dims=((2**40, 2**40),) * 9), "1 to 8 layers"),
    ],
    ids=["orders-2**31", "orders-huge", "width-2**31", "width-huge", "layers"],
)
def test_a_spec_beyond_a_c_int_is_refused_by_its_limit(spec, match):
    """Widths or an order count past 2**31 - 1 had reached the binding, which refused the call with a TypeError
    ("incompatible function arguments") naming no limit; launch_shape promises the ValueError naming it."""
    from dwdp_ops.coaction import launch_shape, split_warps
    from dwdp_ops.coaction.fused import uses_fast_kernels, uses_specialized_kernels

    for call in (lambda: launch_shape(spec), lambda: uses_fast_kernels(spec, backward=True),
                 lambda: uses_specialized_kernels(spec), lambda: split_warps(spec, 1, 100, 132)):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("value", [None, 0, 1, "yes"])
def test_the_backward_flag_of_the_launch_queries_must_be_a_bool(value):
    """launch_shape / uses_fast_kernels / uses_specialized_kernels took backward=None or 0 as the forward and 1 as the
    backward without a word, and refused "yes" in the binding ("incompatible function arguments", naming no
    argument); split_warps already refused a backward that is not a bool. numpy's bool passes."""
    from dwdp_ops.coaction import launch_shape
    from dwdp_ops.coaction.fused import uses_fast_kernels, uses_specialized_kernels

    for query in (launch_shape, uses_fast_kernels, uses_specialized_kernels):
        with pytest.raises(TypeError, match="backward must be a bool"):
            query(CoActionSpec(), backward=value)
        assert query(CoActionSpec(), backward=np.bool_(True)) == query(CoActionSpec(), backward=True)


def test_the_fused_ops_take_only_a_coaction_spec():
    """The reference's older layer_dims form is not the fused op's: a TypeError naming spec, not an AttributeError or
    an unhashable-list error from inside."""
    from dwdp_ops.coaction import launch_shape
    from dwdp_ops.coaction.fused import coaction_backward_gpu, coaction_forward_gpu

    for bad in (((16, 8), (8, 4)), [[16, 8], [8, 4]]):
        with pytest.raises(TypeError, match="spec must be a CoActionSpec"):
            coaction_forward_gpu(None, None, None, bad)
        with pytest.raises(TypeError, match="spec must be a CoActionSpec"):
            coaction_backward_gpu(None, None, None, None, bad)
        with pytest.raises(TypeError, match="spec must be a CoActionSpec"):
            launch_shape(bad)


@pytest.mark.parametrize("which", ["ind_ids", "feed_ids"])
def test_non_contiguous_ids_are_refused(which):
    """The kernels read ids densely: a strided view (a column of a [B, 2] array, a transposed [T, B]) had passed
    the checks and read other ids (a negative stride, memory before the array)."""
    from dwdp_ops.coaction.fused import _args
    from dwdp_ops.interop import DeviceBuffer

    spec, f32, i64 = CoActionSpec(), np.dtype(np.float32), np.dtype(np.int64)
    B, T = 4, 3
    mask = DeviceBuffer(0x3000, (B, T), f32, None)
    table, ftable = DeviceBuffer(0x1000, (10, spec.induction_dim), f32, None), DeviceBuffer(0x2000, (10, 16), f32, None)
    ids, fids = DeviceBuffer(0x4000, (B,), i64, None), DeviceBuffer(0x5000, (B, T), i64, None)
    _args(spec, table, ftable, mask, ids, fids, "float32")  # dense: accepted
    if which == "ind_ids":
        ids = DeviceBuffer(0x4000, (B,), i64, (16,))
    else:
        fids = DeviceBuffer(0x5000, (B, T), i64, (8, 8 * B))
    with pytest.raises(TypeError, match=f"{which} must be a contiguous int64 .* got a non-contiguous int64"):
        _args(spec, table, ftable, mask, ids, fids, "float32")


@pytest.mark.parametrize("B, T", [(2**31, 1), (1, 2**31), (1, 2**31 - 128)], ids=["B", "T", "T-past-the-kernels"])
def test_a_batch_past_the_kernels_32_bit_indices_is_refused_by_name(B, T):
    """The module docstring said B and T were unbounded, but the binding takes them as C ints (and the kernels index
    T + 95 positions in 32 bits): a mask of 2**31 samples or positions reached the binding, which refused the call
    with "incompatible function arguments", naming neither. A ValueError now names the mask's B and T and the limits,
    before any GPU work (DeviceBuffers at made-up addresses: only the shapes are read)."""
    from dwdp_ops.coaction.fused import coaction_backward_gpu, coaction_forward_gpu
    from dwdp_ops.interop import DeviceBuffer

    spec, f32 = CoActionSpec(layer_dims=((1, 1),), orders=1), np.dtype(np.float32)
    ind, feed, mask = (DeviceBuffer(0x1000, shape, f32, None) for shape in ((B, 1), (B, T, 1), (B, T)))
    want = re.escape(f"the mask is [B, T] = [{B}, {T}]: the kernels take B <= 2**31 - 1 samples of T <= 2**31 - 129")
    with pytest.raises(ValueError, match=want):
        coaction_forward_gpu(ind, feed, mask, spec, stream=0, check_ids=False)
    with pytest.raises(ValueError, match=want):
        coaction_backward_gpu(ind, feed, mask, DeviceBuffer(0x1000, (B, 1), f32, None), spec, stream=0,
                              check_ids=False)


def _shape_cases():
    """(label, call, message) for each wrongly shaped argument of the fused ops: DeviceBuffers at made-up addresses,
    stream 0 and no id check, so every call is refused by the argument checks before any GPU work."""
    from dwdp_ops.coaction.fused import coaction_backward_gpu, coaction_forward_gpu
    from dwdp_ops.interop import DeviceBuffer

    spec, f32, i64 = CoActionSpec(), np.dtype(np.float32), np.dtype(np.int64)
    B, T, rows = 4, 3, 10

    def buf(shape, dtype=f32):
        return DeviceBuffer(0x1000, shape, dtype, None)

    table, ftable, mask = buf((rows, spec.induction_dim)), buf((rows, spec.feed_dim)), buf((B, T))
    ids, fids, gout = buf((B,), i64), buf((B, T), i64), buf((B, spec.out_dim))
    good = dict(induction=table, feed=ftable, mask=mask, ind_ids=ids, feed_ids=fids)

    def fwd(**bad):
        a = {**good, **bad}
        out = a.pop("out", None)
        return lambda: coaction_forward_gpu(a.pop("induction"), a.pop("feed"), a.pop("mask"), spec, stream=0,
                                            out=out, **a)

    def bwd(grad_out=gout, **bad):
        a = {**good, **bad}
        return lambda: coaction_backward_gpu(a.pop("induction"), a.pop("feed"), a.pop("mask"), grad_out, spec,
                                             stream=0, check_ids=False, **a)

    return [
        ("mask", fwd(mask=buf((B, T, 1))),
         r"mask must be a contiguous float32 \[B, T\] array, got float32 \[4, 3, 1\]"),
        ("ind_ids", fwd(ind_ids=buf((B + 1,), i64)), r"ind_ids must be a contiguous int64 \[4\] array"),
        ("feed_ids", fwd(feed_ids=buf((B, T + 1), i64)), r"feed_ids must be a contiguous int64 \[4, 3\] array"),
        ("out", fwd(out=buf((B, spec.out_dim + 1))), r"out must be a contiguous float32 \[4, 36\] array"),
        ("grad_out", bwd(grad_out=buf((B + 1, spec.out_dim))), r"grad_out must be a contiguous float32 \[4, 36\]"),
        ("grads", bwd(grads=(buf((rows - 1, spec.induction_dim)), buf((rows, spec.feed_dim)))),
         r"grad_induction must be a contiguous float32 \[10, 160\] array"),
        ("induction", fwd(induction=buf((rows, 100))), "induction rows must hold D' = 160 values"),
        ("induction_rows", fwd(induction=buf((B + 1, spec.induction_dim)), ind_ids=None),
         "induction has 5 rows but the mask has batch 4"),
        ("feed_table", fwd(feed=buf((rows, 15))), r"the feed table must be \[rows, 16\]"),
        ("feed", fwd(feed=buf((B, T + 1, spec.feed_dim)), feed_ids=None), r"feed must be \[B, T, D\] = \[4, 3, 16\]"),
    ]


@pytest.mark.parametrize("exc", [ValueError, TypeError, "CoActionArgumentError"])
@pytest.mark.parametrize("case", range(len(_shape_cases())),
                         ids=[label for label, _, _ in _shape_cases()])
def test_a_wrong_shape_is_both_a_value_and_a_type_error(case, exc):
    """A wrongly shaped array given to the fused ops (mask, ids, out, grad_out, gradient pair, induction, feed) had
    raised TypeError in some checks and ValueError in others (the reference raises ValueError for shapes): now one
    CoActionArgumentError, which ``except ValueError`` and ``except TypeError`` both catch; the message unchanged."""
    if exc == "CoActionArgumentError":
        from dwdp_ops.errors import CoActionArgumentError as exc
    _, call, match = _shape_cases()[case]
    with pytest.raises(exc, match=match):
        call()


def _dtype_and_empty_table_cases():
    """(label, call, exception, message) for the fused ops' dtype and layout checks and their refusal of ids into an
    empty table: DeviceBuffers at made-up addresses, stream 0, refused by the argument checks before any device work
    (the GPU tests test_bf16_is_close_and_bad_input_is_named, test_empty_tables_with_ids_are_refused_before_any_launch,
    test_apply_without_the_checks_still_refuses_by_name, test_backward_adds_into_given_gradients and
    test_table_grads_misuse_is_refused_by_name check the same on device arrays; these run without a GPU)."""
    from dwdp_ops.coaction.fused import coaction_backward_gpu, coaction_forward_gpu
    from dwdp_ops.interop import DeviceBuffer

    spec, f32, f64, u16, i64 = (CoActionSpec(), np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.uint16),
                                np.dtype(np.int64))
    B, T, rows = 2, 3, 4

    def buf(shape, dtype=f32):
        return DeviceBuffer(0x1000, shape, dtype, None)

    ind, feed, mask = buf((B, spec.induction_dim)), buf((B, T, spec.feed_dim)), buf((B, T))
    ids, fids, gout = buf((B,), i64), buf((B, T), i64), buf((B, spec.out_dim))

    def fwd(i=ind, f=feed, **kw):
        return lambda: coaction_forward_gpu(i, f, mask, spec, stream=0, **kw)

    def bwd(i, f, **kw):
        return lambda: coaction_backward_gpu(i, f, mask, gout, spec, stream=0, **kw)

    return [
        ("float64 induction", fwd(i=buf(ind.shape, f64)), TypeError,
         r"^induction must hold float32 \(float32\), got float64$"),
        ("float64 feed", fwd(f=buf(feed.shape, f64)), TypeError, r"^feed must hold float32 \(float32\), got float64$"),
        ("float32 as bf16", fwd(dtype="bfloat16"), TypeError,
         r"^induction must hold bfloat16 \(uint16\), got float32$"),
        ("bf16 feed float32", fwd(i=buf(ind.shape, u16), dtype="bfloat16"), TypeError,
         r"^feed must hold bfloat16 \(uint16\), got float32$"),
        ("float16", fwd(dtype="float16"), ValueError, "dtype must be 'float32' or 'bfloat16'"),
        ("strided induction", fwd(i=DeviceBuffer(0x1000, ind.shape, f32, (4, 4 * B))), ValueError,
         "^induction must be contiguous$"),
        ("strided feed", fwd(f=DeviceBuffer(0x1000, feed.shape, f32, (4 * spec.feed_dim, 4 * B * spec.feed_dim, 4))),
         ValueError, "^feed must be contiguous$"),
        ("bool mask", lambda: coaction_forward_gpu(ind, feed, buf((B, T), np.dtype(bool)), spec, stream=0),
         TypeError, r"^mask must be a contiguous float32 \[B, T\] array, got bool \[2, 3\]$"),
        ("empty feed table", fwd(i=buf((rows, spec.induction_dim)), f=buf((0, spec.feed_dim)), ind_ids=ids,
                                 feed_ids=fids, check_ids=False),
         ValueError, r"^feed_ids must be in \[0, 0\): the feed table is empty$"),
        ("empty induction table", fwd(i=buf((0, spec.induction_dim)), f=buf((rows, spec.feed_dim)), ind_ids=ids,
                                      feed_ids=fids),
         ValueError, r"^ind_ids must be in \[0, 0\): the induction table is empty$"),
        ("backward, empty induction table", bwd(buf((0, spec.induction_dim)), buf((rows, spec.feed_dim)),
                                                ind_ids=ids, feed_ids=fids),
         ValueError, r"^ind_ids must be in \[0, 0\): the induction table is empty$"),
        ("grads not a pair", bwd(buf((rows, spec.induction_dim)), buf((rows, spec.feed_dim)), ind_ids=ids,
                                 feed_ids=fids, check_ids=False, grads=(buf((rows, spec.induction_dim)),)),
         TypeError, r"^grads must be None, a TableGrads or a pair \(grad_induction, grad_feed\), got tuple$"),
        ("grads pair without ind_ids", bwd(ind, buf((rows, spec.feed_dim)), feed_ids=fids, check_ids=False,
                                           grads=(buf(ind.shape), buf((rows, spec.feed_dim)))),
         ValueError, r"^grads=\(grad_induction, grad_feed\) adds into table-shaped gradients: it needs ind_ids "),
        ("zero_grads not a TableGrads", fwd(zero_grads=(buf(ind.shape), buf(feed.shape))), TypeError,
         "^zero_grads must be a TableGrads or None, got tuple$"),
        ("backward, empty feed table", bwd(buf((rows, spec.induction_dim)), buf((0, spec.feed_dim)), ind_ids=ids,
                                           feed_ids=fids, check_ids=False),
         ValueError, r"^feed_ids must be in \[0, 0\): the feed table is empty$"),
    ]


@pytest.mark.parametrize("case", range(len(_dtype_and_empty_table_cases())),
                         ids=[label for label, *_ in _dtype_and_empty_table_cases()])
def test_fused_ops_refuse_a_wrong_dtype_or_an_empty_table_without_a_gpu(case):
    _, call, exc, match = _dtype_and_empty_table_cases()[case]
    with pytest.raises(exc, match=match):
        call()


def test_coaction_argument_error_is_exported():
    import dwdp_ops
    import dwdp_ops.coaction
    from dwdp_ops.errors import CoActionArgumentError

    assert dwdp_ops.CoActionArgumentError is CoActionArgumentError is dwdp_ops.coaction.CoActionArgumentError
    assert "CoActionArgumentError" in dwdp_ops.__all__ and "CoActionArgumentError" in dwdp_ops.coaction.__all__
    assert issubclass(CoActionArgumentError, TypeError) and issubclass(CoActionArgumentError, ValueError)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_signature_with_the_gpu_op(seed):
    """``coaction_forward(ind, feed, mask, CoActionSpec())`` and the table + ids form, as the GPU op takes them."""
    rng = np.random.default_rng(seed)
    spec = CoActionSpec(((4, 3), (3, 2)), orders=2, bias=True)
    B, T, rows_i, rows_f = 5, 7, 9, 11
    table_i = rng.standard_normal((rows_i, spec.induction_dim))
    table_f = rng.standard_normal((rows_f, spec.feed_dim)) * 0.5
    ind_ids = rng.integers(0, rows_i, B)
    feed_ids = rng.integers(0, rows_f, (B, T))
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    gathered = coaction_forward(table_i[ind_ids], table_f[feed_ids], mask, spec)
    np.testing.assert_allclose(coaction_forward(table_i, table_f, mask, spec, ind_ids=ind_ids, feed_ids=feed_ids), gathered)
    legacy = coaction_forward(table_i[ind_ids], table_f[feed_ids], mask, spec.layer_dims, spec.orders, spec.bias)
    np.testing.assert_array_equal(legacy, gathered)
    g = rng.standard_normal(gathered.shape)
    gi, gf = coaction_backward(table_i[ind_ids], table_f[feed_ids], mask, g, spec)
    ti, tf = coaction_backward(table_i, table_f, mask, g, spec, ind_ids=ind_ids, feed_ids=feed_ids)
    want_i = np.zeros_like(table_i)
    np.add.at(want_i, ind_ids, gi)
    want_f = np.zeros_like(table_f)
    np.add.at(want_f, feed_ids.reshape(-1), gf.reshape(-1, spec.feed_dim))
    np.testing.assert_allclose(ti, want_i, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tf, want_f, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="ind_ids must be in"):
        coaction_forward(table_i, table_f, mask, spec, ind_ids=ind_ids + rows_i, feed_ids=feed_ids)


@pytest.mark.parametrize("args, kwargs, exc, match", [
    (((4, 160), (4, 16)), dict(zero="backward"), ValueError, "zero must be 'forward'"),
    (((-1, 160), (4, 16)), {}, ValueError, "induction_shape must be a non-empty tuple of sizes >= 0"),
    (((4, 160), ()), {}, ValueError, "feed_shape must be a non-empty tuple"),
    (((4, 160), None), {}, TypeError, "feed_shape must be a tuple of ints"),
    ((("a", 160), (4, 16)), {}, TypeError, "induction_shape must be a tuple of ints"),
])
def test_table_grads_arguments_are_checked_before_any_device_work(args, kwargs, exc, match):
    """TableGrads refuses a bad zero mode or shape before it allocates or queues anything (no GPU needed), and an
    instance whose constructor raised has nothing to wait for when it is collected."""
    from dwdp_ops.coaction import TableGrads

    with pytest.raises(exc, match=match):
        TableGrads(*args, **kwargs)


def test_a_gradient_array_device_is_read_from_cupy_and_torch_objects():
    """The backward compares a caller's gradient arrays' device with its own: CuPy's ``.device.id``, PyTorch's
    ``.device.index``; an object that says neither is looked up by its address (needs a GPU: not tested here), and without an address
    (an empty array) the device is unknown: None."""
    from types import SimpleNamespace

    from dwdp_ops.coaction.fused import _array_device

    assert _array_device(SimpleNamespace(device=SimpleNamespace(id=1))) == 1
    assert _array_device(SimpleNamespace(device=SimpleNamespace(index=2, type="cuda"))) == 2
    assert _array_device(SimpleNamespace(device=SimpleNamespace(id=0, index=5))) == 0
    assert _array_device(object()) is None


@pytest.mark.parametrize("which, ids_shape, table", [
    ("ind_ids", (3, 1), "induction"), ("ind_ids", (), "induction"), ("ind_ids", (2,), "induction"),
    ("feed_ids", (3,), "feed"), ("feed_ids", (3, 5, 1), "feed"), ("feed_ids", (3, 4), "feed"),
], ids=["ind-2d", "ind-scalar", "ind-short", "feed-1d", "feed-3d", "feed-short"])
def test_the_reference_names_ids_of_the_wrong_shape(which, ids_shape, table):
    """Ids of the wrong shape had been gathered first: the error then named the gathered rows ("induction must be
    [B, D'], got shape (3, 1, 160)", "feed must be [B, T, D]"), not the ids, or (fewer ids) "induction has 2 rows but
    feed has batch 3". Now a ValueError names the ids and the shape the mask asks for, forward and backward."""
    spec = CoActionSpec(bias=True)
    ind, feed, mask = inputs(spec)  # B, T = 3, 5
    kw = {which: np.zeros(ids_shape, dtype=np.int64)}
    args = (ind, feed[0] if which == "feed_ids" else feed, mask)  # the gathered rows are a table of 3 (or 5) rows
    want = re.escape(f"{which} must be " + ("[B] = [3]" if which == "ind_ids" else "[B, T] = [3, 5]"))
    with pytest.raises(ValueError, match=want):
        coaction_forward(*args, spec, **kw)
    with pytest.raises(ValueError, match=want):
        coaction_backward(*args, np.zeros((3, spec.out_dim)), spec, **kw)


def test_ids_given_with_gathered_rows_are_named_before_their_range():
    """feed_ids beside a gathered [B, T, D] feed (not a table) had been range-checked against its first extent and
    refused as "feed_ids must be in [0, 3)": now the table's shape is checked first."""
    spec = CoActionSpec()
    ind, feed, mask = inputs(spec)
    with pytest.raises(ValueError, match=r"with feed_ids the table must be 2-D \[rows, D\]"):
        coaction_forward(ind, feed, mask, spec, feed_ids=np.full((3, 5), 4))


@pytest.mark.parametrize("num_rows, dim, match", [
    (10.5, 16, "num_rows must be an int"), (True, 16, "num_rows must be an int"), (10, 16.0, "dim must be an int"),
    (10, "16", "dim must be an int"), (None, 16, "num_rows must be an int"),
], ids=["float-rows", "bool-rows", "float-dim", "str-dim", "none-rows"])
def test_a_sharded_table_refuses_sizes_that_are_not_ints(num_rows, dim, match):
    """A float size had been truncated by int() (a 10.5-row table had 10 rows), True taken as 1, and a string or None
    failed in a comparison naming neither argument. TypeError before any runtime work (numpy integers pass: they reach
    the runtime's own error here, with no runtime)."""
    from dwdp_ops.coaction import ShardedTable
    from dwdp_ops.errors import DwdpError

    with pytest.raises(TypeError, match=match):
        ShardedTable(num_rows, dim)
    with pytest.raises(DwdpError, match="init"):
        ShardedTable(np.int64(10), np.int32(16))


def test_the_fused_ops_document_every_array_they_take():
    """Each fused op's docstring names its arrays with their dims and dtype (the mask and grad_out had been named
    nowhere: the module docstring covers induction, feed and the ids only) and says whether it is collective."""
    from dwdp_ops.coaction import coaction_backward_gpu, coaction_forward_gpu

    common = ["induction", "[B, D']", "[rows, D']", "ShardedTable", "feed", "[B, T, D]", "[rows, D]", "ind_ids",
              "[B]", "feed_ids", "[B, T]", "int64", "mask", "contiguous float32 ``[B, T]``", "float32", "bfloat16",
              "ollective"]
    for op, extra in ((coaction_forward_gpu, ["out", "[B, spec.out_dim]"]),
                      (coaction_backward_gpu, ["grad_out", "float32 ``[B, spec.out_dim]``"])):
        missing = [w for w in common + extra if w not in op.__doc__]
        assert not missing, f"{op.__name__} does not document {missing}"


def test_the_forward_says_a_callers_out_is_written_when_its_ids_are_refused():
    """The id check runs in front of the kernel but the kernel is launched before the host sees the check's result,
    so a refused forward has written ``out`` (memory-safe, meaningless values): the docstring said only "the output
    is dropped", true of a new output alone."""
    from dwdp_ops.coaction import coaction_forward_gpu

    doc = " ".join(coaction_forward_gpu.__doc__.split())
    assert "a caller's ``out`` has been overwritten" in doc


@pytest.mark.parametrize("value", [None, 0, 1, "yes"])
def test_check_ids_must_be_a_bool_in_the_fused_ops(value):
    """None or 0 had turned the device id check off without a word (the kernels then read a wrong row for a bad id);
    the check comes before any GPU work, so it runs here."""
    import numpy as np
    from dwdp_ops.coaction import coaction_backward_gpu, coaction_forward_gpu

    a = np.zeros((1, 1), np.float32)
    with pytest.raises(TypeError, match="check_ids must be a bool"):
        coaction_forward_gpu(a, a, a, check_ids=value)
    with pytest.raises(TypeError, match="check_ids must be a bool"):
        coaction_backward_gpu(a, a, a, a, check_ids=value)


def test_check_ids_must_be_a_bool_in_the_autograd_op():
    torch = pytest.importorskip("torch")
    from dwdp_ops.coaction import coaction

    t = torch.zeros(1, 1)
    with pytest.raises(TypeError, match="check_ids must be a bool"):
        coaction(t, t, t, check_ids=None)


@pytest.mark.parametrize("bits, match", [
    (1, r"^ind_ids must be in \[0, 10\) \(the table's rows\)$"),
    (2, r"^feed_ids must be in \[0, 7\) \(the table's rows\)$"),
    (3, r"^ind_ids must be in \[0, 10\) \(the table's rows\)$"),  # both bad: the induction ids are named first
    (0, r"^grad_out must be a contiguous float32 \[4, 36\] array"),  # none bad: on to the next check
])
def test_the_id_checks_verdict_names_the_bad_array(monkeypatch, bits, match):
    """The host side of the device id check (tested on a GPU by test_id_check_names_the_bad_array): the backward
    hands the native check both id arrays, their counts (B and B * T), both tables' rows, the stream and the mask, and
    turns the bits it returns into a ValueError naming the array and its table's rows. The native call is a stand-in
    returning ``bits``; DeviceBuffers at made-up addresses."""
    from dwdp_ops.coaction import fused
    from dwdp_ops.interop import DeviceBuffer

    spec, f32, i64 = CoActionSpec(), np.dtype(np.float32), np.dtype(np.int64)
    B, T = 4, 5
    table, ftable = DeviceBuffer(0x1000, (10, spec.induction_dim), f32, None), DeviceBuffer(0x2000, (7, 16), f32, None)
    mask, ids, fids = (DeviceBuffer(0x3000, (B, T), f32, None), DeviceBuffer(0x4000, (B,), i64, None),
                       DeviceBuffer(0x5000, (B, T), i64, None))
    calls = []

    class Native:
        def coaction_check_ids(self, *args):
            calls.append(args)
            return bits

    monkeypatch.setattr(fused, "native", Native)
    with pytest.raises(ValueError, match=match):
        fused.coaction_backward_gpu(table, ftable, mask, DeviceBuffer(0x6000, (B, 35), f32, None), spec,
                                    ind_ids=ids, feed_ids=fids, stream=0)
    assert calls == [(0x4000, B, 10, 0x5000, B * T, 7, 0, 0x3000)]
