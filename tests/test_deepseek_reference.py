"""DeepSeek-R1 numpy reference: gate, fp8 format, RoPE/YaRN, MLA (naive and absorbed), KV cache, MoE, generation."""

from __future__ import annotations

import numpy as np
import pytest
from dwdp_ops.models.deepseek_r1 import (
    DeepSeekConfig,
    ReferenceModel,
    dequant_fp8,
    e4m3_to_float,
    init_weights,
    select_experts,
)
from dwdp_ops.models.deepseek_r1.reference import apply_rope, rms_norm, yarn_freqs
from dwdp_ops.models.deepseek_r1.weights import load_safetensors


@pytest.fixture(scope="module")
def tiny():
    cfg = DeepSeekConfig.tiny()
    return cfg, init_weights(cfg, seed=0)


def test_real_config_and_cuts():
    c = DeepSeekConfig.r1()
    assert (c.dim, c.n_heads, c.q_lora_rank, c.kv_lora_rank, c.qk_head_dim, c.n_moe_layers) == (7168, 128, 1536, 512, 192, 58)
    assert c.softmax_scale == pytest.approx(192**-0.5 * (0.1 * np.log(40) + 1) ** 2)
    cut = DeepSeekConfig.r1(n_layers=5, vocab_size=4096)
    assert (cut.n_layers, cut.n_dense_layers, cut.vocab_size, cut.moe_inter_dim) == (5, 3, 4096, 2048)
    with pytest.raises(ValueError, match="n_dense_layers"):
        DeepSeekConfig.tiny(n_layers=1, n_dense_layers=2)
    with pytest.raises(ValueError, match="divisible"):
        DeepSeekConfig.tiny(n_routed_experts=15)


def test_e4m3_decoding_and_block_dequant():
    codes = np.array([0x00, 0x38, 0xB8, 0x7E, 0xFE, 0x01, 0x08, 0x3C, 0x7F, 0xFF], np.uint8)
    v = e4m3_to_float(codes)
    np.testing.assert_array_equal(v[:8], [0, 1, -1, 448, -448, 2.0**-9, 2.0**-6, 1.5])
    assert np.isnan(v[8]) and np.isnan(v[9])
    w = np.full((5, 2), 0x38, np.uint8)  # all ones
    s = np.array([[2.0], [3.0], [5.0]], np.float32)
    np.testing.assert_array_equal(dequant_fp8(w, s, block=2), [[2] * 2, [2] * 2, [3] * 2, [3] * 2, [5] * 2])
    with pytest.raises(ValueError, match=r"scale_inv shape \(2, 1\) does not match .* want \(3, 1\)"):
        dequant_fp8(w, s[:2], block=2)


def gate_loop(logits, bias, n_group, topk_group, k, scale):
    """Token by token, straight from the description of the official gate."""
    out_w, out_i = [], []
    for row in logits:
        s = 1 / (1 + np.exp(-row))
        sel = s + bias
        per = len(row) // n_group
        gscore = [sorted(sel[g * per : (g + 1) * per])[-2:] for g in range(n_group)]
        gscore = [a + b for a, b in gscore]
        groups = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        cand = [(sel[e], e) for g in groups for e in range(g * per, (g + 1) * per)]
        ids = [e for _, e in sorted(cand, key=lambda t: -t[0])[:k]]
        w = s[ids] / s[ids].sum() * scale
        out_w.append(w)
        out_i.append(ids)
    return np.array(out_w), np.array(out_i)


@pytest.mark.parametrize("seed", range(10))
def test_gate_matches_the_description(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (7, 32)).astype(np.float32)
    bias = rng.normal(0, 1, 32).astype(np.float32)
    w, ids = select_experts(logits, bias, 8, 3, 5, 2.5)
    w2, ids2 = gate_loop(logits, bias, 8, 3, 5, 2.5)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_allclose(w, w2, rtol=1e-6)
    np.testing.assert_allclose(w.sum(-1), 2.5, rtol=1e-6)


