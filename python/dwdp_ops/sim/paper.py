"""The paper's context-only experiment (GB200 x 4, DeepSeek-R1 NVFP4; ../shared/reference/dwdp.md section 5.2,
from TensorRT-LLM's DWDP blog, Table 3): its setting and its per-category breakdown, read as ms per iteration (the
blog labels them "us", which cannot be per iteration of 32K tokens; the ratios are unit-free)."""

from __future__ import annotations

__all__ = ["PAPER"]

PAPER = {  # the paper's context-only setting and Table 3 (../shared/reference/dwdp.md section 5.2)
    "gpus": 4, "isl": 8192, "ratio": 0.8, "max_tokens": 32768, "layers": 61, "dense_layers": 3,
    "table3_dep4_ms": {"attention": 269.67, "grouped_gemm": 342.40, "dense_gemm": 177.50, "others": 241.69,
                       "communication": 126.74, "sync_wait": 161.85, "iteration": 1319.85},
    "table3_dwdp4_ms": {"attention": 320.56, "grouped_gemm": 337.42, "dense_gemm": 189.28, "others": 284.32,
                        "overlapped_copy": 429.00, "iteration": 1131.58},
}
