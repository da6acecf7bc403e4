"""DeepSeek-R1 (the DeepSeek-V3 architecture) for DWDP: configuration, deterministic random weights and the numpy
reference forward pass (``reference``). Dimensions and the gate follow the official ``inference/model.py``
(anchors.md section 4)."""

from .config import DeepSeekConfig
from .reference import ReferenceModel, select_experts
from .weights import dequant_fp8, e4m3_to_float, init_weights

__all__ = ["DeepSeekConfig", "ReferenceModel", "dequant_fp8", "e4m3_to_float", "init_weights", "select_experts"]
