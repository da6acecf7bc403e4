"""The Hugging Face DeepSeek-V3 integration (dwdp_ops.integrations.transformers) on the CPU: the plan and its
refusals, the 'dwdp' experts implementation driven through a stand-in scheduler over the model's own expert tensors
(same logits to bf16 rounding, same greedy tokens from generate(), one begin_step per forward, wait / release per
MoE layer in order), and Hugging Face's router against the official gate where masking dropped groups with 0.0
instead of -inf would change the choice; with stand-ins for the model and the store (no transformers needed), what a
failed construction leaves behind. The store-backed path runs on GPUs (tests/multiproc)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
try:
    import transformers
except ImportError:  # the stand-in tests (construction failures) run without it
    transformers = None

from dwdp_ops import ExpertPartition  # noqa: E402
from dwdp_ops.integrations import transformers as hf  # noqa: E402

needs_hf = pytest.mark.skipif(transformers is None, reason="transformers is not installed (pip install transformers)")


def tiny_config(**kw):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16,
                routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16,
                qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1,
                max_position_embeddings=128, num_mtp_layers=0)
    base.update(kw)
    return transformers.DeepseekV3Config(**base)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = transformers.DeepseekV3ForCausalLM(tiny_config(**kw)).to(torch.bfloat16).eval()
    with torch.no_grad():
        for _, ex in hf.moe_layers(m):
            ex.gate_up_proj.normal_(0, 0.05)
            ex.down_proj.normal_(0, 0.05)
        for layer in m.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0, 0.5)
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.2)
    return m


class StandInScheduler:
    def __init__(self, layers):
        self.step_policy, self.log, self.layers = "prefetch_all", [], layers

    def begin_step(self, tokens):
        self.log.append(("begin", tokens))
        return self.step_policy

    def abort(self):
        pass

    def wait(self, p, stream, ids=None):
        self.log.append(("wait", p))

    def release(self, p, stream):
        self.log.append(("release", p))


@needs_hf
def test_plan_keeps_a_slice_per_rank_and_names_what_it_cannot_serve():
    m = tiny_model()
    p = hf.plan(m, 4, 2)
    assert p.layers == (1, 2) and (p.lo, p.hi) == (8, 12) and (p.hidden, p.inter, p.top_k) == (64, 32, 4)
    assert hf.plan(m, 2, 1, ExpertPartition(16, 2, 10, 6)).lo == 6  # replicated placement
    with pytest.raises(ValueError, match="16 routed experts do not split evenly over 3 ranks"):
        hf.plan(m, 3, 0)
    with pytest.raises(ValueError, match="has no MoE layer"):
        hf.plan(tiny_model(first_k_dense_replace=3), 2, 0)
    with pytest.raises(ValueError, match="need a DeepSeek-V3 model"):
        hf.plan(transformers.LlamaConfig(), 2, 0, layers=[0])
    with pytest.raises(ValueError, match="the partition is for 8 experts"):
        hf.plan(m, 2, 0, ExpertPartition.disjoint(8, 2))
    views = [(ex.gate_up_proj.data, ex.down_proj.data) for _, ex in hf.moe_layers(m)]
    with pytest.raises(ValueError, match="serves bf16 experts; this model's are torch.float32"):
        hf.DwdpDeepseekV3(m.float(), views=views, scheduler=StandInScheduler(2))
    with pytest.raises(ValueError, match="DEP through this integration is not supported yet"):
        hf.DwdpDeepseekV3(tiny_model(), policy="dispatch", views=views, scheduler=StandInScheduler(2))


@needs_hf
@pytest.mark.parametrize("layers, msg", [
    ([1.7, 2], r"got 1\.7 \(float\)"),  # had been truncated to layer 1
    ([True, 2], r"got True \(bool\)"),  # had been taken as layer 1
    ([2, 2], "strictly increasing"),  # one layer at two MoE positions
    ([2, 1], "strictly increasing"),  # MoE position p is the p-th MoE layer run
    ([1, 3], r"in \[0, 3\) \(num_hidden_layers\), got 3"),
    ([-1], r"in \[0, 3\)"),
    ([0, 1, 2], r"decoder layer 0 .* is dense \(first_k_dense_replace = 1"),  # had been planned as a MoE layer
])
def test_plan_of_a_config_checks_the_layer_indices(layers, msg):
    with pytest.raises(ValueError, match=msg):
        hf.plan(tiny_config(), 2, 0, layers=layers)
    assert hf.plan(tiny_config(), 2, 0, layers=[1, 2]).layers == (1, 2)
    assert hf.plan(tiny_config(), 2, 0, layers=[1, np.int64(2)]).layers == (1, 2)


@needs_hf
@pytest.mark.parametrize("top_k", [0, 17])
def test_plan_refuses_a_top_k_outside_the_experts(top_k):
    """num_experts_per_tok > n_routed_experts had been planned; HF's router raised only at the first forward, after
    DwdpDeepseekV3 had moved the experts into the store and freed the model's."""
    with pytest.raises(ValueError, match=rf"num_experts_per_tok must be an int in \[1, 16\].*got {top_k}"):
        hf.plan(tiny_config(num_experts_per_tok=top_k), 2, 0, layers=[1, 2])


