"""The fused fp8 activation kernels (``cpp/src/quant.cu``) on one GPU: ``fp8.quant_rows`` and ``fp8.swiglu_quant``
on CUDA bf16 equal their PyTorch implementations (``quant_rows_torch`` / ``swiglu_quant_torch``) bit for bit, codes
and scales, and ``quant_rows`` equals the numpy truth (``dwdp_ops.quant.quant_rowwise``): random rows over a wide
range of magnitudes with zero rows, -0.0, values near the bf16 maximum, bf16 subnormals, a tiny value beside a large
one; R = 0, 1, 4097; row widths that take every launch shape; non-contiguous row strides; capture in a CUDA graph.
The timing test prints the kernels against the PyTorch chains (run with ``-s`` to see it); it asserts nothing.

    pytest -q -s tests/test_gpu_quant.py

The argument checks of the native functions need no GPU and run everywhere."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
fp8 = pytest.importorskip("dwdp_ops.models.deepseek_r1.fp8")


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t.view(torch.int32)


def _assert_same(got, want):
    (q, s), (qw, sw) = got, want
    assert q.shape == qw.shape and s.shape == sw.shape and q.dtype == qw.dtype and s.dtype == sw.dtype
    bad_s = (_bits(s) != _bits(sw)).nonzero()
    assert bad_s.numel() == 0, f"{bad_s.numel()} scales differ, first rows {bad_s[:5].flatten().tolist()}"
    bad_q = (_bits(q) != _bits(qw)).nonzero()
    assert bad_q.numel() == 0, f"{bad_q.shape[0]} codes differ, first at {bad_q[:5].tolist()}"


def _rows(R: int, K: int, seed: int, swiglu: bool = False):
    """float32 [R, K] on the GPU, bf16-representable once cast: N(0, 1) times a per-row magnitude, with special rows
    at the top."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    lo, hi = (-8.0, 4.0) if swiglu else (-12.0, 6.0)
    mag = torch.exp(torch.empty((R, 1), device="cuda").uniform_(lo, hi, generator=g))
    x = torch.randn((R, K), generator=g, device="cuda") * mag
    big = 1e18 if swiglu else 3.3e38  # swiglu: the product of two stays finite
    specials = [
        lambda r: r.zero_(),                                          # a zero row: scale 1, codes 0
        lambda r: r.zero_().neg_(),                                   # -0.0: codes 0x80
        lambda r: r.uniform_(-1.0, 1.0, generator=g).mul_(big),      # near the bf16 maximum (uniform_ caps to - from)
        lambda r: r.uniform_(-1e-39, 1e-39, generator=g),             # bf16 subnormals (scale a float32 subnormal)
        lambda r: r.uniform_(-1e-3, 1e-3, generator=g).index_fill_(0, torch.tensor([0], device="cuda"), 7.0),
        lambda r: r.zero_().index_fill_(0, torch.tensor([K - 1], device="cuda"), -3e-5),  # one nonzero value
        lambda r: r.uniform_(-120, 120, generator=g),                 # silu: exp overflow / saturation
    ]
    for i, f in enumerate(specials if R > 8 else []):
        f(x[i])
    if R > 8:  # a tiny value beside a large one, values exactly at +-448 * scale
        x[7, :4] = torch.tensor([1e-30, -1e-30, 7.0, -7.0])
        x[8].uniform_(-1, 1, generator=g)
        x[8, :2] = torch.tensor([448.0, -448.0])
    return x


def _strided(x: torch.Tensor, pad: int) -> torch.Tensor:
    """``x`` copied into a wider buffer: row stride K + 2 * pad, data starting pad elements in."""
    R, K = x.shape
    base = torch.full((R, K + 2 * pad), float("nan"), dtype=x.dtype, device=x.device)
    base[:, pad : pad + K] = x
    return base[:, pad : pad + K]


@pytest.mark.gpu
@pytest.mark.parametrize("R", [0, 1, 4097])
@pytest.mark.parametrize("K", [8, 64, 1024, 2048, 4096, 7168, 16384])
def test_quant_rows_kernel_equals_pytorch_and_numpy(R, K):
    from dwdp_ops import quant

    x = _rows(R, K, seed=R * 7 + K).to(torch.bfloat16)
    assert fp8._fused_ok(x, K), "the fused kernel must take a contiguous CUDA bf16 input"
    got = fp8.quant_rows(x)
    _assert_same(got, fp8.quant_rows_torch(x))
    if R and K in (2048, 7168):  # the numpy truth (slower: two shapes)
        qn, sn = quant.quant_rowwise(x.float().cpu().numpy())
        np.testing.assert_array_equal(got[1].cpu().numpy().view(np.int32), sn.view(np.int32))
        np.testing.assert_array_equal(got[0].view(torch.uint8).cpu().numpy(), qn)
    if R > 8:
        q, s = got
        assert s[0] == 1.0 and not q[0].view(torch.uint8).any()
        assert (q[1].view(torch.uint8) == 0x80).all()
        assert q[8, 0].view(torch.uint8) == 0x7E and q[8, 1].view(torch.uint8) == 0xFE  # +-448 exactly


