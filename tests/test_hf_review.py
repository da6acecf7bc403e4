"""Review of the Hugging Face integration's lifecycle (dwdp_ops.integrations.transformers) on the CPU, with the
stand-in schedulers and tiny models of tests/test_transformers_integration.py: two wrappers on one model, close()
twice, a model whose experts were already moved out; and models.routed against a straightforward loop."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from dwdp_ops.errors import DwdpError  # noqa: E402
from dwdp_ops.integrations import transformers as hf  # noqa: E402
from dwdp_ops.models.routed import routed_experts  # noqa: E402
from test_transformers_integration import StandInScheduler, _stand_in_model, needs_hf, tiny_model  # noqa: E402
from test_transformers_integration import stand_in_store as _stand_in_store  # noqa: E402

stand_in_store = _stand_in_store  # the fixture (a one-rank runtime, a store that records its closing)

IDS = torch.tensor([[5, 17, 99, 3, 64, 8, 1]])


def _views(model):
    return [(ex.gate_up_proj.data, ex.down_proj.data) for _, ex in hf.moe_layers(model)]


def _eager_logits(seed):
    base = tiny_model(seed)
    base.config._experts_implementation = "eager"
    with torch.no_grad():
        return base(IDS).logits.float()


@needs_hf
def test_a_second_wrapper_on_a_wrapped_model_is_refused():
    """A second DwdpDeepseekV3 on a model with a live one took its experts over (the first's hook still began every
    step, its scheduler saw no wait / release); closing the second restored the implementation name "dwdp" and left
    the layers running through the closed wrapper (on a GPU: its closed store)."""
    model = tiny_model(1)
    s1, s2 = StandInScheduler(2), StandInScheduler(2)
    with hf.DwdpDeepseekV3(model, views=_views(model), scheduler=s1):
        with pytest.raises(ValueError, match="already served by a DwdpDeepseekV3"):
            hf.DwdpDeepseekV3(model, views=_views(model), scheduler=s2)
        assert len(model.model._forward_pre_hooks) == 1
        with torch.no_grad():
            model(IDS)
        assert s1.log == [("begin", 7), ("wait", 0), ("release", 0), ("wait", 1), ("release", 1)]
        assert s2.log == []
    assert model.config._experts_implementation == "grouped_mm"
    assert not model.model._forward_pre_hooks


@needs_hf
def test_close_detaches_the_layers_and_a_new_wrapper_serves_the_model():
    """close() left each experts module pointing at the closed wrapper: a layer run with "dwdp" afterwards went
    through the closed wrapper's scheduler (and store) instead of naming the mistake."""
    want = _eager_logits(1)
    model = tiny_model(1)
    old = StandInScheduler(2)
    hf.DwdpDeepseekV3(model, views=_views(model), scheduler=old).close()
    assert not any(hasattr(ex, "_dwdp") for _, ex in hf.moe_layers(model))
    model.config._experts_implementation = "dwdp"
    with pytest.raises(DwdpError, match="DwdpDeepseekV3 did not prepare"), torch.no_grad():
        model(IDS)
    model.config._experts_implementation = "grouped_mm"
    new = StandInScheduler(2)
    with hf.DwdpDeepseekV3(model, views=_views(model), scheduler=new), torch.no_grad():
        got = model(IDS).logits.float()
    assert old.log == [] and [e for e in new.log if e[0] != "begin"] == [
        ("wait", 0), ("release", 0), ("wait", 1), ("release", 1)]
    assert float((got - want).norm() / want.norm()) < 2e-2


@needs_hf
def test_a_second_close_changes_nothing():
    """close() restored the implementation name on every call: a second close (an explicit close() and then the
    with statement's, say) set it back to what it was before the first wrapper, under a later wrapper or a name
    the user set since."""
    model = tiny_model(1)
    first = hf.DwdpDeepseekV3(model, views=_views(model), scheduler=StandInScheduler(2))
    first.close()
    model.config._experts_implementation = "eager"
    first.close()
    assert model.config._experts_implementation == "eager"
    sched = StandInScheduler(2)
    with hf.DwdpDeepseekV3(model, views=_views(model), scheduler=sched):
        first.close()
        assert model.config._experts_implementation == "dwdp"
        with torch.no_grad():
            model(IDS)
        assert ("wait", 1) in sched.log
    assert model.config._experts_implementation == "eager"


