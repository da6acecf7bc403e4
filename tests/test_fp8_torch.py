"""The PyTorch side of fp8 experts on the CPU: quantisation against the numpy truth (``dwdp_ops.quant``) bit for bit,
and the grouped fp8 MLP's calls checked by PyTorch's own shape/stride rules on meta tensors laid out like the
store's page-strided views (the GEMM itself needs a GPU: tests/test_gpu_deepseek.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
quant = pytest.importorskip("dwdp_ops.quant")
fp8 = pytest.importorskip("dwdp_ops.models.deepseek_r1.fp8")


def _bits(t):
    return t.view(torch.uint8).numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quant_rows_equals_the_numpy_rowwise_quantisation(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((37, 96)).astype(np.float32) * np.exp(rng.uniform(-12, 6, size=(37, 1))).astype(np.float32)
    x[3] = 0.0  # a zero row: scale 1, codes 0
    x[5, :4] = [1e-30, -1e-30, 7.0, 0.0]  # values that underflow next to a large one
    q, s = fp8.quant_rows(torch.from_numpy(x), chunk=8)  # several chunks
    qn, sn = quant.quant_rowwise(x)
    np.testing.assert_array_equal(s.numpy(), sn)
    np.testing.assert_array_equal(_bits(q), qn)
    assert s[3] == 1.0 and not _bits(q)[3].any()


def test_quant_rows_of_bf16_rows():
    x = (torch.randn(16, 64) * 3).to(torch.bfloat16)
    q, s = fp8.quant_rows(x)
    qn, sn = quant.quant_rowwise(x.float().numpy())
    np.testing.assert_array_equal(_bits(q), qn)
    np.testing.assert_array_equal(s.numpy(), sn)


def test_requant_block_equals_the_numpy_requantisation():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((300, 200)).astype(np.float32) * 0.02  # partial blocks on both axes
    codes, scale_inv = quant.quant_block(w)
    q, s = fp8.requant_block(torch.from_numpy(codes), torch.from_numpy(scale_inv))
    qn, sn = quant.requant_rowwise_from_block(codes, scale_inv)
    np.testing.assert_array_equal(_bits(q), qn)
    np.testing.assert_array_equal(s.numpy(), sn)
    with pytest.raises(ValueError, match="does not match 300x200"):
        fp8.requant_block(torch.from_numpy(codes), torch.from_numpy(scale_inv[:1]))


def _page_strided(G, N, K, page=2 << 20):
    """A meta fp8 ``[G, N, K]`` view whose experts sit a page-rounded stride apart, like ``ExpertStore.composite``."""
    stride = -(-N * K // page) * page
    base = torch.empty(G * stride, dtype=torch.float8_e4m3fn, device="meta")
    return base.as_strided((G, N, K), (stride, K, 1))


@pytest.mark.parametrize("H, I, G, R", [(7168, 2048, 256, 4096), (64, 32, 16, 48), (2048, 512, 128, 2048 + 16 * 128)])
def test_grouped_fp8_mlp_calls_satisfy_pytorchs_layout_rules(H, I, G, R):
    """R1, tiny and mini shapes: the store's views transposed are column-major with 16-byte strides, the scales
    have the shapes ``_scaled_grouped_mm`` checks, the output is bf16 [R, H]."""
    xg = torch.empty((R, H), dtype=torch.bfloat16, device="meta")
    offs = torch.empty((G,), dtype=torch.int32, device="meta")
    w13, w2 = _page_strided(G, 2 * I, H), _page_strided(G, H, I)
    s13 = torch.empty((G, 2 * I), dtype=torch.float32, device="meta")
    s2 = torch.empty((G, H), dtype=torch.float32, device="meta")
    y = fp8.grouped_swiglu_fp8(xg, offs, w13, w2, s13, s2, I)
    assert y.shape == (R, H) and y.dtype == torch.bfloat16
    # a local slice of the scale table (dispatch mode: experts lo..hi of E) is accepted the same way
    h = G // 2
    y = fp8.grouped_swiglu_fp8(xg, offs[:h], w13[:h], w2[:h], s13[:h], s2[:h], I)
    assert y.shape == (R, H)
    with pytest.raises(RuntimeError, match="non-batch dimension|to have|Expected"):
        fp8.grouped_swiglu_fp8(xg, offs, w13, w2, s13[:, :8], s2, I)  # scales of the wrong width
    # rows quantised before the routed gather (models.routed): the pair is taken as is
    q = torch.empty((R, H), dtype=torch.float8_e4m3fn, device="meta")
    s = torch.empty((R,), dtype=torch.float32, device="meta")
    assert fp8.grouped_swiglu_fp8((q, s), offs, w13, w2, s13, s2, I).shape == (R, H)
    with pytest.raises(ValueError, match=r"scale \[R\] float32"):
        fp8.grouped_swiglu_fp8((q, s[:, None]), offs, w13, w2, s13, s2, I)


def test_fast_accumulation_rule_at_its_boundaries():
    """``use_fast_accum``: on up to 2K tokens x top-8 and from 32K x top-8 (where expert_gemm measured it faster),
    off between."""
    assert fp8.use_fast_accum(0) and fp8.use_fast_accum(8) and fp8.use_fast_accum(fp8.FAST_ACCUM_MAX_SMALL_ROWS)
    assert not fp8.use_fast_accum(fp8.FAST_ACCUM_MAX_SMALL_ROWS + 1)
    assert not fp8.use_fast_accum(8192 * 8) and not fp8.use_fast_accum(fp8.FAST_ACCUM_MIN_ROWS - 1)
    assert fp8.use_fast_accum(fp8.FAST_ACCUM_MIN_ROWS) and fp8.use_fast_accum(65536 * 8)


@pytest.mark.parametrize("pairs", [True, False, 1.5, 16384.0, float("nan"), float("inf"), "8", None])
def test_fast_accumulation_rule_refuses_a_pair_count_that_is_not_an_int(pairs):
    """A bool, a float or a string had been compared as a count without a word (True: fast accumulation on as 1
    pair; inf: on; NaN: off)."""
    with pytest.raises(TypeError, match=r"use_fast_accum: pairs must be an int >= 0"):
        fp8.use_fast_accum(pairs)


def test_fast_accumulation_rule_refuses_a_negative_pair_count():
    """A negative count had turned fast accumulation on (it is <= FAST_ACCUM_MAX_SMALL_ROWS)."""
    with pytest.raises(ValueError, match=r"use_fast_accum: pairs must be an int >= 0 .*got -1"):
        fp8.use_fast_accum(-1)
    assert fp8.use_fast_accum(np.int64(fp8.FAST_ACCUM_MIN_ROWS))  # a numpy count is a count


def test_requant_block_and_quant_rows_name_bad_inputs():
    """Codes of another dtype (int16 had failed inside on a widened view), a bad block, K = 0 (a reduction error
    inside before) are refused by name."""
    from dwdp_ops.models.deepseek_r1.fp8 import quant_rows_torch, requant_block

    s = torch.ones((1, 1))
    for codes in (torch.zeros((4, 4), dtype=torch.int16), torch.zeros((4, 4)), torch.zeros(4, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="requant_block: codes must be \\[N, K\\] uint8"):
            requant_block(codes, s, 128)
    with pytest.raises(ValueError, match="block must be an int >= 1, got 0"):
        requant_block(torch.zeros((4, 4), dtype=torch.uint8), s, 0)
    with pytest.raises(ValueError, match="K >= 1"):
        quant_rows_torch(torch.zeros((3, 0)))


def test_quant_rows_refuses_a_chunk_that_is_not_a_positive_int():
    """A negative chunk had returned the uninitialised output buffers (the chunk loop never ran: garbage codes and
    scales, no error); 0 failed inside range(), a float or a bool as well or silently."""
    from dwdp_ops.models.deepseek_r1.fp8 import quant_rows, quant_rows_torch

    x = torch.randn(5, 8)
    for chunk in (-1, 0, 2.0, True, np.True_):
        for fn in (quant_rows, quant_rows_torch):
            with pytest.raises(ValueError, match=f"chunk must be an int >= 1, got {chunk!r}"):
                fn(x, chunk)
    q, s = quant_rows_torch(x, np.int64(2))  # numpy integers are ints
    want_q, want_s = quant.quant_rowwise(x.numpy())
    assert np.array_equal(_bits(q), want_q) and np.array_equal(s.numpy(), want_s)


def test_from_hf_state_dict_refuses_a_tensor_of_another_layout():
    """A transposed tensor (another layout, another transformers version) had been sliced into mislabelled
    weights; every tensor's shape is now checked against the config."""
    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig, init_weights
    from dwdp_ops.models.deepseek_r1 import hf_convert as hc

    cfg = DeepSeekConfig.tiny()
    W = init_weights(cfg, 0)
    sd = hc.hf_state_dict(cfg, W)
    assert set(hc.from_hf_state_dict(cfg, sd)) == set(W)
    for name in ("model.layers.2.mlp.experts.down_proj", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"):
        bad = dict(sd)
        bad[name] = sd[name].transpose(-1, -2).contiguous()
        with pytest.raises(ValueError, match=f"'{name}' has shape .* this config needs"):
            hc.from_hf_state_dict(cfg, bad)


def test_from_hf_state_dict_refuses_fp8_and_integer_tensors():
    """An fp8 checkpoint's weights (block scales in separate weight_scale_inv keys, dropped with a warning) had been
    widened as they are, off by their scales, and integer tensors cast silently: both are refused by name now."""
    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig, init_weights
    from dwdp_ops.models.deepseek_r1 import hf_convert as hc

    cfg = DeepSeekConfig.tiny()
    sd = hc.hf_state_dict(cfg, init_weights(cfg, 0))
    for name, dtype in (("model.layers.0.self_attn.q_a_proj.weight", torch.float8_e4m3fn),
                        ("model.layers.2.mlp.experts.gate_up_proj", torch.float8_e4m3fn),
                        ("model.layers.1.mlp.gate.weight", torch.int8)):
        bad = {**sd, name: sd[name].to(dtype)}
        with pytest.raises(ValueError, match=rf"'{name}' is {dtype}: .*bfloat16, float16 or float32"):
            hc.from_hf_state_dict(cfg, bad)
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    assert set(hc.from_hf_state_dict(cfg, bf16)) == set(hc.from_hf_state_dict(cfg, sd))


def test_from_hf_state_dict_names_the_expert_it_cannot_encode():
    """A non-finite value in a routed expert had raised quant_block's message, naming neither tensor nor expert."""
    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig, init_weights
    from dwdp_ops.models.deepseek_r1 import hf_convert as hc

    cfg = DeepSeekConfig.tiny()
    sd = hc.hf_state_dict(cfg, init_weights(cfg, 0))
    name = "model.layers.2.mlp.experts.down_proj"
    bad = {**sd, name: sd[name].clone()}
    bad[name][3, 5, 7] = float("inf")
    with pytest.raises(ValueError, match=rf"'{name}', expert 3 \(our layers\.2\.ffn\.experts\.3\.w2\): .*non-finite"):
        hc.from_hf_state_dict(cfg, bad)


def test_hf_state_dict_names_the_routed_expert_it_cannot_convert():
    """A routed expert's tensor that was missing, transposed (with its scales, so that they agree) or not fp8 codes
    had raised a bare KeyError, numpy's 'could not broadcast' or dequant_block's message, none naming the tensor
    the way a missing dense weight is named."""
    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig, init_weights
    from dwdp_ops.models.deepseek_r1 import hf_convert as hc

    cfg = DeepSeekConfig.tiny()
    W = init_weights(cfg, 0)
    p = "layers.2.ffn.experts.3.w2"
    theirs = r"\(Hugging Face's 'model\.layers\.2\.mlp\.experts\.down_proj', expert 3\)"
    for gone in (p, p + ".scale"):
        with pytest.raises(KeyError, match=rf"'{gone}' {theirs} is missing from the weights"):
            hc.hf_state_dict(cfg, {k: v for k, v in W.items() if k != gone})
    transposed = {**W, p: W[p].T.copy(), p + ".scale": W[p + ".scale"].T.copy()}
    with pytest.raises(ValueError, match=rf"'{p}' {theirs} has shape \[32, 64\], this config needs \[64, 32\]"):
        hc.hf_state_dict(cfg, transposed)
    with pytest.raises(ValueError, match=rf"'{p}' {theirs}: dequant_block: q must be uint8"):
        hc.hf_state_dict(cfg, {**W, p: W[p].astype(np.float32)})
    assert set(hc.from_hf_state_dict(cfg, hc.hf_state_dict(cfg, W))) == set(W)


def test_from_hf_state_dict_warns_of_keys_it_drops():
    """Keys it does not map (DeepSeek-R1's multi-token-prediction layer, another model's) had been dropped without a
    word: one warning names them now; a clean round trip and the rotary buffers older transformers saved give none."""
    import warnings

    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig, init_weights
    from dwdp_ops.models.deepseek_r1 import hf_convert as hc

    cfg = DeepSeekConfig.tiny()
    W = init_weights(cfg, 0)
    sd = hc.hf_state_dict(cfg, W)
    rope = {k: torch.ones(4) for k in ("model.rotary_emb.inv_freq", "model.layers.0.self_attn.rotary_emb.inv_freq")}
    for clean in (sd, {**sd, **rope}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert set(hc.from_hf_state_dict(cfg, clean)) == set(W)
        assert not caught
    extra = f"model.layers.{cfg.n_layers}.eh_proj.weight"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert set(hc.from_hf_state_dict(cfg, {**sd, extra: torch.ones(2, 2)})) == set(W)
    assert len(caught) == 1 and caught[0].category is UserWarning and caught[0].filename == __file__
    assert f"1 key(s) of the state dict have no counterpart in our weights: '{extra}'" in str(caught[0].message)


def test_from_hf_state_dict_strict_refuses_keys_it_would_drop():
    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig, init_weights
    from dwdp_ops.models.deepseek_r1 import hf_convert as hc

    cfg = DeepSeekConfig.tiny()
    sd = hc.hf_state_dict(cfg, init_weights(cfg, 0))
    extra = {f"model.layers.{cfg.n_layers}.k{i}": torch.ones(1) for i in range(7)}
    with pytest.raises(ValueError, match=rf"7 key\(s\) .*: 'model\.layers\.{cfg.n_layers}\.k0', .*k4', \.\.\.; this "
                                         rf"config takes the {len(sd)} keys hf_state_dict\(cfg, W\) produces"):
        hc.from_hf_state_dict(cfg, {**sd, **extra}, strict=True)
    assert hc.from_hf_state_dict(cfg, sd, strict=True).keys() == hc.from_hf_state_dict(cfg, sd).keys()


def test_requant_block_with_nan_codes_poisons_only_their_rows_as_documented():
    """NaN codes (e4m3 0x7F / 0xFF) are a documented precondition, not checked (a device read per call): the rows
    holding one get a NaN scale and NaN codes, the other rows requantise as the numpy truth does, which refuses the
    whole matrix. (Documentation fix: this pins the behaviour the docstring now states; it passes on the old code.)"""
    codes = torch.full((4, 8), 0x38, dtype=torch.uint8)  # 1.0
    codes[1, 3], codes[2, 0] = 0x7F, 0xFF
    q, s = fp8.requant_block(codes, torch.ones((1, 1)), 128)
    assert torch.isnan(s[1:3]).all() and torch.isnan(q[1:3].float()).all()
    ok = codes[[0, 3]].numpy()
    want_q, want_s = quant.requant_rowwise_from_block(ok, np.ones((1, 1), np.float32), 128)
    np.testing.assert_array_equal(s[[0, 3]].numpy(), want_s)
    np.testing.assert_array_equal(_bits(q)[[0, 3]], want_q)
    with pytest.raises(ValueError, match="q holds NaN codes"):
        quant.requant_rowwise_from_block(codes.numpy(), np.ones((1, 1), np.float32), 128)


@pytest.mark.parametrize("inter, err, match", [
    (True, TypeError, r"got True \(bool\)"), (1.0, TypeError, r"got 1.0 \(float\)"),
    ("1", TypeError, r"got '1' \(str\)"), (0, ValueError, r"got 0$"),
])
def test_swiglu_quant_refuses_an_inter_that_is_not_a_positive_int(inter, err, match):
    """inter=True was taken as 1 (a [R, 2] h went through); inter=1.0 failed inside with "slice indices must be
    integers"; each is refused by name. A numpy integer is an int."""
    h = torch.randn(3, 2)
    with pytest.raises(err, match=r"^swiglu_quant: inter must be an int >= 1 \(the intermediate size\), " + match):
        fp8.swiglu_quant(h, inter)
    q, s = fp8.swiglu_quant(h, np.int64(1))
    want_q, want_s = fp8.swiglu_quant_torch(h, 1)
    assert torch.equal(s, want_s) and np.array_equal(_bits(q), _bits(want_q))


def test_quant_rows_and_swiglu_quant_name_an_input_that_is_not_a_tensor():
    """A numpy array (or a list) had failed inside with "'numpy.ndarray' object has no attribute 'dim'"."""
    x = np.ones((2, 4), np.float32)
    for fn in (fp8.quant_rows, fp8.quant_rows_torch):
        for bad in (x, x.tolist()):
            with pytest.raises(TypeError, match=rf"^quant_rows: x must be a torch.Tensor \[rows, K\], got "
                                                rf"{type(bad).__name__}$"):
                fn(bad)
    with pytest.raises(TypeError, match=r"^swiglu_quant: h must be a torch.Tensor \[rows, K\], got ndarray$"):
        fp8.swiglu_quant(x, 2)


def test_dequant_rows_decodes_uint8_bits_and_names_bad_inputs():
    """uint8 e4m3 bits (the form requant_block and the numpy truth take) had been widened as integers 0..255 and
    multiplied by the scales: silently wrong values; a bf16 weight or a mis-shaped scale went through as well."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 8)).astype(np.float32)
    qn, sn = quant.quant_rowwise(x)
    want = quant.dequant_rowwise(qn, sn)
    for q in (torch.from_numpy(qn), torch.from_numpy(qn).view(torch.float8_e4m3fn)):
        np.testing.assert_array_equal(fp8.dequant_rows(q, torch.from_numpy(sn)).numpy(), want)
    with pytest.raises(ValueError, match=r"dequant_rows: q must be \[\.\.\., K\] float8_e4m3fn or uint8"):
        fp8.dequant_rows(torch.from_numpy(x), torch.from_numpy(sn))
    with pytest.raises(ValueError, match=r"dequant_rows: scale shape \[3, 1\] does not match q's rows: want \[3, 4\]"):
        fp8.dequant_rows(torch.from_numpy(qn), torch.ones(3, 1))


def test_grouped_fp8_mlp_takes_a_list_pair_of_fast_accum_flags_and_refuses_anything_else(monkeypatch):
    """A list pair ``[False, True]`` had been taken as one truthy flag (fast accumulation on in both GEMMs), a tuple
    of another length failed in unpacking, a string such as "False" turned it on: each GEMM's flag is checked now."""
    G, H, I, R = 4, 64, 32, 64
    xg = torch.empty((R, H), dtype=torch.bfloat16, device="meta")
    offs = torch.empty((G,), dtype=torch.int32, device="meta")
    w13, w2 = _page_strided(G, 2 * I, H), _page_strided(G, H, I)
    s13 = torch.empty((G, 2 * I), dtype=torch.float32, device="meta")
    s2 = torch.empty((G, H), dtype=torch.float32, device="meta")
    seen = []
    real = torch._scaled_grouped_mm

    def spy(*args, use_fast_accum, **kw):
        seen.append(use_fast_accum)
        return real(*args, use_fast_accum=use_fast_accum, **kw)

    monkeypatch.setattr(torch, "_scaled_grouped_mm", spy)
    for flags, want in (([False, True], [False, True]), ((True, False), [True, False]), (np.True_, [True, True]),
                        (False, [False, False])):
        seen.clear()
        fp8.grouped_swiglu_fp8(xg, offs, w13, w2, s13, s2, I, fast_accum=flags)
        assert seen == want, flags
    for bad in ((True,), (True, False, True), "False", 1, [1, 0], None):
        with pytest.raises(TypeError, match=r"grouped_swiglu_fp8: fast_accum must be a bool or a pair of bools"):
            fp8.grouped_swiglu_fp8(xg, offs, w13, w2, s13, s2, I, fast_accum=bad)


def test_dequant_rows_names_a_q_or_scale_that_is_not_a_tensor():
    """A list q failed with AttributeError ("'list' object has no attribute 'dtype'"), a numpy q with a ValueError
    calling its uint8 codes a wrong dtype, and a numpy scale was silently taken. TypeError naming the argument."""
    qn, sn = quant.quant_rowwise(np.ones((3, 8), np.float32))
    q, s = torch.from_numpy(qn), torch.from_numpy(sn)
    for bad in (qn, qn.tolist()):
        with pytest.raises(TypeError, match=rf"^dequant_rows: q must be a torch.Tensor \[\.\.\., K\], got "
                                            rf"{type(bad).__name__}$"):
            fp8.dequant_rows(bad, s)
    for bad in (sn, sn.tolist(), 1.0):
        with pytest.raises(TypeError, match=rf"^dequant_rows: scale must be a torch.Tensor \[\.\.\.\], got "
                                            rf"{type(bad).__name__}$"):
            fp8.dequant_rows(q, bad)
    assert fp8.dequant_rows(q, s).dtype == torch.float32
    assert fp8.dequant_rows(q, s.double()).dtype == torch.float64  # documented: the scale's dtype is not checked


@pytest.mark.parametrize("live_rows", [5, "3", torch.tensor([3], dtype=torch.int64),
                                       torch.tensor([], dtype=torch.int32), torch.tensor([3.0])])
def test_quant_rows_and_swiglu_quant_check_live_rows_on_the_pytorch_path_too(live_rows):
    """live_rows was checked on the fused CUDA path only: on the PyTorch path (CPU, float, unaligned rows) any value
    was ignored, so a bad one surfaced only once the inputs took the fused path. The same check runs on every path."""
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"^quant_rows: live_rows must be an int32 tensor on x's device \(cpu; "):
        fp8.quant_rows(x, live_rows=live_rows)
    with pytest.raises(ValueError, match=r"^swiglu_quant: live_rows must be an int32 tensor on h's device \(cpu; "):
        fp8.swiglu_quant(x, 4, live_rows=live_rows)
    n = torch.tensor([2, 9], dtype=torch.int32)
    for got, want in ((fp8.quant_rows(x, live_rows=n), fp8.quant_rows(x)),
                      (fp8.swiglu_quant(x, 4, live_rows=n), fp8.swiglu_quant(x, 4))):
        assert torch.equal(got[1], want[1]) and np.array_equal(_bits(got[0]), _bits(want[0]))
    with pytest.raises(ValueError, match="live_rows must be an int32 tensor on x's device"):
        fp8.quant_rows(x, live_rows=n.to("meta"))  # another device


def test_grouped_fp8_mlp_takes_a_quantised_pair_as_a_list_and_names_a_bad_one():
    """The quantised input was taken only as a tuple: a [q, scale] list went to quant_rows, which said "x must be a
    torch.Tensor"; a tuple of another length failed in unpacking ("too many values to unpack"). A list pair is taken
    as a tuple is (as fast_accum's pair); anything else that is not two tensors is refused saying what is expected."""
    G, H, I, R = 4, 64, 32, 64
    offs = torch.empty((G,), dtype=torch.int32, device="meta")
    w13, w2 = _page_strided(G, 2 * I, H), _page_strided(G, H, I)
    s13 = torch.empty((G, 2 * I), dtype=torch.float32, device="meta")
    s2 = torch.empty((G, H), dtype=torch.float32, device="meta")
    q = torch.empty((R, H), dtype=torch.float8_e4m3fn, device="meta")
    s = torch.empty((R,), dtype=torch.float32, device="meta")
    y = fp8.grouped_swiglu_fp8([q, s], offs, w13, w2, s13, s2, I)
    assert y.shape == (R, H) and y.dtype == torch.bfloat16
    for bad in ([q], (q, s, s), [q, "scale"], ()):
        with pytest.raises(ValueError, match=r"^grouped_swiglu_fp8: a quantised input must be a pair \(q \[R, H\] "
                                             r"float8_e4m3fn, scale \[R\] float32\) of tensors"):
            fp8.grouped_swiglu_fp8(bad, offs, w13, w2, s13, s2, I)
    with pytest.raises(ValueError, match=r"scale \[R\] float32\), got"):
        fp8.grouped_swiglu_fp8([q, s[:, None]], offs, w13, w2, s13, s2, I)