@pytest.mark.gpu
@pytest.mark.parametrize("R", [0, 1, 4097])
@pytest.mark.parametrize("inter", [8, 64, 2048, 7168])
def test_swiglu_quant_kernel_equals_pytorch(R, inter):
    h = _rows(R, 2 * inter, seed=R * 5 + inter, swiglu=True).to(torch.bfloat16)
    if R > 8:
        h[9, :inter] = -100.0  # silu -> -0.0
        h[10, :inter] = 100.0
    assert fp8._fused_ok(h, inter)
    _assert_same(fp8.swiglu_quant(h, inter), fp8.swiglu_quant_torch(h, inter))


@pytest.mark.gpu
@pytest.mark.parametrize("K", [2048, 7168])
def test_kernels_take_row_strides_and_fall_back_when_misaligned(K):
    x = _rows(513, K, seed=K).to(torch.bfloat16)
    xs = _strided(x, 32)  # row stride K + 64 elements, data 64 bytes in: the kernel
    assert not xs.is_contiguous() and fp8._fused_ok(xs, K)
    _assert_same(fp8.quant_rows(xs), fp8.quant_rows_torch(x))
    xm = _strided(x, 4)  # data 8 bytes in: not 16-byte aligned, PyTorch's path, the same bits
    assert not fp8._fused_ok(xm, K)
    _assert_same(fp8.quant_rows(xm), fp8.quant_rows_torch(x))

    inter = K // 2
    h = _rows(513, 2 * inter, seed=K + 1, swiglu=True).to(torch.bfloat16)
    hs = _strided(h, 64)
    assert fp8._fused_ok(hs, inter)
    _assert_same(fp8.swiglu_quant(hs, inter), fp8.swiglu_quant_torch(h, inter))
    # a [R, 2I] view of a wider GEMM output (row stride > 2I) is taken in place as well
    wide = torch.cat([h, h[:, :16]], dim=1)[:, : 2 * inter]
    _assert_same(fp8.swiglu_quant(wide, inter), fp8.swiglu_quant_torch(h, inter))


@pytest.mark.gpu
def test_kernels_replay_in_a_cuda_graph():
    x = _rows(1000, 7168, seed=3).to(torch.bfloat16)
    h = _rows(1000, 4096, seed=4, swiglu=True).to(torch.bfloat16)
    want_x, want_h = fp8.quant_rows_torch(x), fp8.swiglu_quant_torch(h, 2048)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up off the default stream, as capture requires
        fp8.quant_rows(x)
        fp8.swiglu_quant(h, 2048)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got_x = fp8.quant_rows(x)
        got_h = fp8.swiglu_quant(h, 2048)
    graph.replay()
    torch.cuda.synchronize()
    _assert_same(got_x, want_x)
    _assert_same(got_h, want_h)


@pytest.mark.gpu
@pytest.mark.parametrize("live", [0, 1, 777, 1000])
def test_live_rows_bound_the_rows_processed(live):
    """A device count bounds the rows the kernels touch (the tail of a worst-case DEP buffer): the live rows equal
    the unbounded result, the rows past the bound keep what was in the output (poisoned here), read from the device
    without a host round trip."""
    x = _rows(1000, 7168, seed=5).to(torch.bfloat16)
    h = _rows(1000, 4096, seed=6, swiglu=True).to(torch.bfloat16)
    n = torch.tensor([live, 123], dtype=torch.int32, device="cuda")
    for got, want in ((fp8.quant_rows(x, live_rows=n), fp8.quant_rows(x)),
                      (fp8.swiglu_quant(h, 2048, live_rows=n), fp8.swiglu_quant(h, 2048))):
        _assert_same((got[0][:live], got[1][:live]), (want[0][:live], want[1][:live]))
    poison = torch.full((1000,), 7.0, device="cuda")
    q = torch.empty((1000, 7168), dtype=torch.float8_e4m3fn, device="cuda")
    fp8._native_quant().quant_rows_bf16(x.data_ptr(), x.stride(0), q.data_ptr(), poison.data_ptr(), 1000, 7168,
                                        x.device.index, torch.cuda.current_stream().cuda_stream, n.data_ptr())
    torch.cuda.synchronize()
    assert bool((poison[live:] == 7.0).all()) and not bool((poison[:live] == 7.0).any())
    with pytest.raises(ValueError, match="live_rows must be an int32 tensor"):
        fp8.quant_rows(x, live_rows=n.long())


