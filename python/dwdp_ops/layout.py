"""Packed expert layout of one MoE layer (pure host logic).

Each weight tensor kind of an expert (``w13`` = gate and up, ``[2*I, H]``; ``w2`` = down, ``[H, I]``) has its own
layout: expert e of a layer sits at ``e * stride`` where ``stride`` is its byte size rounded up to the VMM page
(2 MiB). Any run of experts is therefore a run of whole pages, which is what lets a rank map its local experts and
the fetched ones into one contiguous per-layer view (the ``composite`` mode) without copying. For DeepSeek-R1 the
strides are exact (fp8 ``w13`` 28 MiB, ``w2`` 14 MiB; bf16 twice that), so nothing is inflated; ``inflation`` reports
the padding for other shapes.

The fp8 block scales (fp32, one per 128x128 block) are tiny (10.5 KiB per R1 expert, 2.7 MiB per layer): they are
kept whole on every rank (as TensorRT-LLM all-gathers them at set-up) instead of being fetched, so they never break
page alignment and cost no fetch traffic.

A rank's local experts of one (layer, tensor kind) form one physical allocation, registered symmetric with NVSHMEM
so that peers read it one-sidedly. One allocation each because ``cuMemMap`` maps an allocation only from offset 0,
and the same allocation is mapped a second time, whole, into the layer's composite range (partial mappings are refused
too). NVSHMEM registers buffers in units of ``NVSHMEM_CUMEM_GRANULARITY`` (512 MiB by default, which refuses smaller
buffers); ``dwdp_ops.init`` sets it to 2 MiB, so the blocks need no padding: ``registration_overhead(layout, L, unit)``
is 0 for the 2 MiB unit the store passes (the backend's ``register_unit()``) and a page that is a multiple of
2 MiB. With this module's default ``unit = REGISTER_UNIT`` (512 MiB, NVSHMEM's own default) it is not, e.g. 2.05 for
R1 fp8 with 8 local experts (``registration_overhead(ExpertLayout.moe(7168, 2048), 8)``).

Validation: a ``TensorSpec`` needs a non-empty string name, a non-empty shape of positive integers (Python or numpy
integers; bools, floats and strings are refused) and a dtype from ``DTYPES``; an ``ExpertLayout`` needs a page that
is a positive integer multiple of 16 bytes; expert counts (``experts_per_rank``) and registration units are
positive integers. Wrong types raise TypeError (a dtype that is not a string included), wrong values ValueError,
each naming the value and what is expected. ``ExpertLayout.check_page(granularity)`` checks the page against a VMM
allocation granularity (a page that is not a multiple of it cannot be mapped page by page).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._checks import is_int

PAGE = 2 << 20
REGISTER_UNIT = 512 << 20
FP8_BLOCK = 128
DTYPES = {
    "float32": (np.dtype(np.float32), 4),
    "float16": (np.dtype(np.float16), 2),
    "bfloat16": (np.dtype(np.uint16), 2),
    "float8_e4m3fn": (np.dtype(np.uint8), 1),
}


def round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def _positive_int(value, what: str) -> int:
    """``value`` as an int, or TypeError (not an integer; bools are refused) / ValueError (not >= 1) naming it."""
    if not is_int(value):
        raise TypeError(f"{what} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value}")
    return int(value)


def _check_dtype(dtype) -> None:
    """TypeError unless ``dtype`` is a string (a numpy / torch dtype is refused: ``bfloat16`` and ``float8_e4m3fn``
    are stored as other numpy types, so the name is the only unambiguous spelling); ValueError unless it is in
    ``DTYPES``."""
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be one of {sorted(DTYPES)} (a string), got {dtype!r} ({type(dtype).__name__})")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


@dataclass(frozen=True)
class TensorSpec:
    """One per-expert weight tensor: logical dtype name, storage dtype (bytes of fp8 / bf16 bits), shape."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"a tensor name must be a string, got {self.name!r} ({type(self.name).__name__})")
        if not self.name:
            raise ValueError("a tensor name must be a non-empty string, got ''")
        if isinstance(self.shape, (str, bytes)) or not isinstance(self.shape, (tuple, list)):
            raise TypeError(f"shape of {self.name!r} must be a tuple of positive integers, got {self.shape!r}")
        if not self.shape:
            raise ValueError(f"shape of {self.name!r} must have at least one dimension, got ()")
        shape = tuple(_positive_int(d, f"every dimension of {self.name!r} (shape {tuple(self.shape)!r})")
                      for d in self.shape)
        object.__setattr__(self, "shape", shape)
        _check_dtype(self.dtype)

    @property
    def storage(self) -> np.dtype:
        return DTYPES[self.dtype][0]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