@needs_hf
@pytest.mark.parametrize("world, rank", [(2, True), (2, 0.0), (2, 2), (0, 0)])
def test_plan_names_a_bad_world_or_rank(world, rank):
    """A bool or float rank passed the range check and failed in the partition with a TypeError, where the docstring
    says ValueError naming world and rank."""
    with pytest.raises(ValueError, match=r"world must be >= 1 and rank in \[0, world\)"):
        hf.plan(tiny_config(), world, rank, layers=[1, 2])
    assert hf.plan(tiny_config(), np.int64(2), np.int64(1), layers=[1, 2]).lo == 8


@needs_hf
def test_dwdp_experts_equal_hugging_faces_and_generate_the_same_tokens():
    ids = torch.tensor([[5, 17, 99, 3, 64, 8, 1]])
    base = tiny_model(1)
    base.config._experts_implementation = "eager"
    with torch.no_grad():
        want = base(ids).logits.float()
        want_tokens = base.generate(ids, max_new_tokens=6, do_sample=False)
    model = tiny_model(1)
    views = [(ex.gate_up_proj.data, ex.down_proj.data) for _, ex in hf.moe_layers(model)]
    sched = StandInScheduler(len(views))
    with hf.DwdpDeepseekV3(model, views=views, scheduler=sched) as dw, torch.no_grad():
        assert model.config._experts_implementation == "dwdp"
        got = model(ids).logits.float()
        assert sched.log == [("begin", 7), ("wait", 0), ("release", 0), ("wait", 1), ("release", 1)]
        sched.log.clear()
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
        begins = [t for kind, t in sched.log if kind == "begin"]
        assert begins[0] == 7 and all(t == 1 for t in begins[1:]) and len(begins) == 6
        assert dw.plan.layers == (1, 2)
    assert model.config._experts_implementation != "dwdp"
    rel = float((got - want).norm() / want.norm())
    assert rel < 2e-2, rel
    assert torch.equal(tokens, want_tokens)


@needs_hf
def test_hugging_faces_router_masks_dropped_groups_like_the_official_gate():
    """Scores + bias below zero in the kept groups: a router that masked dropped groups with 0.0 would pick experts
    of dropped groups (0.0 beats the negative kept ones); the official gate (-inf) never does."""
    from dwdp_ops.models.deepseek_r1.gpu import select_experts_torch

    m = tiny_model(2)
    router = m.model.layers[1].mlp.gate
    with torch.no_grad():
        router.e_score_correction_bias.fill_(-2.0)  # every score + bias < 0
        router.e_score_correction_bias[:4] = -1.0  # group 0 strongest
        x = torch.randn(9, 64)
        _, w, idx = router(x)
        logits = x.float() @ router.weight.float().T
        w2, idx2 = select_experts_torch(logits, router.e_score_correction_bias.float(), 4, 2, 4, 2.5)
    assert [sorted(r) for r in idx.tolist()] == [sorted(r) for r in idx2.tolist()]
    groups = idx // 4
    assert all(len(set(r.tolist())) <= 2 for r in groups)  # only the kept groups


# -- construction failures, with stand-ins (the reviewer's case: rates={"fetch_gbps": 100} raised after the experts were
# freed, and the store was never closed) ----------------------------------------------------------------------------
def _stand_in_model(E=4, H=16, I=8, L=2):
    from types import SimpleNamespace as NS

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(E, 2 * I, H, dtype=torch.bfloat16))
            self.down_proj = torch.nn.Parameter(torch.zeros(E, H, I, dtype=torch.bfloat16))

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = NS(experts=Experts())

    decoder = torch.nn.Module()
    decoder.layers = [Layer() for _ in range(L)]
    cfg = NS(model_type="deepseek_v3", n_routed_experts=E, hidden_size=H, moe_intermediate_size=I,
             num_experts_per_tok=2, num_hidden_layers=L)
    return NS(config=cfg, model=decoder)


