"""Reference co-action forward and backward (numpy, float64-friendly), the semantics of the CAN reference code.

For every sample b, ``induction[b]`` (``[D']``) is cut in row-major order into ``W_0`` (``[d_0, d_1]``), then ``b_0``
(``[d_1]``) when ``bias``, then ``W_1``, ... For each order c = 1..C: ``x = feed[b] ** c`` (element-wise, ``[T, D]``),
``h_1 = act_0(x W_0 + b_0)``, ``h_(l+1) = act_l(h_l W_l + b_l)``; the order's output is ``concat(h_1, ..., h_L)`` summed
over the positions t where ``mask[b, t] != 0`` (any nonzero value marks a present behaviour, counted once, as in the
fused kernels; a masked position adds nothing whatever its values, NaN and infinities included, and its feed gradient
is 0). ``act_l`` is tanh between layers and the identity after the last
layer (the reference code; so a single layer has no tanh). The result concatenates the orders c = 1..C:
``[B, C * sum(d_out)]``.

Options:
  ``order_independent``: every order has its own slice of the induction row (``D' = C * per-order width``; order c
  reads slice c - 1), the paper's "order independence";
  ``variant="paper"``: the paper's eq. (11): the orders are summed instead of concatenated (``[B, sum(d_out)]``) and
  tanh follows every layer, the last included.

The functions are array-module generic: given CuPy arrays they run on the GPU as a framework-style implementation
(gathered rows, reshaped weights, batched matmuls, materialised activations), the baseline of the fused kernels.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .._checks import is_bool

Variant = Literal["code", "paper"]


def _xp(*arrays):
    """numpy, or cupy when any argument is a CuPy array."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy

            return cupy
    return np


