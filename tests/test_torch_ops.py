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
        self.max_pairs, self.hidden, self.max_tokens, self.top_k = 4096, 64, 32, 4


def test_handles_are_stable_kinds_are_checked_and_released_handles_raise():
    s, d = PrefetchScheduler(), TokenDispatcher()
    hs, hd = ops.handle(s), ops.handle(d)
    assert hs != hd and ops.handle(s) == hs and ops.lookup(hs, "PrefetchScheduler") is s
    with pytest.raises(DwdpError, match="is a TokenDispatcher, this op needs a PrefetchScheduler"):
        ops.lookup(hd, "PrefetchScheduler")
    ops.release_handle(hs)
    with pytest.raises(DwdpError, match=f"handle {hs} is not registered"):
        ops.lookup(hs)
    ops.release_handle(hd)  # (the registry is process-wide)


def test_a_subclass_of_the_kind_is_that_kind():
    """An engine's own subclass of PrefetchScheduler (or TokenDispatcher) had been refused by every op, the kind
    compared with the object's own class name: "handle 3 is a MyScheduler, this op needs a PrefetchScheduler"."""

    class MyScheduler(PrefetchScheduler):
        pass

    s = MyScheduler()
    h = ops.handle(s)
    try:
        assert ops.lookup(h, "PrefetchScheduler") is s
        with pytest.raises(DwdpError, match="is a MyScheduler, this op needs a TokenDispatcher"):
            ops.lookup(h, "TokenDispatcher")
    finally:
        ops.release_handle(h)


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


@pytest.fixture
def registered():
    """``registered(obj)``: ``ops.handle(obj)``, released after the test (the registry is process-wide)."""
    made = []
    yield lambda obj: made.append(ops.handle(obj)) or made[-1]
    for h in made:
        ops.release_handle(h)


def test_a_dwdp_moe_layer_traces_with_its_ops_in_order(registered):
    s = registered(PrefetchScheduler())
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


def test_a_dep_moe_layer_traces_with_capacity_or_row_bound(registered):
    d = registered(TokenDispatcher())
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
    for rows in (-2, 0):  # (-2 had been taken as -1, the capacity)
        with FakeTensorMode(), pytest.raises(ValueError, match=rf"max_rows must be -1 \(the capacity\) or a row "
                                                               rf"bound >= 1, got {rows}"):
            layer(torch.empty((T, H), dtype=torch.bfloat16), torch.empty((T, k), dtype=torch.int64),
                  torch.empty((T, k)), torch.empty((8, 64, H), dtype=torch.bfloat16),
                  torch.empty((8, H, 32), dtype=torch.bfloat16), rows)


def _bad_dep_calls():
    """(name, op, args after the handle, error, message) of dispatch / combine calls the dispatcher refuses (hidden
    64, max_tokens 32, top_k 4, max_pairs 4096), as fake tensors are made of them."""
    bf, T = torch.bfloat16, 12
    x, ids, w = torch.empty((T, 64), dtype=bf), torch.empty((T, 4), dtype=torch.int64), torch.empty((T, 4))
    return [
        ("max_rows above max_pairs", "dispatch", (x, ids, w), (5000,), ValueError,
         r"max_rows must be -1 \(the capacity\) or in \[1, max_pairs = 4096\], got 5000"),
        ("x of another hidden size", "dispatch", (torch.empty((T, 32), dtype=bf), ids, w), (-1,), ValueError,
         r"x must be a contiguous \[T, 64\] bf16 tensor, got shape \[12, 32\]"),
        ("float32 x", "dispatch", (x.float(), ids, w), (-1,), TypeError, "x must be bfloat16, got torch.float32"),
        ("1-D x", "dispatch", (torch.empty((64,), dtype=bf), ids, w), (-1,), ValueError, r"got shape \[64\]"),
        ("more tokens than max_tokens", "dispatch", (torch.empty((40, 64), dtype=bf), torch.empty((40, 4), dtype=torch.int64),
                                                      torch.empty((40, 4))), (-1,), ValueError,
         "40 tokens exceed the dispatcher's max_tokens = 32"),
        ("float ids", "dispatch", (x, w, w), (-1,), TypeError,
         r"topk_ids must be a contiguous int32/int64 \[12, 4\] tensor, got torch.float32"),
        ("ids of another k", "dispatch", (x, ids[:, :2], w), (-1,), TypeError, r"topk_ids .* got torch.int64 \[12, 2\]"),
        ("bf16 weights", "dispatch", (x, ids, w.to(bf)), (-1,), TypeError,
         r"topk_weights must be a contiguous float32 \[12, 4\] tensor, got torch.bfloat16"),
        ("y of another hidden size", "combine", (torch.empty((100, 32), dtype=bf), x), (), TypeError,
         r"y_grouped must be a contiguous bf16 \[rows, 64\] tensor, got torch.bfloat16 \[100, 32\]"),
        ("float32 y", "combine", (torch.empty((100, 64)), x), (), TypeError, "y_grouped .* got torch.float32"),
        ("1-D y", "combine", (torch.empty((100,), dtype=bf), x), (), TypeError, r"y_grouped .* \[100\]"),
        ("1-D x", "combine", (torch.empty((100, 64), dtype=bf), torch.empty((64,), dtype=bf)), (), ValueError,
         r"x must be the dispatch's input, \[T, 64\], got \[64\]"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_dep_calls())), ids=[c[0] for c in _bad_dep_calls()])