def test_gate_bias_selects_but_does_not_weight_and_masks_with_minus_inf():
    # group 0 holds the best unbiased scores, but the bias moves group 1 ahead
    logits = np.array([[4.0, 4.0, 0.0, 0.0, -3.0, -3.0, -3.0, -3.0]], np.float32)
    bias = np.array([-5, -5, 2, 2, -5, -5, -5, -5], np.float32)
    w, ids = select_experts(logits, bias, 4, 1, 2, 1.0)
    assert sorted(ids[0]) == [2, 3]
    np.testing.assert_allclose(w[0], [0.5, 0.5])  # unbiased sigmoid(0) for both, normalised
    # with every kept score negative, a 0.0 mask (HF) would pick a dropped expert; -inf (official) never does
    logits = np.zeros((1, 8), np.float32)
    bias = np.array([-3, -3.1, -9, -9, -9, -9, -9, -9], np.float32)
    _, ids = select_experts(logits, bias, 4, 1, 2, 1.0)
    assert sorted(ids[0]) == [0, 1]


def test_gate_rejects_bad_shapes():
    with pytest.raises(ValueError, match="do not split"):
        select_experts(np.zeros((1, 10)), np.zeros(10), 4, 1, 1, 1.0)
    with pytest.raises(ValueError, match="correction_bias"):
        select_experts(np.zeros((1, 8)), np.zeros(7), 4, 1, 1, 1.0)
    with pytest.raises(ValueError, match="top_k"):
        select_experts(np.zeros((1, 8)), np.zeros(8), 4, 1, 3, 1.0)


@pytest.mark.parametrize("args, err, msg", [
    ((0, 1, 1), ValueError, "n_group must be >= 1, got 0"),  # had been a ZeroDivisionError
    ((True, 1, 1), TypeError, r"n_group must be an int, got True \(bool\)"),  # had been taken as one group
    ((4, 1.0, 1), TypeError, r"topk_group must be an int, got 1\.0 \(float\)"),  # had failed in a slice
    ((4, 1, np.True_), TypeError, "top_k must be an int, got np.True_"),  # had chosen one expert
])
def test_gate_rejects_counts_that_are_not_ints(args, err, msg):
    with pytest.raises(err, match=msg):
        select_experts(np.zeros((1, 8)), np.zeros(8), *args, 1.0)


def test_gate_takes_numpy_integer_counts():
    logits = np.random.default_rng(3).normal(size=(5, 16)).astype(np.float32)
    want = select_experts(logits, np.zeros(16), 4, 2, 3, 2.5)
    got = select_experts(logits, np.zeros(16), np.int64(4), np.int32(2), np.uint8(3), 2.5)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("n_group, topk_group, top_k", [(8, 4, 2), (4, 2, 3)])
def test_the_torch_gate_equals_the_reference_with_one_expert_per_group(n_group, topk_group, top_k):
    """DeepSeekConfig allows groups of one expert (the reference ranks a group by its one score); the GPU forward's
    gate had failed there ("selected index k out of range": topk(2) over a group of one)."""
    torch = pytest.importorskip("torch")
    from dwdp_ops.models.deepseek_r1.gpu import select_experts_torch

    rng = np.random.default_rng(n_group)
    E = 8 if n_group == 8 else 16
    logits, bias = rng.normal(size=(6, E)).astype(np.float32), rng.normal(size=E).astype(np.float32)
    w, ids = select_experts(logits, bias, n_group, topk_group, top_k, 2.5)
    tw, tids = select_experts_torch(torch.from_numpy(logits), torch.from_numpy(bias), n_group, topk_group, top_k, 2.5)
    np.testing.assert_array_equal(tids.numpy(), ids)
    np.testing.assert_allclose(tw.numpy(), w, rtol=1e-6)


def test_yarn_and_rope():
    plain = DeepSeekConfig.tiny(max_seq_len=32)  # not longer than original: no YaRN
    yarn = DeepSeekConfig.tiny()
    f0, f1 = yarn_freqs(plain)[1], yarn_freqs(yarn)[1]
    assert f1[0] == pytest.approx(f0[0])  # the fastest rotation is kept
    assert f1[-1] == pytest.approx(f0[-1] / yarn.rope_factor)  # the slowest is interpolated by the factor
    x = np.random.default_rng(0).normal(size=(5, 3, 8)).astype(np.float32)
    ang = yarn_freqs(yarn)[:5]
    y = apply_rope(x, ang)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(y[0], x[0], rtol=1e-6)  # position 0 is not rotated
    # relative positions: <rope(q, m), rope(k, n)> depends on m - n only
    q, k = x[0, 0], x[1, 0]
    a = yarn_freqs(yarn)
    d1 = apply_rope(q[None, None], a[7:8])[0, 0] @ apply_rope(k[None, None], a[4:5])[0, 0]
    d2 = apply_rope(q[None, None], a[9:10])[0, 0] @ apply_rope(k[None, None], a[6:7])[0, 0]
    assert d1 == pytest.approx(d2, rel=1e-5)


