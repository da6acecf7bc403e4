"""Framework-neutral views of device arrays and streams (``dwdp_ops.interop``): what every op's argument checks read.
The host-side tests run everywhere (fake interface objects, CPU tensors); the GPU test checks the attribute paths of
CuPy arrays and PyTorch tensors against their ``__cuda_array_interface__``."""

from __future__ import annotations

import numpy as np
import pytest
from dwdp_ops.interop import DeviceBuffer, cupy_stream, device_buffer, stream_handle


class FakeArray:
    """An object exposing only ``__cuda_array_interface__`` (as Numba's device arrays do)."""

    def __init__(self, ptr, shape, typestr, strides=None):
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": shape, "typestr": typestr,
                                         "strides": strides, "version": 3}


def test_the_interface_dict_is_read():
    b = device_buffer(FakeArray(4096, (3, 5), "<f4"), "x")
    assert (b.ptr, b.shape, b.dtype, b.strides) == (4096, (3, 5), np.dtype(np.float32), None)
    assert b.contiguous and b.nbytes == 60
    t = device_buffer(FakeArray(4096, (3, 5), "<f4", (4, 12)), "x")  # a transposed view: column-major
    assert t.strides == (4, 12) and not t.contiguous


@pytest.mark.parametrize("shape, strides, contiguous", [
    ((1, 5), (0, 4), True), ((1, 5), (999, 4), True),  # a dimension of one element: any stride (it was refused)
    ((3, 1), (4, 4), True), ((3, 1, 2), (8, 0, 4), True),
    ((3, 5), (20, 4), True), ((3, 5), (4, 12), False), ((2, 5), (40, 4), False),  # a row gap
    ((0, 5), (4, 4), True),  # no element
])
def test_contiguity_ignores_the_stride_of_a_dimension_of_one(shape, strides, contiguous):
    """NumPy and PyTorch call an array C-contiguous whatever the stride of a dimension of one element, and some
    producers report such strides through ``__cuda_array_interface__``; the check had compared every stride."""
    assert device_buffer(FakeArray(4096, shape, "<f4", strides), "x").contiguous is contiguous


def test_contiguity_of_a_strided_array_does_not_compute_its_size(monkeypatch):
    """``contiguous`` runs for every array of every fused / dispatch call. A non-empty array whose producer reports
    its strides is decided by the strides alone; ``nbytes`` (``np.prod``, several microseconds, where the whole stride
    check takes well under one) is not computed for it (it was, ahead of the strides, since the size-one-dimension
    change). An empty array is still contiguous whatever its strides."""
    def no_nbytes(self):
        raise AssertionError("contiguous computed nbytes")

    monkeypatch.setattr(DeviceBuffer, "nbytes", property(no_nbytes))
    assert DeviceBuffer(4096, (4096, 20, 64), np.dtype(np.float32), (5120, 256, 4)).contiguous
    assert not DeviceBuffer(4096, (3, 5), np.dtype(np.float32), (4, 12)).contiguous
    assert DeviceBuffer(4096, (0, 5), np.dtype(np.float32), (4, 4)).contiguous
    assert DeviceBuffer(4096, (0, 5), np.dtype(np.float32), (4,)).contiguous  # (strides of another rank: no element)


def test_a_device_buffer_passes_through_and_is_cheap_to_make():
    b = DeviceBuffer(256, (2, 2), np.dtype(np.int64), None)
    assert device_buffer(b) is b
    b.ptr = 512  # not frozen (a frozen dataclass's __init__ is several times slower on the ops' per-call path)
    assert b.ptr == 512


def test_host_arrays_are_refused_by_name():
    with pytest.raises(TypeError, match="feed must be a CUDA device array .* got ndarray"):
        device_buffer(np.zeros(3), "feed")
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="mask must be a CUDA device array .* got Tensor"):
        device_buffer(torch.zeros(3), "mask")  # a CPU tensor: not read from its attributes


