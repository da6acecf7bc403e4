"""The random model's two routers (``gpu_weights.ROUTERS``) on the CPU: the gate of ``init_weights``' distribution
(weight std 0.05 over R1's 7168 dims) on random hidden states, through the official group-limited top-8 selection.
The claims the docstring and the benchmarks' readings rest on: "skewed" (correction bias std 0.5) concentrates the
routing on a few experts and unbalances two expert-parallel ranks; "balanced" (bias 0) uses every expert evenly."""

from __future__ import annotations

import numpy as np
import pytest
from dwdp_ops.models.deepseek_r1 import DeepSeekConfig
from dwdp_ops.models.deepseek_r1.gpu_weights import ROUTERS
from dwdp_ops.models.deepseek_r1.reference import select_experts


def _loads(router: str, seed: int, tokens: int = 2048):
    cfg = DeepSeekConfig.r1(n_layers=4)
    rng = np.random.default_rng(seed)
    E = cfg.n_routed_experts
    gate = (rng.standard_normal((E, cfg.dim)) * 0.05).astype(np.float32)
    bias = (rng.standard_normal(E) * ROUTERS[router]).astype(np.float32)
    x = rng.standard_normal((tokens, cfg.dim)).astype(np.float32)
    _, ids = select_experts(x @ gate.T, bias, cfg.n_expert_groups, cfg.n_limited_groups, cfg.n_activated_experts,
                            cfg.route_scale)
    return np.bincount(ids.ravel(), minlength=E)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_skewed_router_concentrates_on_a_few_experts(seed):
    cnt = _loads("skewed", seed)
    assert np.count_nonzero(cnt) < 128  # most experts never chosen
    assert np.sort(cnt)[::-1][:16].sum() / cnt.sum() > 0.4  # 16 of 256 experts take a large share
    assert cnt.std() / cnt.mean() > 1.5


def test_skewed_router_unbalances_two_expert_parallel_ranks_for_most_seeds():
    """The two halves of the experts (two DEP ranks' shares): 0.27, 0.52, 0.35, 0.34 of the pairs for seeds 0-3."""
    halves = [_loads("skewed", s)[:128].sum() / _loads("skewed", s).sum() for s in range(4)]
    assert sum(abs(h - 0.5) > 0.1 for h in halves) >= 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_router_uses_every_expert_evenly(seed):
    cnt = _loads("balanced", seed)
    half = cnt[: len(cnt) // 2].sum() / cnt.sum()
    assert np.count_nonzero(cnt) == len(cnt)
    assert cnt.std() / cnt.mean() < 0.25
    assert abs(half - 0.5) < 0.03
