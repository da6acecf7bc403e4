"""Data for CAN: the DIEN/CAN Amazon Books text format and a synthetic generator with a planted co-action.

Amazon Books (DIEN protocol, ``local_train_splitByUser`` / ``local_test_splitByUser``): one sample per line,
tab-separated ``label, user, item, category, item history, category history``; the histories are
``\\x02``-separated, oldest first; an empty entry (a doubled, leading or trailing separator) is no behaviour and is
skipped, in the vocabulary and the histories alike, so the two histories must hold as many non-empty entries.
Vocabularies are built from the training file, most frequent first, with id 0 for padding and anything unseen.
Histories keep the most recent ``max_len`` behaviours.

Every loader returns a ``Batchable`` of numpy arrays: ``uid [N]``, ``mid [N]``, ``cat [N]``, ``hist_mid [N, T]``,
``hist_cat [N, T]``, ``mask [N, T]`` (float32 0/1) and ``label [N]`` (float32).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from .._checks import int_at_least, is_int, is_real

SEP = "\x02"


@dataclass
class Batchable:
    uid: np.ndarray
    mid: np.ndarray
    cat: np.ndarray
    hist_mid: np.ndarray
    hist_cat: np.ndarray
    mask: np.ndarray
    label: np.ndarray

    def __post_init__(self) -> None:
        self.check_shapes()

    def check_shapes(self) -> None:
        """ValueError unless the fields agree: ``uid``, ``mid``, ``cat`` and ``label`` ``[N]``, ``hist_mid``,
        ``hist_cat`` and ``mask`` ``[N, T]`` (numpy or CuPy arrays; their shapes alone are read), and TypeError for a
        field that is not an array (a list had passed here and failed deep inside ``batches``, ``split`` or the
        model). Run when the ``Batchable`` is built and again by ``batches`` and ``split``, since a field may be
        assigned afterwards (one longer than the labels would otherwise be cut to their ``N`` rows without a word)."""
        for f in self.__dataclass_fields__:
            a = getattr(self, f)
            if not (hasattr(a, "shape") and hasattr(a, "dtype")):
                raise TypeError(f"{f} must be an array (numpy or CuPy), got {type(a).__name__}")
        shape = np.shape(self.label)
        if len(shape) != 1:
            raise ValueError(f"label must be [N], got shape {list(shape)}")
        n = shape[0]
        for f in ("uid", "mid", "cat"):
            if np.shape(getattr(self, f)) != (n,):
                raise ValueError(f"{f} must be [N] = [{n}] (label's N), got shape {list(np.shape(getattr(self, f)))}")
        mask = np.shape(self.mask)
        if len(mask) != 2 or mask[0] != n:
            raise ValueError(f"mask must be [N, T] with N = {n} (label's N), got shape {list(mask)}")
        for f in ("hist_mid", "hist_cat"):
            if np.shape(getattr(self, f)) != mask:
                raise ValueError(f"{f} must be [N, T] = {list(mask)} (mask's shape), got shape "
                                 f"{list(np.shape(getattr(self, f)))}")

    def __len__(self) -> int:
        return len(self.label)

    def batches(self, batch_size: int, rng: np.random.Generator | None = None):
        """Batchable slices of ``batch_size`` (shuffled when ``rng`` is given); the last one may be short.
        ``batch_size``: an integer >= 1 (Python or numpy), ``rng`` a ``numpy.random.Generator`` (or a legacy
        ``RandomState``) or None, checked at the call: TypeError / ValueError otherwise; ValueError, also at the call,
        when a field assigned since construction no longer agrees with the others (``check_shapes``)."""
        if rng is not None and not isinstance(rng, (np.random.Generator, np.random.RandomState)):
            raise TypeError(f"rng must be a numpy.random.Generator or None (for no shuffling), got {rng!r} "
                            f"({type(rng).__name__}); pass np.random.default_rng(seed) for a seed")
        if not is_int(batch_size):
            raise TypeError(f"batch_size must be an integer >= 1, got {batch_size!r} ({type(batch_size).__name__})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size}")
        batch_size = int(batch_size)
        self.check_shapes()
        order = rng.permutation(len(self)) if rng is not None else np.arange(len(self))
        fields = tuple(self.__dataclass_fields__)
        return (Batchable(*(getattr(self, f)[order[s : s + batch_size]] for f in fields))
                for s in range(0, len(self), batch_size))


@dataclass(frozen=True)
class Vocab:
    uid: dict
    mid: dict
    cat: dict

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Table sizes including id 0."""
        return len(self.uid) + 1, len(self.mid) + 1, len(self.cat) + 1