def test_torch_dtypes_map_to_the_storage_dtypes():
    torch = pytest.importorskip("torch")
    from dwdp_ops.interop import _torch_types

    tensor, dtypes, _, _ = _torch_types()
    assert tensor is torch.Tensor
    assert dtypes[torch.bfloat16] == np.uint16  # bf16 as its bits, the library's convention (normalize_dtype)
    assert dtypes[torch.float8_e4m3fn] == np.uint8
    assert dtypes[torch.float32] == np.float32 and dtypes[torch.int64] == np.int64


def test_normalize_dtype_takes_every_torch_dtype_numpy_has():
    """``torch.bfloat16`` and ``torch.float8_e4m3fn`` were taken (by name) but ``torch.float32``, ``torch.int64`` and
    ``torch.bool`` refused ("dtype torch.float32 is not supported"): ``symmetric_empty(shape, torch.float32)`` failed
    where ``torch.bfloat16`` worked. A torch dtype without a numpy form is still refused by name."""
    torch = pytest.importorskip("torch")
    from dwdp_ops.interop import normalize_dtype

    for t, want in ((torch.float32, "float32"), (torch.float16, "float16"), (torch.int64, "int64"),
                    (torch.int32, "int32"), (torch.uint8, "uint8"), (torch.bool, "bool"), (torch.half, "float16")):
        assert normalize_dtype(t) == (np.dtype(want), want)
    assert normalize_dtype(torch.bfloat16) == (np.dtype(np.uint16), "bfloat16")
    assert normalize_dtype(torch.float8_e4m3fn) == (np.dtype(np.uint8), "float8_e4m3fn")
    for t in (torch.float8_e5m2, torch.complex32):
        with pytest.raises(TypeError, match=f"dtype {t} is not supported"):
            normalize_dtype(t)
    assert normalize_dtype(np.float32) == normalize_dtype("float32") == (np.dtype(np.float32), "float32")


@pytest.mark.parametrize("dtype", [">f4", ">i8", "U3", "S2", "M8[s]", "m8[ms]", "V4", [("a", "<i4")]])
def test_normalize_dtype_refuses_what_a_device_cannot_compute_on(dtype):
    """A big-endian ``'>f4'`` was taken as storage ``>f4`` named 'float32' (``symmetric_empty(n, '>f4')`` allocated a
    CuPy array whose bytes every GPU kernel and DLPack consumer reads little-endian); strings, datetimes and records
    were taken too. Refused by name; the native forms of the same types still pass."""
    from dwdp_ops.interop import normalize_dtype

    with pytest.raises(TypeError, match=r"dtype .* is not supported: use a native-byte-order bool, integer, float"):
        normalize_dtype(dtype)
    for ok in ("<f4", "=i8", "|u1", "?", "c8"):
        dt = np.dtype(ok)
        assert normalize_dtype(ok) == (dt, dt.name)


def test_stream_handles_from_every_kind_of_stream():
    class CupyLike:
        ptr = 11

    class TorchLike:
        cuda_stream = 12

    class Protocol:
        def __cuda_stream__(self):
            return 0, 13

    assert [stream_handle(s) for s in (CupyLike(), TorchLike(), Protocol(), 14)] == [11, 12, 13, 14]
    with pytest.raises(TypeError, match="stream must be a CuPy/PyTorch/cuda.core stream or an integer handle"):
        stream_handle("default")


def test_a_numpy_integer_is_an_integer_handle():
    """A handle read from an array (np.int64, np.uint64) had been refused ("got int64"), though the docstring takes
    an integer handle and the package's checks take numpy integers (``_checks.is_int``); numpy bools stay refused."""
    assert stream_handle(np.int64(14)) == 14 and stream_handle(np.uint64(2**40)) == 2**40
    assert type(stream_handle(np.int64(14))) is int
    with pytest.raises(TypeError, match="integer handle, got bool"):
        stream_handle(np.True_)


@pytest.mark.parametrize("bad", [-1, 2**64, -(2**70), np.int64(-3)])
def test_an_integer_handle_outside_a_pointer_is_named(bad):
    """A negative or a 65-bit integer handle went through and reached the bindings, which refused it with pybind11's
    "incompatible function arguments" naming no argument (or a negative one could be read as a huge pointer). It is a
    ValueError naming the stream and the range now; 0 and 2**64 - 1 are handles."""
    with pytest.raises(ValueError, match=r"stream: an integer handle must be in \[0, 2\*\*64\)"):
        stream_handle(bad)
    assert stream_handle(0) == 0 and stream_handle(2**64 - 1) == 2**64 - 1