def test_a_model_whose_experts_were_moved_out_is_refused_before_the_store(stand_in_store, monkeypatch):
    """Experts already freed (a model DwdpDeepseekV3 served before) or not the config's [E, 2I, H] / [E, H, I]
    had reached the collective store construction, failing there in store.load (after the store was built)."""
    model = _stand_in_model()
    for _, ex in hf.moe_layers(model):
        ex.gate_up_proj = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16), requires_grad=False)
    with pytest.raises(ValueError, match=r"gate_up_proj must be \[4, 16, 16\].*got \[0\]"):
        hf.DwdpDeepseekV3(model)
    model = _stand_in_model()
    hf.moe_layers(model)[1][1].down_proj = torch.nn.Parameter(torch.zeros(2, 16, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"down_proj must be \[4, 16, 8\].*got \[2, 16, 8\]"):
        hf.DwdpDeepseekV3(model)
    assert stand_in_store == []  # no store built
    import dwdp_ops.scheduler

    monkeypatch.setattr(dwdp_ops.scheduler, "PrefetchScheduler", lambda *a, **k: StandInScheduler(2))
    hf.DwdpDeepseekV3(_stand_in_model()).close()  # intact experts are served
    assert stand_in_store == ["register", "build", "close"]


def test_a_second_close_retries_a_store_whose_close_raised(stand_in_store):
    """ExpertStore.close() may raise and is retried by calling it again (it says so); the wrapper's close() must pass
    the retry on even though the rest of its closing is done once."""
    from types import SimpleNamespace as NS

    model = _stand_in_model()
    dw = hf.DwdpDeepseekV3(model, views=_views(model), scheduler=StandInScheduler(2))
    calls = []

    def close():
        calls.append("close")
        if len(calls) == 1:
            raise DwdpError("a release step failed")

    dw.store = NS(device=None, close=close)
    with pytest.raises(DwdpError, match="a release step failed"):
        dw.close()
    assert not model.model._forward_pre_hooks
    dw.close()
    dw.close()
    assert calls == ["close", "close"] and dw.store is None


def test_a_scheduler_without_views_is_refused(stand_in_store):
    """scheduler= is the stand-in of the views test path; without views it was ignored silently (the store-backed
    path builds its own PrefetchScheduler), after the experts had moved into the store."""
    model = _stand_in_model()
    with pytest.raises(ValueError, match="scheduler .* comes with views"):
        hf.DwdpDeepseekV3(model, scheduler=StandInScheduler(2))
    assert stand_in_store == []
    assert all(ex.gate_up_proj.shape == (4, 16, 16) for _, ex in hf.moe_layers(model))


@pytest.mark.parametrize("T, k, E, align", [(5, 2, 4, 16), (5, 2, 4, 1), (9, 4, 3, 4), (7, 3, 8, 1), (0, 2, 4, 16),
                                            (1, 1, 1, 16)])
def test_routed_experts_equal_a_loop_over_tokens_and_slots(T, k, E, align):
    """Repeated ids within a token (the same expert twice), empty experts, T = 0, align 1 and > 1."""
    g = torch.Generator().manual_seed(T * 100 + k * 10 + E)
    H = 6
    Ws = torch.randn(E, H, H, dtype=torch.float64, generator=g)
    x = torch.randn(T, H, dtype=torch.float64, generator=g)
    ids = torch.randint(0, E, (T, k), generator=g)
    w = torch.rand(T, k, dtype=torch.float64, generator=g)

    def mlp(xg, offs):
        out, lo = torch.zeros_like(xg), 0
        for e in range(E):
            hi = int(offs[e])
            out[lo:hi] = xg[lo:hi] @ Ws[e].T
            lo = hi
        return out

    want = torch.zeros_like(x)
    for t in range(T):
        for j in range(k):
            want[t] += w[t, j] * (Ws[ids[t, j]] @ x[t])
    got = routed_experts(x, w, ids, mlp, num_experts=E, align=align)
    assert got.shape == (T, H) and got.dtype == x.dtype
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
