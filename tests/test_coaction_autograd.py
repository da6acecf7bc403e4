"""The co-action autograd op (``dwdp_ops.coaction.coaction``): gradients from ``loss.backward()`` against a PyTorch
implementation of the reference math differentiated by autograd in float64 (GPU), a few SGD steps of a tiny CTR
model (GPU), and the argument checks that run before any kernel (CPU)."""

from __future__ import annotations

import pytest
from dwdp_ops.coaction import CoActionSpec

torch = pytest.importorskip("torch")

CONFIGS = [
    dict(layer_dims=((16, 8), (8, 4)), orders=3, bias=False),
    dict(layer_dims=((5, 4),), orders=2, bias=True),
    dict(layer_dims=((6, 5), (5, 4), (4, 2)), orders=3, bias=True, order_independent=True),
    dict(layer_dims=((16, 8), (8, 4)), orders=3, bias=True, variant="paper"),
]


def torch_reference(spec: CoActionSpec, ind, feed, mask):
    """The semantics of ``reference.coaction_forward`` in PyTorch ops on gathered rows (``ind [B, D']``, ``feed [B,
    T, D]``), so that autograd gives the reference gradients."""
    outs = []
    m = mask[:, :, None].to(feed.dtype)
    for c in range(1, spec.orders + 1):
        off = (c - 1) * spec.order_width if spec.order_independent else 0
        h, pooled = feed**c, []
        for layer, (i, o) in enumerate(spec.layer_dims):
            w = ind[:, off : off + i * o].reshape(-1, i, o)
            off += i * o
            z = torch.bmm(h, w)
            if spec.bias:
                z = z + ind[:, None, off : off + o]
                off += o
            h = torch.tanh(z) if spec.activated(layer) else z
            pooled.append((h * m).sum(1))
        outs.append(torch.cat(pooled, -1))
    return sum(outs) if spec.variant == "paper" else torch.cat(outs, -1)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make(spec, B, T, seed, rows=None):
    g = torch.Generator().manual_seed(seed)
    ind = torch.randn(rows or B, spec.induction_dim, generator=g) * 0.3
    feed = torch.randn(*((rows, spec.feed_dim) if rows else (B, T, spec.feed_dim)), generator=g) * 0.6
    mask = (torch.rand(B, T, generator=g) < 0.8).float()
    gout = torch.randn(B, spec.out_dim, generator=g)
    return ind, feed, mask, gout


# --------------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("B, T", [(3, 1), (37, 50)])
def test_gradients_equal_the_reference(cfg, B, T, dtype, bound):
    from dwdp_ops.coaction import coaction

    spec = CoActionSpec(**cfg)
    ind, feed, mask, gout = (t.cuda() for t in make(spec, B, T, B + T))
    ind, feed = ind.to(dtype), feed.to(dtype)  # the reference starts from the same (rounded) values
    a, b = ind.clone().requires_grad_(), feed.clone().requires_grad_()
    out = coaction(a, b, mask, spec)
    assert out.dtype == dtype and out.shape == (B, spec.out_dim) and out.device == ind.device
    (out.float() * gout).sum().backward()
    ra, rb = ind.double().requires_grad_(), feed.double().requires_grad_()
    want = torch_reference(spec, ra, rb, mask.double())
    (want * gout.double()).sum().backward()
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    assert rel(out, want) <= bound
    assert rel(a.grad, ra.grad) <= bound, rel(a.grad, ra.grad)
    assert rel(b.grad, rb.grad) <= bound, rel(b.grad, rb.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_table_gradients_are_table_shaped_and_accumulate(dtype, bound):
    from dwdp_ops.coaction import coaction

    spec = CoActionSpec()
    B, T, rows = 40, 30, 25  # fewer rows than samples: ids repeat, their gradients add up
    table, ftable, mask, gout = (t.cuda() for t in make(spec, B, T, 5, rows=rows))
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, rows, (B,), generator=g).cuda()
    fids = torch.randint(0, rows, (B, T), generator=g, dtype=torch.int32).cuda()  # int32 ids are widened
    table, ftable = table.to(dtype), ftable.to(dtype)
    a, b = table.clone().requires_grad_(), ftable.clone().requires_grad_()
    out = coaction(a, b, mask, spec, ind_ids=ids, feed_ids=fids)
    (out.float() * gout).sum().backward()
    ra, rb = table.double().requires_grad_(), ftable.double().requires_grad_()
    want = torch_reference(spec, ra[ids], rb[fids.long()], mask.double())
    (want * gout.double()).sum().backward()
    assert a.grad.shape == table.shape and b.grad.shape == ftable.shape
    assert rel(out, want) <= bound
    assert rel(a.grad, ra.grad) <= bound and rel(b.grad, rb.grad) <= bound
    with pytest.raises(ValueError, match=r"ind_ids must be in \[0, 25\)"):
        coaction(a, b, mask, spec, ind_ids=ids + rows, feed_ids=fids)


