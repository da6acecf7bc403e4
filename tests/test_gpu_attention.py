"""GPU tests of the packed prefill attention (``dwdp_ops.models.attention``): every backend against a float32
causal softmax per request, at DeepSeek-R1's head dims (query/key 192, value 128), with equal, mixed and
single-token lengths; and the way an engine calls it (its non-blocking stream with work queued)."""

from __future__ import annotations

import pytest
from dwdp_ops.models import attention as A

LENGTHS = {"one": [1], "equal": [256, 256, 256], "mixed": [1, 7, 300, 1000, 33], "long": [4096, 2048]}


def _inputs(lengths, H=16, D=192, Dv=128, seed=0):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    T = sum(lengths)
    q, k = (torch.randn(T, H, D, generator=g, device="cuda").to(torch.bfloat16) for _ in range(2))
    # v as GpuModel passes it: a strided slice of a wider tensor (the K/V expansion)
    kv = torch.randn(T, H, 128 + Dv, generator=g, device="cuda").to(torch.bfloat16)
    return q, k, kv[..., 128:]


def _reference(q, k, v, lengths, scale):
    import torch

    q, k, v = q.float(), k.float(), v.float()
    out, a = torch.empty(q.shape[0], q.shape[1], v.shape[2], device=q.device), 0
    for n in lengths:
        s = torch.einsum("ihd,jhd->hij", q[a:a + n], k[a:a + n]) * scale
        s.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        out[a:a + n] = torch.einsum("hij,jhd->ihd", s.softmax(-1), v[a:a + n])
        a += n
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(LENGTHS))
@pytest.mark.parametrize("backend", [*A.BACKENDS, "auto"])
def test_backend_equals_float32_reference(backend, case):
    lengths = LENGTHS[case]
    q, k, v = _inputs(lengths)
    scale = 192 ** -0.5
    out = A.prefill_attention(q, k, v, lengths, scale, backend=backend)
    ref = _reference(q, k, v, lengths, scale)
    assert out.shape == ref.shape and out.dtype == q.dtype
    err = float((out.float() - ref).abs().max() / ref.abs().max())
    assert err <= 2e-2, f"{backend} on {case}: max error {err:.2e} of the largest output"


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[300, 300], [300, 100]])
def test_auto_is_refused_by_none_of_its_backends_on_r1_shapes(lengths, monkeypatch):
    """On R1's bf16 shapes auto's backends (dense for equal lengths, the default order otherwise) accept the call
    without a warning (a refusal would silently fall back to a slower one). The process-wide refusal record starts
    empty here: a refusal recorded by an earlier test would make this call skip that backend without a warning."""
    import warnings

    monkeypatch.setattr(A, "_refused", {})

    q, k, v = _inputs(lengths)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A.prefill_attention(q, k, v, lengths, 0.1)
    assert not [key for key in A._refused if key[3] == q.dtype], A._refused


@pytest.mark.gpu
def test_runs_on_the_callers_busy_non_blocking_stream():
    """The inputs are produced on the caller's non-blocking stream behind a long GEMM; the call must order itself
    there (its index copies included), and its result must survive the pool's reuse of freed inputs."""
    import torch

    lengths = [700, 1, 300]
    q0, k0, v0 = _inputs(lengths, seed=3)
    ref = _reference(q0, k0, v0, lengths, 0.07)
    s = torch.cuda.Stream()
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        for _ in range(4):
            big = big @ big / 90.0  # keep the stream busy
        q, k, v = (t * 1.0 for t in (q0, k0, v0))  # produced on s, behind the GEMMs
        out = A.prefill_attention(q, k, v, lengths, 0.07)
        del q, k, v
        junk = torch.full((sum(lengths), 16, 512), 7.0, device="cuda", dtype=torch.bfloat16)  # reuses the pool
    s.synchronize()
    del junk
    err = float((out.float() - ref).abs().max() / ref.abs().max())
    assert err <= 2e-2, err
