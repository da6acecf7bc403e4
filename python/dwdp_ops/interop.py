"""Framework-neutral views of device memory and streams.

Arrays are accepted from anything that exposes ``__cuda_array_interface__`` (CuPy, PyTorch, Numba); CuPy arrays and
PyTorch tensors are read from their attributes instead (the same values without building the interface dict: the
fused ops read several arrays per call); streams from CuPy (``.ptr``), PyTorch (``torch.cuda.Stream``'s
``.cuda_stream``, or a CUDA ``torch.Stream``), cuda-python / cuda.core (``__cuda_stream__``) or a raw integer handle.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._checks import is_bool, is_int

FP8_NAMES = {"float8_e4m3fn", "e4m3", "fp8", "float8_e4m3"}


@dataclass(slots=True)
class DeviceBuffer:
    """Pointer, size and layout of a device array (``strides`` in bytes, None when C-contiguous), and its CUDA device
    when the maker knows it (None: look it up from the pointer where it matters). Not frozen: a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__``, several times slower, and this record is made for
    every array of every fused call. A caller that has checked its arrays already may pass DeviceBuffers to the fused
    ops (``device_buffer`` returns one as it is): the autograd op does, so that a training step reads each tensor's
    attributes once."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    strides: tuple[int, ...] | None
    device: int | None = None

    @property
    def nbytes(self) -> int:
        # (Python ints: an int64 product wrapped around, 2**32 x 2**32 elements read as 0 bytes)
        return math.prod(int(n) for n in self.shape) * self.dtype.itemsize

    @property
    def contiguous(self) -> bool:
        """C-contiguous: every dimension of more than one element at its C stride (a dimension of one element may
        have any stride, as NumPy and PyTorch take it: a producer's ``__cuda_array_interface__`` may report one)."""
        if self.strides is None or 0 in self.shape or self.dtype.itemsize == 0:  # (no element: not nbytes' np.prod)
            return True
        if len(self.strides) != len(self.shape):
            return False
        acc = self.dtype.itemsize
        for n, st in zip(reversed(self.shape), reversed(self.strides)):
            if n > 1 and st != acc:
                return False
            acc *= n
        return True


_CUPY_NDARRAY: Any = None


def _cupy_ndarray() -> Any:
    """``cupy.ndarray`` (False without CuPy), imported once."""
    global _CUPY_NDARRAY
    if _CUPY_NDARRAY is None:
        try:
            import cupy

            _CUPY_NDARRAY = cupy.ndarray
        except ImportError:
            _CUPY_NDARRAY = False
    return _CUPY_NDARRAY


_TORCH: Any = None  # (torch.Tensor, {torch dtype: numpy storage dtype}, ...) once torch is imported


def _torch_types() -> Any:
    """``(torch.Tensor, dtype map, torch.strided, torch.is_grad_enabled)`` if the process has imported torch (never
    imports it), else None. The map gives the storage dtype the library uses: bf16 as uint16 bits and fp8 e4m3 as
    uint8 bytes (``normalize_dtype``)."""
    global _TORCH
    if _TORCH is None:
        torch = sys.modules.get("torch")
        if torch is None or not hasattr(torch, "Tensor"):
            return None
        names = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": np.uint16,
                 "float8_e4m3fn": np.uint8, "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8,
                 "uint8": np.uint8, "bool": np.bool_}
        _TORCH = (torch.Tensor, {getattr(torch, n): np.dtype(t) for n, t in names.items() if hasattr(torch, n)},
                  torch.strided, torch.is_grad_enabled)
    return _TORCH


def device_buffer(obj: Any, name: str = "array") -> DeviceBuffer:
    """Reads ``__cuda_array_interface__``; a TypeError names the argument when the object is not a device array, or
    is a CUDA tensor of a dtype neither path can read (float8_e5m2, for one).
    CuPy arrays and strided CUDA PyTorch tensors (of the dtypes in ``_torch_types``; bf16 reads as uint16 bits, fp8
    e4m3 as uint8 bytes) are read from their attributes: the same values, without building the interface dict (this
    runs on the fused ops' per-call path). A tensor that requires grad is refused (TypeError) while grad mode is on,
    as its interface refuses it: the ops write through raw addresses, which autograd cannot see (inside an
    ``autograd.Function``'s forward and backward grad mode is off). A ``DeviceBuffer`` is returned as it is."""
    nd = _cupy_ndarray()
    if nd and type(obj) is nd:
        # the interface reports pointer 0 for an empty array; so does this path (a view's data.ptr may not be 0)
        return DeviceBuffer(obj.data.ptr if obj.size else 0, obj.shape, obj.dtype,
                            None if obj.flags.c_contiguous else obj.strides)
    if type(obj) is DeviceBuffer:
        return obj
    tt = _torch_types()
    if tt is not None and isinstance(obj, tt[0]):
        dt = tt[1].get(obj.dtype)
        if dt is not None and obj.is_cuda and obj.layout is tt[2]:
            if obj.requires_grad and tt[3]():
                # (as its interface does: the library's ops write through raw addresses, outside autograd)
                raise TypeError(f"{name} requires grad: pass {name}.detach() (the library's ops are not tracked by "
                                "autograd; dwdp_ops.coaction.coaction is the differentiable co-action op)")
            return DeviceBuffer(obj.data_ptr() if obj.numel() else 0, tuple(obj.shape), dt,
                                None if obj.is_contiguous() else tuple(v * dt.itemsize for v in obj.stride()))
    try:
        cai = getattr(obj, "__cuda_array_interface__", None)
    except KeyError:
        # PyTorch's interface has no type string for some dtypes (float8_e5m2, float8_e4m3fnuz, ...): its dict lookup
        # raises KeyError, which getattr's default does not catch
        raise TypeError(f"{name} has dtype {getattr(obj, 'dtype', '?')}, which the library cannot read: use float16, "
                        "float32, float64, bfloat16, float8_e4m3fn, complex64/128, bool or an integer dtype") from None
    if cai is None:
        raise TypeError(
            f"{name} must be a CUDA device array (CuPy, PyTorch, Numba: anything with __cuda_array_interface__), "
            f"got {type(obj).__name__}"
        )
    return _from_interface(cai, name)


