"""CAN-DNN and its DNN baseline (the CAN reference code's ``Model_DNN``), with hand-written backward passes and
Adam, on numpy (the co-action reference op) or any array module with the same API.

Inputs per sample: user, target item and category, item and category histories with a 0/1 mask.
Features: ``concat[user (18), target item + category (36), masked sum of the history's item + category (36),
co-action(item) (36), co-action(category) (36)]`` -> BatchNorm -> FC 200 -> PReLU -> FC 80 -> PReLU -> FC 1;
binary cross-entropy on the logit. ``device="cpu"`` runs in float64 numpy on the co-action reference;
``device="gpu"`` runs in float32 CuPy with the fused co-action kernels reading the tables by id (no gathered rows)
and returning table-shaped gradients. The co-action tables are separate from the 18-d embeddings (parameter
independence): induction rows of 160 and feed rows of 16 per item and per category. The DNN baseline drops the two
co-action blocks. Unlike the reference code, the history sum is masked (its padding id does not leak in) and the
loss is the usual mean BCE (theirs is half of it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .._checks import int_at_least, is_bool, is_real
from ..coaction.reference import CoActionSpec, coaction_backward, coaction_forward
from .can_data import Batchable, auc

EMB = 18


@dataclass
class CanConfig:
    tables: tuple[int, int, int]  # users, items, categories (with id 0)
    use_coaction: bool = True
    coaction: CoActionSpec = field(default_factory=CoActionSpec)
    hidden: tuple[int, int] = (200, 80)
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"  # "cpu": numpy + reference op; "gpu": CuPy + fused kernels


def _check_config(cfg: CanConfig) -> None:
    """TypeError / ValueError naming the field: ``tables`` three integers >= 1 (users, items, categories, id 0
    included), ``hidden`` a sequence of integers >= 1, each a tuple, a list or a 1-D numpy array; ``use_coaction`` a
    bool, ``coaction`` a ``CoActionSpec``, ``lr`` a finite number > 0, ``seed`` an integer >= 0 (the weights'
    seed: None would draw fresh entropy), ``device`` a string. Numpy integers and bools pass."""
    if not isinstance(cfg.device, str):
        raise TypeError(f"device must be 'cpu' or 'gpu', got {cfg.device!r} ({type(cfg.device).__name__})")
    for name, what in (("tables", "three table sizes (users, items, categories)"),
                       ("hidden", "a sequence of hidden layer widths")):
        v = getattr(cfg, name)
        if not (isinstance(v, (tuple, list)) or (isinstance(v, np.ndarray) and v.ndim == 1)):
            raise TypeError(f"{name} must be {what} (a tuple, a list or a 1-D numpy array), got {v!r} "
                            f"({type(v).__name__})")
    if len(cfg.tables) != 3:
        raise ValueError(f"tables must be three table sizes (users, items, categories), got {cfg.tables!r}")
    for name, values in (("tables", cfg.tables), ("hidden", cfg.hidden)):
        for i, v in enumerate(values):
            int_at_least(f"{name}[{i}]", v, 1, "an integer")
    if not is_bool(cfg.use_coaction):
        raise TypeError(f"use_coaction must be a bool, got {cfg.use_coaction!r} ({type(cfg.use_coaction).__name__})")
    if not isinstance(cfg.coaction, CoActionSpec):
        raise TypeError(f"coaction must be a CoActionSpec, got {cfg.coaction!r} ({type(cfg.coaction).__name__})")
    if not is_real(cfg.lr):
        raise TypeError(f"lr must be a finite number > 0, got {cfg.lr!r} ({type(cfg.lr).__name__})")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {cfg.lr!r}")
    int_at_least("seed", cfg.seed, 0, "an integer")


_TABLES = (("user", ("uid",)), ("item", ("mid", "hist_mid")), ("category", ("cat", "hist_cat")))


def check_ids(data: Batchable, tables, where: str) -> None:
    """TypeError unless ``data``'s ids are integers, ValueError unless every one indexes its table of ``tables``
    (users, items, categories); the message starts with ``where``. Numpy would wrap a negative id (a silent wrong
    row) and the GPU kernels run with ``check_ids=False`` (an id beyond its table would be read out of bounds)."""
    for i, (table, fields) in enumerate(_TABLES):
        arrays = [getattr(data, f) for f in fields]
        arrays = [a if hasattr(a, "dtype") else np.asarray(a) for a in arrays]  # (numpy or CuPy arrays as they are)
        for f, a in zip(fields, arrays):
            if a.dtype.kind not in "iu":
                raise TypeError(f"{where}: {f} must hold integer ids, got {a.dtype}")
        if not any(a.size for a in arrays):
            continue
        lo = min(int(a.min()) for a in arrays if a.size)
        hi = max(int(a.max()) for a in arrays if a.size)
        if lo < 0 or hi >= tables[i]:
            raise ValueError(f"{where}: {table} ids ({', '.join(fields)}) reach {lo if lo < 0 else hi} but the "
                             f"model's {table} table has {tables[i]} rows (CanConfig.tables[{i}]); build the model "
                             "with the data's table sizes")


def check_labels(data: Batchable, where: str) -> None:
    """TypeError unless ``data``'s labels are numbers or booleans, ValueError unless every one is a finite number in
    [0, 1] (soft labels pass: the BCE takes any target in [0, 1]); the message starts with ``where`` and names the
    first bad label and its index. A NaN or infinite label makes the loss NaN at the first step that draws it (the
    run then ended with advice to lower the learning rate), one outside [0, 1] a loss without its minimum."""
    label = data.label if hasattr(data.label, "dtype") else np.asarray(data.label)  # (numpy or CuPy as they are)
    if label.dtype.kind not in "biuf":
        raise TypeError(f"{where}: labels must be numbers in [0, 1] (or booleans), got {label.dtype}")
    bad = ~((label >= 0) & (label <= 1))  # (NaN compares False: bad)
    if bad.any():
        i = int(bad.reshape(-1).argmax())
        raise ValueError(f"{where}: labels must be finite numbers in [0, 1]: {int(bad.sum())} of {label.size} are not "
                         f"(the first {label.reshape(-1)[i].item()!r} at index {i})")


def check_mask(data: Batchable, where: str) -> None:
    """TypeError unless ``data.mask`` holds numbers or booleans, ValueError unless each is 0 or 1 (the message starts
    with ``where`` and names the first other value and its position). The model's history sums weigh a behaviour
    by its mask value while the co-action counts any nonzero one once, so another value is a silently inconsistent
    feature, and a NaN one a NaN loss (reported as a divergence) or NaN predictions."""
    mask = data.mask if hasattr(data.mask, "dtype") else np.asarray(data.mask)  # (numpy or CuPy as they are)
    if mask.dtype.kind not in "biuf":
        raise TypeError(f"{where}: mask must hold 0 / 1 numbers or booleans, got {mask.dtype}")
    bad = ~((mask == 0) | (mask == 1))  # (NaN compares False: bad)
    if bad.any():
        i = int(bad.reshape(-1).argmax())
        at = tuple(int(x) for x in np.unravel_index(i, mask.shape))
        raise ValueError(f"{where}: mask must be 0 (padding) or 1 (a behaviour): {int(bad.sum())} of {mask.size} "
                         f"are not (the first {mask.reshape(-1)[i].item()!r} at {list(at)})")


def _check_call(data, check, where: str) -> None:
    """TypeError unless ``data`` is a ``Batchable`` (anything else had failed on a missing attribute) and ``check``
    a bool (numpy's too: None or 0 had skipped the checks without a word, as ``check_ids=None`` had in the fused
    ops)."""
    if not isinstance(data, Batchable):
        raise TypeError(f"{where} must be a Batchable, got {type(data).__name__}")
    if not is_bool(check):
        raise TypeError(f"check must be a bool (False: the ids, labels and mask were checked already), got "
                        f"{type(check).__name__}: {check!r}")


def check_label_shape(data: Batchable, where: str) -> None:
    """ValueError unless ``data.label`` is ``[B]`` with ``B`` the batch's sample count (``uid``'s length); the message
    starts with ``where``. ``Batchable`` checks its fields' shapes when it is built, but a field assigned afterwards
    is not: a ``[B, 1]`` or a one-label batch would broadcast against the ``[B]`` logits (a ``[B, B]`` loss, silently
    wrong), another length fail in numpy's words. Reads shapes alone (no host sync of CuPy arrays)."""
    want = np.shape(data.uid)[:1]
    got = np.shape(data.label)
    if got != want:
        raise ValueError(f"{where}: label must be [B] = {list(want)} (one per sample: uid's length), got shape "
                         f"{list(got)}")


