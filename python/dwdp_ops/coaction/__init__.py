"""CAN feature co-action (Bian et al., WSDM'22): a per-sample micro-MLP whose weights are an embedding row of the
target item (the *induction* side), applied to powers of every behaviour's feed embedding and sum-pooled.

``reference``: the numpy reference of the forward and backward passes (the oracle for the CUDA kernels);
``fused``: the fused CUDA kernels for CuPy arrays (gathered rows or table + ids);
``autograd``: the fused kernels as a differentiable PyTorch op (``coaction``, ``CoActionFunction``), imported on
first use so that this package needs no PyTorch.
``CoActionArgumentError`` (from ``dwdp_ops.errors``): what the fused and autograd ops raise for a wrongly shaped
array, both a TypeError and a ValueError.
"""

from ..errors import CoActionArgumentError
from .fused import (
    ShardedTable,
    TableGrads,
    coaction_backward_gpu,
    coaction_forward_gpu,
    launch_shape,
    split_warps,
)
from .reference import CoActionSpec, coaction_backward, coaction_forward

_TORCH = ("CoActionFunction", "coaction")


def __getattr__(name: str):
    if name in _TORCH:  # PyTorch is imported only here, when the autograd op is asked for
        from . import autograd

        return getattr(autograd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CoActionArgumentError", "CoActionFunction", "CoActionSpec", "ShardedTable", "TableGrads", "launch_shape",
           "coaction", "coaction_backward", "coaction_backward_gpu", "coaction_forward", "coaction_forward_gpu",
           "split_warps"]