def _history(text: str) -> list[str]:
    """The behaviours of a ``SEP``-separated history field, oldest first: its non-empty entries (a doubled, leading
    or trailing separator leaves an empty one, which is no behaviour). ``_parse``, and so ``build_vocab`` and
    ``load_amazon_books``, read histories through this alone."""
    return [x for x in text.split(SEP) if x]


def _parse(path: Path) -> list[tuple[float, str, str, str, list[str], list[str]]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 6:
                raise ValueError(
                    f"{path}:{n}: expected 6 tab-separated fields (label, user, item, category, item history, "
                    f"category history), got {len(parts)}"
                )
            label, uid, mid, cat, hm, hc = parts
            hm, hc = _history(hm), _history(hc)
            if len(hm) != len(hc):
                raise ValueError(f"{path}:{n}: item history has {len(hm)} entries but category history {len(hc)} "
                                 "(non-empty ones: an empty entry is skipped); expected one category per item")
            if label not in ("0", "1", "0.0", "1.0"):
                raise ValueError(f"{path}:{n}: label must be 0 or 1, got {label!r}")
            rows.append((float(label), uid, mid, cat, hm, hc))
    if not rows:
        raise ValueError(f"{path}: no samples")
    return rows


def build_vocab(path: str | Path) -> Vocab:
    """The vocabulary of one DIEN-format file (the training file): ``_vocab(_parse(path))``."""
    return _vocab(_parse(Path(path)))


def _vocab(rows: list[tuple[float, str, str, str, list[str], list[str]]]) -> Vocab:
    """The vocabulary of parsed rows (``_parse``'s): users, items and categories, each most frequent first (ties by
    name), from 1 (0 is padding and anything unseen); items and categories count their histories' entries too."""
    counts = [Counter(), Counter(), Counter()]
    for _, uid, mid, cat, hm, hc in rows:
        counts[0][uid] += 1
        counts[1][mid] += 1
        counts[1].update(hm)
        counts[2][cat] += 1
        counts[2].update(hc)
    maps = [{k: i + 1 for i, (k, _) in enumerate(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))} for c in counts]
    return Vocab(*maps)


def load_amazon_books(path: str | Path, vocab: Vocab | None = None, max_len: int = 100) -> tuple[Batchable, Vocab]:
    """Reads one DIEN-format file, once; builds the vocabulary from its rows when none is given (as ``build_vocab``
    would; pass the training file's ``Vocab`` when loading the test file). ``max_len`` an integer >= 1, ``vocab`` a
    ``Vocab`` or None: TypeError / ValueError otherwise."""
    max_len = int_at_least("max_len", max_len, 1, "an integer")
    if vocab is not None and not isinstance(vocab, Vocab):
        raise TypeError(f"vocab must be a Vocab (the training file's, from load_amazon_books or build_vocab) or None, "
                        f"got {type(vocab).__name__}")
    rows = _parse(Path(path))  # (read once: the vocabulary, when built here, comes from the same rows)
    vocab = vocab if vocab is not None else _vocab(rows)
    N = len(rows)
    out = Batchable(
        np.zeros(N, np.int64), np.zeros(N, np.int64), np.zeros(N, np.int64), np.zeros((N, max_len), np.int64),
        np.zeros((N, max_len), np.int64), np.zeros((N, max_len), np.float32), np.zeros(N, np.float32),
    )
    for i, (label, uid, mid, cat, hm, hc) in enumerate(rows):
        out.label[i] = label
        out.uid[i], out.mid[i], out.cat[i] = vocab.uid.get(uid, 0), vocab.mid.get(mid, 0), vocab.cat.get(cat, 0)
        hm, hc = hm[-max_len:], hc[-max_len:]
        out.hist_mid[i, : len(hm)] = [vocab.mid.get(x, 0) for x in hm]
        out.hist_cat[i, : len(hc)] = [vocab.cat.get(x, 0) for x in hc]
        out.mask[i, : len(hm)] = 1
    return out, vocab