def test_a_bool_and_a_non_cuda_torch_stream_are_not_streams():
    """``True`` read as handle 1 (the legacy default stream) and ``torch.Stream``, what
    ``torch.accelerator.current_stream()`` returns, was refused even on CUDA (its CUDA case: tests/test_gpu_torch_ops.py)."""
    for flag in (True, False):
        with pytest.raises(TypeError, match=f"an integer handle, got bool {flag}"):
            stream_handle(flag)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="stream must be a CUDA stream, got a torch.Stream on cpu"):
        stream_handle(torch.Stream("cpu"))


def test_a_torch_dtype_without_a_device_form_is_named():
    """PyTorch's ``__cuda_array_interface__`` raises KeyError for a dtype it has no type string for (float8_e5m2 on a
    CUDA tensor; this stand-in raises the same way): a TypeError names the argument and what the library reads."""

    class E5m2Tensor:
        dtype = "torch.float8_e5m2"

        @property
        def __cuda_array_interface__(self):
            raise KeyError(self.dtype)

    with pytest.raises(TypeError, match="weights has dtype torch.float8_e5m2, which the library cannot read: use "
                                        "float16, float32"):
        device_buffer(E5m2Tensor(), "weights")


def test_a_raw_handle_becomes_a_cupy_stream_without_the_deprecated_wrapper():
    cupy = pytest.importorskip("cupy")
    import warnings

    if not hasattr(cupy.cuda.Stream, "from_external"):
        pytest.skip("CuPy < 14: ExternalStream is the only wrapper (and not deprecated there)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # CuPy 14 deprecates ExternalStream
        s = cupy_stream(0xABC0)
    assert isinstance(s, cupy.cuda.Stream) and s.ptr == 0xABC0
    assert cupy_stream(0) is cupy.cuda.Stream.null


@pytest.mark.gpu
def test_cupy_arrays_and_torch_tensors_read_like_their_interface():
    """The attribute paths give what ``__cuda_array_interface__`` gives: pointers of offset views, byte strides of
    transposed views, empty arrays' pointer 0; a bf16 tensor reads as uint16 bits (its interface has no bf16)."""
    import cupy as cp

    def via_interface(a):
        c = a.__cuda_array_interface__
        return c["data"][0], tuple(c["shape"]), np.dtype(c["typestr"]), c.get("strides")

    a = cp.arange(60, dtype=cp.float32).reshape(6, 10)
    for v in (a, a[2:], a.T, a[:, 3:7], a[:0]):
        b, want = device_buffer(v), via_interface(v)
        assert (b.ptr, b.shape, b.dtype) == want[:3]
        assert b.strides == want[3] or (b.strides is None and v.flags.c_contiguous)
    torch = pytest.importorskip("torch")
    t = torch.arange(60, dtype=torch.float32, device="cuda").reshape(6, 10)
    for v in (t, t[2:], t.T, t[:, 3:7], t[:0], t.to(torch.int64)):
        b, want = device_buffer(v), via_interface(v)
        assert (b.ptr, b.shape, b.dtype) == want[:3]
        assert b.strides == want[3] or (b.strides is None and v.is_contiguous())
    h = device_buffer(t.to(torch.bfloat16))
    assert h.dtype == np.uint16 and h.shape == (6, 10) and h.strides is None
    g = t.clone().requires_grad_()  # refused under grad mode, as its interface refuses it (raw writes bypass autograd)
    with pytest.raises(TypeError, match="weights requires grad: pass weights.detach()"):
        device_buffer(g, "weights")
    with torch.no_grad():
        assert device_buffer(g).ptr == g.data_ptr()
    with pytest.raises(TypeError, match="sparse must be a CUDA device array"):  # not strided: no address to read
        device_buffer(t.to_sparse(), "sparse")
