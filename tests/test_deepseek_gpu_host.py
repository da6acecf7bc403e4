"""Host-side checks of ``GpuModel.forward`` on the CPU: a step refused by its arguments leaves the requests' cached
lengths as they were (the model is built without ``__init__``: the checks run before any CUDA call)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
from dwdp_ops.models.deepseek_r1 import DeepSeekConfig  # noqa: E402
from dwdp_ops.models.deepseek_r1.gpu import GpuModel  # noqa: E402


def _model(lengths):
    m = GpuModel.__new__(GpuModel)
    m.cfg, m.max_requests, m.max_seq, m.lengths = DeepSeekConfig.tiny(), len(lengths), 16, list(lengths)
    return m


@pytest.mark.parametrize("tokens, msg", [
    ([[1, 2], [97, 1]], r"token ids must be in \[0, 97\)"),
    ([[1, 2], []], "request 1: empty token list"),
    ([[1, 2], list(range(17))], "request 1: 17 positions exceed max_seq 16"),
])
def test_a_refused_prefill_keeps_the_cached_lengths(tokens, msg):
    """A prefill refused for its tokens had already zeroed every request's length: the sequences cached in those
    slots were lost (their next decode was taken for a prefill)."""
    m = _model([5, 3])
    with pytest.raises(ValueError, match=msg):
        m.forward([0, 1], tokens)
    assert m.lengths == [5, 3]


def test_a_step_mixing_a_prefill_and_a_decode_is_refused_before_any_cuda_call():
    """The mixed-step check had been tested only on a GPU (tests/test_gpu_deepseek.py); it needs none: request 0
    holds a cached sequence (one token: a decode), request 1 none (a prefill)."""
    m = _model([4, 0])
    with pytest.raises(ValueError, match="a step is either a prefill of every request .* this one mixes both"):
        m.forward([0, 1], [[1], [2, 3]])
    assert m.lengths == [4, 0]


@pytest.mark.parametrize("requests, tokens, err, msg", [
    ([0], [[1.7, 2.2]], TypeError, "token ids must be integers, got float64"),  # had been truncated to [1, 2]
    ([0], [[True, False]], TypeError, "token ids must be integers, got bool"),  # had been taken as [1, 0]
    ([True], [[1, 2]], ValueError, r"requests must be distinct slots \(ints\)"),  # had been slot 1
    ([0.0], [[1, 2]], ValueError, r"requests must be distinct slots \(ints\)"),
])
def test_forward_refuses_float_and_bool_ids_as_the_reference_does(requests, tokens, err, msg):
    m = _model([0, 0])
    with pytest.raises(err, match=msg):
        m.forward(requests, tokens)
    assert m.lengths == [0, 0]


@pytest.mark.parametrize("kw, err, msg", [
    (dict(max_requests=2, max_seq=0), ValueError, "max_seq must be an int >= 1, got 0"),  # had been max_seq_len
    (dict(max_requests=2, max_seq=-4), ValueError, "max_seq must be an int >= 1, got -4"),
    (dict(max_requests=2, max_seq=8.5), TypeError, "max_seq must be an int >= 1, got 8.5"),
    (dict(max_requests=2.9, max_seq=8), TypeError, "max_requests must be an int >= 1, got 2.9"),  # had been 2
    (dict(max_requests=True, max_seq=8), TypeError, "max_requests must be an int >= 1, got True"),  # had been 1
    (dict(max_requests=0, max_seq=8), ValueError, "max_requests must be an int >= 1, got 0"),
])
def test_constructor_refuses_counts_it_would_truncate_or_default(kw, err, msg):
    """GpuModel took ``int(max_requests)`` and ``int(max_seq or cfg.max_seq_len)``: 2.9 requests were 2, True one,
    and max_seq=0 silently the model's whole max_seq_len. Refused before any CUDA call (the weights are a stand-in:
    the checks come before they are read)."""
    import types

    w = types.SimpleNamespace(dtype=None, device="cuda")
    with pytest.raises(err, match=msg):
        GpuModel(DeepSeekConfig.tiny(), w, None, **kw)
