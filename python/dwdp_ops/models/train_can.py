"""``python -m dwdp_ops can-train`` (also ``dwdp-can-train``): trains CAN-DNN and/or the DNN baseline and reports
test AUC per epoch.

Every option is checked before training starts (files exist, output directories are writable, ``--json`` and
``--plot`` are not the ``--data`` or ``--test`` file, matplotlib is present for ``--plot`` and can write its
extension's format, a GPU is usable for ``--device gpu``); a training loss that stops being finite ends the run with
the epoch and step where it happened (``train`` raises ``FloatingPointError``; the command exits with code 1), and so
does an output the file system refuses at the end (one ``error:`` line naming the option, after the curves).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from .._checks import int_at_least
from .._cli import (
    HelpFormatter,
    existing_file,
    nonnegative_int,
    plain,
    positive_float,
    positive_int,
    usable_gpus,
    writable_path,
)
from .can import CanConfig, CanModel, NonFiniteLossError, check_ids, check_label_shape, check_labels, check_mask
from .can_data import Batchable, binary_labels, load_amazon_books, split, synthetic


def train(model: CanModel, train_set, test_set, epochs: int, batch_size: int, seed: int, progress: bool = True):
    """Trains ``epochs`` passes of shuffled ``batch_size`` batches; returns one record per epoch (mean train loss,
    test AUC, every step's loss, and ``step_ms``: every step's wall-clock milliseconds, from the batch in hand to the
    return of ``train_step``). On the GPU the loss reaches the host before the step's backward and update are done,
    so a step's time holds the previous step's tail instead of its own: in steady state (the median) that is the
    step time per batch, without the batching, the evaluation or the model's construction. Raises TypeError for
    ``epochs``, ``batch_size`` or ``seed`` not an integer (Python or numpy; a bool is refused), ValueError for
    ``epochs`` or ``batch_size`` < 1, a negative ``seed``, an empty ``train_set``, labels not ``[N]`` (either set;
    ``check_label_shape``), other fields that do not agree with them (either set; ``Batchable.check_shapes``), a
    ``train_set`` label that is NaN, infinite or outside [0, 1] (soft labels pass; ``check_labels``), a mask value
    other than 0 or 1 (either set), a ``test_set`` whose labels are not 0 / 1 of both classes (no AUC) or (for a
    model with ``cfg.tables``) an id outside its table (TypeError for labels or ids that are not numbers /
    integers), all before any training, and FloatingPointError, naming the epoch and step, when a loss is not finite (a CanModel refuses
    that step: the model is as it was before it, and a caller who catches the error can lower ``model.opt.lr`` and
    train on)."""
    # (Python ints from here on: range() numbers epochs either way)
    epochs, batch_size = (int_at_least(name, v, 1, "an integer") for name, v in (("epochs", epochs),
                                                                                 ("batch_size", batch_size)))
    seed = int_at_least("seed", seed, 0, "an integer")  # (None would draw fresh entropy: other shuffles every run)
    # labels [N] (len() is the labels' length), then the other fields: one assigned since construction may not agree
    for which, data in (("training set", train_set), ("test set", test_set)):
        check_label_shape(data, which)
        if isinstance(data, Batchable):
            try:
                data.check_shapes()
            except ValueError as e:
                raise ValueError(f"{which}: {e}") from None
    if len(train_set) == 0:
        raise ValueError("the training set is empty: no step would run (and the epoch's loss would be nan)")
    check_labels(train_set, "training set")  # (NaN, infinite or outside [0, 1]: soft labels pass)
    for which, data in (("training set", train_set), ("test set", test_set)):
        check_mask(data, which)
    try:  # (the AUC after the first epoch would fail: checked before any training)
        binary_labels(test_set.label)
    except (TypeError, ValueError) as e:
        raise type(e)(f"test set ({len(test_set)} samples): {e}; its AUC is taken after every epoch") from None
    tables = getattr(getattr(model, "cfg", None), "tables", None)
    if tables is not None:
        for which, data in (("train", train_set), ("test", test_set)):
            _check_ids(data, tables, which)
    # a CanModel's steps and evaluations skip the per-call id and label checks: both sets were checked above, once
    step, evaluate = ((lambda b: model.train_step(b, check=False)), (lambda d: model.evaluate(d, check=False))) \
        if isinstance(model, CanModel) else (model.train_step, model.evaluate)
    rng = np.random.default_rng(seed)
    curve = []
    for epoch in range(1, epochs + 1):
        losses, step_ms = [], []
        bar = tqdm(train_set.batches(batch_size, rng), total=-(-len(train_set) // batch_size), desc=f"epoch {epoch}",
                   disable=not progress, leave=False)
        for b in bar:
            t0 = time.perf_counter()
            try:
                loss = float(step(b))
            except NonFiniteLossError as e:  # (a CanModel's: the step was refused, the model is as it was)
                bar.close()
                raise _diverged(model, e.loss, epoch, len(losses) + 1,
                                " (the model is as it was before that step: it was not taken)") from e
            step_ms.append(1e3 * (time.perf_counter() - t0))
            if not np.isfinite(loss):  # (another model's step, which returns the loss it stepped on)
                bar.close()
                raise _diverged(model, loss, epoch, len(losses) + 1)
            losses.append(loss)
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        curve.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "test_auc": evaluate(test_set),
                      "losses": [float(x) for x in losses], "step_ms": step_ms})
    return curve


def _diverged(model, loss: float, epoch: int, step: int, tail: str = "") -> FloatingPointError:
    """``train``'s error for a loss that is not finite, naming the epoch and step (and the learning rate: Adam's,
    which a caller may have lowered since ``cfg.lr`` built it)."""
    lr = getattr(getattr(model, "opt", None), "lr", getattr(getattr(model, "cfg", None), "lr", None))
    return FloatingPointError(f"the training loss became {loss} at epoch {epoch}, step {step}"
                              + (f" (learning rate {lr:g})" if lr is not None else "") + "; try a lower --lr" + tail)


def _check_ids(data, tables, which: str) -> None:
    """``check_ids`` of the ``which`` ("train" or "test") set: checked once, before training, so that a bad test id
    does not end the run after an epoch of training."""
    check_ids(data, tables, f"{which} set")


SYNTHETIC_SAMPLES = 20000  # --samples without a value
FILE_MAX_LEN = 100  # --max-len without a value


def _data_source(text: str) -> str:
    """``synthetic`` or an existing DIEN-format file."""
    return text if text == "synthetic" else existing_file(text)


def build_parser(prog: str = "dwdp-can-train") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=plain(__doc__), formatter_class=HelpFormatter)
    ap.add_argument("--data", type=_data_source, default="synthetic",
                    help="'synthetic' or a DIEN-format training file")
    ap.add_argument("--test", type=existing_file, default=None,
                    help="DIEN-format test file, with --data FILE (default: 20%% of the data)")
    ap.add_argument("--model", choices=["can", "dnn", "both"], default="both",
                    help="CAN-DNN, the DNN baseline, or both")
    ap.add_argument("--samples", type=positive_int, default=None,
                    help=f"synthetic samples, only with --data synthetic (default {SYNTHETIC_SAMPLES})")
    ap.add_argument("--epochs", type=positive_int, default=2, help="passes over the training set")
    ap.add_argument("--batch-size", type=positive_int, default=128, help="samples per training step")
    ap.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    ap.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the data, the split and the weights")
    ap.add_argument("--max-len", type=positive_int, default=None,
                    help=f"behaviours kept per history, only with --data FILE (default {FILE_MAX_LEN})")
    ap.add_argument("--device", choices=["cpu", "gpu", "auto"], default="auto",
                    help="cpu: numpy reference ops (float64); gpu: CuPy + fused co-action kernels (float32); "
                         "auto: gpu when one is usable")
    ap.add_argument("--json", type=writable_path, default=None, help="write the curves and AUCs to this file")
    ap.add_argument("--plot", type=writable_path, default=None,
                    help="write a figure of the training curves to this file, in the format of its extension "
                         "(png without one; needs matplotlib)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def _pick_device(ap: argparse.ArgumentParser, requested: str) -> str:
    if requested == "cpu":
        return "cpu"
    count, why = usable_gpus()
    have_cupy = importlib.util.find_spec("cupy") is not None
    if requested == "auto":
        return "gpu" if count > 0 and have_cupy else "cpu"
    if count == 0:
        ap.error(f"argument --device: gpu needs a usable NVIDIA GPU and none was found ({why}); use --device cpu")
    if not have_cupy:
        ap.error("argument --device: gpu needs CuPy, which is not installed (pip install cupy-cuda13x); "
                 "use --device cpu")
    return "gpu"


def _load(ap: argparse.ArgumentParser, ns: argparse.Namespace):
    """The train and test sets and the embedding table sizes; unusable data ends with a usage error."""
    if ns.data == "synthetic":
        try:
            data, tables = synthetic(ns.samples, seed=ns.seed)
        except MemoryError as e:  # (numpy's 'Unable to allocate N GiB for an array with shape ...')
            ap.error(f"argument --samples: {ns.samples} samples do not fit in memory ({e}); use fewer")
        train_set, test_set = split(data, 0.2, ns.seed)
        fix = "use more --samples"
    else:
        # (a MemoryError: [samples, --max-len] arrays too large, or a file too large)
        try:
            train_set, vocab = load_amazon_books(ns.data, max_len=ns.max_len)
        except (ValueError, OSError, UnicodeDecodeError) as e:
            ap.error(f"argument --data: cannot read it: {e}")
        except MemoryError as e:
            ap.error(f"argument --data: out of memory loading it with --max-len {ns.max_len} ({e}); use a smaller "
                     "--max-len")
        if ns.test:
            try:
                test_set, _ = load_amazon_books(ns.test, vocab, ns.max_len)
            except (ValueError, OSError, UnicodeDecodeError) as e:
                ap.error(f"argument --test: cannot read it: {e}")
            except MemoryError as e:
                ap.error(f"argument --test: out of memory loading it with --max-len {ns.max_len} ({e}); use a "
                         "smaller --max-len")
        else:
            train_set, test_set = split(train_set, 0.2, ns.seed)
        tables = vocab.sizes
        fix = "use a larger --data file" + ("" if ns.test else " or give --test")
    if len(train_set) == 0:
        ap.error(f"the training set is empty; {fix}")
    labels = set(np.unique(test_set.label).tolist())
    if len(test_set) == 0 or not {0.0, 1.0} <= labels:
        ap.error(f"the test set ({len(test_set)} samples) needs both clicked and non-clicked samples for its AUC; "
                 f"{fix}")
    return train_set, test_set, tables


def main(argv: list[str] | None = None, prog: str = "dwdp-can-train") -> int:
    """Entry point of ``dwdp-can-train`` and ``python -m dwdp_ops can-train`` (which passes its own ``prog``)."""
    ap = build_parser(prog)
    ns = ap.parse_args(argv)
    if ns.test and ns.data == "synthetic":
        ap.error("argument --test: --test needs --data FILE (synthetic data is split 80/20)")
    # (an option of the other data source is refused, not ignored)
    if ns.samples is not None and ns.data != "synthetic":
        ap.error("argument --samples: only with --data synthetic (a file's samples are its lines)")
    if ns.max_len is not None and ns.data == "synthetic":
        ap.error("argument --max-len: only with --data FILE (synthetic histories have their own length)")
    if ns.json and ns.plot and os.path.realpath(ns.json) == os.path.realpath(ns.plot):
        ap.error(f"argument --plot: {ns.plot!r} is --json's file too (the PNG would overwrite the JSON); give another "
                 "path")
    # (an output written over an input: the data file would be lost after the run, the run's own data with it)
    inputs = {"--data": ns.data if ns.data != "synthetic" else None, "--test": ns.test}
    for out_opt, out in (("--json", ns.json), ("--plot", ns.plot)):
        for in_opt, path in inputs.items():
            if out and path and os.path.realpath(out) == os.path.realpath(path):
                ap.error(f"argument {out_opt}: {out!r} is {in_opt}'s file (writing it would overwrite the data); give "
                         "another path")
    # (the default of the source's own option only: the report's args had held --samples 20000 for a file run)
    if ns.data == "synthetic":
        ns.samples = SYNTHETIC_SAMPLES if ns.samples is None else ns.samples
    else:
        ns.max_len = FILE_MAX_LEN if ns.max_len is None else ns.max_len
    if ns.plot and importlib.util.find_spec("matplotlib") is None:
        ap.error("argument --plot: needs matplotlib, which is not installed (pip install matplotlib)")
    if ns.plot:
        from ..sim.plot import plot_format

        try:  # (matplotlib refused an unknown extension only after training)
            plot_format(ns.plot)
        except ValueError as e:
            ap.error(f"argument --plot: {e}")
    device = _pick_device(ap, ns.device)
    train_set, test_set, tables = _load(ap, ns)
    results = {}
    for name in (["can", "dnn"] if ns.model == "both" else [ns.model]):
        t0 = time.perf_counter()
        model = CanModel(CanConfig(tables, use_coaction=name == "can", lr=ns.lr, seed=ns.seed, device=device))
        try:
            curve = train(model, train_set, test_set, ns.epochs, ns.batch_size, ns.seed, progress=not ns.quiet)
        except FloatingPointError as e:
            ap.exit(1, f"{ap.prog}: error: {name}: {e}\n")
        steps = [t for c in curve for t in c["step_ms"]]
        # the median step: robust to the first steps' one-time work (kernel compilation, allocator warm-up)
        results[name] = {"curve": curve, "test_auc": curve[-1]["test_auc"], "seconds": time.perf_counter() - t0,
                         "step_ms_median": float(np.median(steps)), "steps": len(steps), "device": device}
        for c in curve:
            print(f"{name} ({device}): epoch {c['epoch']} train loss {c['train_loss']:.4f} "
                  f"test AUC {c['test_auc']:.4f} median step {np.median(c['step_ms']):.2f} ms")
    # (the paths were checked when parsed, but the file system can still refuse: a directory removed meanwhile, a
    # full disk): one error line per output, after the curves
    failed = False
    if ns.json:
        try:
            with open(ns.json, "w") as f:
                json.dump({"args": vars(ns), "results": results}, f, indent=1)
        except OSError as e:
            print(f"{ap.prog}: error: argument --json: the report was not written: {e}", file=sys.stderr)
            failed = True
    if ns.plot:
        try:
            plot(results, ns.plot, f"CAN-DNN vs DNN, data={ns.data}, seed {ns.seed}, {device}")
        except OSError as e:
            print(f"{ap.prog}: error: argument --plot: the figure was not written: {e}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def plot(results: dict, path: str, title: str) -> None:
    """A figure of the smoothed training loss per step and the test AUC per epoch of every model in ``results``,
    written at ``path`` in the format of its extension (PNG without one; ``sim.plot.plot_format``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, r in results.items():
        losses = np.concatenate([c["losses"] for c in r["curve"]])
        k = max(1, len(losses) // 100)
        ax[0].plot(np.convolve(losses, np.ones(k) / k, mode="valid"), label=name)
        ax[1].plot([c["epoch"] for c in r["curve"]], [c["test_auc"] for c in r["curve"]], marker="o", label=name)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("train loss (moving mean)")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("test AUC")
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    from ..sim.plot import plot_format

    try:
        fig.savefig(path, dpi=110, format=plot_format(path))
    finally:
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main(prog="python -m dwdp_ops.models.train_can"))
