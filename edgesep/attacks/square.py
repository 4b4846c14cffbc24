"""Square Attack (Andriushchenko et al., ECCV 2020), L-inf, query-only: numpy, no torch.

It attacks any ``predict`` function from a float32 batch (N, C, H, W) of pixels in [0, 1] to logits
(N, classes), so it runs on the device against a compiled engine (ONNX Runtime, TVM, TensorRT).

Faithful to the reference implementation (github.com/max-andr/square-attack, ``square_attack_linf``):
margin loss, vertical-stripe initialisation, the piecewise-constant schedule of the square size ``p``,
random squares whose new values are ``+-eps`` per channel (resampled when they would change nothing), a
candidate kept only when it lowers the margin, and an example left alone once it is misclassified.
Two deliberate differences: a square may also touch the last row / column (the reference draws its corner
in ``[0, h - s)``), and the query of the clean input is counted (see :func:`square_attack`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgesep.errors import ConfigError, ShapeMismatchError

__all__ = ["SquareResult", "p_schedule", "square_attack"]

_RANGE_TOL = 1e-6
_MAX_RESAMPLE = 32  # sign redraws per iteration for squares that would change nothing (2^C choices each)


@dataclass(frozen=True)
class SquareResult:
    """Outcome of :func:`square_attack`.

    Attributes:
        x_adv: adversarial inputs, float32 (N, C, H, W), inside the eps ball and [0, 1]; the input itself
            for examples that were already misclassified.
        success: bool (N,): misclassified at the end (targeted: predicted as the target).
        queries: int (N,): calls of ``predict`` that included the example, the clean query included.
        robust_accuracy: fraction of examples the attack did not succeed on (untargeted: still correct).
    """

    x_adv: np.ndarray
    success: np.ndarray
    queries: np.ndarray
    robust_accuracy: float


def p_schedule(p_init: float, it: int, n_iters: int) -> float:
    """Fraction of pixels changed at iteration ``it`` of ``n_iters``: the reference's schedule, halving
    ``p_init`` at fixed points of a 10 000-iteration run rescaled to ``n_iters``."""
    it = int(it / n_iters * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128)):
        if it <= bound:
            return p_init / div
    return p_init / 256 if it <= 8000 else p_init / 512


def _margin(logits: np.ndarray, y: np.ndarray, targeted: bool) -> np.ndarray:
    """``z_y - max_{j != y} z_j`` (untargeted) or its negative (targeted); the attack succeeds below 0."""
    rows = np.arange(len(y))
    z_y = logits[rows, y]
    others = logits.copy()
    others[rows, y] = -np.inf
    m = z_y - others.max(axis=1)
    return -m if targeted else m


def square_attack(
    predict: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    eps: float,
    *,
    n_queries: int = 1000,
    p_init: float = 0.05,
    seed: int = 0,
    targeted: bool = False,
) -> SquareResult:
    """Run the L-inf Square Attack against ``predict``.

    Every example costs one query for its clean prediction, one for the stripe initialisation, then one per
    iteration until it is misclassified or has used ``n_queries`` queries.

    Args:
        predict: maps a float32 batch (n, C, H, W) in [0, 1] to logits (n, classes); any ``n`` <= N.
        x: clean inputs (N, C, H, W) in [0, 1].
        y: integer labels (N,); the target labels when ``targeted``.
        eps: L-inf radius.
        n_queries: query budget per example, clean query included.
        p_init: initial fraction of pixels changed per square (the paper uses 0.05 for L-inf).
        seed: seed of the numpy generator; the result is a deterministic function of it (given ``predict``).
        targeted: push towards ``y`` instead of away from it.

    Returns:
        A :class:`SquareResult`.

    Raises:
        ConfigError: eps < 0, n_queries < 1, p_init outside (0, 1], inputs outside [0, 1], labels out of range.
        ShapeMismatchError: ``x`` not (N, C, H, W), ``y`` not (N,), or logits not (n, classes).
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ConfigError(f"eps must be a finite number >= 0, got {eps!r}")
    if isinstance(n_queries, bool) or not isinstance(n_queries, (int, np.integer)) or n_queries < 1:
        raise ConfigError(f"n_queries must be an integer >= 1, got {n_queries!r}")
    if not isinstance(p_init, (int, float)) or not 0 < p_init <= 1:
        raise ConfigError(f"p_init must be in (0, 1], got {p_init!r} (the paper uses 0.05 for L-inf)")
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if x.ndim != 4 or y.ndim != 1 or len(y) != len(x):
        raise ShapeMismatchError(
            f"expected x of shape (N, C, H, W) and y of shape (N,), got x {x.shape} and y {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"labels must be integers, got dtype {y.dtype}")
    if x.size and (x.min() < -_RANGE_TOL or x.max() > 1 + _RANGE_TOL):
        raise ConfigError(
            f"inputs must be pixels in [0, 1] (got min {x.min():.4g}, max {x.max():.4g}); "
            "normalization belongs inside the model"
        )
    y = y.astype(np.int64)
    n, c, h, w = x.shape
    rng = np.random.default_rng(seed)
    queries = np.zeros(n, dtype=np.int64)
    eps32 = np.float32(eps)

    def margin_of(xb: np.ndarray, idx: np.ndarray) -> np.ndarray:
        logits = np.asarray(predict(np.ascontiguousarray(xb, dtype=np.float32)))
        if logits.ndim != 2 or logits.shape[0] != len(idx) or logits.shape[1] < 2:
            raise ShapeMismatchError(
                f"predict must return logits of shape ({len(idx)}, classes >= 2), got {logits.shape}"
            )
        if len(idx) and (y[idx].min() < 0 or y[idx].max() >= logits.shape[1]):
            raise ConfigError(f"labels must be in [0, {logits.shape[1]}) for a model with that many classes")
        queries[idx] += 1
        return _margin(logits.astype(np.float64), y[idx], targeted)

    everyone = np.arange(n)
    best_margin = margin_of(x, everyone) if n else np.zeros(0)
    # the perturbation is stored as +-eps per pixel (0 where nothing was tried); x_adv = clip(x + delta)
    delta = np.zeros_like(x)

    idx = np.flatnonzero(best_margin >= 0)
    if n_queries >= 2 and eps > 0 and idx.size:
        # vertical stripes: one sign per (channel, column), which works best for untargeted attacks
        delta[idx] = rng.choice(np.array([-eps32, eps32]), size=(idx.size, c, 1, w))
        best_margin[idx] = margin_of(np.clip(x[idx] + delta[idx], 0.0, 1.0), idx)

    n_features = c * h * w
    rows, cols = np.arange(h), np.arange(w)
    for i_iter in range(n_queries - 2 if eps > 0 else 0):
        idx = np.flatnonzero(best_margin >= 0)
        if idx.size == 0:
            break
        k = idx.size
        p = p_schedule(p_init, i_iter, n_queries)
        s = round(math.sqrt(p * n_features / c))
        s = max(min(s, min(h, w) - 1), 1)  # at least 1x1, at most (h-1)x(w-1)
        top = rng.integers(0, h - s + 1, size=k)
        left = rng.integers(0, w - s + 1, size=k)
        in_rows = (rows >= top[:, None]) & (rows < top[:, None] + s)  # (k, h)
        in_cols = (cols >= left[:, None]) & (cols < left[:, None] + s)  # (k, w)
        window = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (k, 1, h, w)

        xc, dc = x[idx], delta[idx]
        x_cur = np.clip(xc + dc, 0.0, 1.0)
        signs = rng.choice(np.array([-eps32, eps32]), size=(k, c, 1, 1))
        for _ in range(_MAX_RESAMPLE):
            cand = np.where(window, signs, dc)  # (k, c, h, w)
            changed = (window & (np.abs(np.clip(xc + cand, 0.0, 1.0) - x_cur) >= 1e-7)).any(axis=(1, 2, 3))
            if changed.all():
                break
            # a square that changes nothing wastes a query: redraw its signs (the reference does the same)
            signs[~changed] = rng.choice(np.array([-eps32, eps32]), size=(int((~changed).sum()), c, 1, 1))
        cand = np.where(window, signs, dc)

        new_margin = margin_of(np.clip(xc + cand, 0.0, 1.0), idx)
        better = new_margin < best_margin[idx]
        delta[idx[better]] = cand[better]
        best_margin[idx[better]] = new_margin[better]

    x_adv = np.clip(x + delta, 0.0, 1.0)
    success = best_margin < 0
    robust = float(1.0 - success.mean()) if n else float("nan")
    return SquareResult(x_adv=x_adv, success=success, queries=queries, robust_accuracy=robust)
