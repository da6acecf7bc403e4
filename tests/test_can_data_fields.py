"""CAN data on the host: a ``Batchable`` field assigned after construction is checked again where the data is used
(``batches``, ``split``, ``train``), and ``train`` refuses masks that are not 0 / 1."""

from __future__ import annotations

import numpy as np
import pytest
from dwdp_ops.models.can import CanConfig, CanModel
from dwdp_ops.models.can_data import split, synthetic
from dwdp_ops.models.train_can import train


def _sets():
    data, tables = synthetic(300, seq_len=6, seed=0)
    tr, te = split(data, 0.2, 0)
    return tr, te, tables


def _longer(data, field):
    """``data`` with ``field`` (and, for a history field, the other [N, T] ones) assigned twice as long: its first
    N rows are another sample's."""
    fields = ("hist_mid", "hist_cat", "mask") if field in ("hist_mid", "hist_cat", "mask") else (field,)
    for f in fields:
        a = getattr(data, f)
        setattr(data, f, np.concatenate([a[::-1], a]))
    return data


@pytest.mark.parametrize("field", ["uid", "mid", "cat", "hist_mid"])
def test_batches_and_split_refuse_a_field_assigned_longer_than_the_labels(field):
    """A field assigned after construction had been cut to the labels' N rows without a word (its first N: here
    another sample's), batch by batch and in split."""
    tr, _, _ = _sets()
    _longer(tr, field)
    with pytest.raises(ValueError, match="label's N"):
        tr.batches(16)
    with pytest.raises(ValueError, match="label's N"):
        split(tr, 0.2, 0)


@pytest.mark.parametrize("which", ["train", "test"])
@pytest.mark.parametrize("field", ["mid", "hist_mid"])
def test_train_refuses_a_field_assigned_longer_than_the_labels_before_training(which, field):
    """The test set had been evaluated on misaligned ids (an AUC, no error); a training set trained on them."""
    tr, te, tables = _sets()
    sets = {"train": tr, "test": te}
    _longer(sets[which], field)
    model = CanModel(CanConfig(tables))
    name = "training" if which == "train" else "test"
    with pytest.raises(ValueError, match=rf"^{name} set: .*label's N"):
        train(model, tr, te, 1, 16, 0, progress=False)
    assert model.opt.t == 0