def test_absorbed_mla_equals_naive(tiny):
    cfg, W = tiny
    prompt = [3, 17, 42, 8, 99 % cfg.vocab_size, 5, 61]
    naive, absorbed = ReferenceModel(cfg, W), ReferenceModel(cfg, W, absorbed=True)
    np.testing.assert_allclose(naive.prefill(prompt), absorbed.prefill(prompt), rtol=2e-4, atol=2e-4)
    for t in (11, 29, 7):
        np.testing.assert_allclose(naive.decode(t), absorbed.decode(t), rtol=2e-4, atol=2e-4)


def test_kv_cache_decode_equals_full_prefill(tiny):
    cfg, W = tiny
    seq = [1, 9, 33, 70, 2, 44, 18, 90, 13]
    m = ReferenceModel(cfg, W)
    full = m.forward(seq, 0)
    m.prefill(seq[:4])
    for i in range(4, len(seq)):
        np.testing.assert_allclose(m.decode(seq[i]), full[i], rtol=1e-4, atol=1e-4)


def test_moe_equals_per_token_expert_loop(tiny):
    cfg, W = tiny
    m = ReferenceModel(cfg, W)
    layer = cfg.n_dense_layers
    x = np.random.default_rng(1).normal(size=(6, cfg.dim)).astype(np.float32)
    y = m.moe(layer, x)
    p = f"layers.{layer}.ffn."
    w, ids = select_experts(x @ W[p + "gate"].T, W[p + "gate_bias"], cfg.n_expert_groups, cfg.n_limited_groups,
                            cfg.n_activated_experts, cfg.route_scale)
    for t in range(6):
        want = m.mlp(x[t : t + 1], W[p + "shared.w1"], W[p + "shared.w3"], W[p + "shared.w2"])[0]
        for k in range(cfg.n_activated_experts):
            want = want + w[t, k] * m.mlp(x[t : t + 1], *m.expert(layer, int(ids[t, k])))[0]
        np.testing.assert_allclose(y[t], want, rtol=1e-4, atol=1e-5)
    assert len(np.unique(ids)) > cfg.n_activated_experts  # tokens do route to different experts


def test_generation_is_deterministic_and_checked(tiny):
    cfg, W = tiny
    a, la = ReferenceModel(cfg, W).generate([5, 6, 7], 8)
    b, _ = ReferenceModel(cfg, init_weights(cfg, seed=0)).generate([5, 6, 7], 8)
    assert a == b and len(a) == 8 and all(0 <= t < cfg.vocab_size for t in a)
    assert all(np.isfinite(x).all() for x in la)
    c, _ = ReferenceModel(cfg, init_weights(cfg, seed=1)).generate([5, 6, 7], 8)
    assert c != a  # other weights, other tokens
    m = ReferenceModel(cfg, W)
    with pytest.raises(ValueError, match="token ids must be in"):
        m.prefill([cfg.vocab_size])
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        m.prefill(list(range(10)) * 13)


def test_safetensors_shards_load(tmp_path, tiny):
    st = pytest.importorskip("safetensors.numpy")
    cfg, W = tiny
    part = {k: v for k, v in W.items() if k.startswith("layers.1.ffn.experts.0.")}
    st.save_file(part, str(tmp_path / "model-00001.safetensors"))
    st.save_file({"embed": W["embed"]}, str(tmp_path / "model-00002.safetensors"))
    got = load_safetensors([str(tmp_path / "model-00001.safetensors"), str(tmp_path / "model-00002.safetensors")])
    assert set(got) == set(part) | {"embed"}
    np.testing.assert_array_equal(got["layers.1.ffn.experts.0.w1"], W["layers.1.ffn.experts.0.w1"])
    st.save_file({"embed": W["embed"]}, str(tmp_path / "dup.safetensors"))
    with pytest.raises(ValueError, match="more than one shard"):
        load_safetensors([str(tmp_path / "model-00002.safetensors"), str(tmp_path / "dup.safetensors")])


def test_safetensors_loads_one_shard_given_as_a_path(tmp_path, tiny):
    """A single path (str or Path) had been iterated character by character: 'No such device' from opening '/'."""
    st = pytest.importorskip("safetensors.numpy")
    cfg, W = tiny
    path = tmp_path / "model.safetensors"
    st.save_file({"embed": W["embed"]}, str(path))
    for p in (str(path), path):
        got = load_safetensors(p)
        assert set(got) == {"embed"} and np.array_equal(got["embed"], W["embed"])


