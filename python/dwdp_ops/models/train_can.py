"""``python -m dwdp_ops can-train``: trains CAN-DNN and/or the DNN baseline and reports test AUC per epoch."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from tqdm import tqdm

from .can import CanConfig, CanModel
from .can_data import load_amazon_books, split, synthetic


def train(model: CanModel, train_set, test_set, epochs: int, batch_size: int, seed: int, progress: bool = True):
    rng = np.random.default_rng(seed)
    curve = []
    for epoch in range(1, epochs + 1):
        losses = []
        bar = tqdm(train_set.batches(batch_size, rng), total=-(-len(train_set) // batch_size), desc=f"epoch {epoch}",
                   disable=not progress, leave=False)
        for b in bar:
            losses.append(model.train_step(b))
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        curve.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "test_auc": model.evaluate(test_set),
                      "losses": [float(x) for x in losses]})
    return curve


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dwdp_ops can-train", description=__doc__)
    ap.add_argument("--data", default="synthetic", help="'synthetic' or a DIEN-format training file")
    ap.add_argument("--test", default=None, help="DIEN-format test file (default: 20%% of the data)")
    ap.add_argument("--model", choices=["can", "dnn", "both"], default="both")
    ap.add_argument("--samples", type=int, default=20000, help="synthetic samples")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=100)
    ap.add_argument("--device", choices=["cpu", "gpu", "auto"], default="auto",
                    help="cpu: numpy reference ops (float64); gpu: CuPy + fused co-action kernels (float32); "
                         "auto: gpu when one is usable")
    ap.add_argument("--json", default=None, help="write the curves and AUCs here")
    ap.add_argument("--plot", default=None, help="write a PNG of the training curves here (needs matplotlib)")
    ap.add_argument("--quiet", action="store_true")
    ns = ap.parse_args(argv)
    if ns.data == "synthetic":
        data, tables = synthetic(ns.samples, seed=ns.seed)
        train_set, test_set = split(data, 0.2, ns.seed)
    else:
        train_set, vocab = load_amazon_books(ns.data, max_len=ns.max_len)
        if ns.test:
            test_set, _ = load_amazon_books(ns.test, vocab, ns.max_len)
        else:
            train_set, test_set = split(train_set, 0.2, ns.seed)
        tables = vocab.sizes
    device = ns.device
    if device == "auto":
        from .. import cuda_device_count

        device = "gpu" if cuda_device_count() > 0 else "cpu"
    results = {}
    for name in (["can", "dnn"] if ns.model == "both" else [ns.model]):
        t0 = time.time()
        model = CanModel(CanConfig(tables, use_coaction=name == "can", lr=ns.lr, seed=ns.seed, device=device))
        curve = train(model, train_set, test_set, ns.epochs, ns.batch_size, ns.seed, progress=not ns.quiet)
        results[name] = {"curve": curve, "test_auc": curve[-1]["test_auc"], "seconds": time.time() - t0,
                         "device": device}
        for c in curve:
            print(f"{name} ({device}): epoch {c['epoch']} train loss {c['train_loss']:.4f} test AUC {c['test_auc']:.4f}")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"args": vars(ns), "results": results}, f, indent=1)
    if ns.plot:
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
        fig.suptitle(f"CAN-DNN vs DNN, data={ns.data}, seed {ns.seed}, {device}")
        fig.tight_layout()
        fig.savefig(ns.plot, dpi=110)
    return 0
