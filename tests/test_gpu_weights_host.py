"""Host-side checks of the GPU forward's weight sources (``models.deepseek_r1.gpu_weights``), made before any
tensor is drawn or moved, so they need no GPU."""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from dwdp_ops.models.deepseek_r1 import DeepSeekConfig, init_weights  # noqa: E402
from dwdp_ops.models.deepseek_r1.gpu_weights import DeviceWeights, NumpyWeights  # noqa: E402


@pytest.mark.parametrize("method", ["experts", "experts_fp8"])
def test_weight_sources_refuse_layers_and_experts_the_model_does_not_have(method):
    """DeviceWeights had drawn random weights for expert 16 of 16, for a dense layer or a layer past the model
    without a word (each is only a seed); NumpyWeights failed with a bare KeyError or np.stack's message."""
    cfg = DeepSeekConfig.tiny()
    E, moe = cfg.n_routed_experts, cfg.n_dense_layers
    W = init_weights(cfg, 0)
    for src in (DeviceWeights(cfg, device=0), NumpyWeights(cfg, W, device=0)):
        fn = getattr(src, method)
        for layer in (moe - 1, cfg.n_layers, float(moe), True):
            with pytest.raises(ValueError, match=rf"layer must be a MoE layer, an int in \[{moe}, {cfg.n_layers}\)"):
                fn(layer, 0, 1)
        for lo, hi in ((0, E + 1), (-1, 2), (3, 2), (True, 2), (0, 2.0)):
            with pytest.raises(ValueError, match=rf"experts lo \.\. hi-1 must have ints 0 <= lo <= hi <= {E} "):
                fn(moe, lo, hi)


@pytest.mark.parametrize("seed", [1.5, 2.0, True, np.True_, "3"])
def test_device_weights_refuse_a_seed_that_is_not_an_int(seed):
    """DeviceWeights(seed=1.5) drew seed 1's weights and seed=True seed 1's (int() truncated them), seed='3' seed 3's;
    each is refused by name, as init_weights refuses its seed. A numpy integer is an int."""
    cfg = DeepSeekConfig.tiny()
    with pytest.raises(TypeError, match=rf"^DeviceWeights: seed must be an int, got {re.escape(repr(seed))} "
                                        rf"\({type(seed).__name__}\)$"):
        DeviceWeights(cfg, seed, device=0)
    w = DeviceWeights(cfg, np.int64(7), device=0)
    assert w.seed == 7 and type(w.seed) is int


def test_numpy_weights_serve_an_empty_expert_range_as_device_weights_do():
    """lo == hi is a valid (empty) range: DeviceWeights returns [0, 2I, H] / [0, H, I] stacks, NumpyWeights failed
    with np.stack's "need at least one array to stack". Both now return the empty stacks (tensors kept on the CPU:
    no GPU here)."""
    cfg = DeepSeekConfig.tiny()
    I, d, moe = cfg.moe_inter_dim, cfg.dim, cfg.n_dense_layers
    dev, num = DeviceWeights(cfg, device=0), NumpyWeights(cfg, init_weights(cfg, 0), device=0)
    dev.device = num.device = torch.device("cpu")
    for src in (dev, num):
        w13, w2 = src.experts(moe, 2, 2)
        assert tuple(w13.shape) == (0, 2 * I, d) and tuple(w2.shape) == (0, d, I) and w13.dtype == src.dtype
    w13, w2 = num.experts(moe, 2, 3)  # a non-empty range still stacks
    assert tuple(w13.shape) == (1, 2 * I, d) and tuple(w2.shape) == (1, d, I)