@dataclass(frozen=True)
class CoActionSpec:
    """Shape of one co-action pair. Invariant: consecutive layers chain (``d_out`` of one is ``d_in`` of the next)."""

    layer_dims: tuple[tuple[int, int], ...] = ((16, 8), (8, 4))
    orders: int = 3
    bias: bool = False
    order_independent: bool = False
    variant: Variant = "code"

    def __post_init__(self) -> None:
        want = ("layer_dims must be a non-empty sequence of positive integer (d_in, d_out) pairs, got "
                f"{self.layer_dims!r}")
        try:  # (read once: a generator, of the dims or of a pair, is not read twice)
            raw = tuple(tuple(d) for d in self.layer_dims)
            dims = tuple(tuple(operator.index(x) for x in d) for d in raw)
        except TypeError:  # a flat pair, floats, strings
            raise TypeError(want) from None
        if any(is_bool(x) for d in raw for x in d):  # operator.index takes True as 1
            raise TypeError(want)
        if not dims or any(len(d) != 2 or min(d) < 1 for d in dims):
            raise ValueError(want)
        object.__setattr__(self, "layer_dims", dims)
        for (_, b), (c, _) in zip(dims, dims[1:]):
            if b != c:
                raise ValueError(f"layer_dims do not chain: a layer outputs {b} features but the next takes {c}")
        if isinstance(self.orders, bool) or not isinstance(self.orders, (int, np.integer)):
            raise TypeError(f"orders must be an int, got {self.orders!r}")
        object.__setattr__(self, "orders", int(self.orders))
        if self.orders < 1:
            raise ValueError(f"orders must be >= 1, got {self.orders}")
        for name in ("bias", "order_independent"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
            object.__setattr__(self, name, bool(getattr(self, name)))
        if not isinstance(self.variant, str):
            raise TypeError(f"variant must be 'code' or 'paper', got {self.variant!r} ({type(self.variant).__name__})")
        if self.variant not in ("code", "paper"):
            raise ValueError(f"variant must be 'code' or 'paper', got {self.variant!r}")

    @property
    def feed_dim(self) -> int:
        return self.layer_dims[0][0]

    @property
    def order_width(self) -> int:
        """Induction floats one order uses."""
        return sum(i * o + (o if self.bias else 0) for i, o in self.layer_dims)

    @property
    def induction_dim(self) -> int:
        return self.order_width * (self.orders if self.order_independent else 1)

    @property
    def out_per_order(self) -> int:
        return sum(o for _, o in self.layer_dims)

    @property
    def out_dim(self) -> int:
        return self.out_per_order * (1 if self.variant == "paper" else self.orders)

    def activated(self, layer: int) -> bool:
        return self.variant == "paper" or layer < len(self.layer_dims) - 1

    def split(self, induction: np.ndarray, order: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per-sample ``(W [B, d_in, d_out], b [B, d_out] or None)`` of each layer for ``order`` (1-based)."""
        off = (order - 1) * self.order_width if self.order_independent else 0
        out = []
        for i, o in self.layer_dims:
            w = induction[:, off : off + i * o].reshape(-1, i, o)
            off += i * o
            b = None
            if self.bias:
                b = induction[:, off : off + o]
                off += o
            out.append((w, b))
        return out

    def check(self, induction: np.ndarray, feed: np.ndarray, mask: np.ndarray) -> None:
        if induction.ndim != 2:
            raise ValueError(f"induction must be [B, D'], got shape {induction.shape}")
        if feed.ndim != 3:
            raise ValueError(f"feed must be [B, T, D], got shape {feed.shape}")
        B, T, D = feed.shape
        if induction.shape[0] != B:
            raise ValueError(f"induction has {induction.shape[0]} rows but feed has batch {B}")
        if induction.shape[1] != self.induction_dim:
            raise ValueError(
                f"induction rows hold {induction.shape[1]} floats but layer_dims={self.layer_dims}, bias={self.bias}, "
                f"orders={self.orders}, order_independent={self.order_independent} need D' = {self.induction_dim}"
            )
        if D != self.feed_dim:
            raise ValueError(f"feed has D = {D} but the first layer takes {self.feed_dim} inputs")
        if mask.shape != (B, T):
            raise ValueError(f"mask must be [B, T] = {(B, T)}, got {mask.shape}")
        for name, a in (("induction", induction), ("feed", feed)):
            if a.dtype.kind != "f":
                raise TypeError(f"{name} must hold floating-point values, got {a.dtype}")
        _check_mask_dtype(mask)


def _check_mask_dtype(mask) -> None:
    """TypeError unless ``mask`` holds numbers or booleans (a string mask had compared '0' != 0 and counted every
    position); run before anything reads the mask's values (``_gather``'s masked feed ids too)."""
    if mask.dtype.kind not in "biuf":
        raise TypeError(f"mask must be numbers or booleans (nonzero where a behaviour is present), got {mask.dtype}")


def _forward_order(spec: CoActionSpec, induction, feed, mask, c):
    xp = _xp(induction, feed)
    on = _present(mask)
    x = xp.where(on, feed, 1) ** c  # padding never enters the arithmetic (1, not 0: 0 x an infinite weight is NaN)
    hs = [x]
    for layer, (w, b) in enumerate(spec.split(induction, c)):
        z = xp.matmul(hs[-1], w)  # [B, T, d_in] @ [B, d_in, d_out]
        if b is not None:
            z = z + b[:, None, :]
        hs.append(xp.tanh(z) if spec.activated(layer) else z)
    pooled = xp.concatenate([xp.where(on, h, 0).sum(axis=1) for h in hs[1:]], axis=-1)
    return pooled, hs


def _present(mask):
    """``[B, T, 1]`` booleans: the positions that count (``mask != 0``)."""
    return (mask != 0)[:, :, None]


_LEGACY_DEFAULTS = dict(layer_dims=((16, 8), (8, 4)), orders=3, bias=False, order_independent=False, variant="code")


def _spec_of(spec, layer_dims, orders, bias, order_independent, variant) -> CoActionSpec:
    """The spec from either a ``CoActionSpec`` (the GPU op's signature) or the legacy keyword form, whose keywords
    default to None (``_LEGACY_DEFAULTS``); both at once is a TypeError (the keywords would be ignored), whatever the
    keywords' values, as are legacy ``layer_dims`` given both positionally and by keyword."""
    given = dict(layer_dims=layer_dims, orders=orders, bias=bias, order_independent=order_independent,
                 variant=variant)
    if isinstance(spec, CoActionSpec):
        clash = [k for k, v in given.items() if v is not None]
        if clash:
            raise TypeError(f"pass the shape either as a CoActionSpec or as keywords, not both (got a CoActionSpec and "
                            f"{', '.join(clash)}); set them in the CoActionSpec")
        return spec
    if spec is not None:  # legacy positional layer_dims
        if layer_dims is not None:
            raise TypeError(f"layer_dims twice: positionally ({spec!r}) and as the keyword ({layer_dims!r}); pass one")
        given["layer_dims"] = spec
    return CoActionSpec(**{k: _LEGACY_DEFAULTS[k] if v is None else v for k, v in given.items()})


def _gather(xp, table, ids, what: str, shape_hint: str, mask):
    """``(table[ids], ids)`` once the ids' dtype, the table's rank, the ids' shape (``[B]`` for ``ind_ids``, ``[B, T]``
    for ``feed_ids``, from ``mask [B, T]``; not checked when the mask is not 2-D: ``check`` names it) and their range
    are checked, in that order. A feed id at a masked position (mask 0) is neither checked nor read (it is taken as
    row 0, which contributes nothing there), as on the GPU: padding may hold any value; an empty table is refused
    whenever there is an id, as on the GPU."""
    ids = xp.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integer row ids, got {ids.dtype}")
    if table.ndim != 2:
        raise ValueError(f"with {what} the table must be 2-D {shape_hint}, got shape {list(table.shape)}")
    if mask.ndim == 2:
        want, dims = (mask.shape[:1], "[B]") if what == "ind_ids" else (mask.shape, "[B, T]")
        if ids.shape != want:
            raise ValueError(f"{what} must be {dims} = {list(want)} (the mask is [B, T] = {list(mask.shape)}), got "
                             f"shape {list(ids.shape)}")
    if what == "feed_ids":
        _check_mask_dtype(mask)  # (before its values pick the ids to check: a string mask had named the feed_ids)
    if what == "feed_ids" and mask.ndim == 2 and ids.shape == mask.shape and table.shape[0] > 0:
        ids = xp.where(mask != 0, ids, 0)  # (masked positions: any value, read as row 0)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]):
        raise ValueError(f"{what} must be in [0, {table.shape[0]}) (the table's rows)")
    return table[ids], ids


def coaction_forward(
    induction: np.ndarray,
    feed: np.ndarray,
    mask: np.ndarray,
    spec: CoActionSpec | tuple | None = None,
    orders: int | None = None,
    bias: bool | None = None,
    *,
    ind_ids=None,
    feed_ids=None,
    layer_dims=None,
    order_independent: bool | None = None,
    variant: Variant | None = None,
) -> np.ndarray:
    """The co-action output ``[B, C * sum(d_out)]`` (``[B, sum(d_out)]`` for ``variant="paper"``).

    The same signature as ``coaction_forward_gpu``: ``induction`` is gathered rows ``[B, D']`` or a table
    ``[rows, D']`` with ``ind_ids [B]``; ``feed`` is ``[B, T, D]`` or a table ``[rows, D]`` with ``feed_ids [B, T]``;
    ``mask [B, T]``; ``spec`` a ``CoActionSpec`` (or, the older form, ``layer_dims, orders, bias`` and the keyword
    options, each None for ``CoActionSpec``'s default: ((16, 8), (8, 4)), 3, False, False, "code"; given beside a
    ``CoActionSpec``, even with its default value, a TypeError). Returns a new array; any array module (numpy or
    CuPy). Floating-point ``induction`` / ``feed`` (computed in their dtype, as NumPy / CuPy promote), a mask of
    numbers or booleans (nonzero: present), integer ids. Local. Raises ValueError for a shape that does not fit
    ``spec`` or the mask and for ids outside their table, TypeError for a non-float induction / feed, a mask that is
    not numbers or booleans or non-integer ids."""
    spec = _spec_of(spec, layer_dims, orders, bias, order_independent, variant)
    xp = _xp(induction, feed, mask)
    induction, feed, mask = xp.asarray(induction), xp.asarray(feed), xp.asarray(mask)
    if ind_ids is not None:
        induction, _ = _gather(xp, induction, ind_ids, "ind_ids", "[rows, D']", mask)
    if feed_ids is not None:
        feed, _ = _gather(xp, feed, feed_ids, "feed_ids", "[rows, D]", mask)
    spec.check(induction, feed, mask)
    outs = [_forward_order(spec, induction, feed, mask, c)[0] for c in range(1, spec.orders + 1)]
    return sum(outs) if spec.variant == "paper" else xp.concatenate(outs, axis=-1)


def _scatter_add(xp, table, ids, rows) -> None:
    if xp is np:
        np.add.at(table, ids, rows)
    else:  # CuPy
        import cupyx

        cupyx.scatter_add(table, ids, rows)


def coaction_backward(
    induction: np.ndarray,
    feed: np.ndarray,
    mask: np.ndarray,
    grad_out: np.ndarray,
    spec: CoActionSpec | tuple | None = None,
    orders: int | None = None,
    bias: bool | None = None,
    *,
    ind_ids=None,
    feed_ids=None,
    layer_dims=None,
    order_independent: bool | None = None,
    variant: Variant | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients ``(d loss / d induction, d loss / d feed)`` given ``d loss / d output [B, out_dim]``, shaped like
    ``induction`` and ``feed``: ``[B, D']`` / ``[B, T, D]``, or table-shaped when ids are given (repeated ids add
    up), as ``coaction_backward_gpu`` returns them (new arrays). The arguments are ``coaction_forward``'s, and raise
    as there; ``grad_out`` of another shape is a ValueError."""
    spec = _spec_of(spec, layer_dims, orders, bias, order_independent, variant)
    xp = _xp(induction, feed, mask, grad_out)
    induction, feed, mask = xp.asarray(induction), xp.asarray(feed), xp.asarray(mask)
    if ind_ids is not None or feed_ids is not None:
        rows_i, ids_i = (_gather(xp, induction, ind_ids, "ind_ids", "[rows, D']", mask) if ind_ids is not None
                         else (induction, None))
        rows_f, ids_f = (_gather(xp, feed, feed_ids, "feed_ids", "[rows, D]", mask) if feed_ids is not None
                         else (feed, None))
        g_i, g_f = coaction_backward(rows_i, rows_f, mask, grad_out, spec)
        if ids_i is not None:
            t = xp.zeros(induction.shape, dtype=g_i.dtype)
            _scatter_add(xp, t, ids_i.reshape(-1), g_i.reshape(-1, induction.shape[1]))
            g_i = t
        if ids_f is not None:
            t = xp.zeros(feed.shape, dtype=g_f.dtype)
            _scatter_add(xp, t, ids_f.reshape(-1), g_f.reshape(-1, feed.shape[1]))
            g_f = t
        return g_i, g_f
    spec.check(induction, feed, mask)
    orders, bias, order_independent, variant = spec.orders, spec.bias, spec.order_independent, spec.variant
    grad_out = xp.asarray(grad_out)
    if grad_out.shape != (feed.shape[0], spec.out_dim):
        raise ValueError(f"grad_out must be [B, {spec.out_dim}], got {grad_out.shape}")
    if grad_out.dtype.kind not in "iuf":  # (a complex one had made complex gradients, a string numpy's promotion error)
        raise TypeError(f"grad_out must hold real numbers (floating-point or integer), got {grad_out.dtype}")
    g_ind = xp.zeros_like(induction, dtype=np.result_type(induction.dtype, grad_out.dtype))
    g_feed = xp.zeros_like(feed, dtype=np.result_type(feed.dtype, grad_out.dtype))
    on = _present(mask)  # a masked position contributes nothing, whatever its values (NaN x 0 would be NaN)
    feed_on = xp.where(on, feed, 1)  # as in _forward_order
    S = spec.out_per_order
    for c in range(1, orders + 1):
        g_order = grad_out if variant == "paper" else grad_out[:, (c - 1) * S : c * S]
        _, hs = _forward_order(spec, induction, feed, mask, c)
        params = spec.split(induction, c)
        # direct gradient of every layer's output: the pooled sum broadcasts back to the unmasked positions
        direct, off = [], 0
        for _, o in spec.layer_dims:
            direct.append(xp.where(on, g_order[:, None, off : off + o], 0))
            off += o
        upstream = None
        grads_w, grads_b = [None] * len(params), [None] * len(params)
        for layer in range(len(params) - 1, -1, -1):
            g_h = direct[layer] if upstream is None else direct[layer] + upstream
            g_z = xp.where(on, g_h * (1.0 - hs[layer + 1] ** 2) if spec.activated(layer) else g_h, 0)
            h_in = xp.where(on, hs[layer], 0)
            grads_w[layer] = xp.matmul(h_in.transpose(0, 2, 1), g_z)  # [B, d_in, d_out]
            grads_b[layer] = g_z.sum(axis=1)
            upstream = xp.matmul(g_z, params[layer][0].transpose(0, 2, 1))  # [B, T, d_in]
        g_feed += xp.where(on, upstream * (c * feed_on ** (c - 1) if c > 1 else 1.0), 0)
        off = (c - 1) * spec.order_width if order_independent else 0
        for (i, o), gw, gb in zip(spec.layer_dims, grads_w, grads_b):
            g_ind[:, off : off + i * o] += gw.reshape(-1, i * o)
            off += i * o
            if bias:
                g_ind[:, off : off + o] += gb
                off += o
    return g_ind, g_feed