@pytest.mark.gpu
def test_one_table_in_two_calls_and_forwards_without_a_backward(monkeypatch):
    """The forward zeroes its backward's gradient arrays (TableGrads): one table read by two calls in one loss gets
    the sum of both calls' gradients (each call its own arrays), forwards whose graph is dropped without a backward
    give their arrays back to PyTorch's allocator (and CuPy's pool is never touched), and a forward under no_grad or
    on tensors that need no gradient makes none."""
    import cupy as cp
    from dwdp_ops.coaction import coaction, fused

    spec = CoActionSpec()
    B, T, rows = 300, 40, 50
    table, ftable, mask, gout = (t.cuda() for t in make(spec, B, T, 8, rows=rows))
    g = torch.Generator().manual_seed(9)
    ids, ids2 = (torch.randint(0, rows, (B,), generator=g).cuda() for _ in range(2))
    fids = torch.randint(0, rows, (B, T), generator=g).cuda()
    a, b = table.clone().requires_grad_(), ftable.clone().requires_grad_()
    ((coaction(a, b, mask, spec, ind_ids=ids, feed_ids=fids) + coaction(a, b, mask, spec, ind_ids=ids2,
                                                                         feed_ids=fids)) * gout).sum().backward()
    ra, rb = table.double().requires_grad_(), ftable.double().requires_grad_()
    want = (torch_reference(spec, ra[ids], rb[fids], mask.double())
            + torch_reference(spec, ra[ids2], rb[fids], mask.double()))
    (want * gout.double()).sum().backward()
    assert rel(a.grad, ra.grad) <= 1e-5 and rel(b.grad, rb.grad) <= 1e-5
    torch.cuda.synchronize()
    pool = cp.get_default_memory_pool()
    used, held = pool.used_bytes(), torch.cuda.memory_allocated()
    for _ in range(5):
        coaction(a, b, mask, spec, ind_ids=ids, feed_ids=fids)  # the graph (and its TableGrads) dropped at once
    torch.cuda.synchronize()
    assert pool.used_bytes() == used and torch.cuda.memory_allocated() == held
    made = []
    real = fused.TableGrads.__init__
    monkeypatch.setattr(fused.TableGrads, "__init__", lambda self, *a, **k: made.append(1) or real(self, *a, **k))
    with torch.no_grad():
        coaction(a, b, mask, spec, ind_ids=ids, feed_ids=fids)
    coaction(table, ftable, mask, spec, ind_ids=ids, feed_ids=fids)  # nothing requires grad
    assert made == []  # no gradient arrays without a backward to come
    coaction(a, b, mask, spec, ind_ids=ids, feed_ids=fids)
    assert made == [1]