def test_forward_checks_start_and_token_ids_before_touching_the_cache(tiny):
    cfg, W = tiny
    m = ReferenceModel(cfg, W)
    m.prefill([1, 2, 3])
    before = [{k: v.copy() for k, v in c.items()} for c in m.cache]
    for start in (1, 5, -1):
        with pytest.raises(ValueError, match=rf"start must be 0 .* or the cached length 3 .*got {start}"):
            m.forward([4], start)
    with pytest.raises(TypeError, match="start must be an int"):
        m.forward([4], 3.0)
    with pytest.raises(TypeError, match="token ids must be integers"):
        m.forward([1.7, 2.2], 3)
    with pytest.raises(TypeError, match="token ids must be integers"):
        m.forward([True, False], 3)
    with pytest.raises(TypeError, match="token ids must be integers"):
        m.prefill([1.0])
    assert m.pos == 3
    for c, b in zip(m.cache, before):
        assert c.keys() == b.keys() and all(np.array_equal(c[k], b[k]) for k in b)  # untouched
    want = ReferenceModel(cfg, W)
    want.prefill([1, 2, 3])
    np.testing.assert_array_equal(m.decode(4), want.decode(4))  # the model still works
    np.testing.assert_array_equal(m.forward(np.array([5, 6], np.int32), 0), want.forward([5, 6], 0))  # 0: new seq


@pytest.mark.parametrize("absorbed", [False, True])
def test_a_forward_that_fails_half_way_leaves_the_model_as_it_was(tiny, absorbed):
    """A weight missing from layer 2 raised after layers 0 and 1 had appended to their caches (pos unchanged): the
    next decode failed with a broadcasting error and a full forward of a continuation was impossible. A failed
    forward (or prefill) now leaves position, caches and routing record as they were."""
    cfg, W = tiny
    W = dict(W)  # the fixture's dict is shared
    m, want = ReferenceModel(cfg, W, absorbed), ReferenceModel(cfg, W, absorbed)
    m.prefill([1, 2, 3])
    want.prefill([1, 2, 3])
    before = [{k: v.copy() for k, v in c.items()} for c in m.cache]
    ids_before = [None if i is None else i.copy() for i in m.last_ids]
    gate = W.pop("layers.2.ffn.gate")
    with pytest.raises(KeyError, match="layers.2.ffn.gate"):
        m.decode(4)
    with pytest.raises(KeyError, match="layers.2.ffn.gate"):
        m.prefill([7, 8])  # a failed prefill keeps the sequence it would have replaced
    assert m.pos == 3
    for c, b in zip(m.cache, before):
        assert c.keys() == b.keys() and all(np.array_equal(c[k], b[k]) for k in b)
    assert all((a is None and b is None) or np.array_equal(a, b) for a, b in zip(m.last_ids, ids_before))
    W["layers.2.ffn.gate"] = gate
    np.testing.assert_array_equal(m.decode(4), want.decode(4))


def test_generate_steps_contract(tiny):
    cfg, W = tiny
    m = ReferenceModel(cfg, W)
    assert m.generate([5, 6, 7], 0) == ([], [])
    toks, logits = m.generate([5, 6, 7], 1)
    assert len(toks) == len(logits) == 1
    with pytest.raises(ValueError, match="steps must be >= 0, got -2"):
        m.generate([5, 6, 7], -2)
    with pytest.raises(TypeError, match="steps must be an int"):
        m.generate([5, 6, 7], 2.0)


@pytest.mark.parametrize("kw, err, msg", [
    (dict(n_expert_groups=0), ValueError, "n_expert_groups must be >= 1"),
    (dict(n_activated_experts=0), ValueError, "n_activated_experts must be >= 1"),
    (dict(n_dense_layers=-1), ValueError, r"n_dense_layers -1 must be in \[0, n_layers = 4\]"),
    (dict(n_dense_layers=5), ValueError, r"n_dense_layers 5 must be in \[0, n_layers = 4\]"),
    (dict(n_layers=0, n_dense_layers=0), ValueError, "n_layers must be >= 1"),
    (dict(dim=-64), ValueError, "dim must be >= 1"),
    (dict(max_seq_len=0), ValueError, "max_seq_len must be >= 1"),
    (dict(n_shared_experts=-1), ValueError, "n_shared_experts must be >= 0"),
    (dict(n_heads=2.5), TypeError, "n_heads must be an int"),
    (dict(vocab_size=True), TypeError, "vocab_size must be an int"),
])
def test_config_rejects_bad_fields_by_name(kw, err, msg):
    with pytest.raises(err, match=msg):
        DeepSeekConfig.tiny(**kw)


