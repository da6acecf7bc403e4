"""The PyTorch custom ops (dwdp_ops.torch) on the CPU: the handle registry, and the fake implementations that let a
MoE layer trace (shapes, dtypes, the order of wait / MLP / release, nothing dropped); the ops' real kernels run in
tests/test_gpu_torch_ops.py."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
ops = pytest.importorskip("dwdp_ops.torch")

from dwdp_ops.errors import DwdpError  # noqa: E402
from dwdp_ops.partition import ExpertPartition  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402


class PrefetchScheduler:  # stand-in with the real class's name (the ops check the kind of a handle by name)
    step_policy = "prefetch_all"


class TokenDispatcher:
    def __init__(self):
        self.partition = ExpertPartition.disjoint(16, 2)
        self.max_pairs, self.hidden = 4096, 64


def test_handles_are_stable_kinds_are_checked_and_released_handles_raise():
    s, d = PrefetchScheduler(), TokenDispatcher()
    hs, hd = ops.handle(s), ops.handle(d)
    assert hs != hd and ops.handle(s) == hs and ops.lookup(hs, "PrefetchScheduler") is s
    with pytest.raises(DwdpError, match="is a TokenDispatcher, this op needs a PrefetchScheduler"):
        ops.lookup(hd, "PrefetchScheduler")
    ops.release_handle(hs)
    with pytest.raises(DwdpError, match=f"handle {hs} is not registered"):
        ops.lookup(hs)


@pytest.mark.parametrize("fp8", [False, True])
def test_expert_mlp_fake_shapes(fp8):
    G, H, I, R = 8, 64, 32, 256
    wdt = torch.float8_e4m3fn if fp8 else torch.bfloat16
    with FakeTensorMode():
        x = torch.empty((R, H), dtype=torch.bfloat16)
        offs = torch.empty((G,), dtype=torch.int32)
        w13, w2 = torch.empty((G, 2 * I, H), dtype=wdt), torch.empty((G, H, I), dtype=wdt)
        sc = (torch.empty((G, 2 * I)), torch.empty((G, H))) if fp8 else (None, None)
        y = torch.ops.dwdp.expert_mlp(x, offs, w13, w2, *sc)
        assert y.shape == (R, H) and y.dtype == torch.bfloat16
        with pytest.raises(ValueError, match="w13 must be"):
            torch.ops.dwdp.expert_mlp(x, offs, w13[:, :, :32], w2, *sc)
        with pytest.raises(ValueError, match="need both row scales"):
            torch.ops.dwdp.expert_mlp(x, offs, w13, w2, sc[0] if fp8 else torch.empty((G, 2 * I)), None)


def test_a_dwdp_moe_layer_traces_with_its_ops_in_order():
    s = ops.handle(PrefetchScheduler())
    G, H, I, R = 8, 64, 32, 128

    def layer(x, offs, w13, w2):
        torch.ops.dwdp.wait(w13, w2, s, 0)
        y = torch.ops.dwdp.expert_mlp(x, offs, w13, w2)
        torch.ops.dwdp.release(w13, y, s, 0)
        return y

    args = (torch.empty((R, H), dtype=torch.bfloat16), torch.empty((G,), dtype=torch.int32),
            torch.empty((G, 2 * I, H), dtype=torch.bfloat16), torch.empty((G, H, I), dtype=torch.bfloat16))
    gm = make_fx(layer, tracing_mode="fake")(*args)
    names = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    got = [n for n in names if "dwdp" in n]
    assert got == ["dwdp.wait.default", "dwdp.expert_mlp.default", "dwdp.release.default"], names
    assert all(n.is_impure() for n in gm.graph.nodes if str(n.target) in ("dwdp.wait.default", "dwdp.release.default"))


def test_a_dep_moe_layer_traces_with_capacity_or_row_bound():
    d = ops.handle(TokenDispatcher())
    T, H, k = 12, 64, 4

    def layer(x, ids, w, w13, w2, rows):
        xg, offs = torch.ops.dwdp.dispatch(x, ids, w, d, rows)
        y = torch.ops.dwdp.expert_mlp(xg, offs, w13, w2)
        return torch.ops.dwdp.combine(y, x, d), xg

    for rows, want in ((-1, 4096), (160, 160)):
        with FakeTensorMode():
            x = torch.empty((T, H), dtype=torch.bfloat16)
            out, xg = layer(x, torch.empty((T, k), dtype=torch.int64), torch.empty((T, k)),
                            torch.empty((8, 64, H), dtype=torch.bfloat16), torch.empty((8, H, 32), dtype=torch.bfloat16),
                            rows)
            assert out.shape == (T, H) and out.dtype == torch.bfloat16 and xg.shape == (want, H)