@pytest.mark.gpu
def test_a_step_makes_no_cupy_array_and_no_dlpack_exchange(monkeypatch):
    """The autograd op hands the kernels the tensors' addresses: a training step (table + ids, and gathered rows in
    bf16) makes no CuPy array and no DLPack capsule (each exchange cost ~0.1 ms of host time a tensor: a step took
    ~1.1 ms of host work with them, bench/coaction_host.py); its output and gradients are PyTorch's allocations, and
    a float32 gradient becomes the table's .grad as it is (no table-sized copy by AccumulateGrad)."""
    import cupy as cp
    from dwdp_ops.coaction import coaction, fused

    spec = CoActionSpec()
    B, T, rows = 100, 30, 40
    table, ftable, mask, gout = (t.cuda() for t in make(spec, B, T, 4, rows=rows))
    g = torch.Generator().manual_seed(2)
    ids, fids = torch.randint(0, rows, (B,), generator=g).cuda(), torch.randint(0, rows, (B, T), generator=g).cuda()
    ind, feed, _, _ = (t.cuda() for t in make(spec, B, T, 5))

    def refuse(*a, **k):
        raise AssertionError("a DLPack exchange on the autograd op's path")

    for mod, name in ((cp, "from_dlpack"), (torch, "from_dlpack"), (torch.utils.dlpack, "from_dlpack"),
                      (torch.Tensor, "__dlpack__")):
        monkeypatch.setattr(mod, name, refuse)
    made = []
    real = fused.TableGrads.__init__
    monkeypatch.setattr(fused.TableGrads, "__init__",  # (the op hands the gradient tensors' DeviceBuffers)
                        lambda self, *a, **k: made.append([t.ptr for t in k["arrays"]]) or real(self, *a, **k))
    read = []  # every tensor the fused ops' checks would read again: none (the op hands them DeviceBuffers)
    real_buffer = fused.device_buffer
    monkeypatch.setattr(fused, "device_buffer",
                        lambda obj, name="array": (read.append(name) if isinstance(obj, torch.Tensor) else None)
                        or real_buffer(obj, name))

    def no_cupy_memory(nbytes):
        raise AssertionError(f"a CuPy allocation ({nbytes} bytes) on the autograd op's path")

    allocator = cp.cuda.get_allocator()
    cp.cuda.set_allocator(no_cupy_memory)  # (any CuPy array with memory of its own would come from here)
    try:
        for args, kw in (((table, ftable), dict(ind_ids=ids, feed_ids=fids)),
                         ((ind.bfloat16(), feed.bfloat16()), {})):
            a, b = (x.clone().requires_grad_() for x in args)
            out = coaction(a, b, mask, spec, **kw)
            (out.float() * gout).sum().backward()
            assert out.dtype == a.dtype and a.grad.dtype == a.dtype and b.grad.shape == b.shape
            if a.dtype == torch.float32:
                assert [a.grad.data_ptr(), b.grad.data_ptr()] == made[-1]
    finally:
        cp.cuda.set_allocator(allocator)
    torch.cuda.synchronize()
    assert read == [], f"tensors read again by the fused ops' checks: {read}"


@pytest.mark.gpu
def test_apply_without_the_checks_still_refuses_by_name():
    """``CoActionFunction.apply`` called directly (no ``coaction`` checks): a tensor the op cannot hand over as it is
    (non-contiguous, a bool mask) reaches the fused ops' own checks, which name it; nothing runs."""
    from dwdp_ops.coaction import CoActionFunction

    spec = CoActionSpec()
    ind, feed, mask, _ = (t.cuda() for t in make(spec, 6, 5, 1))
    strided = feed.transpose(0, 1).contiguous().transpose(0, 1)  # [B, T, D] with T-major strides
    with pytest.raises(ValueError, match="feed must be contiguous"):
        CoActionFunction.apply(ind, strided, mask, spec, None, None, True, False)
    with pytest.raises(TypeError, match="mask must be a contiguous float32"):
        CoActionFunction.apply(ind, feed, mask.bool(), spec, None, None, True, False)


