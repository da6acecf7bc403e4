"""The routed-expert step (dwdp_ops.models.routed) on the CPU, where PyTorch has a grouped GEMM too: aligned and
packed groups, an overloaded expert, experts nobody picked, against a per-pair float32 loop; the combine is in slot
order and deterministic."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from dwdp_ops.models.routed import combine_pairs, routed_experts  # noqa: E402


def _grouped_mlp(w13, w2):
    I = w2.shape[-1]

    def mlp(xg, offs):
        h = torch._grouped_mm(xg, w13.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(torch.nn.functional.silu(h[:, :I]) * h[:, I:], w2.transpose(-2, -1), offs=offs)

    return mlp


@pytest.mark.parametrize("align", [1, 16])
@pytest.mark.parametrize("T", [1, 5, 64])
def test_routed_experts_equal_a_per_pair_loop(align, T):
    g = torch.Generator().manual_seed(T * 10 + align)
    E, H, I, k = 12, 32, 16, 3
    x = torch.randn((T, H), generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[: (T + 1) // 2, 0] = 4  # an overloaded expert; experts 10, 11 rarely or never picked
    w = torch.rand((T, k), generator=g)
    w13 = (torch.randn((E, 2 * I, H), generator=g) * 0.1).to(torch.bfloat16)
    w2 = (torch.randn((E, H, I), generator=g) * 0.1).to(torch.bfloat16)
    got = routed_experts(x, w, ids, _grouped_mlp(w13, w2), num_experts=E, align=align).float()
    want = torch.zeros((T, H))
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            h = x[t].float() @ w13[e].float().T
            want[t] += float(w[t, j].to(torch.bfloat16)) * ((torch.nn.functional.silu(h[:I]) * h[I:]) @ w2[e].float().T)
    assert float((got - want).norm() / want.norm()) < 2e-2


def test_combine_is_in_slot_order_and_repeatable():
    g = torch.Generator().manual_seed(0)
    T, k, H = 7, 4, 8
    order = torch.randperm(T * k, generator=g)
    ys = torch.randn((T * k, H), generator=g)
    w = torch.rand((T, k), generator=g)
    a, b = combine_pairs(ys, order, w), combine_pairs(ys, order, w)
    assert torch.equal(a, b)
    yt = torch.empty_like(ys)
    yt[order] = ys
    torch.testing.assert_close(a, (w.unsqueeze(-1) * yt.view(T, k, H)).sum(1))


@pytest.mark.parametrize("align", [1, 16])
@pytest.mark.parametrize("T", [1, 5, 64])
def test_quantising_before_the_gather_gives_the_bits_of_quantising_the_gathered_rows(align, T):
    """fp8 experts: ``quantize=`` quantises each token once and hands the MLP gathered fp8 rows and scales; they must
    be bit for bit what quantising the gathered bf16 rows gives (padding rows included), so the routed output is
    identical either way."""
    from dwdp_ops.models.deepseek_r1.fp8 import quant_rows

    g = torch.Generator().manual_seed(T * 7 + align)
    E, H, I, k = 12, 32, 16, 3
    x = torch.randn((T, H), generator=g).to(torch.bfloat16)
    x[0, :] = 0.0  # a zero row: scale 1.0
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand((T, k), generator=g)
    w13 = (torch.randn((E, 2 * I, H), generator=g) * 0.1).to(torch.bfloat16)
    w2 = (torch.randn((E, H, I), generator=g) * 0.1).to(torch.bfloat16)
    seen = {}

    def mlp_from(kind):
        inner = _grouped_mlp(w13, w2)

        def mlp(xg, offs):
            q, s = xg if isinstance(xg, tuple) else quant_rows(xg)
            seen[kind] = (q.view(torch.uint8).clone(), s.clone())
            return inner((q.float() * s[:, None]).to(torch.bfloat16), offs)

        return mlp

    a = routed_experts(x, w, ids, mlp_from("after"), num_experts=E, align=align)
    b = routed_experts(x, w, ids, mlp_from("before"), num_experts=E, align=align, quantize=quant_rows)
    assert torch.equal(seen["after"][0], seen["before"][0]) and torch.equal(seen["after"][1], seen["before"][1])
    assert seen["before"][0].shape[0] >= T * k
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw, exc, match", [
    ({"num_experts": 12.9}, TypeError, r"num_experts must be an integer >= 1, got 12.9"),
    ({"num_experts": True}, TypeError, r"num_experts must be an integer >= 1, got True"),
    ({"num_experts": 0}, ValueError, r"num_experts must be an integer >= 1, got 0"),
    ({"align": 2.5}, TypeError, r"align must be an integer >= 1, got 2.5"),
    ({"align": 0}, ValueError, r"align must be an integer >= 1, got 0"),
])
def test_routed_experts_names_a_bad_expert_count_or_alignment(kw, exc, match):
    """num_experts=12.9 became 12 and True 1 (int()), an align of 2.5 failed deep in tensor indexing, align=0 ran
    unaligned groups without a word."""
    x = torch.zeros(2, 4)
    ids = torch.zeros(2, 1, dtype=torch.int64)
    with pytest.raises(exc, match=match):
        routed_experts(x, torch.ones(2, 1), ids, lambda xg, offs: xg, **{"num_experts": 4, **kw})


@pytest.mark.parametrize("x, w, ids, match", [
    (torch.zeros(6, 4), torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.int64), r"x must be \[T, H\] and w \[T, k\] "
     r"with ids' T = 4, k = 2, got x \[6, 4\], w \[4, 2\]"),
    (torch.zeros(4, 4), torch.ones(4, 3), torch.zeros(4, 2, dtype=torch.int64), r"k = 2, got x \[4, 4\], w \[4, 3\]"),
    (torch.zeros(4), torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.int64), r"got x \[4\], w \[4, 2\]"),
    (torch.zeros(4, 4), torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.int32), r"ids must be \[T, k\] int64 "
     r"expert ids, got torch.int32 \[4, 2\]"),
    (torch.zeros(4, 4), torch.ones(8), torch.zeros(8, dtype=torch.int64), r"ids must be \[T, k\] int64"),
])
def test_routed_experts_names_mismatched_shapes(x, w, ids, match):
    """x with more rows than ids had returned the first T tokens' result without a word (the rest dropped); a w of
    another k, int32 ids or 1-D ids failed inside the bmm, scatter or unpacking without naming the argument."""
    with pytest.raises(ValueError, match="routed_experts: .*" + match):
        routed_experts(x, w, ids, lambda xg, offs: xg, num_experts=4)
