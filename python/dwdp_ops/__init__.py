"""dwdp_ops: Distributed Weight Data Parallelism for MoE inference.

Every GPU runs data-parallel on its own requests, stores a slice of each MoE layer's experts, and pulls the experts it
lacks from its peers one-sidedly (NVSHMEM, copy engines), ahead of use, so no GPU waits for another.

Runtime (one process per GPU, started by ``python -m dwdp_ops.launch``, torchrun or mpirun):
    init, finalize, rank, world_size, local_rank, barrier
Symmetric memory:
    symmetric_empty, free_symmetric, peer_view, getmem, logical_dtype, to_torch
Experts (the paper's split weights):
    ExpertPartition (who stores what, who fetches what), ExpertLayout (page-aligned packing),
    ExpertStore (local storage, slots, composite/table/merge views, copy-engine and NVSHMEM fetch)
    PrefetchScheduler (layer-ahead double buffering: begin_step, wait, release; prefetch_all / on_demand / auto)
Tokens (expert parallelism, DEP; the sibling of the weight fetch):
    dispatch.TokenDispatcher (NVLink dispatch / combine kernels), dispatch_plan (the pure reference: plan_send,
    plan_recv, reference_moe), dispatch_nccl.NcclDispatcher (the all_to_all_single baseline; needs PyTorch),
    policy.choose_mode (per-step choice between prefetch_all, on_demand and dispatch)
"""

from .dispatch import DispatchHandle, TokenDispatcher
from .dispatch_plan import RecvPlan, SendPlan, plan_recv, plan_send, reference_moe
from .env import DistEnv
from .errors import CoActionArgumentError, DwdpError, RendezvousError
from .layout import ExpertLayout, TensorSpec
from .partition import ExpertPartition
from .policy import MODES, ModeChoice, Rates, choose_mode, expected_distinct
from .runtime import Runtime, barrier, finalize, get_runtime, init, is_initialized, local_rank, rank, world_size
from .scheduler import PrefetchScheduler
from .store import ExpertStore
from .symmetric import free_symmetric, getmem, logical_dtype, peer_view, symmetric_empty, to_torch

__version__ = "0.1.0"


def cuda_device_count() -> int:
    """Number of CUDA GPUs usable by this process (0 where there is no GPU or driver); never raises for a missing
    driver."""
    from ._native import native

    return native().cuda_device_count()[0]


__all__ = [
    "MODES",
    "CoActionArgumentError",
    "DispatchHandle",
    "DistEnv",
    "ModeChoice",
    "Rates",
    "RecvPlan",
    "SendPlan",
    "TokenDispatcher",
    "choose_mode",
    "plan_recv",
    "plan_send",
    "reference_moe",
    "DwdpError",
    "ExpertLayout",
    "ExpertPartition",
    "ExpertStore",
    "PrefetchScheduler",
    "RendezvousError",
    "Runtime",
    "TensorSpec",
    "barrier",
    "cuda_device_count",
    "expected_distinct",
    "finalize",
    "free_symmetric",
    "get_runtime",
    "getmem",
    "init",
    "is_initialized",
    "local_rank",
    "logical_dtype",
    "peer_view",
    "rank",
    "symmetric_empty",
    "to_torch",
    "world_size",
]
