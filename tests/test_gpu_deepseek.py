"""GPU tests of the DeepSeek-R1 forward: the gate and the tiny model against numpy on one GPU, and the DWDP
integration test (prefill + 8 decode steps under prefetch_all, on_demand, dispatch (DEP) and auto against an all-local
run) on 2 and 4."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import GPU_COUNT
from dwdp_ops.models.deepseek_r1 import DeepSeekConfig, ReferenceModel, init_weights, select_experts


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 7, 300])
def test_gate_on_gpu_equals_the_numpy_gate(T):
    import torch
    from dwdp_ops.models.deepseek_r1.gpu import select_experts_torch

    rng = np.random.default_rng(T)
    logits = rng.normal(0, 2, (T, 256)).astype(np.float32)
    bias = rng.normal(0, 0.5, 256).astype(np.float32)
    w, ids = select_experts(logits, bias, 8, 4, 8, 2.5)
    tw, tids = select_experts_torch(torch.from_numpy(logits).cuda(), torch.from_numpy(bias).cuda(), 8, 4, 8, 2.5)
    np.testing.assert_array_equal(tids.cpu().numpy(), ids)
    np.testing.assert_allclose(tw.cpu().numpy(), w, rtol=1e-5)


@pytest.mark.gpu
def test_tiny_model_on_one_gpu_equals_the_numpy_reference():
    import torch
    from dwdp_ops.models.deepseek_r1.gpu import GpuModel, LocalExperts
    from dwdp_ops.models.deepseek_r1.gpu_weights import NumpyWeights
    from dwdp_ops.models.deepseek_r1.serve import run_requests

    cfg = DeepSeekConfig.tiny()
    W = init_weights(cfg, 1)
    weights = NumpyWeights(cfg, W, torch.float32)
    model = GpuModel(cfg, weights, LocalExperts(weights, cfg), max_requests=3, max_seq=40)
    prompts = [[5, 9, 1], list(range(3, 20)), [42]]
    run = run_requests(model, prompts, 6)
    toks, logits = run.tokens, run.logits
    for r, prompt in enumerate(prompts):
        want_toks, want = ReferenceModel(cfg, W).generate(prompt, 6)
        assert toks[r] == want_toks
        for i in range(6):
            assert np.linalg.norm(logits[i][r] - want[i]) <= 1e-3 * np.linalg.norm(want[i])
    with pytest.raises(ValueError, match="mixes both"):
        model.forward([0, 1], [[1], [2, 3]])
    with pytest.raises(ValueError, match="token ids must be in"):
        model.forward([0], [[cfg.vocab_size]])
    with pytest.raises(ValueError, match="exceed max_seq"):
        model.forward([0], [list(range(41))])


@pytest.mark.gpu
def test_device_weights_are_deterministic_and_sliceable():
    import torch
    from dwdp_ops.models.deepseek_r1.gpu_weights import DeviceWeights

    cfg = DeepSeekConfig.mini(n_layers=2)
    a, b = DeviceWeights(cfg, 3), DeviceWeights(cfg, 3)
    w13, w2 = a.experts(1, 0, 6)
    s13, s2 = b.experts(1, 4, 6)
    assert torch.equal(w13[4:], s13) and torch.equal(w2[4:], s2)
    assert torch.isfinite(w13.float()).all() and 0.005 < float(w13.float().std()) < 0.05
    assert torch.equal(a.dense("layers.1.attn.wq_a"), b.dense("layers.1.attn.wq_a"))
    assert not torch.equal(DeviceWeights(cfg, 4).dense("layers.1.attn.wq_a"), a.dense("layers.1.attn.wq_a"))


@pytest.mark.multigpu(n=2)
@pytest.mark.parametrize("n, config", [(2, "tiny"), (2, "mini"), (4, "mini"), (2, "mini8")])
def test_dwdp_decode_steps_match_the_all_local_run(run_ranks, n, config):
    if GPU_COUNT < n:
        pytest.skip(f"needs {n} GPUs; found {GPU_COUNT}")
    proc = run_ranks(n, "deepseek_check.py", config, "9", timeout=400)
    assert proc.returncode == 0, proc.stdout[-8000:]
    policies = ("prefetch_all", "on_demand") + {
        "mini": ("dispatch", "auto", "on_demand+graph", "dispatch+graph", "auto+graph", "dispatch_nccl"),
        "mini8": ("dispatch", "dispatch+graph"), "tiny": ()}[config]
    for r in range(n):
        for policy in policies:
            assert f"[rank {r}] rank {r}: {config} {policy} " in proc.stdout
    assert proc.stdout.count(": OK") == n * (len(policies) + (config == "tiny")), proc.stdout[-4000:]
    assert "MISMATCH" not in proc.stdout


@pytest.mark.gpu
def test_grouped_expert_gemm_equals_the_per_expert_loop():
    """The grouped GEMM (unaligned and 16-row-aligned groups) against one plain GEMM chain per expert, bf16, with an
    overloaded expert and repeated ids: the DWDP integration test compares two runs that both use the grouped path,
    so this is what checks the path itself."""
    import torch
    from dwdp_ops.models.deepseek_r1.gpu import GpuModel, LocalExperts
    from dwdp_ops.models.deepseek_r1.gpu_weights import DeviceWeights

    cfg = DeepSeekConfig.mini(n_layers=2)
    w = DeviceWeights(cfg, 2)
    local = LocalExperts(w, cfg)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn((300, cfg.dim), generator=g, device="cuda") * 0.5).to(torch.bfloat16)
    ids = torch.randint(0, cfg.n_routed_experts, (300, 8), generator=g, device="cuda")
    ids[:150, 0] = 3
    wt = torch.rand((300, 8), generator=g, device="cuda")
    out = {}
    for name, grouped, align in (("loop", False, 0), ("grouped", True, 1), ("grouped16", True, 16)):
        m = GpuModel(cfg, w, local, max_requests=1, max_seq=8, grouped=grouped, align=align)
        with torch.cuda.stream(m.tstream):
            out[name] = m._routed(x, wt, ids, *local._layers[0]).float()
        torch.cuda.synchronize()
    ref = out["loop"]
    assert float(ref.norm()) > 0
    for name in ("grouped", "grouped16"):
        assert float((out[name] - ref).norm() / ref.norm()) < 1e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("counts", [[0, 1, 37, 0, 200, 16, 3, 0], [0, 0, 0, 0, 257, 0, 0, 0]])
def test_grouped_fp8_expert_mlp_against_its_emulation_and_the_block_scaled_reference(counts):
    """``fp8.grouped_swiglu_fp8`` with empty groups, a one-row group and one expert taking every token, against
    (a) its float32 emulation on the very fp8 operands (rows of x and of the SwiGLU output quantised per token by
    ``dwdp_ops.quant``, the rowwise-requantised weights dequantised): the kernel's own error, bound 2e-2 (the GEMM
    writes bf16 and the SwiGLU runs in bf16 before the second quantisation: a bf16 rounding moves ~1/32 of the
    elements to a neighbouring e4m3 code, ~1 % RMS; a wrong scale or group is 10-100 %); and (b) the
    float32 MLP on the block-scaled weights themselves (what the model stands for): fp8 costs ~2.5 % per quantised
    operand here (3 mantissa bits), three of them compound to ~6.4 % (numpy emulation, 3 seeds), so the issue's 3e-2
    is out of e4m3's reach; bound 0.1, figure printed."""
    import torch
    from dwdp_ops import quant
    from dwdp_ops.models.deepseek_r1.fp8 import grouped_swiglu_fp8, requant_block

    H, I, A = 256, 128, 16
    G = len(counts)
    rng = np.random.default_rng(sum(counts))
    dev = "cuda"
    w13, w2, s13, s2, ref13, ref2 = [], [], [], [], [], []
    for _ in range(G):
        for shape, q_out, s_out, r_out in (((2 * I, H), w13, s13, ref13), ((H, I), w2, s2, ref2)):
            codes, scale_inv = quant.quant_block((rng.standard_normal(shape) * 0.02).astype(np.float32))
            q, s = requant_block(torch.from_numpy(codes).to(dev), torch.from_numpy(scale_inv).to(dev))
            q_out.append(q)
            s_out.append(s)
            r_out.append(quant.dequant_block(codes, scale_inv))
    w13, w2, s13, s2 = (torch.stack(t) for t in (w13, w2, s13, s2))
    padded = [-(-c // A) * A for c in counts]
    offs = torch.tensor(np.cumsum(padded), dtype=torch.int32, device=dev)
    xg = torch.zeros((sum(padded), H), dtype=torch.bfloat16, device=dev)
    rows, start = [], 0
    for g, c in enumerate(counts):
        xg[start : start + c] = torch.from_numpy(rng.standard_normal((c, H)).astype(np.float32)).to(dev)
        rows.append((g, start, c))
        start += padded[g]
    y = grouped_swiglu_fp8(xg, offs, w13, w2, s13, s2, I).float().cpu().numpy()
    e13 = quant.dequant_rowwise(w13.view(torch.uint8).cpu().numpy(), s13.cpu().numpy())
    e2 = quant.dequant_rowwise(w2.view(torch.uint8).cpu().numpy(), s2.cpu().numpy())
    xs = xg.float().cpu().numpy()
    got, emu, ref = [], [], []
    for g, a, c in rows:
        if not c:
            continue
        x = xs[a : a + c]
        xq = quant.dequant_rowwise(*quant.quant_rowwise(x))
        h = xq @ e13[g].T
        act = (h[:, :I] / (1 + np.exp(-h[:, :I])) * h[:, I:]).astype(np.float32)
        emu.append(quant.dequant_rowwise(*quant.quant_rowwise(act)) @ e2[g].T)
        hr = x @ ref13[g].T
        ref.append((hr[:, :I] / (1 + np.exp(-hr[:, :I])) * hr[:, I:]) @ ref2[g].T)
        got.append(y[a : a + c])
    got, emu, ref = np.concatenate(got), np.concatenate(emu), np.concatenate(ref)
    kernel = float(np.linalg.norm(got - emu) / np.linalg.norm(emu))
    model = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    print(f"grouped fp8 expert MLP (counts {counts}): vs its fp8 emulation {kernel:.3e}, vs block-scaled float32 "
          f"{model:.3e}")
    assert np.isfinite(got).all() and kernel <= 2e-2 and model <= 0.1


@pytest.mark.gpu
def test_routed_experts_of_the_model_with_fp8_weights_against_the_emulation():
    """``GpuModel._routed`` (sort, align, grouped fp8 MLP, weighted combine) on the tiny model's fp8 experts against
    a float32 emulation of the same fp8 arithmetic per (token, expert) pair: catches wrong scales, swapped
    projections or a misrouted group, which the whole model's logits hardly show (its experts barely move them)."""
    import torch
    from dwdp_ops import quant
    from dwdp_ops.models.deepseek_r1.gpu import GpuModel, LocalExperts
    from dwdp_ops.models.deepseek_r1.gpu_weights import NumpyWeights

    cfg = DeepSeekConfig.tiny()
    W = init_weights(cfg, 5)
    w = NumpyWeights(cfg, W, torch.bfloat16, expert_dtype=torch.float8_e4m3fn)
    local = LocalExperts(w, cfg)
    m = GpuModel(cfg, w, local, max_requests=1, max_seq=8)
    g = torch.Generator(device="cuda").manual_seed(1)
    T, k, I = 64, cfg.n_activated_experts, cfg.moe_inter_dim
    x = torch.randn((T, cfg.dim), generator=g, device="cuda").to(torch.bfloat16)
    ids = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g, device="cuda")[:k] for _ in range(T)])
    ids[: T // 2, 0] = 3  # an overloaded expert
    wt = torch.rand((T, k), generator=g, device="cuda").to(torch.bfloat16)
    with torch.cuda.stream(m.tstream):
        y = m._routed(x, wt, ids, *local._layers[0]).float()
    torch.cuda.synchronize()
    q13, q2, s13, s2 = (t.cpu() for t in local._layers[0])
    e13 = quant.dequant_rowwise(q13.view(torch.uint8).numpy(), s13.numpy())
    e2 = quant.dequant_rowwise(q2.view(torch.uint8).numpy(), s2.numpy())
    xs, idn, wn = x.float().cpu().numpy(), ids.cpu().numpy(), wt.float().cpu().numpy()
    xq = quant.dequant_rowwise(*quant.quant_rowwise(xs))
    want = np.zeros((T, cfg.dim), np.float32)
    for t in range(T):
        for j in range(k):
            e = idn[t, j]
            h = xq[t] @ e13[e].T
            a = (h[:I] / (1 + np.exp(-h[:I])) * h[I:]).astype(np.float32)
            want[t] += wn[t, j] * (quant.dequant_rowwise(*quant.quant_rowwise(a[None]))[0] @ e2[e].T)
    rel = float(np.linalg.norm(y.cpu().numpy() - want) / np.linalg.norm(want))
    print(f"model routed experts, fp8, vs emulation: rel err {rel:.3e}")
    assert rel <= 2e-2


@pytest.mark.gpu
def test_tiny_model_with_fp8_experts_against_the_block_scaled_numpy_reference():
    """The tiny model in bf16 with fp8 experts against the float32 numpy reference on the block-scaled weights.
    Tolerance derived from measured parts, not picked: the same model with bf16 (dequantised block-scaled) experts
    has error ``e_bf16`` against the reference (bf16 everywhere else); one fp8 MoE layer has error ``e_layer``
    against its float32 block-scaled twin on this model's hidden states; errors of the MoE layers add at most, so
    the fp8 model's logits must be within ``e_bf16 + 2 * n_moe_layers * e_layer`` (factor 2 for the residual and
    norm amplification we do not model)."""
    import torch
    from dwdp_ops.models.deepseek_r1.fp8 import grouped_swiglu_fp8
    from dwdp_ops.models.deepseek_r1.gpu import GpuModel, LocalExperts
    from dwdp_ops.models.deepseek_r1.gpu_weights import NumpyWeights
    from dwdp_ops.models.deepseek_r1.serve import run_requests

    cfg = DeepSeekConfig.tiny()
    W = init_weights(cfg, 4)
    prompts = [[5, 9, 1], list(range(3, 20)), [42]]
    ref = [ReferenceModel(cfg, W).generate(p, 4) for p in prompts]
    want = [lg for _, lg in ref]
    errs, compared = {}, {}
    for name, xdt in (("bf16", None), ("fp8", torch.float8_e4m3fn)):
        w = NumpyWeights(cfg, W, torch.bfloat16, expert_dtype=xdt)
        model = GpuModel(cfg, w, LocalExperts(w, cfg), max_requests=3, max_seq=40)
        run = run_requests(model, prompts, 4)
        # step i's logits are comparable while the inputs agree: the tokens generated before it are the reference's
        # (an argmax near a tie may pick another token, after which the two runs continue different texts)
        pairs = [(r, i) for r in range(3) for i in range(4) if run.tokens[r][:i] == ref[r][0][:i]]
        compared[name] = len(pairs)
        errs[name] = max(float(np.linalg.norm(run.logits[i][r] - want[r][i]) / np.linalg.norm(want[r][i]))
                         for r, i in pairs)
    # one MoE layer in fp8 against float32 on the block-scaled weights, on unit-RMS hidden states like the model's
    w8 = NumpyWeights(cfg, W, torch.bfloat16, expert_dtype=torch.float8_e4m3fn)
    (q13, q2), (s13, s2) = w8.experts_fp8(cfg.n_dense_layers, 0, cfg.n_routed_experts)
    w32 = NumpyWeights(cfg, W, torch.float32)
    f13, f2 = w32.experts(cfg.n_dense_layers, 0, cfg.n_routed_experts)
    E, A, I = cfg.n_routed_experts, 16, cfg.moe_inter_dim
    x = torch.randn((E * A, cfg.dim), device="cuda").to(torch.bfloat16)
    offs = torch.arange(A, E * A + 1, A, dtype=torch.int32, device="cuda")
    y8 = grouped_swiglu_fp8(x, offs, q13, q2, s13, s2, I).float()
    xf = x.float().view(E, A, cfg.dim)
    h = torch.bmm(xf, f13.transpose(1, 2))
    y32 = torch.bmm(torch.nn.functional.silu(h[..., :I]) * h[..., I:], f2.transpose(1, 2)).reshape(E * A, -1)
    e_layer = float((y8 - y32).norm() / y32.norm())
    bound = errs["bf16"] + 2 * cfg.n_moe_layers * e_layer
    print(f"tiny fp8 experts: logits rel err {errs['fp8']:.3e} (bf16 experts {errs['bf16']:.3e}, one fp8 MoE layer "
          f"{e_layer:.3e}, bound {bound:.3e}; steps compared {compared})")
    assert min(compared.values()) >= 3  # every request's prefill at least
    assert errs["fp8"] <= bound
