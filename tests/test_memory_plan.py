"""The per-rank memory plan (models.deepseek_r1.memory) on the CPU: its items, the fit search, the error before any
allocation, and the demo's --moe-layers all."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from dwdp_ops.models.deepseek_r1 import DeepSeekConfig
from dwdp_ops.models.deepseek_r1.memory import GiB, moe_layers_that_fit, plan_memory

R1 = DeepSeekConfig.r1()


def test_items_of_the_full_model_on_eight_gpus():
    p = plan_memory(R1, 8, expert_itemsize=1, requests=1, cache_len=8192, step_tokens=8192, free=139 * GiB)
    it = p.items
    # 32 of 256 fp8 experts (42 MiB each) of 58 layers, plus every expert's row scales; two slots of 224 experts
    assert it["routed experts"] == 58 * (32 * 42 * (1 << 20) + 4 * 256 * (2 * 2048 + 7168))
    assert it["prefetch slots"] == 2 * 224 * 42 * (1 << 20)
    assert 75 * GiB < it["routed experts"] < 78 * GiB and 18 * GiB < it["prefetch slots"] < 19 * GiB
    assert it["KV cache"] == 2 * 8192 * 61 * 576
    assert p.total == sum(it.values()) and list(it)[0] == "routed experts"
    # the activations are the measured coefficient times the step's tokens; the headroom is a reserve on top
    assert it["activations"] == 8192 * (6485169664 // 20022)
    assert p.predicted_use == p.total - it["headroom"] and it["headroom"] >= 3 * GiB
    bf16 = plan_memory(R1, 8, expert_itemsize=2, requests=1, cache_len=8192, step_tokens=8192, free=139 * GiB)
    assert not bf16.fits and bf16.items["routed experts"] > 1.9 * it["routed experts"]


def test_check_names_every_item_and_the_shortfall():
    p = plan_memory(R1, 8, expert_itemsize=2, requests=8, cache_len=8192, step_tokens=65536, free=139 * GiB)
    with pytest.raises(ValueError) as e:
        p.check()
    msg = str(e.value)
    assert "does not fit" in msg and "short by" in msg and "routed experts" in msg and "activations" in msg
    plan_memory(R1, 8, expert_itemsize=1, requests=1, cache_len=64, step_tokens=1024, free=200 * GiB).check()


def test_layers_that_fit_grow_with_memory_and_a_request_too_large_is_an_error():
    kw = dict(vocab_size=32768, expert_itemsize=1, requests=8, cache_len=4160, step_tokens=20000)
    small, big = moe_layers_that_fit(2, 100 * GiB, **kw), moe_layers_that_fit(2, 139 * GiB, **kw)
    assert 1 <= small < big < 58
    assert moe_layers_that_fit(8, 139 * GiB, **kw) > big  # fewer local experts per layer
    assert moe_layers_that_fit(2, 139 * GiB, requested=big, **kw) == big
    with pytest.raises(ValueError, match="with 58 MoE layers does not fit"):
        moe_layers_that_fit(2, 139 * GiB, requested=58, **kw)
    with pytest.raises(ValueError, match=r"in \[1, 58\]"):
        moe_layers_that_fit(2, 139 * GiB, requested=59, **kw)
    assert moe_layers_that_fit(2, 10 * GiB, **kw) == 0
    with pytest.raises(ValueError, match="divide"):
        plan_memory(R1, 3)


def test_demo_moe_layers_argument():
    from dwdp_ops.demo_gpu import moe_layers_arg

    assert moe_layers_arg("all") == 58 and moe_layers_arg("6") == 6
    for bad in ("0", "x", "-1", "59"):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"^expected a count in \[1, 58\] .*, got '{bad}'$"):
            moe_layers_arg(bad)


def test_plan_counts_what_the_store_allocates():
    """Routed experts and slots use the store's layout (each tensor kind rounded to 2 MiB, ``min(2, M)`` slot
    parities), so plan == allocation for any shape; R1's own figures are unchanged (w13 and w2 are whole pages)."""
    from dwdp_ops.layout import ExpertLayout

    for cfg in (DeepSeekConfig.tiny(), DeepSeekConfig.r1(n_layers=4, moe_inter_dim=1536), DeepSeekConfig.mini(),
                DeepSeekConfig.r1(n_layers=5)):
        for isz, dt in ((1, "float8_e4m3fn"), (2, "bfloat16")):
            p = plan_memory(cfg, 4, expert_itemsize=isz)
            stride = ExpertLayout.moe(cfg.dim, cfg.moe_inter_dim, dt).expert_stride
            E, M = cfg.n_routed_experts, cfg.n_moe_layers
            L = E // 4
            scales = 4 * E * (2 * cfg.moe_inter_dim + cfg.dim) if isz == 1 else 0
            assert p.items["routed experts"] == M * (L * stride + scales), (cfg, dt)
            assert p.items["prefetch slots"] == min(2, M) * (E - L) * stride, (cfg, dt)
    assert plan_memory(DeepSeekConfig.tiny(), 4).items["routed experts"] == 50356224  # was 25.2 MB
    assert plan_memory(R1, 8).items["routed experts"] == 58 * (32 * 42 * (1 << 20) + 4 * 256 * (2 * 2048 + 7168))