def _from_interface(cai: Any, name: str) -> DeviceBuffer:
    """A DeviceBuffer of a ``__cuda_array_interface__`` dict, or TypeError / ValueError naming ``name`` and the
    field: a missing key, a data pointer or extent that is not an int >= 0, a dtype that is not a native-byte-order
    number or bool (``normalize_dtype``'s rule) or plain bytes (``<V2``: bf16 bits), a mask (not supported: every
    element would be read as valid)."""
    try:
        data, shape, typestr = cai["data"], cai["shape"], cai["typestr"]
    except (KeyError, TypeError) as e:
        raise TypeError(f"{name}: its __cuda_array_interface__ lacks {e} (needs 'data', 'shape' and 'typestr')") \
            from None
    try:
        ptr = data[0]
        shape = tuple(shape)
        ok = is_int(ptr) and all(is_int(n) for n in shape)
    except (TypeError, IndexError):
        ok = False
    if not ok:
        raise TypeError(f"{name}: __cuda_array_interface__ 'data' must be (pointer, read_only) and 'shape' a tuple "
                        f"of ints, got data={data!r}, shape={cai['shape']!r}")
    if ptr < 0 or any(n < 0 for n in shape):
        raise ValueError(f"{name}: __cuda_array_interface__ has a negative pointer or extent: pointer {ptr}, shape "
                         f"{shape}")
    try:
        dt = np.dtype(typestr)
    except (TypeError, ValueError):
        dt = None
    raw = dt is not None and dt.kind == "V" and dt.names is None and dt.subdtype is None  # '<V2': PyTorch's bf16
    if dt is None or not (raw or (dt.kind in "biufc" and dt.isnative)):
        raise TypeError(f"{name}: __cuda_array_interface__ typestr {typestr!r} is not supported: use a "
                        "native-byte-order bool, integer, float or complex dtype (or raw bytes '<V2' of bf16)")
    if cai.get("mask") is not None:
        raise TypeError(f"{name}: a masked array (__cuda_array_interface__ 'mask') is not supported")
    return DeviceBuffer(int(ptr), tuple(int(n) for n in shape), dt, cai.get("strides"))


def normalize_dtype(dtype: Any) -> tuple[np.dtype, str]:
    """(storage dtype, logical name) of a numpy dtype (or its name) or a torch dtype. fp8 e4m3 is stored as uint8
    bytes; its logical name is 'float8_e4m3fn'. A torch dtype is read by its name (``torch.float32`` as float32), so
    one without a numpy form (``torch.float8_e5m2``, ``torch.complex32``) is a TypeError, and so is a numpy dtype that
    is not a native-byte-order bool, integer, float or complex (``'>f4'``, strings, datetimes, records): GPU kernels,
    CuPy's arithmetic and DLPack read every element in the host's byte order."""
    if dtype is None:  # (np.dtype(None) is float64: a missing dtype became float64 silently)
        raise TypeError("dtype None is not supported: use a NumPy dtype, 'bfloat16' or 'float8_e4m3fn'")
    name = getattr(dtype, "__name__", None) or str(dtype)
    torch_dtype = name.startswith("torch.")
    name = name.replace("torch.", "")
    if name in FP8_NAMES:
        return np.dtype(np.uint8), "float8_e4m3fn"
    if name == "bfloat16":
        # CuPy has no bfloat16: store the bits as uint16, view them as bf16 in the consuming framework.
        return np.dtype(np.uint16), "bfloat16"
    try:
        dt = np.dtype(name if torch_dtype else dtype)
    except TypeError:
        raise TypeError(f"dtype {dtype!r} is not supported: use a NumPy dtype, 'bfloat16' or 'float8_e4m3fn'") from None
    if dt.hasobject or dt.itemsize == 0:
        raise TypeError(f"dtype {dt} cannot live in device memory")
    if dt.kind not in "biufc" or not dt.isnative:
        raise TypeError(f"dtype {dt.str!r} ({dt}) is not supported: use a native-byte-order bool, integer, float or "
                        "complex dtype, 'bfloat16' or 'float8_e4m3fn'")
    return dt, dt.name


