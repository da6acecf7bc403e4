"""Review of the host-side planning modules: bad input that crashed deep inside or gave a silent wrong answer."""

from __future__ import annotations

import numpy as np
import pytest
from dwdp_ops.env import DistEnv
from dwdp_ops.interop import DeviceBuffer, device_buffer, normalize_dtype, stream_handle
from dwdp_ops.schedule import Copy, order_copies, slice_copy


class _Cai:
    """A fake device array: only ``__cuda_array_interface__``."""

    def __init__(self, **cai):
        self.__cuda_array_interface__ = {"data": (4096, False), "shape": (2,), "typestr": "<f4", "version": 3, **cai}


def test_device_buffer_nbytes_does_not_wrap_around():
    """``np.prod(shape, dtype=int64)`` wrapped: 2**32 x 2**32 float32 elements read as 0 bytes."""
    b = DeviceBuffer(4096, (2**32, 2**32), np.dtype(np.float32), None)
    assert b.nbytes == 2**66
    assert DeviceBuffer(4096, (3, 5), np.dtype(np.float32), None).nbytes == 60
    assert DeviceBuffer(4096, (np.int64(3), np.int64(5)), np.dtype(np.int16), None).nbytes == 30


def test_normalize_dtype_refuses_none():
    """``np.dtype(None)`` is float64: a missing dtype silently became float64."""
    with pytest.raises(TypeError, match="dtype None"):
        normalize_dtype(None)


@pytest.mark.parametrize("handle", [-5, 2**64, None, 1.5])
def test_stream_objects_handles_are_checked(handle):
    """A stream object's handle (``.ptr``, ``.cuda_stream``, ``__cuda_stream__``) went through unchecked: a negative
    one or one of 2**64 and more came back as the handle; None met a bare int() TypeError."""

    class Ptr:
        ptr = handle

    class Cs:
        cuda_stream = handle

    class Proto:
        def __cuda_stream__(self):
            return 0, handle

    for s in (Ptr(), Cs(), Proto()):
        exc = TypeError if handle is None or isinstance(handle, float) else ValueError
        with pytest.raises(exc, match="stream"):
            stream_handle(s)


def test_stream_objects_good_handles_pass():
    class Ptr:
        ptr = np.uint64(2**64 - 1)

    class Proto:
        def __cuda_stream__(self):
            return 0, 7

    assert stream_handle(Ptr()) == 2**64 - 1
    assert stream_handle(Proto()) == 7


@pytest.mark.parametrize("cai, exc, match", [
    ({"data": None}, TypeError, "data"),
    ({"typestr": "|O"}, TypeError, "typestr"),
    ({"typestr": ">f4"}, TypeError, "typestr"),
    ({"typestr": "zz"}, TypeError, "typestr"),
    ({"shape": (-2,)}, ValueError, "shape"),
    ({"data": (-1, False)}, ValueError, "pointer"),
    ({"mask": "not none"}, TypeError, "mask"),
])
def test_device_buffer_checks_the_interface(cai, exc, match):
    """A malformed or unsupported ``__cuda_array_interface__`` gave a bare KeyError / int() TypeError, or a
    DeviceBuffer of an object / big-endian dtype, a negative extent or pointer, or one that ignored a mask."""
    with pytest.raises(exc, match=match) as ei:
        device_buffer(_Cai(**cai), "x")
    assert "x" in str(ei.value)


def test_device_buffer_missing_key_is_named():
    obj = _Cai()
    del obj.__cuda_array_interface__["data"]
    with pytest.raises(TypeError, match="'data'"):
        device_buffer(obj, "x")


def test_device_buffer_good_interface():
    b = device_buffer(_Cai(shape=(3, 5), strides=(20, 4), mask=None), "x")
    assert (b.ptr, b.shape, b.dtype, b.strides) == (4096, (3, 5), np.dtype(np.float32), (20, 4))


def test_launchers_local_values_must_agree():
    """Both launcher sets present: only rank and size were compared, so a disagreeing local rank (another GPU) was
    taken silently from torchrun's set (docs/environment.md: "when both sets are present they must agree")."""
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(ValueError, match="launcher environments disagree.*LOCAL_RANK=1.*OMPI_COMM_WORLD_LOCAL_RANK=0"):
        DistEnv.from_environ(env)
    env["OMPI_COMM_WORLD_LOCAL_RANK"] = "1"
    assert DistEnv.from_environ(env).local_rank == 1


@pytest.mark.parametrize("copy, exc", [
    (Copy("1", 0, 0, 5), TypeError),
    (Copy(None, 0, 0, 5), TypeError),
    (Copy(1, None, 0, 5), TypeError),
    (Copy(1, 0.5, 0, 5), TypeError),
    (Copy(1, 0, "0", 5), TypeError),
    (Copy(1, -4, 0, 5), ValueError),
    (Copy(1, 0, -4, 5), ValueError),
])
@pytest.mark.parametrize("schedule", ["per_peer", "staggered", "interleaved"])
def test_copies_fields_are_checked(copy, exc, schedule):
    """Only ``nbytes`` was checked: a str peer was silently ordered as a non-peer, a None peer / dst crashed in
    ``sorted`` ('<' not supported), a float dst was sliced into float addresses."""
    with pytest.raises(exc, match="copy"):
        order_copies([copy, Copy(1, 100, 100, 5)], 0, 2, schedule, 2)
    with pytest.raises(exc, match="copy"):
        slice_copy(copy, 2)


def test_device_buffer_takes_raw_bf16_bytes():
    """PyTorch exports bf16 as '<V2' (``dispatch._bf16`` takes it): still accepted."""
    assert device_buffer(_Cai(typestr="<V2"), "x").dtype == np.dtype("V2")


def test_writable_path_refuses_a_nul_byte():
    """'out\\0.json' passed (os.path.isdir / exists answer False for it) and open() failed only at the run's end
    ('embedded null byte'); the CLI now stops at parsing, exit 2."""
    import argparse

    from dwdp_ops._cli import writable_path

    with pytest.raises(argparse.ArgumentTypeError, match="NUL"):
        writable_path("out\0.json")
    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--json", type=writable_path)
    with pytest.raises(SystemExit) as ei:
        parser.parse_args(["--json", "out\0.json"])
    assert ei.value.code == 2


def test_timeout_too_large_for_a_float_is_named():
    """``init(timeout=10**400)``: float() raised a bare OverflowError ('int too large to convert to float') instead of
    the ValueError naming the timeout and the limit."""
    from dwdp_ops.env import timeout_from_environ

    with pytest.raises(ValueError, match="timeout must be at most"):
        timeout_from_environ(10**400)