def synthetic(
    n: int = 20000,
    *,
    n_users: int = 500,
    n_items: int = 400,
    n_cats: int = 20,
    seq_len: int = 20,
    strength: float = 2.5,
    seed: int = 0,
) -> tuple[Batchable, tuple[int, int, int]]:
    """Samples whose click depends on a planted interaction between the target item and the history: every item
    has a category, and ``P(click) = sigmoid(strength * mean_t A[cat(target), cat(hist_t)] + item bias)`` with a
    random +-1 table ``A``, so the signal lives in the (target, behaviour) pairs, not in either side alone.
    Returns the data and the table sizes (users, items, categories) including id 0. ``n`` and ``seed`` integers
    >= 0, the sizes and ``seq_len`` integers >= 1, ``strength`` a finite number: TypeError / ValueError naming one
    otherwise."""
    n = int_at_least("n", n, 0, "an integer")
    seed = int_at_least("seed", seed, 0, "an integer")  # (None would draw fresh entropy: other data every call)
    n_users, n_items, n_cats, seq_len = (int_at_least(k, v, 1, "an integer") for k, v in (
        ("n_users", n_users), ("n_items", n_items), ("n_cats", n_cats), ("seq_len", seq_len)))
    if not is_real(strength):
        raise TypeError(f"strength must be a finite number, got {strength!r} ({type(strength).__name__})")
    if not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number, got {strength!r}")
    rng = np.random.default_rng(seed)
    item_cat = rng.integers(1, n_cats + 1, size=n_items + 1)
    item_cat[0] = 0
    A = rng.choice([-1.0, 1.0], size=(n_cats + 1, n_cats + 1))
    bias = rng.normal(0, 0.3, size=n_items + 1)
    lengths = rng.integers(1, seq_len + 1, size=n)
    hist_mid = rng.integers(1, n_items + 1, size=(n, seq_len))
    mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.float32)
    hist_mid = (hist_mid * mask).astype(np.int64)
    mid = rng.integers(1, n_items + 1, size=n)
    pair = A[item_cat[mid][:, None], item_cat[hist_mid]]  # [n, T]: the planted (target, behaviour) interaction
    score = strength * (pair * mask).sum(1) / lengths + bias[mid]
    label = (rng.random(n) < 1 / (1 + np.exp(-score))).astype(np.float32)
    data = Batchable(
        rng.integers(1, n_users + 1, size=n), mid, item_cat[mid], hist_mid, item_cat[hist_mid] * (mask > 0), mask, label
    )
    return data, (n_users + 1, n_items + 1, n_cats + 1)