def test_dispatch_and_combine_fakes_refuse_what_the_dispatcher_refuses(registered, case):
    """The fakes had checked max_rows only: a trace got [5000, H] rows past max_pairs, [4096, 32] for an x of the wrong
    hidden size, [12, 32] from a combine of a y_grouped the dispatcher refuses, bf16 outputs of float32 inputs (and an
    IndexError for a 1-D tensor), where the eager op raises."""
    d = registered(TokenDispatcher())
    _, op, tensors, tail, err, msg = _bad_dep_calls()[case]
    with FakeTensorMode() as mode, pytest.raises(err, match=msg):
        getattr(torch.ops.dwdp, op)(*(mode.from_tensor(t) for t in tensors), d, *tail)
    with pytest.raises(err, match=msg):  # meta tensors: the same
        getattr(torch.ops.dwdp, op)(*(t.to("meta") for t in tensors), d, *tail)


def test_the_combine_fake_refuses_a_stale_handle():
    h = ops.handle(TokenDispatcher())
    ops.release_handle(h)
    with FakeTensorMode(), pytest.raises(DwdpError, match=f"handle {h} is not registered"):
        torch.ops.dwdp.combine(torch.empty((8, 64), dtype=torch.bfloat16), torch.empty((4, 64), dtype=torch.bfloat16), h)


def _mlp_args(G=2, H=32, I=16, R=32):
    x = torch.randn((R, H)).to(torch.bfloat16)
    offs = torch.tensor([16, R], dtype=torch.int32)
    return x, offs, torch.randn((G, 2 * I, H)).to(torch.bfloat16), torch.randn((G, H, I)).to(torch.bfloat16)


def _bad_mlp_calls():
    """(name, args, error, message) of calls dwdp::expert_mlp must refuse, on CPU tensors."""
    x, offs, w13, w2 = _mlp_args()
    G, H, I = 2, 32, 16
    f8 = torch.float8_e4m3fn
    s13, s2 = torch.ones((G, 2 * I)), torch.ones((G, H))
    return [
        ("w2 [G, H+16, I]", (x, offs, w13, torch.zeros((G, H + 16, I), dtype=torch.bfloat16)), ValueError,
         r"w13 must be \[G, 2I, 32\] and w2 \[G, 32, I\]"),
        ("float32 weights", (x.float(), offs, w13.float(), w2.float()), TypeError,
         "w13 and w2 must both be bfloat16, or both float8_e4m3fn with row scales; got torch.float32"),
        ("float32 x", (x.float(), offs, w13, w2), TypeError, "x_grouped must be bfloat16, got torch.float32"),
        ("int64 offs", (x, offs.long(), w13, w2), TypeError, "offs must be int32"),
        ("fp8 without s2", (x, offs, w13.to(f8), w2.to(f8), s13, None), ValueError,
         r"fp8 weights need both row scales.*got torch.float8_e4m3fn weights with s13 torch.float32 \[2, 32\] and s2 None"),
        ("fp8 without scales", (x, offs, w13.to(f8), w2.to(f8)), ValueError, "fp8 weights need both row scales"),
        ("bf16 with scales", (x, offs, w13, w2, s13, s2), ValueError, "bf16 neither; got torch.bfloat16 weights"),
        ("float16 scales", (x, offs, w13.to(f8), w2.to(f8), s13.half(), s2.half()), TypeError,
         "row scales s13 and s2 must be float32, got torch.float16"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_mlp_calls())), ids=[c[0] for c in _bad_mlp_calls()])
def test_expert_mlp_refuses_bad_arguments_eagerly_as_its_fake_does(case):
    """The eager op checks what its fake checks (a wrong shape ran eagerly and was refused only when compiled;
    float32 ran and returned float32 where the fake says bf16; fp8 without s2 failed after its first GEMM)."""
    _, args, err, msg = _bad_mlp_calls()[case]
    with pytest.raises(err, match=msg):
        torch.ops.dwdp.expert_mlp(*args)
    with FakeTensorMode() as mode, pytest.raises(err, match=msg):
        torch.ops.dwdp.expert_mlp(*(None if a is None else mode.from_tensor(a) for a in args))


