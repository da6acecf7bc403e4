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


@pytest.mark.parametrize("which", ["train", "test"])
@pytest.mark.parametrize("value", [3.0, 0.5, -1.0, np.nan])
def test_train_refuses_a_mask_that_is_not_0_or_1_before_training(which, value):
    """A mask of 3 or 0.5 had trained without a word (the history sums weigh a behaviour by its mask, the co-action
    counts it once), a NaN one ended the run with advice to lower the learning rate."""
    tr, te, tables = _sets()
    sets = {"train": tr, "test": te}
    sets[which].mask = sets[which].mask.copy()
    sets[which].mask[2, 0] = value
    model = CanModel(CanConfig(tables))
    name = "training" if which == "train" else "test"
    with pytest.raises(ValueError, match=rf"^{name} set: mask must be 0 \(padding\) or 1 \(a behaviour\): 1 of "
                                         rf"{sets[which].mask.size} are not \(the first {value!r} at \[2, 0\]\)"):
        train(model, tr, te, 1, 16, 0, progress=False)
    assert model.opt.t == 0


def test_train_takes_boolean_and_integer_masks():
    tr, te, tables = _sets()
    tr.mask, te.mask = tr.mask.astype(bool), te.mask.astype(np.int64)
    curve = train(CanModel(CanConfig(tables)), tr, te, 1, 16, 0, progress=False)
    assert 0 <= curve[0]["test_auc"] <= 1


def test_train_refuses_a_mask_that_is_not_numbers():
    tr, te, tables = _sets()
    te.mask = te.mask.astype(str)
    with pytest.raises(TypeError, match="^test set: mask must hold 0 / 1 numbers or booleans"):
        train(CanModel(CanConfig(tables)), tr, te, 1, 16, 0, progress=False)


def _books(path, n=60):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n):
            h = [f"i{rng.integers(30)}" for _ in range(rng.integers(1, 6))]
            c = [f"c{int(x[1:]) % 5}" for x in h]
            f.write(f"{i % 2}\tu{rng.integers(40)}\ti{rng.integers(30)}\tc{rng.integers(5)}\t"
                    f"{chr(2).join(h)}\t{chr(2).join(c)}\n")
    return path.read_text()


@pytest.mark.parametrize("out", ["--json", "--plot"])
@pytest.mark.parametrize("which", ["--data", "--test"])
def test_can_train_refuses_an_output_that_is_an_input_file(tmp_path, capsys, out, which):
    """--json (or --plot) naming the --data or --test file had overwritten the data with the run's report, without a
    word, after training."""
    from dwdp_ops.models.train_can import main

    data, test = tmp_path / "train.txt", tmp_path / "test.txt"
    texts = {"--data": _books(data), "--test": _books(test)}
    alias = str(tmp_path / "." / (data if which == "--data" else test).name)  # (the same file, spelt otherwise)
    with pytest.raises(SystemExit) as e:
        main(["--device", "cpu", "--quiet", "--epochs", "1", "--data", str(data), "--test", str(test), out, alias])
    assert e.value.code == 2
    assert f"argument {out}: {alias!r} is {which}'s file" in capsys.readouterr().err
    assert (data.read_text(), test.read_text()) == (texts["--data"], texts["--test"])  # (both as they were)