class Adam:
    """Adam over ``params`` (a dict of name -> array, updated in place by ``step(grads)``, ``grads`` a dict of arrays
    shaped like the parameters it names). ``lr`` and ``eps`` finite numbers > 0, ``b1`` and ``b2`` in [0, 1):
    TypeError / ValueError naming one otherwise (a NaN or negative one would turn or push every weight wrong at the
    first step). ``params`` a dict of floating-point arrays (numpy or CuPy, updated in place): TypeError naming the
    one that is not."""

    def __init__(self, params: dict, lr: float, b1=0.9, b2=0.999, eps=1e-8, xp=np):
        for name, v, lo_open in (("lr", lr, True), ("eps", eps, True), ("b1", b1, False), ("b2", b2, False)):
            want = "a finite number > 0" if lo_open else "a number in [0, 1)"
            if not is_real(v):
                raise TypeError(f"{name} must be {want}, got {v!r} ({type(v).__name__})")
            ok = (math.isfinite(v) and v > 0) if lo_open else 0 <= v < 1  # (NaN fails both)
            if not ok:
                raise ValueError(f"{name} must be {want}, got {v!r}")
        if not isinstance(params, dict):
            raise TypeError(f"params must be a dict of name -> float array, got {type(params).__name__}")
        for k, v in params.items():
            kind = getattr(getattr(v, "dtype", None), "kind", None)
            if kind != "f":  # (updated in place: an integer array cannot take the step, a list is no array)
                raise TypeError(f"params[{k!r}] must be a floating-point array, got "
                                f"{v.dtype if kind is not None else type(v).__name__}")
        self.p, self.lr, self.b1, self.b2, self.eps, self.t, self.xp = params, lr, b1, b2, eps, 0, xp
        self.m = {k: xp.zeros_like(v) for k, v in params.items()}
        self.v = {k: xp.zeros_like(v) for k, v in params.items()}

    def step(self, grads: dict) -> None:
        """One update of every parameter ``grads`` names (the others keep their values and moments). Each gradient
        must be an array of real numbers shaped like its parameter: KeyError / TypeError / ValueError naming it
        otherwise, before any parameter changes (a ``[1, n]`` or scalar gradient would broadcast into an ``[m, n]``
        parameter, silently wrong). ``grads`` not a dict: TypeError. Shapes and dtypes only: no host synchronisation
        of CuPy arrays."""
        if not isinstance(grads, dict):
            raise TypeError(f"Adam.step: grads must be a dict of name -> array, got {type(grads).__name__}")
        for k, g in grads.items():
            kind = getattr(getattr(g, "dtype", None), "kind", None)
            if kind is None or kind not in "biuf":
                raise TypeError(f"Adam.step: the gradient of {k!r} must be an array of real numbers, got "
                                f"{'array of ' + str(g.dtype) if kind is not None else type(g).__name__}")
            if k not in self.p:
                raise KeyError(f"Adam.step: no parameter named {k!r} (the parameters: {sorted(self.p)})")
            if tuple(np.shape(g)) != tuple(np.shape(self.p[k])):
                raise ValueError(f"Adam.step: the gradient of {k!r} is shaped {list(np.shape(g))}, its parameter "
                                 f"{list(np.shape(self.p[k]))}")
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for k, g in grads.items():
            m, v = self.m[k], self.v[k]
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            self.p[k] -= self.lr * (m / c1) / (self.xp.sqrt(v / c2) + self.eps)