@dataclass(frozen=True)
class ExpertLayout:
    """Byte layout of one layer's experts, per tensor kind. Invariant: every stride is a multiple of ``page``."""

    tensors: tuple[TensorSpec, ...]
    page: int = PAGE

    def __post_init__(self) -> None:
        if not isinstance(self.tensors, (tuple, list)) or not all(isinstance(t, TensorSpec) for t in self.tensors):
            raise TypeError(f"tensors must be a tuple of TensorSpec, got {self.tensors!r}")
        if not self.tensors:
            raise ValueError("an expert layout needs at least one tensor")
        object.__setattr__(self, "tensors", tuple(self.tensors))
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError(f"tensor names must be unique, got {names}")
        page = _positive_int(self.page, "page (bytes)")
        if page % 16:
            raise ValueError(f"page must be a positive multiple of 16 bytes, got {page}")
        object.__setattr__(self, "page", page)

    def check_page(self, granularity: int) -> None:
        """Raises ValueError unless ``page`` is a multiple of ``granularity`` (bytes), e.g. the VMM allocation
        granularity ``cuMemGetAllocationGranularity`` reports (2 MiB on H100/H200): only then is every expert run a
        run of whole mappable pages. TypeError / ValueError when ``granularity`` is not a positive integer."""
        g = _positive_int(granularity, "granularity (bytes)")
        if self.page % g:
            raise ValueError(
                f"the layout page ({self.page} bytes) is not a multiple of the VMM allocation granularity ({g} bytes); "
                f"use a page that is, e.g. {round_up(self.page, g)}")

    @classmethod
    def moe(cls, hidden: int, intermediate: int, dtype: str = "float8_e4m3fn", page: int = PAGE) -> ExpertLayout:
        """The DeepSeek layout: w13 ``[2*I, H]`` and w2 ``[H, I]`` per expert."""
        _check_dtype(dtype)
        hidden = _positive_int(hidden, "hidden")
        intermediate = _positive_int(intermediate, "intermediate")
        w13 = TensorSpec("w13", (2 * intermediate, hidden), dtype)
        return cls((w13, TensorSpec("w2", (hidden, intermediate), dtype)), page)

    def index(self, name: str) -> int:
        for i, t in enumerate(self.tensors):
            if t.name == name:
                return i
        raise KeyError(f"no tensor {name!r} in this layout; tensors are {[t.name for t in self.tensors]}")

    def stride(self, name: str) -> int:
        return round_up(self.tensors[self.index(name)].nbytes, self.page)

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(round_up(t.nbytes, self.page) for t in self.tensors)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (what an engine reads)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def expert_stride(self) -> int:
        """Bytes one expert occupies in the layout (what a fetch moves)."""
        return sum(self.strides)

    @property
    def inflation(self) -> float:
        """Fraction of extra bytes a fetch moves because of page padding."""
        return self.expert_stride / self.expert_bytes - 1.0

    def tensor_offset(self, name: str, experts_per_rank: int) -> int:
        """Offset of a tensor kind's block inside one layer's local region: all local w13 first, then all w2.
        ``experts_per_rank``: a positive integer (TypeError / ValueError otherwise); the offset is >= 0."""
        experts_per_rank = _positive_int(experts_per_rank, "experts_per_rank")
        i = self.index(name)
        return experts_per_rank * sum(self.strides[:i])


def fp8_scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Shape of the fp32 block-scale tensor of an ``[out, in]`` fp8 weight (one scale per 128x128 block):
    ``(ceil(out / 128), ceil(in / 128))``, ints. ``shape``: a tuple or list of two positive integers (Python or numpy;
    TypeError / ValueError naming it otherwise)."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (tuple, list)):
        raise TypeError(f"shape must be a 2-D [out, in] tuple of positive integers, got {shape!r}")
    if len(shape) != 2:
        raise ValueError(f"shape must be a 2-D [out, in] tuple of positive integers, got {tuple(shape)!r} "
                         f"({len(shape)} dimensions)")
    out, inner = (_positive_int(d, f"every dimension of the weight shape {tuple(shape)!r}") for d in shape)
    return (-(-out // FP8_BLOCK), -(-inner // FP8_BLOCK))


def local_allocation_bytes(layout: ExpertLayout, name: str, experts_per_rank: int, unit: int = REGISTER_UNIT) -> int:
    """Size of the registered allocation that holds one layer's local experts of tensor kind ``name``: their bytes
    rounded up to ``unit`` (bytes; default ``REGISTER_UNIT``, NVSHMEM's 512 MiB: pass the backend's unit). An int;
    ``experts_per_rank`` and ``unit`` must be positive integers (TypeError / ValueError naming them otherwise)."""
    experts_per_rank = _positive_int(experts_per_rank, "experts_per_rank")
    unit = _positive_int(unit, "unit (bytes)")
    return round_up(experts_per_rank * layout.stride(name), unit)


def registration_overhead(layout: ExpertLayout, experts_per_rank: int, unit: int = REGISTER_UNIT) -> float:
    """Extra local memory the registration unit costs, as a fraction of the local expert bytes. ``unit`` defaults
    to ``REGISTER_UNIT`` (512 MiB), not the 2 MiB ``dwdp_ops.init`` sets: the overhead is 0 only for a unit that
    divides every local block (the store passes the backend's unit). Bad arguments as ``local_allocation_bytes``."""
    experts_per_rank = _positive_int(experts_per_rank, "experts_per_rank")
    unit = _positive_int(unit, "unit (bytes)")
    used = experts_per_rank * layout.expert_stride
    alloc = sum(local_allocation_bytes(layout, t.name, experts_per_rank, unit) for t in layout.tensors)
    return alloc / used - 1.0
