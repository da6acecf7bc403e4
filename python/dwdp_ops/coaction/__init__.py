"""CAN feature co-action (Bian et al., WSDM'22): a per-sample micro-MLP whose weights are an embedding row of the
target item (the *induction* side), applied to powers of every behaviour's feed embedding and sum-pooled.

``reference``: the numpy reference of the forward and backward passes (the oracle for the CUDA kernels);
``fused``: the fused CUDA kernels for CuPy arrays (gathered rows or table + ids).
"""

from .fused import ShardedTable, coaction_backward_gpu, coaction_forward_gpu, launch_shape
from .reference import CoActionSpec, coaction_backward, coaction_forward

__all__ = ["CoActionSpec", "ShardedTable", "launch_shape", "coaction_backward", "coaction_backward_gpu", "coaction_forward", "coaction_forward_gpu"]
