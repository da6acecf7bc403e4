"""``dwdp_ops._checks.is_int``, the one integer predicate of the argument checks: Python and numpy integers pass,
bools do not. The sites that took only a Python ``int`` (and refused ``np.int64(2)``) now take numpy integers and
hand on Python ints (for JSON, ``range``, torch); bools are still refused with each site's own message."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from dwdp_ops import launch
from dwdp_ops._checks import is_bool, is_int
from dwdp_ops.integrations import transformers as hf
from dwdp_ops.models import train_can
from dwdp_ops.partition import ExpertPartition
from dwdp_ops.schedule import _check_world
from dwdp_ops.sim.analysis import validate_e2e
from dwdp_ops.sim.model import SimConfig
from dwdp_ops.sim.workload import workload

E2E = Path(__file__).resolve().parents[1] / "bench" / "results" / "e2e_dwdp_vs_dep_H200_N2.json"


@pytest.mark.parametrize("v", [0, 3, -7, 2**70, np.int64(4), np.int32(-1), np.uint8(255), np.intp(2)])
def test_is_int_takes_python_and_numpy_integers(v):
    assert is_int(v)


@pytest.mark.parametrize("v", [True, False, np.bool_(True), 3.0, np.float64(3.0), "3", None, 1j, [3],
                               np.array(3), np.array([3])],
                         ids=["True", "False", "np.bool_", "float", "np.float64", "str", "None", "complex", "list",
                              "0-d array", "1-d array"])
def test_is_int_refuses_bools_floats_and_everything_else(v):
    assert not is_int(v)


# -- sites that took only int: numpy integers pass now, as Python ints ------------------------------------------------
def test_sim_config_takes_numpy_integers_as_ints():
    kw = dict(gpus=2, isl=1024, max_tokens=4096, layers=6, dense_layers=1, seed=3, iterations=2, warmup=1)
    cfg = SimConfig(**{k: np.int64(v) for k, v in kw.items()})
    assert cfg == SimConfig(**kw)
    assert all(type(getattr(cfg, k)) is int for k in kw)
    json.dumps(asdict(cfg))  # np.int64 is not JSON serialisable


def test_workload_takes_numpy_counts():
    assert workload(np.int64(2), np.int64(3), 1024, 4096, ratio=0.8) == workload(2, 3, 1024, 4096, ratio=0.8)


def test_launch_run_takes_a_numpy_nprocs():
    assert launch.run(np.int64(1), [sys.executable, "-c", "pass"], timeout=60) == 0


class _Model:
    def train_step(self, _batch) -> float:
        return 0.5

    def evaluate(self, _data) -> float:
        return 0.5


def test_train_takes_numpy_counts_and_records_json_ints():
    data, _ = train_can.synthetic(20, seed=0)
    curve = train_can.train(_Model(), data, data, np.int64(2), np.int64(10), 0, progress=False)
    assert [r["epoch"] for r in curve] == [1, 2] and len(curve[0]["losses"]) == 2
    json.dumps(curve)


def _hf_config():
    return SimpleNamespace(model_type="deepseek_v3", n_routed_experts=16, hidden_size=64, moe_intermediate_size=32,
                           num_experts_per_tok=4)


def test_hf_plan_takes_a_numpy_world():
    p = hf.plan(_hf_config(), np.int64(4), 1, layers=[1, 2])
    assert p == hf.plan(_hf_config(), 4, 1, layers=[1, 2]) and p.partition == ExpertPartition.disjoint(16, 4)


def test_requant_block_takes_a_numpy_block():
    torch = pytest.importorskip("torch")
    from dwdp_ops.models.deepseek_r1.fp8 import requant_block

    codes, s = torch.full((4, 4), 0x38, dtype=torch.uint8), torch.full((1, 1), 2.0)  # 0x38: e4m3 1.0
    q, scale = requant_block(codes, s, np.int64(128))
    q0, scale0 = requant_block(codes, s, 128)
    assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(scale, scale0)


@pytest.mark.skipif(not E2E.is_file(), reason="bench/results not here")
def test_validate_e2e_takes_a_numpy_warmup():
    data = json.loads(E2E.read_text())
    sub = dict(data, points=data["points"][:1])
    got = validate_e2e(dict(sub, warmup=np.int64(sub["warmup"])))
    assert got == validate_e2e(sub)


# -- bools: still refused, with each site's message --------------------------------------------------------------------
@pytest.mark.parametrize("call, err, match", [
    (lambda: launch.run(True, ["true"]), ValueError, r"^nprocs must be an integer >= 1, got True$"),
    (lambda: SimConfig(gpus=True), ValueError, r"^gpus must be an integer >= 1, got True$"),
    (lambda: SimConfig(layers=6, dense_layers=False), ValueError,
     r"^dense_layers must be an integer in \[0, layers=6\], got False$"),
    (lambda: workload(True, 1, 1024, 4096, ratio=0.8), ValueError, r"^ranks must be an integer >= 1, got True$"),
    (lambda: hf.plan(_hf_config(), True, 0, layers=[1]), ValueError,
     r"^world must be >= 1 and rank in \[0, world\), got world True, rank 0$"),
    (lambda: _check_world(0, True), TypeError, r"^world_size must be an int >= 1, got True \(bool\)$"),
    (lambda: ExpertPartition(8, True, 8, 8), TypeError, r"must be an int, got bool \(True\)$"),
])
def test_bools_are_refused_with_the_sites_message(call, err, match):
    with pytest.raises(err, match=match):
        call()


@pytest.mark.parametrize("v", [True, False, np.bool_(True), np.array(False)[()]])
def test_is_bool_takes_python_and_numpy_bools(v):
    assert is_bool(v)


@pytest.mark.parametrize("v", [0, 1, 1.0, np.int64(1), np.float32(0), "True", None, np.array([True])])
def test_is_bool_refuses_numbers_and_other_objects(v):
    assert not is_bool(v)