@pytest.fixture
def stand_in_store(monkeypatch):
    """A one-rank runtime and a ``_build_store`` that does to the model what the real one does (frees the experts),
    returning a store that records its closing; ``register`` a no-op (transformers may be absent)."""
    from types import SimpleNamespace as NS

    import dwdp_ops.runtime as rt

    log = []
    monkeypatch.setattr(rt, "get_runtime", lambda: NS(require=lambda *_: None, world_size=lambda: 1, rank=lambda: 0))
    monkeypatch.setattr(hf, "register", lambda: log.append("register"))

    def build(self):
        log.append("build")
        for ex in self._experts:
            ex.gate_up_proj = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16), requires_grad=False)
        return NS(E=4, device=None, close=lambda: log.append("close")), [None] * len(self._experts)

    monkeypatch.setattr(hf.DwdpDeepseekV3, "_build_store", build)
    return log


def test_bad_rates_and_failing_imports_are_refused_before_the_experts_are_freed(stand_in_store, monkeypatch):
    model = _stand_in_model()
    with pytest.raises(TypeError, match="rates must be a dwdp_ops.policy.Rates, got dict"):
        hf.DwdpDeepseekV3(model, policy="auto", rates={"fetch_gbps": 100})

    def no_transformers():
        raise ImportError("No module named 'transformers'")

    monkeypatch.setattr(hf, "register", no_transformers)
    with pytest.raises(ImportError, match="transformers"):
        hf.DwdpDeepseekV3(model)
    assert stand_in_store == []  # no store built
    assert all(ex.gate_up_proj.shape == (4, 16, 16) for _, ex in hf.moe_layers(model))  # the experts are intact


def test_a_failure_after_the_store_is_built_closes_it_and_undoes_the_setup(stand_in_store, monkeypatch):
    import dwdp_ops.scheduler

    def no_scheduler(*a, **k):
        raise RuntimeError("the scheduler failed")

    monkeypatch.setattr(dwdp_ops.scheduler, "PrefetchScheduler", no_scheduler)
    model = _stand_in_model()
    with pytest.raises(RuntimeError, match="the scheduler failed"):
        hf.DwdpDeepseekV3(model)
    assert stand_in_store == ["register", "build", "close"]
    assert getattr(model.config, "_experts_implementation", None) is None  # not left as "dwdp"
    assert not model.model._forward_pre_hooks
    assert not any(hasattr(ex, "_dwdp") for _, ex in hf.moe_layers(model))


def test_hidden_states_off_the_stores_gpu_are_refused(stand_in_store):
    """The experts run on the stream of the hidden states' device (tests/test_gpu_torch_ops.py checks it on two GPUs),
    which must be the store's."""
    from types import SimpleNamespace as NS

    model = _stand_in_model()
    views = [(ex.gate_up_proj.data, ex.down_proj.data) for _, ex in hf.moe_layers(model)]
    dw = hf.DwdpDeepseekV3(model, views=views, scheduler=NS(step_policy="prefetch_all"))
    dw.store = NS(device=1, close=lambda: None)
    with pytest.raises(ValueError, match="MoE position 0's hidden states are on cpu, the expert store on cuda:1"):
        dw.experts(0, torch.zeros(3, 16, dtype=torch.bfloat16), torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 2))
    dw.close()


def test_a_forward_without_input_ids_or_inputs_embeds_is_named(stand_in_store):
    """The step's pre-hook read the token count from inputs_embeds when input_ids was None, and raised AttributeError
    ("'NoneType' object has no attribute 'shape'") for a forward given neither, where Hugging Face names the mistake."""
    model = _stand_in_model()
    views = [(ex.gate_up_proj.data, ex.down_proj.data) for _, ex in hf.moe_layers(model)]
    sched = StandInScheduler(2)
    dw = hf.DwdpDeepseekV3(model, views=views, scheduler=sched)
    try:
        for args, kwargs in (((), {}), ((), {"input_ids": None}), ((None,), {"inputs_embeds": None})):
            with pytest.raises(ValueError, match="the forward needs input_ids or inputs_embeds, got neither"):
                dw._begin_step(model.model, args, kwargs)
        assert sched.log == []
        dw._begin_step(model.model, (), {"input_ids": None, "inputs_embeds": torch.zeros(2, 3, 16)})
        dw._begin_step(model.model, (torch.zeros(1, 5, dtype=torch.int64),), {})
        assert sched.log == [("begin", 6), ("begin", 5)]
    finally:
        dw.close()