@pytest.mark.gpu
def test_a_captured_training_step_replays_like_eager_steps():
    """A whole training step (the op's forward, its backward into the tables' .grad) captured in a CUDA graph with
    torch.cuda.graph: replays, from NaN-filled static outputs, alternate with eager steps on PyTorch's stream and
    give the eager step's output and gradients (the forward's kernel zeroes the gradient arrays on every replay)."""
    from dwdp_ops.coaction import coaction

    spec = CoActionSpec()
    B, T, rows = 200, 30, 40
    table, ftable, mask, gout = (t.cuda() for t in make(spec, B, T, 6, rows=rows))
    g = torch.Generator().manual_seed(3)
    ids, fids = torch.randint(0, rows, (B,), generator=g).cuda(), torch.randint(0, rows, (B, T), generator=g).cuda()
    a, b = table.clone().requires_grad_(), ftable.clone().requires_grad_()

    def step():
        out = coaction(a, b, mask, spec, ind_ids=ids, feed_ids=fids, check_ids=False)  # (no host wait in a capture)
        (out * gout).sum().backward()
        return out

    want = step().detach().clone()
    wa, wb = a.grad.clone(), b.grad.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
        for _ in range(2):
            a.grad = b.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    a.grad = b.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    static = (out, a.grad, b.grad)
    for i in range(6):
        if i % 2:
            for t in static:
                t.fill_(float("nan"))
            graph.replay()
            got = static
        else:
            a.grad = b.grad = None
            got = (step(), a.grad, b.grad)
            a.grad, b.grad = static[1], static[2]
        torch.cuda.synchronize()
        assert rel(got[0], want) <= 1e-6  # (the table gradients' atomics add in any order)
        assert rel(got[1], wa) <= 1e-6 and rel(got[2], wb) <= 1e-6


@pytest.mark.gpu
def test_runs_on_the_current_torch_stream_and_only_needed_gradients():
    from dwdp_ops.coaction import coaction

    spec = CoActionSpec()
    ind, feed, mask, gout = (t.cuda() for t in make(spec, 64, 100, 9))
    want = coaction(ind, feed, mask, spec)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        a = ind.clone().requires_grad_()
        out = coaction(a, feed, mask.bool(), spec)  # a bool mask is taken as 0/1
        (out * gout).sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.allclose(out, want, rtol=1e-6, atol=1e-6)  # the same kernel on another stream
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert not feed.requires_grad and feed.grad is None
    with pytest.raises(ValueError, match="got induction on cuda:0, feed on cuda:0, mask on cpu"):
        coaction(ind, feed, mask.cpu(), spec)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_tiny_ctr_model_trains(dtype):
    """Item embeddings as induction rows (table + ids), behaviour embeddings as the feed table, a linear head and
    BCE: a few SGD steps on one batch lower the loss, and the tables' gradients come from the fused backward."""
    from dwdp_ops.coaction import coaction

    torch.manual_seed(0)
    spec = CoActionSpec()
    items, B, T = 200, 256, 20
    dev = torch.device("cuda")
    ind_table = torch.nn.Parameter((torch.randn(items, spec.induction_dim) * 0.3).to(dev, dtype))
    feed_table = torch.nn.Parameter((torch.randn(items, spec.feed_dim) * 0.6).to(dev, dtype))
    head = torch.nn.Linear(spec.out_dim, 1).to(dev, dtype)
    target = torch.randint(0, items, (B,), device=dev)
    history = torch.randint(0, items, (B, T), device=dev)
    mask = (torch.rand(B, T, device=dev) < 0.7).float()
    # a label the co-action can explain: whether the target's and the history's first feature agree in sign
    label = ((feed_table.detach()[target, 0].float() * feed_table.detach()[history, 0].float().mean(1)) > 0).float()
    opt = torch.optim.SGD([ind_table, feed_table, *head.parameters()], lr=0.5)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        x = coaction(ind_table, feed_table, mask, spec, ind_ids=target, feed_ids=history, check_ids=False)
        logit = head(x / T).squeeze(-1).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, label)
        loss.backward()
        assert ind_table.grad.shape == ind_table.shape and ind_table.grad.dtype == dtype
        assert feed_table.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)), losses  # no NaN
    assert losses[-1] < losses[0], losses


