"""Request lengths and batching of a context-only (prefill) server, one queue per rank.

Request lengths (integers >= 1, drawn with ``numpy.random.default_rng([seed, rank])``: deterministic per seed and
rank, the same for every mode):
  ``ratio=R``  uniform integers in [ceil(R * ISL), ISL] (the paper's "input ratio": ISL 8K, R = 0.8);
  ``cv=C``     a gamma distribution with mean ISL and coefficient of variation C (shape 1 / C^2, scale ISL * C^2),
               rounded to the nearest integer and at least 1; C = 0 gives every request exactly ISL tokens
               (a C > 0 whose shape or scale is not a finite number > 0 in floats, about C < 1e-154 or
               C > 1e154, is refused).
               Gamma because it is positive and skewed like real prompt lengths; the long tail can exceed the
               token budget, which chunking handles.

Batching (per rank, first come first served, as a context server without overlap scheduling): an iteration takes
whole requests from the head of the queue while their tokens fit ``max_tokens``; the first request that does not fit
closes the iteration and opens the next one (requests are never reordered, and a request is never split to fill a
budget). A request longer than ``max_tokens`` is chunked (chunked prefill): it is cut into pieces of ``max_tokens``
tokens and a last piece of the remainder; each full piece is an iteration of its own, piece i attending to the
i * max_tokens tokens before it (its prefix, from the KV cache) and causally within itself; the last piece starts
the next iteration, which then takes whole requests behind it as usual. The LM head runs once per request, in the
iteration of its last piece.

Not modelled: arrivals (every queue is full from the start: a throughput measurement), a maximum batch size (the
paper's 64 is never reached at ISL 8K), KV-cache capacity and prefix-cache hits.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .._checks import is_finite_real, is_int, is_real

__all__ = ["DRAW_BLOCK_MAX", "Chunk", "Iteration", "batch_requests", "draw_block", "drawn_lengths", "iter_batches",
           "rank_iterations", "request_lengths", "workload"]


INT64_MAX = 2**63 - 1  # the largest isl: request lengths are int64


@dataclass(frozen=True)
class Chunk:
    """``length`` new tokens of request ``request`` after ``prefix`` tokens already in its KV cache; ``last``: the
    request's final piece (its LM head runs in this iteration)."""

    request: int
    prefix: int
    length: int
    last: bool = True


@dataclass(frozen=True)
class Iteration:
    chunks: tuple[Chunk, ...]

    @property
    def tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def finished(self) -> int:
        """Requests whose last piece is in this iteration (LM-head rows)."""
        return sum(1 for c in self.chunks if c.last)


def _check_source(isl: int, ratio: float | None, cv: float | None) -> None:
    if not is_int(isl) or not 1 <= isl <= INT64_MAX:  # the lengths are int64 (10**300 had drawn -2^63 each)
        raise ValueError(f"isl must be an integer in [1, 2**63 - 1] (request lengths are int64), got {isl!r}")
    if (ratio is None) == (cv is None):
        raise ValueError("give exactly one of ratio (uniform in [ratio * isl, isl]) and cv (gamma, mean isl)")
    if ratio is not None and not (is_real(ratio) and 0 < ratio <= 1):
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    if cv is not None and not (is_finite_real(cv) and cv >= 0):
        raise ValueError(f"cv must be a finite number >= 0, got {cv!r}")
    if cv is not None and cv > 0:  # the gamma's shape 1 / cv^2 and scale isl cv^2 must be finite numbers > 0
        c2 = float(cv) * float(cv)  # out of floats' range below about cv = 1e-154 and above about 1e154
        if not (c2 > 0 and math.isfinite(1.0 / c2) and math.isfinite(isl * c2)):
            raise ValueError(f"cv={cv!r} is out of range: the gamma's shape 1 / cv^2 and scale isl * cv^2 "
                             f"(isl {isl}) must be finite numbers > 0")


def request_lengths(n: int, isl: int, *, ratio: float | None = None, cv: float | None = None,
                    rng: np.random.Generator) -> np.ndarray:
    """``n`` request lengths (int64, each >= 1) by the rule of the module docstring; ``isl`` at most
    ``INT64_MAX``, and a gamma draw beyond int64 is refused (ValueError), not wrapped."""
    if not is_int(n) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    _check_source(isl, ratio, cv)
    ratio, cv = (None if ratio is None else float(ratio)), (None if cv is None else float(cv))
    if ratio is not None:
        lo = max(1, math.ceil(ratio * isl - 1e-9))
        return rng.integers(lo, isl + 1, size=n, dtype=np.int64)
    if cv == 0:
        return np.full(n, isl, dtype=np.int64)
    x = np.maximum(1, np.rint(rng.gamma(1.0 / cv**2, isl * cv**2, size=n)))
    if x.size and not x.max() < 2.0**63:  # the cast had wrapped it to -2^63 with only a RuntimeWarning
        raise ValueError(f"cv={cv!r} with isl={isl} drew a request length of {x.max():.4g} tokens, beyond int64: "
                         "a smaller isl or cv")
    return x.astype(np.int64)