@pytest.mark.parametrize("kw, err, msg", [
    # float fields had not been checked at all: a zero or negative rope_factor failed later in softmax_scale with
    # "math domain error", a NaN eps gave NaN logits, a string scale a TypeError deep in the gate
    (dict(rope_factor=0.0), ValueError, "rope_factor must be > 0, got 0.0"),
    (dict(rope_factor=-4.0), ValueError, "rope_factor must be > 0"),
    (dict(rope_theta=1.0), ValueError, "rope_theta must be > 1, got 1.0"),
    (dict(rms_eps=float("nan")), ValueError, "rms_eps must be finite"),
    (dict(rms_eps=-1e-6), ValueError, "rms_eps must be >= 0"),
    (dict(route_scale=float("inf")), ValueError, "route_scale must be finite"),
    (dict(route_scale=-2.5), ValueError, "route_scale must be > 0, got -2.5"),  # (had flipped the experts' sum)
    (dict(route_scale=0.0), ValueError, "route_scale must be > 0, got 0.0"),
    (dict(mscale=float("nan")), ValueError, "mscale must be finite"),
    (dict(route_scale="2.5"), TypeError, "route_scale must be a real number, got '2.5' \\(str\\)"),
    (dict(rms_eps=True), TypeError, "rms_eps must be a real number"),
])
def test_config_rejects_bad_float_fields_by_name(kw, err, msg):
    with pytest.raises(err, match=msg):
        DeepSeekConfig.tiny(**kw)


def test_config_takes_integer_and_numpy_values_for_float_fields():
    c = DeepSeekConfig.tiny(rope_theta=10000, route_scale=np.float32(2.5), rms_eps=0.0)
    assert c.rope_theta == 10000 and c.route_scale == 2.5


@pytest.mark.parametrize("n_layers", [True, np.True_, 5.0])
def test_r1_names_a_bad_layer_count(n_layers):
    """A bool layer count had been blamed on n_dense_layers (which r1 derives from it, and which was checked first)."""
    with pytest.raises(TypeError, match=r"DeepSeekConfig\.n_layers must be an int"):
        DeepSeekConfig.r1(n_layers=n_layers)


def test_config_overrides():
    c = DeepSeekConfig.r1(n_layers=5, n_dense_layers=1)
    assert (c.n_layers, c.n_dense_layers, c.n_moe_layers) == (5, 1, 4)
    assert DeepSeekConfig.r1(n_layers=2).n_dense_layers == 2 and DeepSeekConfig.r1().n_dense_layers == 3
    assert DeepSeekConfig.tiny(n_dense_layers=0).n_moe_layers == 4