# --------------------------------------------------------------------------------------------------------------- CPU


def test_import_of_the_package_does_not_need_torch():
    import subprocess
    import sys

    code = ("import sys, builtins; real = builtins.__import__\n"
            "def imp(name, *a, **k):\n"
            "    if name == 'torch' or name.startswith('torch.'): raise ImportError('no torch here')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = imp\n"
            "import dwdp_ops.coaction as c\n"
            "assert 'coaction' in c.__all__ and c.CoActionSpec\n"
            "try:\n    c.coaction\nexcept ImportError as e:\n    print('lazy:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "lazy: no torch here" in proc.stdout


def test_tensors_handed_over_as_device_buffers_only_when_the_kernels_can_read_them():
    """The op hands the fused ops a DeviceBuffer only for a contiguous tensor of a kernel dtype on the op's device;
    anything else goes to the fused ops as it is, to be refused by their checks (a CPU tensor here)."""
    from dwdp_ops.coaction.autograd import _buffer
    from dwdp_ops.coaction.fused import _array_device
    from dwdp_ops.interop import DeviceBuffer

    assert _buffer(None, 0) is None
    cpu = torch.zeros(3, 4)
    assert _buffer(cpu, 0) is cpu
    # a DeviceBuffer that carries its device answers the device checks without a pointer lookup
    assert _array_device(DeviceBuffer(1 << 20, (3,), cpu.numpy().dtype, None, 5), 1 << 20) == 5


def test_cpu_tensors_are_refused_with_the_reason():
    from dwdp_ops.coaction import coaction

    spec = CoActionSpec()
    ind, feed, mask, _ = make(spec, 4, 3, 0)
    with pytest.raises(ValueError, match=r"must be on a CUDA device, got induction on cpu, feed on cpu, mask on cpu"):
        coaction(ind, feed, mask, spec)


def test_wrong_types_and_shapes_are_named():
    from dwdp_ops.coaction import coaction

    spec = CoActionSpec()
    ind, feed, mask, _ = make(spec, 4, 3, 0)
    with pytest.raises(TypeError, match="feed must be a torch.Tensor, got ndarray"):
        coaction(ind, feed.numpy(), mask, spec)
    with pytest.raises(TypeError, match="spec must be a CoActionSpec"):
        coaction(ind, feed, mask, ((16, 8), (8, 4)))
    for falsy in (0, "", {}):  # not swapped for the default spec (`spec or CoActionSpec()` did)
        with pytest.raises(TypeError, match=f"spec must be a CoActionSpec, got {type(falsy).__name__}"):
            coaction(ind, feed, mask, falsy)

    def check(ind=ind, feed=feed, mask=mask, ind_ids=None, feed_ids=None):  # dtypes and shapes come before devices
        coaction(ind, feed, mask, spec, ind_ids=ind_ids, feed_ids=feed_ids)

    with pytest.raises(TypeError, match="induction must be float32 or bfloat16, got torch.float64"):
        check(ind=ind.double())
    with pytest.raises(TypeError, match=r"feed must have induction's dtype \(torch.float32\), got torch.bfloat16"):
        check(feed=feed.bfloat16())
    with pytest.raises(TypeError, match="mask must be float32"):
        check(mask=mask.long())
    with pytest.raises(ValueError, match=r"induction must be \[B, D' = 160\]"):
        check(ind=ind[:, :100])
    with pytest.raises(ValueError, match="induction has 3 rows but the mask has batch 4"):
        check(ind=ind[:3])
    with pytest.raises(ValueError, match=r"feed must be \[B, T, D\] = \[4, 3, 16\]"):
        check(feed=feed[:, :2])
    with pytest.raises(TypeError, match="ind_ids must be integer row ids, got torch.float32"):
        check(ind_ids=torch.zeros(4))
    with pytest.raises(ValueError, match=r"ind_ids must be \[B\] = \[4\]"):
        check(ind_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"the feed table must be \[rows, D = 16\]"):
        check(feed_ids=torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"feed_ids must be \[B, T\] = \[4, 3\]"):
        check(feed=feed[0], feed_ids=torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="CUDA device"):  # well-formed table inputs get as far as the device check
        check(feed=feed[0], ind_ids=torch.zeros(4, dtype=torch.int32), feed_ids=torch.zeros(4, 3, dtype=torch.int16))


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_the_tests_torch_reference_is_the_numpy_reference(cfg):
    """The oracle of the GPU tests above, checked against ``reference`` (forward and backward) on the CPU."""
    from dwdp_ops.coaction import coaction_backward, coaction_forward

    spec = CoActionSpec(**cfg)
    ind, feed, mask, gout = (t.double() for t in make(spec, 5, 7, 3))
    a, b = ind.clone().requires_grad_(), feed.clone().requires_grad_()
    out = torch_reference(spec, a, b, mask)
    (out * gout).sum().backward()
    want = coaction_forward(ind.numpy(), feed.numpy(), mask.numpy(), spec)
    gi, gf = coaction_backward(ind.numpy(), feed.numpy(), mask.numpy(), gout.numpy(), spec)
    assert rel(out.detach(), torch.from_numpy(want)) <= 1e-12
    assert rel(a.grad, torch.from_numpy(gi)) <= 1e-12 and rel(b.grad, torch.from_numpy(gf)) <= 1e-12


@pytest.mark.parametrize("exc", [ValueError, TypeError])
@pytest.mark.parametrize("bad, match", [
    (dict(mask="3d"), r"mask must be \[B, T\], got shape \[4, 3, 1\]"),
    (dict(ind="narrow"), r"induction must be \[B, D' = 160\]"),
    (dict(ind="short"), "induction has 3 rows but the mask has batch 4"),
    (dict(feed="short"), r"feed must be \[B, T, D\] = \[4, 3, 16\]"),
    (dict(ind_ids=5), r"ind_ids must be \[B\] = \[4\]"),
    (dict(feed_ids="table"), r"the feed table must be \[rows, D = 16\]"),
    (dict(feed_ids=(4, 2)), r"feed_ids must be \[B, T\] = \[4, 3\]"),
], ids=["mask", "induction", "induction_rows", "feed", "ind_ids", "feed_table", "feed_ids"])
def test_a_wrong_shape_is_both_a_value_and_a_type_error(bad, match, exc):
    """The autograd op's shape errors are the fused ops' CoActionArgumentError: ``except ValueError`` (as around the
    reference) and ``except TypeError`` (as around the fused ops' combined dtype/shape checks) both catch them."""
    from dwdp_ops.coaction import coaction

    spec = CoActionSpec()
    ind, feed, mask, _ = make(spec, 4, 3, 0)
    kw = {}
    if "mask" in bad:
        mask = mask[:, :, None]
    if "ind" in bad:
        ind = ind[:, :100] if bad["ind"] == "narrow" else ind[:3]
    if "feed" in bad:
        feed = feed[:, :2]
    if "ind_ids" in bad:
        kw["ind_ids"] = torch.zeros(bad["ind_ids"], dtype=torch.long)
    if "feed_ids" in bad:
        if bad["feed_ids"] == "table":
            kw["feed_ids"] = torch.zeros(4, 3, dtype=torch.long)
        else:
            feed, kw["feed_ids"] = feed[0], torch.zeros(bad["feed_ids"], dtype=torch.long)
    with pytest.raises(exc, match=match):
        coaction(ind, feed, mask, spec, **kw)
