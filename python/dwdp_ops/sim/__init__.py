"""Simulator of DWDP against DEP for DeepSeek-R1 prefill on a context-only server (pure Python + numpy, no GPU).

Predicts iteration latency, TPS/GPU (prefill tokens per second per GPU) and the paper's Table 3 categories
(attention, expert GEMMs, dense GEMMs, others, communication, synchronisation wait, exposed fetch; the overlapped
copy beside them) of both modes for any group size N, link rates, model depth (up to the full 61-layer R1) and
hardware profile, with request lengths uniform in [R x ISL, ISL] or gamma with a given CV. Deterministic per seed.

Modules, one responsibility each:
  ``workload``   request lengths and per-rank batching under a token budget (chunking of long requests)
  ``costs``      per-operation cost models and the calibration files (``calibration/h200.json``, ``gb200.json``)
  ``model``      the DWDP (two-stream event simulation) and DEP (per-layer collectives in lockstep) iterations
  ``analysis``   the CV x budget sweep, validation against measured end-to-end points, the paper comparison
  ``calibrate``  regenerates the calibration files (``python -m dwdp_ops.sim.calibrate``)
  ``cli``        ``python -m dwdp_ops sim``;  ``plot``: the optional matplotlib figure

What the model assumes and leaves out is stated in each module's docstring and in docs/simulator.md.
"""

from .analysis import paper_comparison, sweep, validate
from .costs import CostModel, Overrides, load_calibration, validate_calibration
from .model import SimConfig, simulate
from .workload import batch_requests, request_lengths, workload

__all__ = ["CostModel", "Overrides", "SimConfig", "batch_requests", "load_calibration", "paper_comparison",
           "request_lengths", "simulate", "sweep", "validate", "validate_calibration", "workload"]