def test_expert_mlp_valid_calls_run_and_devices_are_checked():
    x, offs, w13, w2 = _mlp_args()
    h = torch._grouped_mm(x, w13.transpose(-2, -1), offs=offs)  # what the op computes (CPU: PyTorch's grouped mm)
    want = torch._grouped_mm(torch.nn.functional.silu(h[:, :16]) * h[:, 16:], w2.transpose(-2, -1), offs=offs)
    assert torch.equal(torch.ops.dwdp.expert_mlp(x, offs, w13, w2), want)
    with pytest.raises(ValueError, match=r"every tensor must be on one device, got x_grouped on meta, offs on cpu"):
        ops._check_mlp(x.to("meta"), offs, w13, w2, None, None)
    f8 = torch.float8_e4m3fn
    ops._check_mlp(x.to("meta"), offs.to("meta"), w13.to(f8).to("meta"), w2.to(f8).to("meta"),
                   torch.ones((2, 32), device="meta"), torch.ones((2, 32), device="meta"))  # fp8 with scales: valid


def test_expert_mlp_is_inference_only_as_documented():
    """Inputs that require grad run forward (the Hugging Face integration's plain forward outside no_grad passes
    such rows), and a backward through the op raises PyTorch's error: no gradient is made up."""
    x, offs, w13, w2 = _mlp_args()
    y = torch.ops.dwdp.expert_mlp(x.requires_grad_(), offs, w13, w2)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        y.float().sum().backward()


class OnDemandScheduler:  # stand-in PrefetchScheduler of an on_demand step, recording what the op hands it
    step_policy = "on_demand"

    def __init__(self, experts=None, device=None):
        from types import SimpleNamespace

        self.store = SimpleNamespace(E=experts, device=device)
        self.got = []

    def wait(self, layer, stream, ids=None):
        self.got.append(("wait", layer, stream, ids))

    def release(self, layer, stream):
        self.got.append(("release", layer, stream))


OnDemandScheduler.__name__ = "PrefetchScheduler"


def _streams(monkeypatch):
    """No GPU here: ops._stream records which tensor's device the op asked the stream of."""
    asked = []
    monkeypatch.setattr(ops, "_stream", lambda *a: asked.append(a) or "stream")
    return asked


def test_wait_refuses_non_integer_ids_and_out_of_range_host_ids(monkeypatch):
    _streams(monkeypatch)
    s = OnDemandScheduler(experts=16)
    h = ops.handle(s)
    w13, w2 = torch.empty((16, 4, 4)), torch.empty((16, 4, 2))
    for bad in (torch.tensor([[0.7, 0.3], [0.9, 0.1]]), torch.tensor([True, False])):  # router weights, a mask
        with pytest.raises(TypeError, match=f"ids must be the router's integer expert ids.*got {bad.dtype}"):
            torch.ops.dwdp.wait(w13, w2, h, 0, bad)
        with FakeTensorMode() as mode, pytest.raises(TypeError, match="integer expert ids"):  # traced: refused too
            torch.ops.dwdp.wait(mode.from_tensor(w13), mode.from_tensor(w2), h, 0, mode.from_tensor(bad))
    for bad, value in ((2**32 + 3, 2**32 + 3), (16, 16), (-1, -1)):  # 2**32 + 3 was cast to expert 3
        with pytest.raises(ValueError, match=rf"expert id {value} is outside \[0, 16\)"):
            torch.ops.dwdp.wait(w13, w2, h, 0, torch.tensor([[1, bad]], dtype=torch.int64))
    assert s.got == []
    torch.ops.dwdp.wait(w13, w2, h, 3, torch.tensor([[3, 5], [15, 0]]))
    (_, layer, _, ids), = s.got
    assert layer == 3 and ids.dtype == torch.int32 and ids.tolist() == [3, 5, 15, 0]
    ops.release_handle(h)