def stream_handle(stream: Any) -> int:
    """The cudaStream_t of ``stream`` as an integer: a CuPy stream (``.ptr``), a ``torch.cuda.Stream``
    (``.cuda_stream``), a CUDA ``torch.Stream`` (what ``torch.accelerator.current_stream()`` returns: the
    ``cuda_stream`` of the ``torch.cuda.Stream`` of its ``stream_id`` / ``device_index``; ``stream_id`` itself is
    PyTorch's internal id, not a handle), a cuda.core stream (``__cuda_stream__``) or an integer handle (Python or
    numpy, in [0, 2**64): a ValueError otherwise); None means CuPy's current stream (the legacy default stream when CuPy
    is absent). A TypeError for anything else, a ``bool`` included (``True`` would read as handle 1, the legacy default
    stream), and for a ``torch.Stream`` of another device type."""
    if stream is None:
        try:
            import cupy

            return int(cupy.cuda.get_current_stream().ptr)
        except ImportError:
            return 0
    if is_bool(stream):
        raise TypeError(f"stream must be a CuPy/PyTorch/cuda.core stream or an integer handle, got bool {stream}")
    if is_int(stream):
        if not 0 <= int(stream) < 2**64:  # a cudaStream_t is a pointer: the bindings take it as uintptr_t
            raise ValueError(f"stream: an integer handle must be in [0, 2**64) (a cudaStream_t), got {int(stream)}")
        return int(stream)
    for attr in ("ptr", "cuda_stream"):
        if hasattr(stream, attr):
            return _object_handle(getattr(stream, attr), type(stream).__name__, attr)
    if hasattr(stream, "__cuda_stream__"):
        return _object_handle(stream.__cuda_stream__()[1], type(stream).__name__, "__cuda_stream__()")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(stream, getattr(torch, "Stream", ())):
        return _torch_stream_handle(torch, stream)
    raise TypeError(f"stream must be a CuPy/PyTorch/cuda.core stream or an integer handle, got {type(stream).__name__}")


def _object_handle(h: Any, kind: str, attr: str) -> int:
    """A stream object's handle, checked as an integer handle is (it went through unchecked: a negative one or one of
    2**64 and more reached the bindings, None met a bare int() TypeError)."""
    if not is_int(h):
        raise TypeError(f"stream: {kind}.{attr} must be an integer cudaStream_t, got {h!r} ({type(h).__name__})")
    if not 0 <= int(h) < 2**64:
        raise ValueError(f"stream: {kind}.{attr} must be a handle in [0, 2**64) (a cudaStream_t), got {int(h)}")
    return int(h)


def _torch_stream_handle(torch: Any, stream: Any) -> int:
    """The cudaStream_t of a generic ``torch.Stream`` (no ``cuda_stream`` attribute), refusing other device types."""
    if stream.device.type != "cuda":
        raise TypeError(f"stream must be a CUDA stream, got a torch.Stream on {stream.device}")
    # (the torch.cuda.Stream of the same stream, built from its ids as torch.cuda.current_stream builds one: no new
    # stream; newer releases also have torch.Stream.native_handle, this works in every release we support)
    s = torch.cuda.Stream(stream_id=stream.stream_id, device_index=stream.device_index, device_type=stream.device_type)
    return int(s.cuda_stream)


def cupy_stream(stream: Any):
    """A CuPy stream for ``stream`` (any handle ``stream_handle`` takes), for ``with cupy_stream(s): ...`` blocks: CuPy
    allocations, fills and copies inside the block are enqueued on ``s``, and a temporary freed afterwards returns to
    the memory pool of ``s`` (CuPy's pool is stream-ordered), so a later allocation can reuse it only behind the work
    already queued on ``s``."""
    import cupy

    if isinstance(stream, (cupy.cuda.Stream, cupy.cuda.ExternalStream)):
        return stream  # already one (no new wrapper object per call on hot paths)
    h = stream_handle(stream)
    if not h:
        return cupy.cuda.Stream.null
    if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy 14 (ExternalStream is deprecated there)
        return cupy.cuda.Stream.from_external(stream if hasattr(stream, "__cuda_stream__") else _RawStream(h))
    return cupy.cuda.ExternalStream(h)


class _RawStream:
    """A raw ``cudaStream_t`` as an object of the CUDA stream protocol (``__cuda_stream__``: version 0, handle)."""

    __slots__ = ("h",)

    def __init__(self, h: int):
        self.h = h

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self.h