def split(data: Batchable, test_fraction: float = 0.2, seed: int = 0) -> tuple[Batchable, Batchable]:
    """``(train, test)``: ``data`` shuffled by ``seed`` (an integer >= 0), the last ``test_fraction`` of it (a real
    number in (0, 1)) the test set: the first ``floor(N x (1 - test_fraction))`` samples train. TypeError for a
    ``data`` that is not a ``Batchable``; ValueError when ``data``'s fields no longer agree
    (``Batchable.check_shapes``: one assigned since construction) or when either set would be empty."""
    if not is_real(test_fraction):
        raise TypeError(f"test_fraction must be a number in (0, 1), got {test_fraction!r} "
                        f"({type(test_fraction).__name__})")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    seed = int_at_least("seed", seed, 0, "an integer")
    if not isinstance(data, Batchable):  # (had failed on data.check_shapes: a bare AttributeError)
        raise TypeError(f"data must be a Batchable (load_amazon_books' or synthetic's), got {type(data).__name__}")
    data.check_shapes()
    idx = np.random.default_rng(seed).permutation(len(data))
    # floor(N x (1 - test_fraction)) training samples, in exact arithmetic on the fraction as written (its str):
    # int(90 * (1 - 0.3)) is 62, not 63, as 1 - 0.3 is 0.69999999999999996 in floats
    cut = math.floor(len(data) * (1 - Fraction(str(test_fraction))))
    if not 0 < cut < len(data):  # (an empty set went on to fail, or to give no AUC, later)
        raise ValueError(f"test_fraction {test_fraction} of {len(data)} samples leaves the "
                         f"{'training' if cut == 0 else 'test'} set empty; more samples or another fraction")
    pick = lambda ix: Batchable(*(getattr(data, f)[ix] for f in data.__dataclass_fields__))  # noqa: E731
    return pick(idx[:cut]), pick(idx[cut:])


def binary_labels(label) -> np.ndarray:
    """``label`` (0 / 1 numbers or booleans) as booleans, True for a click. TypeError for labels that are not numbers
    or booleans, ValueError for any other value (NaN included) or labels of one class only (no AUC)."""
    label = np.asarray(label)
    if label.dtype.kind not in "biuf":
        raise TypeError(f"labels must be 0 / 1 numbers or booleans, got {label.dtype}")
    other = ~((label == 0) | (label == 1))
    if other.any():
        raise ValueError(f"labels must be 0 or 1: {int(other.sum())} of {label.size} are not (the first "
                         f"{label[other][0].item()!r} at {int(np.flatnonzero(other.reshape(-1))[0])})")
    pos = label == 1
    if pos.all() or not pos.any():
        raise ValueError("AUC needs both positive and negative labels")
    return pos


def auc(label: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties averaged; vectorised: one sort, no Python loop over the
    samples, so millions of them take about a second). ``label`` and ``score``: 1-D, one score per label;
    the labels 0 or 1 (numbers or booleans), the scores real numbers. ValueError for mismatched shapes, a NaN score
    (it has no rank), a label other than 0 or 1 (NaN included) or labels of one class only; TypeError for labels or
    scores that are not numbers (strings, even of digits, complex numbers, objects)."""
    label, score = np.asarray(label), np.asarray(score)
    if score.dtype.kind not in "biuf":
        raise TypeError(f"score must hold real numbers (one per label), got an array of dtype {score.dtype}")
    score = score.astype(np.float64)
    if label.ndim != 1 or score.shape != label.shape:
        raise ValueError(f"auc needs 1-D labels and one score per label: got {label.size} labels and {score.size} "
                         f"scores (shapes {label.shape} and {score.shape})")
    nan = int(np.isnan(score).sum())
    if nan:
        raise ValueError(f"scores must not be NaN ({nan} of {score.size} are): a NaN has no rank")
    pos = binary_labels(label)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    # average ranks, vectorised (no Python loop over samples): sorted, each run of equal scores (a group: -0.0 and
    # 0.0 are one, as are equal infinities) gets the mean of its 1-based positions, (first + last) / 2 + 1
    order = np.argsort(score, kind="stable")
    s = score[order]
    n = len(s)
    new = np.empty(n, bool)
    new[:1] = True
    np.not_equal(s[1:], s[:-1], out=new[1:])  # (not np.diff: inf - inf is NaN, which would split a group)
    first = np.flatnonzero(new)  # each group's first sorted position
    end = np.append(first[1:], n)  # one past its last
    ranks = np.empty(n)
    ranks[order] = ((first + end + 1) / 2)[np.cumsum(new) - 1]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