def test_ops_use_their_tensors_device_stream_and_refuse_another_gpu(monkeypatch):
    """The stream is asked for the tensors' device (torch.cuda.current_stream(device), not the current device's), and
    tensors off the scheduler's GPU are refused before anything is enqueued."""
    asked = _streams(monkeypatch)
    s = OnDemandScheduler(experts=16)
    h = ops.handle(s)
    w13, w2, y = torch.empty((16, 4, 4)), torch.empty((16, 4, 2)), torch.empty((8, 4))
    torch.ops.dwdp.wait(w13, w2, h, 0, torch.tensor([1]))
    torch.ops.dwdp.release(w13, y, h, 0)
    assert [(a[0], a[1], a[2] is w13) for a in asked] == [("dwdp::wait(0)", "w13", True),
                                                          ("dwdp::release(0)", "w13", True)]
    s.store.device = 1
    with pytest.raises(ValueError, match=r"dwdp::wait\(0\): the tensors must be on the library object's GPU, cuda:1, "
                                         r"got w13 on cpu, w2 on cpu"):
        torch.ops.dwdp.wait(w13, w2, h, 0, torch.tensor([1]))
    with pytest.raises(ValueError, match=r"dwdp::release\(0\): .* cuda:1, got w13 on cpu, moe_out on cpu"):
        torch.ops.dwdp.release(w13, y, h, 0)
    ops.release_handle(h)
    monkeypatch.undo()
    seen = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: seen.append(device) or "stream")
    with FakeTensorMode():  # CUDA tensors without a GPU (no data)
        on1 = torch.empty((4,), device="cuda:1")
        assert ops._stream("op", "w13", on1) == "stream" and seen == [torch.device("cuda:1")]
        with pytest.raises(ValueError, match="every tensor must be on one device, got w13 on cuda:1, ids on cuda:0"):
            ops._check_devices("op", None, w13=on1, ids=torch.empty((4,), device="cuda:0"))
    with pytest.raises(ValueError, match="op: w13 must be a CUDA tensor .* got w13 on cpu"):
        ops._stream("op", "w13", torch.empty(4))


def test_wait_and_release_fakes_refuse_what_the_ops_refuse():
    """The fakes had checked the ids' dtype only: a trace accepted a stale handle, a dispatcher's handle, views on
    another GPU than the scheduler's and tensors on two GPUs, which the eager ops refuse."""
    s, d = OnDemandScheduler(experts=16, device=0), TokenDispatcher()
    h, hd = ops.handle(s), ops.handle(d)
    stale = ops.handle(object())
    ops.release_handle(stale)
    try:
        with FakeTensorMode():
            on0, on1 = torch.empty((16, 4, 4), device="cuda:0"), torch.empty((16, 4, 4), device="cuda:1")
            torch.ops.dwdp.wait(on0, on0, h, 0)  # valid: traced
            torch.ops.dwdp.release(on0, on0, h, 0)
            for op, args in (("wait", (on0, on0)), ("release", (on0, on0))):
                with pytest.raises(DwdpError, match=f"handle {stale} is not registered"):
                    getattr(torch.ops.dwdp, op)(*args, stale, 0)
                with pytest.raises(DwdpError, match="is a TokenDispatcher, this op needs a PrefetchScheduler"):
                    getattr(torch.ops.dwdp, op)(*args, hd, 0)
            with pytest.raises(ValueError, match=r"dwdp::wait\(2\): the tensors must be on the library object's GPU, "
                                                 r"cuda:0, got w13 on cuda:1, w2 on cuda:1"):
                torch.ops.dwdp.wait(on1, on1, h, 2)
            with pytest.raises(ValueError, match=r"dwdp::wait\(2\): every tensor must be on one device"):
                torch.ops.dwdp.wait(on0, on0, h, 2, torch.empty((4, 2), dtype=torch.int64, device="cuda:1"))
            with pytest.raises(ValueError, match=r"dwdp::release\(1\): every tensor must be on one device, got w13 on "
                                                 r"cuda:0, moe_out on cuda:1"):
                torch.ops.dwdp.release(on0, on1, h, 1)
        assert s.got == []
    finally:
        ops.release_handle(h)
        ops.release_handle(hd)


class FlakyDispatcher:  # stand-in TokenDispatcher whose first combine raises
    def __init__(self):
        self.hidden, self.calls = 8, 0

    def combine(self, y, h, out=None, stream=None):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a transient failure")
        return out.fill_(1)


FlakyDispatcher.__name__ = "TokenDispatcher"


def test_combine_keeps_its_dispatch_until_it_succeeds_and_checks_x(monkeypatch):
    from types import SimpleNamespace

    _streams(monkeypatch)
    d = FlakyDispatcher()
    h = ops.handle(d)
    ops._PENDING[h] = SimpleNamespace(num_tokens=5)
    y, x = torch.empty((16, 8), dtype=torch.bfloat16), torch.empty((5, 8), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"x must be the dispatch's input, \[T, H\] = \[5, 8\].*got \[3, 8\]"):
        torch.ops.dwdp.combine(y, x[:3], h)  # the fake would give 3 rows, the op 5
    with pytest.raises(RuntimeError, match="a transient failure"):
        torch.ops.dwdp.combine(y, x, h)
    out = torch.ops.dwdp.combine(y, x, h)  # the retry finds its dispatch
    assert out.shape == (5, 8) and bool((out == 1).all()) and h not in ops._PENDING
    with pytest.raises(DwdpError, match="has no dispatch to combine"):
        torch.ops.dwdp.combine(y, x, h)
    ops._PENDING[h] = SimpleNamespace(num_tokens=5)  # a dispatch never combined: released with its handle
    ops.release_handle(h)
    assert h not in ops._PENDING