def iter_batches(lengths, max_tokens: int, first_request: int = 0) -> Iterator[Iteration]:
    """The iterations that the queue ``lengths`` (any iterable of integers >= 1, in order; it may be endless; a
    float or a bool raises TypeError, a length < 1 ValueError, each naming its position) makes under
    ``max_tokens`` (module docstring), one at a time: an iteration is yielded as soon as it is closed (by a request
    that did not fit, or as a full piece of a chunked request), so taking the first k of them reads only the
    requests up to the one that closed the k-th, and builds only k iterations (however many pieces a long request
    has). When ``lengths`` ends, the open iteration (if any) comes last, though it may have had room for more.
    ``first_request``: the id of the queue's first request (an integer >= 0; a float or a bool raises TypeError, a
    negative one ValueError)."""
    _check_budget(max_tokens)
    return _batches(lengths, max_tokens, _check_first_request(first_request))


def _check_budget(max_tokens: int) -> None:
    if not is_int(max_tokens) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")


def _check_first_request(first_request: int) -> int:
    """``first_request`` as a Python int (1.5, True or -1 had become request ids 1.5, 1 or -1 without a word)."""
    if not is_int(first_request):
        raise TypeError(f"first_request must be an integer >= 0, got {first_request!r}")
    if first_request < 0:
        raise ValueError(f"first_request must be an integer >= 0, got {first_request!r}")
    return int(first_request)


def _batches(lengths, max_tokens: int, first_request: int) -> Iterator[Iteration]:
    cur: list[Chunk] = []
    used = 0
    for i, x in enumerate(lengths):
        if type(x) is not int and not is_int(x):  # the exact-int test first: the queues are long
            raise TypeError(f"request lengths must be integers (Python or numpy), got {x!r} at position {i}")
        n = int(x)
        if n < 1:
            raise ValueError(f"request lengths must be >= 1, got {n} at position {i}")
        rid = first_request + i
        if used + n <= max_tokens:
            cur.append(Chunk(rid, 0, n))
            used += n
            continue
        if cur:
            yield Iteration(tuple(cur))
            cur, used = [], 0
        prefix = 0
        while n - prefix > max_tokens:  # full pieces of a long request, one iteration each
            yield Iteration((Chunk(rid, prefix, max_tokens, last=False),))
            prefix += max_tokens
        cur, used = [Chunk(rid, prefix, n - prefix)], n - prefix
    if cur:
        yield Iteration(tuple(cur))


def batch_requests(lengths, max_tokens: int, first_request: int = 0) -> list[Iteration]:
    """Every iteration that the queue ``lengths`` (in order, finite) makes under ``max_tokens`` (module docstring;
    ``iter_batches`` as a list). The last iteration returned may have had room for requests that were not in the
    queue."""
    return list(iter_batches(lengths, max_tokens, first_request))


# requests drawn at a time by ``rank_iterations``: enough for the default settings in one draw, and a bound on what
# is drawn beyond the last request used (the draws are the same values whatever the block size: numpy's generators
# give one stream for one call of n or several calls adding up to n; tested)
DRAW_BLOCK_MAX = 4096


def drawn_lengths(rng: np.random.Generator, block: int, isl: int, ratio: float | None = None,
                  cv: float | None = None) -> Iterator[int]:
    """The rank's queue, endless: request lengths drawn ``block`` at a time from ``rng``, only when the ones before
    have been read."""
    while True:
        yield from request_lengths(block, isl, ratio=ratio, cv=cv, rng=rng).tolist()


def rank_iterations(rank: int, iterations: int, isl: int, max_tokens: int, *, ratio: float | None = None,
                    cv: float | None = None, seed: int = 0) -> list[Iteration]:
    """The first ``iterations`` complete iterations of rank ``rank``'s queue: ``iter_batches`` over lengths drawn
    from the rank's generator in blocks of min(``DRAW_BLOCK_MAX``, max(64, iterations (max_tokens // isl + 2)))
    as the batching reads them. Each iteration kept was closed by a request that did not fit (or is a full piece of
    a chunked request), not by the end of a draw; time and memory grow with the iterations and requests kept (plus
    at most one block), not with ``max_tokens`` or ``isl`` themselves."""
    _check_source(isl, ratio, cv)
    if not is_int(iterations) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    iterations = int(iterations)
    _check_budget(max_tokens)
    for name, v in (("rank", rank), ("seed", seed)):  # numpy's seeding took True as 1 and named neither
        if not is_int(v) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    rng = np.random.default_rng([int(seed), int(rank)])
    block = draw_block(iterations, isl, max_tokens)
    return list(itertools.islice(iter_batches(drawn_lengths(rng, block, isl, ratio, cv), max_tokens), iterations))


def draw_block(iterations: int, isl: int, max_tokens: int) -> int:
    """Request lengths ``rank_iterations`` draws at a time: min(``DRAW_BLOCK_MAX``, max(64, ``iterations``
    (``max_tokens`` // ``isl`` + 2))) (the draws are the same values whatever the block)."""
    return min(DRAW_BLOCK_MAX, max(64, iterations * (max_tokens // max(isl, 1) + 2)))


def workload(ranks: int, iterations: int, isl: int, max_tokens: int, *, ratio: float | None = None,
             cv: float | None = None, seed: int = 0) -> list[list[Iteration]]:
    """``[rank][iteration]``: every rank's own queue, batched (module docstring)."""
    if not is_int(ranks) or ranks < 1:
        raise ValueError(f"ranks must be an integer >= 1, got {ranks!r}")
    return [rank_iterations(r, iterations, isl, max_tokens, ratio=ratio, cv=cv, seed=seed) for r in range(ranks)]