def _time_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


@pytest.mark.gpu
def test_kernel_timing_against_the_pytorch_chain():
    """Prints median times and effective bandwidths (bytes read + written once); asserts nothing."""
    R = 65536  # 8K tokens x top-8
    x = torch.randn((R, 7168), device="cuda").to(torch.bfloat16)
    h = torch.randn((R, 4096), device="cuda").to(torch.bfloat16)
    cases = [
        ("quant_rows  [65536, 7168]", x.numel() * 3 + R * 4, lambda: fp8.quant_rows(x),
         lambda: fp8.quant_rows_torch(x)),
        ("swiglu_quant [65536, 2x2048]", h.numel() * 2 + h.numel() // 2 + R * 4,
         lambda: fp8.swiglu_quant(h, 2048), lambda: fp8.swiglu_quant_torch(h, 2048)),
    ]
    for name, nbytes, kernel, chain in cases:
        tk, tc = _time_ms(kernel), _time_ms(chain)
        print(f"\n{name}: kernel {tk:.3f} ms ({nbytes / tk / 1e6:.0f} GB/s), PyTorch {tc:.3f} ms "
              f"({nbytes / tc / 1e6:.0f} GB/s effective), {tc / tk:.1f}x")


def test_native_functions_check_their_arguments():
    from dwdp_ops._native import native_or_reason

    c, why = native_or_reason()
    if c is None:
        pytest.skip(why)
    # one message for both bounds: the width it names tells which case raised
    with pytest.raises(ValueError, match=r"quant_rows_bf16: the row width must be a positive multiple of 8 .*, got 12$"):
        c.quant_rows_bf16(256, 16, 256, 256, 4, 12, 0, 0)
    with pytest.raises(ValueError, match=rf"swiglu_quant_bf16: .* up to {c.QUANT_MAX_K}, got {c.QUANT_MAX_K + 8}$"):
        c.swiglu_quant_bf16(256, 2 * c.QUANT_MAX_K + 16, 256, 256, 4, c.QUANT_MAX_K + 8, 0, 0)
    with pytest.raises(ValueError, match="16-byte aligned"):
        c.quant_rows_bf16(258, 16, 256, 256, 4, 16, 0, 0)
    with pytest.raises(ValueError, match="shorter than a row"):
        c.swiglu_quant_bf16(256, 16, 256, 256, 4, 16, 0, 0)
    c.quant_rows_bf16(0, 16, 0, 0, 0, 16, 0, 0)  # no rows: nothing is launched (no GPU needed)


class _Cuda2d:
    """What ``fp8._fused_ok`` reads of a 2-D CUDA bf16 tensor (so that its decision is testable without a GPU)."""

    is_cuda = True
    dtype = torch.bfloat16

    def __init__(self, shape, stride, ptr=256):
        self.shape, self._stride, self._ptr = shape, stride, ptr

    def dim(self):
        return 2

    def stride(self, d):
        return self._stride[d]

    def data_ptr(self):
        return self._ptr


def test_overlapping_rows_go_to_pytorchs_path(monkeypatch):
    """A broadcast view (``x[:1].expand(R, K)``: row stride 0) or any row stride below the row's length passed
    ``_fused_ok`` (0 and 8 are multiples of 8), and the kernel then refused it ("row stride ... is shorter than a
    row"): a valid tensor raised instead of taking the PyTorch path."""
    monkeypatch.setattr(fp8, "_NATIVE", type("C", (), {"QUANT_MAX_K": 16384})())
    assert fp8._fused_ok(_Cuda2d((4, 64), (64, 1)), 64) and fp8._fused_ok(_Cuda2d((4, 64), (72, 1)), 64)
    assert fp8._fused_ok(_Cuda2d((1, 64), (0, 1)), 64)  # one row: the stride is never used
    for stride in (0, 8, 56):
        assert not fp8._fused_ok(_Cuda2d((4, 64), (stride, 1)), 64)
        assert not fp8._fused_ok(_Cuda2d((4, 128), (stride, 1)), 64)  # swiglu: the input row is 2 * inter long


@pytest.mark.gpu
def test_kernels_fall_back_for_a_broadcast_row():
    x = _rows(1, 7168, seed=9).to(torch.bfloat16)
    xe = x.expand(5, 7168)
    _assert_same(fp8.quant_rows(xe), fp8.quant_rows_torch(xe.contiguous()))
    h = _rows(1, 4096, seed=10, swiglu=True).to(torch.bfloat16).expand(5, 4096)
    _assert_same(fp8.swiglu_quant(h, 2048), fp8.swiglu_quant_torch(h.contiguous(), 2048))