class NonFiniteLossError(FloatingPointError):
    """``CanModel.train_step``'s error for a batch loss that is not finite (``loss``: the value, a Python float); the
    step was not taken, the model is as it was before it."""

    def __init__(self, loss: float):
        super().__init__(f"the training loss is {loss}, not finite: the step was not taken (the weights, Adam's moments "
                         "and step count and BatchNorm's running statistics are as they were)")
        self.loss = loss


class CanModel:
    """CAN-DNN (``use_coaction=True``) or the DNN baseline. ``train_step`` returns the batch loss."""

    def __init__(self, cfg: CanConfig):
        _check_config(cfg)
        if cfg.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {cfg.device!r}")
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        U, M, C = cfg.tables
        co = cfg.coaction
        P = {
            "uid": rng.normal(0, 0.1, (U, EMB)),
            "mid": rng.normal(0, 0.1, (M, EMB)),
            "cat": rng.normal(0, 0.1, (C, EMB)),
        }
        d_in = EMB + 4 * EMB
        if cfg.use_coaction:
            for name, n in (("mid", M), ("cat", C)):
                P[f"{name}_ind"] = rng.normal(0, 0.1, (n, co.induction_dim))
                P[f"{name}_feed"] = rng.normal(0, 0.3, (n, co.feed_dim))
            d_in += 2 * co.out_dim
        dims = [d_in, *cfg.hidden, 1]
        P["bn_g"], P["bn_b"] = np.ones(d_in), np.zeros(d_in)
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            P[f"w{i}"] = rng.normal(0, np.sqrt(2.0 / a), (a, b))
            P[f"b{i}"] = np.zeros(b)
            if i < len(dims) - 2:
                P[f"a{i}"] = np.full(b, 0.1)  # PReLU slopes
        if cfg.device == "gpu":
            import cupy as cp

            self.xp = cp
            P = {k: cp.asarray(v, dtype=cp.float32) for k, v in P.items()}
        else:
            self.xp = np
        self.P, self.n_fc = P, len(dims) - 1
        self.bn_mean, self.bn_var = self.xp.zeros(d_in, P["bn_g"].dtype), self.xp.ones(d_in, P["bn_g"].dtype)
        self.opt = Adam(P, cfg.lr, xp=self.xp)

    def _on_device(self, b: Batchable) -> Batchable:
        if self.xp is np:
            return b
        xp = self.xp
        ids = {f: xp.asarray(getattr(b, f), dtype=xp.int64) for f in ("uid", "mid", "cat", "hist_mid", "hist_cat")}
        return Batchable(**ids, mask=xp.asarray(b.mask, dtype=xp.float32), label=xp.asarray(b.label, dtype=xp.float32))

    def _scatter_add(self, dst, idx, vals) -> None:
        if self.xp is np:
            np.add.at(dst, idx, vals)
        else:
            import cupyx

            cupyx.scatter_add(dst, idx, vals)

    def _coaction(self, name: str, tgt, hist, mask):
        P, co = self.P, self.cfg.coaction
        if self.xp is np:
            return coaction_forward(P[f"{name}_ind"][tgt], P[f"{name}_feed"][hist], mask, co.layer_dims, co.orders,
                                    co.bias, order_independent=co.order_independent, variant=co.variant)
        from ..coaction.fused import coaction_forward_gpu

        return coaction_forward_gpu(P[f"{name}_ind"], P[f"{name}_feed"], mask, co, ind_ids=tgt, feed_ids=hist,
                                    check_ids=False)

    def _coaction_grads(self, name: str, tgt, hist, mask, g_out):
        """Table-shaped gradients of the induction and feed tables."""
        P, co, xp = self.P, self.cfg.coaction, self.xp
        if xp is not np:
            from ..coaction.fused import coaction_backward_gpu

            return coaction_backward_gpu(P[f"{name}_ind"], P[f"{name}_feed"], mask, xp.ascontiguousarray(g_out), co,
                                         ind_ids=tgt, feed_ids=hist, check_ids=False)
        g_ind, g_feed = coaction_backward(P[f"{name}_ind"][tgt], P[f"{name}_feed"][hist], mask, g_out, co.layer_dims,
                                          co.orders, co.bias, order_independent=co.order_independent,
                                          variant=co.variant)
        gi, gf = np.zeros_like(P[f"{name}_ind"]), np.zeros_like(P[f"{name}_feed"])
        np.add.at(gi, tgt, g_ind)
        np.add.at(gf, hist, g_feed)
        return gi, gf

    # -- forward / backward ------------------------------------------------------------------------------------
    def _features(self, b: Batchable):
        P = self.P
        m = b.mask[:, :, None]
        parts = [P["uid"][b.uid], P["mid"][b.mid], P["cat"][b.cat],
                 (P["mid"][b.hist_mid] * m).sum(1), (P["cat"][b.hist_cat] * m).sum(1)]
        if self.cfg.use_coaction:
            for name, tgt, hist in (("mid", b.mid, b.hist_mid), ("cat", b.cat, b.hist_cat)):
                parts.append(self._coaction(name, tgt, hist, b.mask))
        return self.xp.concatenate(parts, axis=1)

    def logits(self, b: Batchable, train: bool = False):
        """``(logits [B], cache)`` of a batch already on the model's device (``_on_device``): float64 numpy on the CPU,
        float32 CuPy on the GPU; ``cache`` holds the backward's activations. ``train=True`` uses the batch's
        BatchNorm statistics and updates the running ones."""
        logit, cache = self._forward(b, train)
        if train:
            self.bn_mean, self.bn_var = cache["running"]
        return logit, cache

    def _forward(self, b: Batchable, train: bool):
        """``logits``, but with ``train=True`` the updated running statistics are only returned, as
        ``cache["running"]`` (mean, variance): ``loss_and_grads`` keeps them once the loss is known finite."""
        P, xp = self.P, self.xp
        x = self._features(b)
        cache = {}
        if train:
            mu, var = x.mean(0), x.var(0)
            cache["running"] = (0.99 * self.bn_mean + 0.01 * mu, 0.99 * self.bn_var + 0.01 * var)
        else:
            mu, var = self.bn_mean, self.bn_var
        xhat = (x - mu) / xp.sqrt(var + 1e-5)
        h = xhat * P["bn_g"] + P["bn_b"]
        cache.update({"x": x, "xhat": xhat, "var": var, "acts": [h], "pre": []})
        for i in range(self.n_fc):
            z = h @ P[f"w{i}"] + P[f"b{i}"]
            cache["pre"].append(z)
            if i < self.n_fc - 1:
                h = xp.where(z > 0, z, P[f"a{i}"] * z)
                cache["acts"].append(h)
            else:
                h = z
        return h[:, 0], cache

    def train_step(self, b: Batchable, *, check: bool = True) -> float:
        """One Adam step on batch ``b`` (a ``Batchable`` of numpy arrays: ids ``[B]`` / ``[B, T]``, mask ``[B, T]``,
        labels ``[B]``); returns the batch's mean BCE before the step, a Python float. Refuses what
        ``loss_and_grads`` refuses, before any change (``check=False``: the ids and labels were checked already, as
        ``train`` checks the whole set once). A loss that is NaN or infinite raises ``NonFiniteLossError`` (a
        FloatingPointError) and the step is not taken: the weights, Adam's moments and step count and BatchNorm's
        running statistics stay as they were. Only the loss is checked (it reaches the host anyway; checking the
        gradients would cost a reduction and a host sync per step): a finite loss with a non-finite gradient
        still steps."""
        loss, grads = self.loss_and_grads(b, check=check)
        if not math.isfinite(loss):
            raise NonFiniteLossError(loss)
        self.opt.step(grads)
        return loss

    def loss_and_grads(self, b: Batchable, *, check: bool = True) -> tuple[float, dict]:
        """Mean BCE of a training batch (batch statistics in BatchNorm), a Python float, and the gradient of every
        parameter: a dict of ``P``'s names to arrays shaped like the parameters (float64 numpy on the CPU, float32 CuPy
        on the GPU; the tables' gradients table-shaped, repeated ids added up). Updates BatchNorm's running
        statistics, unless the loss is NaN or infinite (then the model is left as it was and the loss returned as
        it is). ValueError for a batch of no sample (its batch statistics would be NaN), an id outside its
        table (``check_ids``), labels not ``[B]`` (``check_label_shape``), a label that is NaN, infinite or outside
        [0, 1] (``check_labels``: soft labels pass, as in ``train``) or a mask value other than 0 or 1
        (``check_mask``), TypeError for a ``b`` that is not a ``Batchable``, a ``check`` that is not a bool, ids
        that are not integers or labels or a mask that are not numbers, before anything of the model changes.
        ``check=False`` skips the id, label and mask checks (their host sync and their cost) for a batch whose set
        was checked already, as ``train`` does."""
        _check_call(b, check, "the training batch")
        if check:  # (the shape first: len(b) is the labels' length)
            check_label_shape(b, "the training batch")
        if len(b) == 0:
            raise ValueError("a training batch needs at least one sample: BatchNorm's mean and variance of no sample "
                             "are NaN (and would become its running statistics)")
        if check:
            check_ids(b, self.cfg.tables, "the training batch")
            check_labels(b, "the training batch")
            check_mask(b, "the training batch")
        P, co, xp = self.P, self.cfg.coaction, self.xp
        b = self._on_device(b)
        logit, c = self._forward(b, train=True)
        y = b.label
        loss = float(xp.mean(xp.maximum(logit, 0) - logit * y + xp.log1p(xp.exp(-xp.abs(logit)))))
        if math.isfinite(loss):  # (the running statistics only now: a NaN batch would have made them NaN for good)
            self.bn_mean, self.bn_var = c["running"]
        g = ((1 / (1 + xp.exp(-logit)) - y) / len(y))[:, None]
        grads = {}
        for i in range(self.n_fc - 1, -1, -1):
            if i < self.n_fc - 1:
                z = c["pre"][i]
                grads[f"a{i}"] = (g * xp.where(z > 0, 0, z)).sum(0)
                g = g * xp.where(z > 0, 1, P[f"a{i}"])
            h_in = c["acts"][i]
            grads[f"w{i}"] = h_in.T @ g
            grads[f"b{i}"] = g.sum(0)
            g = g @ P[f"w{i}"].T
        grads["bn_g"] = (g * c["xhat"]).sum(0)
        grads["bn_b"] = g.sum(0)
        gx_hat = g * P["bn_g"]
        n = len(y)
        inv = 1 / xp.sqrt(c["var"] + 1e-5)
        gx = inv / n * (n * gx_hat - gx_hat.sum(0) - c["xhat"] * (gx_hat * c["xhat"]).sum(0))
        # split the feature gradient back onto the embeddings
        for k in ("uid", "mid", "cat"):
            grads[k] = xp.zeros_like(P[k])
        off = 0
        m = b.mask[:, :, None]
        for k, idx in (("uid", b.uid), ("mid", b.mid), ("cat", b.cat)):
            self._scatter_add(grads[k], idx, gx[:, off : off + EMB])
            off += EMB
        for k, idx in (("mid", b.hist_mid), ("cat", b.hist_cat)):
            self._scatter_add(grads[k], idx, xp.broadcast_to(gx[:, None, off : off + EMB], idx.shape + (EMB,)) * m)
            off += EMB
        if self.cfg.use_coaction:
            for name, tgt, hist in (("mid", b.mid, b.hist_mid), ("cat", b.cat, b.hist_cat)):
                g_out = gx[:, off : off + co.out_dim]
                off += co.out_dim
                grads[f"{name}_ind"], grads[f"{name}_feed"] = self._coaction_grads(name, tgt, hist, b.mask, g_out)
        return loss, grads

    def predict(self, data: Batchable, batch_size: int = 1024, *, check: bool = True) -> np.ndarray:
        """Click probabilities of ``data``'s samples, ``[len(data)]`` float on the host (empty for no sample).
        ``data``'s ids are checked against the model's tables and its mask to be 0 / 1 first (``check_ids``,
        ``check_mask``: TypeError / ValueError; ``check=False``: checked already). TypeError for a ``data`` that is
        not a ``Batchable`` or a ``check`` that is not a bool."""
        _check_call(data, check, "predict's data")
        if check:
            check_ids(data, self.cfg.tables, "predict's data")
            check_mask(data, "predict's data")
        xp = self.xp
        out = [1 / (1 + xp.exp(-self.logits(self._on_device(b))[0])) for b in data.batches(batch_size)]
        if not out:  # (no batch: concatenate of nothing would raise)
            return np.zeros(0)
        res = xp.concatenate(out)
        return res if xp is np else res.get()

    def evaluate(self, data: Batchable, *, check: bool = True) -> float:
        """AUC (a float in [0, 1]) of ``predict(data)`` against ``data.label`` (0 / 1 of both classes: ``auc``'s
        ValueError otherwise); ``check`` as ``predict``'s."""
        return auc(data.label, self.predict(data, check=check))