def test_one_moe_layer_needs_one_slot_parity():
    kw = dict(expert_itemsize=2, requests=1, cache_len=4096, step_tokens=4096)
    p = plan_memory(DeepSeekConfig.r1(n_layers=4, vocab_size=32768), 2, **kw)
    assert p.items["prefetch slots"] == 128 * 84 * (1 << 20)  # one parity of 128 remote bf16 experts (84 MiB)
    assert moe_layers_that_fit(2, p.total + GiB, vocab_size=32768, requested=1, **kw) == 1


@pytest.mark.parametrize("kw, err, msg", [
    (dict(step_tokens=-100000), ValueError, "step_tokens must be >= 0"),
    (dict(requests=-8), ValueError, "requests must be >= 0"),
    (dict(cache_len=1.5), TypeError, "cache_len must be an int"),
    (dict(dispatcher_bytes=-1), ValueError, "dispatcher_bytes must be >= 0"),
    (dict(free=True), TypeError, r"^free \(bytes\) must be an int, got True \(bool\)$"),
    (dict(expert_itemsize=True), ValueError, r"^expert_itemsize must be 1 \(fp8\) or 2 \(bf16\), got True$"),
    # numpy's bool had passed as 1 (fp8)
    (dict(expert_itemsize=np.True_), ValueError, r"^expert_itemsize must be 1 \(fp8\) or 2 \(bf16\), got (np\.True_|True)$"),
    (dict(expert_itemsize=2.0), ValueError, r"^expert_itemsize must be 1 \(fp8\) or 2 \(bf16\), got 2.0$"),
])
def test_plan_arguments_are_checked(kw, err, msg):
    with pytest.raises(err, match=msg):
        plan_memory(R1, 8, **kw)


def test_plan_takes_a_numpy_integer_itemsize():
    assert plan_memory(R1, 8, expert_itemsize=np.int64(2)).items == plan_memory(R1, 8, expert_itemsize=2).items


@pytest.mark.parametrize("kind", [np.int32, np.uint16, np.int64])
def test_plan_of_a_config_with_numpy_integer_fields_is_the_plan_of_python_ints(kind):
    """DeepSeekConfig takes numpy integers; an int32 field had kept its width, so the plan's byte counts wrapped
    around (embedding and head -0.55 GiB, KV cache negative) and MemoryPlan.total raised OverflowError."""
    cfg = DeepSeekConfig.r1(vocab_size=kind(32768), n_layers=kind(61), dim=kind(7168))
    assert all(type(getattr(cfg, n)) is int for n in ("vocab_size", "n_layers", "dim", "n_dense_layers"))
    want = plan_memory(DeepSeekConfig.r1(vocab_size=32768), 8)
    got = plan_memory(cfg, 8)
    assert got.items == want.items and got.total == want.total
    assert all(v >= 0 for v in got.items.values())


@pytest.mark.parametrize("world, err, msg", [
    (True, TypeError, r"^world must be an int, got True \(bool\)$"),
    (2.0, TypeError, r"^world must be an int, got 2.0 \(float\)$"),
    (0, ValueError, r"^world must be >= 1, got 0$"),
    (3, ValueError, r"^world must divide the 256 routed experts, got 3$"),
])
def test_plan_world_is_checked(world, err, msg):
    """The match had been 'world', which all four messages (and others) contain: each case names its own check."""
    with pytest.raises(err, match=msg):
        plan_memory(R1, world)


def test_layers_that_fit_arguments_are_checked():
    with pytest.raises(TypeError, match=r"requested \(MoE layers\) must be an int"):
        moe_layers_that_fit(8, 1000 * GiB, vocab_size=4096, requested=2.5)
    with pytest.raises(TypeError, match="world must be an int"):
        moe_layers_that_fit(True, 1000 * GiB, vocab_size=4096)


def test_an_empty_plan_prints_its_total():
    """MemoryPlan().table() had raised 'max() arg is an empty sequence'."""
    from dwdp_ops.models.deepseek_r1.memory import MemoryPlan

    assert MemoryPlan(free=1 << 30).table() == "  total     0.00 GiB of 1.00 GiB free"