def test_safetensors_fp8_and_bf16_tensors_load(tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    f8 = (torch.arange(16, dtype=torch.float32).reshape(4, 4) / 4 - 2).to(torch.float8_e4m3fn)
    bf = torch.tensor([0.96875, 0.2021484375, -3.5], dtype=torch.bfloat16)
    f32 = torch.tensor([1.5, -2.25])
    st.save_file({"w": f8, "w.scale": f32}, str(tmp_path / "a.safetensors"))
    st.save_file({"norm": bf}, str(tmp_path / "b.safetensors"))
    got = load_safetensors([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")])
    assert got["w"].dtype == np.uint8 and got["w"].shape == (4, 4)
    np.testing.assert_array_equal(got["w"], f8.view(torch.uint8).numpy())  # the fp8 codes, bit-exact
    assert got["norm"].dtype == np.float32
    np.testing.assert_array_equal(got["norm"], [0.96875, 0.2021484375, -3.5])
    np.testing.assert_array_equal(got["w.scale"], [1.5, -2.25])
    st.save_file({"w": f8}, str(tmp_path / "dup.safetensors"))
    with pytest.raises(ValueError, match="more than one shard"):
        load_safetensors([str(tmp_path / "a.safetensors"), str(tmp_path / "dup.safetensors")])
    # e5m2 tensors come back as their values: as uint8 codes they were indistinguishable from e4m3 ones, and
    # dequant_fp8 decoded them as e4m3 (wrong values, no error)
    e5 = torch.tensor([0.5, -3.0, 57344.0, 1.52587890625e-05]).to(torch.float8_e5m2)
    st.save_file({"g": e5}, str(tmp_path / "c.safetensors"))
    got = load_safetensors(str(tmp_path / "c.safetensors"))["g"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, e5.float().numpy())


def test_init_weights_seeds_give_unrelated_streams_or_are_refused_by_name():
    """Each tensor group is drawn from SeedSequence([seed, *key]); a seed >= 2**32 is two uint32 words, so
    seed 2**33 drew its embedding from seed 0's layer-0 stream ([0, 2, 0]) and seed 2**32's from seed 0's head stream:
    two documented-different seeds gave the same weights. Such seeds, negative ones, bools and strings are refused."""
    cfg = DeepSeekConfig.tiny(n_layers=1, n_dense_layers=1)
    for seed, err, msg in [(2**32, ValueError, r"seed must be an int in \[0, 2\*\*32\), got 4294967296"),
                           (2**33, ValueError, "seed must be an int in"),
                           (-1, ValueError, r"seed must be an int in \[0, 2\*\*32\), got -1"),
                           (True, TypeError, r"seed must be an int in .*got True \(bool\)"),
                           ("3", TypeError, r"seed must be an int in .*got '3' \(str\)"),
                           (1.0, TypeError, r"seed must be an int in .*got 1\.0 \(float\)")]:
        with pytest.raises(err, match=msg):
            init_weights(cfg, seed)
    a, b = init_weights(cfg, np.uint32(2**32 - 1)), init_weights(cfg, 2**32 - 1)  # the largest, numpy ints taken
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_apply_rope_refuses_angles_that_would_broadcast():
    """An angles of one row had rotated every position by that row's angles, one of one column every pair by the
    same angle (no error); wrong sizes failed inside numpy's broadcasting without naming the argument."""
    a = yarn_freqs(DeepSeekConfig.tiny())
    x = np.random.default_rng(0).normal(size=(5, 3, 8)).astype(np.float32)
    for bad in (a[2:3], a[:5, :1], a[:4], a[:5].T, a[:5, :2]):
        with pytest.raises(ValueError, match=r"apply_rope: angles must be \[S, dim/2\] = \(5, 4\)"):
            apply_rope(x, bad)
    for badx in (x[0, 0], x[..., :7]):
        with pytest.raises(ValueError, match="apply_rope: x must be"):
            apply_rope(badx, a[:1])
    np.testing.assert_array_equal(apply_rope(x[:, 0], a[:5]), apply_rope(x, a[:5])[:, 0])  # [S, dim] as [S, 1, dim]


def test_rms_norm_refuses_a_weight_that_would_broadcast(tiny):
    """A norm weight of shape [1] or [n, 1] had been broadcast over the hidden dim (or the rows) without a word, in
    rms_norm and so in a ReferenceModel given such a weight."""
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    want = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * 2
    np.testing.assert_allclose(rms_norm(x, np.full(8, 2.0), 1e-6), want, rtol=1e-6)
    for w in (np.ones(1), np.ones((3, 1)), np.ones(7), np.ones((1, 8))):
        with pytest.raises(ValueError, match=r"rms_norm: w must have shape \(d,\) .* \(3, 8\), got"):
            rms_norm(x, w, 1e-6)
    cfg, W = tiny
    W = dict(W, **{"layers.0.attn_norm": np.ones(1, np.float32)})
    with pytest.raises(ValueError, match="rms_norm: w must have shape"):
        ReferenceModel(cfg, W).prefill([1, 2, 3])


@pytest.mark.parametrize("scale, err, msg", [
    (np.array([1.0, 3.0]), TypeError, "routed_scaling_factor must be a real number"),  # had scaled slot by slot
    (True, TypeError, r"routed_scaling_factor must be a real number, got True \(bool\)"),  # had been 1.0
    ("2.5", TypeError, "routed_scaling_factor must be a real number, got '2.5'"),  # numpy's UFuncTypeError
    (float("nan"), ValueError, "routed_scaling_factor must be finite"),  # NaN weights
])
def test_gate_refuses_a_scaling_factor_that_is_not_a_finite_number(scale, err, msg):
    with pytest.raises(err, match=msg):
        select_experts(np.zeros((2, 8)), np.zeros(8), 4, 2, 2, scale)
    w, _ = select_experts(np.zeros((2, 8)), np.zeros(8), 4, 2, 2, np.float32(2.5))  # numpy scalars are numbers
    np.testing.assert_allclose(w, 1.25)
