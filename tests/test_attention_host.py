"""Host logic of the packed prefill attention (``dwdp_ops.models.attention``): backend order from the environment,
length checks, the padded-batch row map, and argument errors raised before any kernel (no GPU needed)."""

from __future__ import annotations

import numpy as np
import pytest
from dwdp_ops.models import attention as A


def test_backend_order_default_and_environment():
    assert A.backend_order({}) == A.DEFAULT_ORDER
    assert A.backend_order({A.ENV: " flex , loop "}) == ("flex", "loop")
    with pytest.raises(ValueError, match=r"unknown backend\(s\) \['fa9'\]"):
        A.backend_order({A.ENV: "dense,fa9"})
    with pytest.raises(ValueError, match="unknown"):
        A.backend_order({A.ENV: ","})


@pytest.mark.parametrize("lengths,tokens,ok", [([3, 1, 4], 8, True), ([3, 1], 8, False), ([0, 8], 8, False),
                                               ([], 0, False), ([-1, 9], 8, False)])
def test_check_lengths(lengths, tokens, ok):
    if ok:
        assert A.check_lengths(lengths, tokens) == lengths
    else:
        with pytest.raises(ValueError, match="lengths must be positive and sum to"):
            A.check_lengths(lengths, tokens)


def test_padded_rows_maps_each_token_into_its_request_slot():
    rows = A.padded_rows([3, 1, 2])
    np.testing.assert_array_equal(rows, [0, 1, 2, 3, 6, 7])
    assert rows.dtype == np.int64
    # equal lengths: the identity
    np.testing.assert_array_equal(A.padded_rows([4, 4]), np.arange(8))
    np.testing.assert_array_equal(A.padded_rows(np.array([2, 1])), [0, 1, 2])  # numpy lengths are ints


@pytest.mark.parametrize("lengths, err, match", [
    ([], ValueError, r"lengths must be one int >= 1 per request \(at least one\), got \[\]$"),
    ([2, 0], ValueError, r"lengths must be one int >= 1 per request \(at least one\), got \[2, 0\]$"),
    ([-1], ValueError, r"got \[-1\]$"),
    ([1.5], TypeError, r"lengths must be ints \(token counts\), got lengths\[0\] = 1.5 \(float\)$"),
    ([2, True], TypeError, r"got lengths\[1\] = True \(bool\)$"),
])
def test_padded_rows_names_lengths_it_cannot_map(lengths, err, match):
    """[] raised a bare "max() arg is an empty sequence"; [-1] returned no rows and [2, 0] the rows of [2]; [1.5]
    gave float rows and True counted as one token. Each is refused by name."""
    with pytest.raises(err, match=r"^padded_rows: .*" + match):
        A.padded_rows(lengths)


def test_shape_and_backend_errors_come_before_any_kernel():
    torch = pytest.importorskip("torch")
    q = torch.zeros(6, 2, 8)
    v = torch.zeros(6, 2, 4)
    with pytest.raises(ValueError, match=r"expected q, k \[T, H, Dqk\] and v \[T, H, Dv\]"):
        A.prefill_attention(q, q[:5], v, [6], 1.0)
    with pytest.raises(ValueError, match="sum to the 6 packed tokens"):
        A.prefill_attention(q, q, v, [2, 2], 1.0)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        A.prefill_attention(q, q, v, [6], 1.0, backend="fast")


@pytest.mark.parametrize("lengths", [[5], [3, 1, 4], [2, 2, 2]])
def test_cpu_dense_and_loop_agree_with_a_direct_causal_softmax(lengths):
    """The padded-batch and per-request paths are plain PyTorch: on the CPU they must equal the textbook formula
    (the CUDA kernels are checked against the same formula in tests/test_gpu_attention.py)."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    T, H, D, Dv = sum(lengths), 3, 8, 4
    q, k = torch.randn(T, H, D, generator=g), torch.randn(T, H, D, generator=g)
    v = torch.randn(T, H, Dv, generator=g)
    ref, a = torch.empty(T, H, Dv), 0
    for n in lengths:
        s = torch.einsum("ihd,jhd->hij", q[a:a + n], k[a:a + n]) * 0.3
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        ref[a:a + n] = torch.einsum("hij,jhd->ihd", s.softmax(-1), v[a:a + n])
        a += n
    for b in ("dense", "loop", "auto"):
        out = A.prefill_attention(q, k, v, lengths, 0.3, backend=b)
        assert out.shape == (T, H, Dv)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [[1.9, 2.1], [2.0, 1.0], [True, 2], ["1", "2"]])
def test_check_lengths_refuses_non_integers_instead_of_truncating(lengths):
    """[1.9, 2.1] used to become [1, 2] (summing to 3 tokens: accepted, the wrong split); a length must be an
    integer (Python or numpy; bools refused)."""
    with pytest.raises(TypeError, match=r"lengths must be integers .*lengths\[0\]"):
        A.check_lengths(lengths, 3)


def test_check_lengths_accepts_numpy_integers():
    out = A.check_lengths(np.array([2, 1], dtype=np.int32), 3)
    assert out == [2, 1] and all(type(x) is int for x in out)


@pytest.mark.parametrize("scale, exc", [(float("nan"), ValueError), (float("inf"), ValueError), (0.0, ValueError),
                                        (-0.1, ValueError), ("0.1", TypeError), (True, TypeError)])
def test_a_bad_softmax_scale_is_named_before_any_kernel(scale, exc):
    """A NaN scale gave an all-NaN output without a word (every backend), 0 a uniform average over the causal
    prefix; a string failed inside SDPA."""
    torch = pytest.importorskip("torch")
    q, v = torch.zeros(4, 2, 8), torch.zeros(4, 2, 4)
    with pytest.raises(exc, match=r"scale must be a finite number > 0 \(the softmax scale\)"):
        A.prefill_attention(q, q, v, [4], scale, backend="loop")
    assert A.prefill_attention(q, q, v, [4], np.float32(0.5), backend="loop").shape == (4, 2, 4)


@pytest.mark.parametrize("lengths", [5, np.int64(5), None, 2.5])
def test_check_lengths_names_a_lengths_that_is_not_a_sequence(lengths):
    """A single count (``5`` for one request) had raised list()'s bare "'int' object is not iterable"."""
    with pytest.raises(TypeError, match=r"lengths must be a sequence of the requests' token counts, got"):
        A.check_lengths(lengths, 5)


@pytest.mark.parametrize("lengths", [5, np.int64(5), None, 2.5])
def test_padded_rows_names_a_lengths_that_is_not_a_sequence(lengths):
    """padded_rows checks its lengths "as check_lengths does", but a single count (``5`` for one request) still raised
    list()'s bare "'int' object is not iterable" there; named as check_lengths names it."""
    with pytest.raises(TypeError, match=r"^padded_rows: lengths must be a sequence of the requests' token counts, got"):
        A.padded_rows(lengths)
