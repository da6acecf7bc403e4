"""Arrays on the NVSHMEM symmetric heap, peer views and one-sided gets.

``symmetric_empty`` returns a CuPy array (usable from PyTorch through DLPack, ``to_torch``). Allocation and freeing
are collective: every rank allocates the same shapes in the same order and frees them explicitly with
``free_symmetric`` (never through garbage collection, whose order differs between ranks). A freed array must not be
used again.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ._checks import is_int, launch_args
from .errors import DwdpError
from .interop import device_buffer, normalize_dtype, stream_handle
from .runtime import SymmetricBuffer, get_runtime

_LOGICAL: dict[int, str] = {}  # buffer ptr -> logical dtype name for byte-stored dtypes
_MAX_BYTES = 2**63 - 1  # an array's byte size is a signed 64-bit integer (CuPy's, NumPy's, a ptrdiff_t)


def _shape(shape: Any) -> tuple[int, ...]:
    """``shape`` (an int or a sequence of ints) as a tuple of positive ints. Extents must be integers
    (``numbers.Integral``, not bool): strings, floats and bools raise TypeError rather than being split or
    truncated; an empty shape or a non-positive extent raises ValueError."""
    if isinstance(shape, (str, bytes)):
        raise TypeError(f"shape must be an int or a sequence of ints, got the string {shape!r}")
    if isinstance(shape, (numbers.Integral, bool)):
        shape = (shape,)
    else:
        try:
            shape = tuple(shape)
        except TypeError:  # (a float, None, a 0-d array: "'float' object is not iterable" named no shape)
            raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r} "
                            f"({type(shape).__name__})") from None
    bad = [n for n in shape if not is_int(n)]
    if bad:
        raise TypeError(f"shape {shape} must hold ints, got {bad[0]!r} ({type(bad[0]).__name__})")
    if not shape or any(int(n) <= 0 for n in shape):
        raise ValueError(f"shape {shape} must be non-empty with positive extents")
    return tuple(int(n) for n in shape)


def _wrap(ptr: int, nbytes: int, shape, dtype, owner, strides=None):
    import cupy

    rt = get_runtime()
    mem = cupy.cuda.UnownedMemory(ptr, nbytes, owner, device_id=rt.device)
    return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(mem, 0), strides)


def symmetric_empty(shape: Any, dtype: Any = np.float32):
    """A CuPy array of ``shape`` on the symmetric heap, uninitialised. Collective: every rank passes the same shape
    and dtype, in the same order. fp8 e4m3 and bf16 are stored as uint8 / uint16 bits (``logical_dtype`` and
    ``to_torch`` recover them).

    ``shape``: an int or a sequence of positive ints. ``dtype``: a NumPy native-byte-order bool, integer, float or
    complex dtype, a torch dtype of one, ``'bfloat16'`` or ``'float8_e4m3fn'`` (``interop.normalize_dtype``).
    Returned: the caller owns it and frees it with ``free_symmetric`` (collective); usable once this call returns
    (the ranks have agreed on the allocation on the control plane). Raises TypeError for a shape that is not ints or
    an unsupported dtype, ValueError for an empty shape, a non-positive extent or more than ``2**63 - 1`` bytes
    (before anything is allocated), DwdpError before ``init()``, when the ranks ask for different shapes / dtypes,
    or when the allocation failed on any rank (every rank raises)."""
    shape = _shape(shape)
    storage, logical = normalize_dtype(dtype)
    nbytes = math.prod(shape) * storage.itemsize  # Python ints: an int64 product would wrap around
    if nbytes > _MAX_BYTES:
        raise ValueError(f"symmetric_empty: shape {shape} of {logical} is {nbytes} bytes, more than an array can "
                         f"address ({_MAX_BYTES})")
    buf = get_runtime().symmetric_alloc(nbytes, f"{logical}{list(shape)}")
    if logical != storage.name:
        _LOGICAL[buf.ptr] = logical
    return _wrap(buf.ptr, nbytes, shape, storage, buf)


def _buffer_of(array: Any, what: str) -> tuple[SymmetricBuffer, Any]:
    rt = get_runtime()
    rt.require(what)
    db = device_buffer(array, what)
    buf = rt.find_buffer(db.ptr, db.nbytes)
    if buf is None:
        raise DwdpError(f"{what}: the array at {db.ptr:#x} is not on the symmetric heap (or was freed)")
    return buf, db


def _pe(pe: Any, what: str, world: int) -> int:
    """``pe`` as an int in ``[0, world)``: TypeError unless an integer (bools, floats and strings are not PEs),
    ValueError outside the range."""
    if not is_int(pe):
        raise TypeError(f"{what}: pe must be an int in [0, {world}), got {pe!r} ({type(pe).__name__})")
    if not 0 <= pe < world:
        raise ValueError(f"{what}: pe {pe} is outside [0, {world})")
    return int(pe)


def free_symmetric(array: Any) -> None:
    """Frees the symmetric allocation that ``array`` (returned by ``symmetric_empty``, or a view of all of it) owns.
    Collective: every rank frees the same allocation, in the same order. A slice of it is refused (DwdpError), even
    one that starts where the allocation does; so are an array that is not on the heap (or was freed already) and a
    call before ``init()`` or after ``finalize()``. It synchronises this rank's device before freeing (work queued on
    any of its streams finishes first)."""
    buf, db = _buffer_of(array, "free_symmetric")
    if db.ptr != buf.ptr or db.nbytes != buf.nbytes:
        raise DwdpError("free_symmetric: pass the array returned by symmetric_empty, not a slice of it")
    get_runtime().symmetric_free(buf)
    _LOGICAL.pop(buf.ptr, None)


def logical_dtype(array: Any) -> str:
    """The dtype a symmetric array stands for ('float8_e4m3fn', 'bfloat16', or its own dtype's name)."""
    buf, db = _buffer_of(array, "logical_dtype")
    return _LOGICAL.get(buf.ptr, db.dtype.name)


def peer_view(array: Any, pe: int):
    """A CuPy array over ``pe``'s copy of the symmetric ``array`` (same shape, strides, offset), readable and
    writable by load/store from this GPU. Local (not collective; no copy: the view aliases the peer's memory, and
    ordering against the peer's writes is the caller's). Raises DwdpError when ``pe`` is not P2P-reachable (use
    ``getmem`` there) or ``array`` is not on the symmetric heap, TypeError for a ``pe`` that is not an int,
    ValueError for one outside ``[0, world_size)``."""
    rt = get_runtime()
    buf, db = _buffer_of(array, "peer_view")
    pe = _pe(pe, "peer_view", rt.world_size())
    base = rt.backend.symmetric_peer_ptr(buf.ptr, pe)
    if base == 0:
        raise DwdpError(
            f"peer_view: PE {pe} is not reachable by load/store from PE {rt.rank()} (no P2P/NVLink mapping); "
            "use dwdp_ops.getmem"
        )
    off = db.ptr - buf.ptr
    return _wrap(base + off, db.nbytes, db.shape, db.dtype, buf, db.strides)


def getmem(dst: Any, src: Any, pe: int, *, stream: Any = None, num_blocks: int = 32, threads: int = 512) -> None:
    """One-sided NVSHMEM get on ``stream``: ``dst`` (any contiguous device array on this GPU) receives the bytes of
    ``pe``'s copy of the symmetric array ``src``. An SM-driven kernel of ``num_blocks`` blocks (an int in [1, 65535])
    of ``threads`` threads (a multiple of 32 in [32, 1024]); no host sync. Local and one-sided: ``pe`` takes no
    part (it must have written ``src`` before, ordered by a barrier or the like).

    ``dst``: caller-allocated, contiguous, of exactly ``src``'s byte size (its dtype and shape are not compared: the
    bytes are copied); it holds the data once ``stream``'s work up to this call has run. ``src``: a contiguous array
    on the symmetric heap (or a slice of one). Raises ValueError for a non-contiguous array or a size mismatch,
    DwdpError when ``src`` is not on the heap (or before ``init()``), TypeError for a ``dst`` that is not a device
    array, TypeError / ValueError for a ``pe``, ``num_blocks`` or ``threads`` that is not an int / out of range."""
    rt = get_runtime()
    _, s = _buffer_of(src, "getmem")
    d = device_buffer(dst, "getmem dst")
    if not (s.contiguous and d.contiguous):
        raise ValueError("getmem: src and dst must be contiguous")
    if d.nbytes != s.nbytes:
        raise ValueError(f"getmem: dst holds {d.nbytes} bytes but src holds {s.nbytes}")
    pe = _pe(pe, "getmem", rt.world_size())
    launch_args("getmem", num_blocks=num_blocks, threads=threads)
    rt.backend.getmem(d.ptr, s.ptr, s.nbytes, pe, stream_handle(stream), int(num_blocks), int(threads))


def to_torch(array: Any):
    """A PyTorch tensor sharing ``array``'s memory (DLPack, no copy: same shape; the array stays the owner, so
    the tensor must not outlive ``free_symmetric``), viewed as its logical dtype (fp8 e4m3, bf16) when ``array`` is
    a live symmetric allocation; any other CUDA device array keeps its own dtype. Local."""
    import torch

    t = torch.from_dlpack(array)
    rt = get_runtime()
    db = device_buffer(array, "to_torch")
    buf = rt.find_buffer(db.ptr, db.nbytes) if rt.state == "initialized" else None
    logical = _LOGICAL.get(buf.ptr) if buf is not None else None
    if logical == "float8_e4m3fn":
        t = t.view(torch.float8_e4m3fn)
    elif logical == "bfloat16":
        t = t.view(torch.bfloat16)
    return t
