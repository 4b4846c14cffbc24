"""Sparsity and conditioning regularizers for the factors of separable (Kronecker) layers.

Every term is a pure, differentiable function of one factor matrix A of shape (m, n) returning a 0-dim tensor.
With r = min(m, n) and σ_1 >= ... >= σ_r the singular values of A, the Gram matrix G is the r x r one,
G = AᵀA if m >= n else AAᵀ, so its eigenvalues are exactly σ_i² (no structural zeros).

Condition terms (all are minimal exactly when cond(A) = σ_1 / σ_r = 1):

- ``logdet_barrier`` (the default): (1/r) Σ (σ_i² − log σ_i²) >= 1. Gram + Cholesky, no SVD.
- ``gram_deviation``: ||G − (||A||_F² / r) I||_F. Polynomial, no decomposition at all, degree-2 homogeneous.
- ``smooth_log_cond``: a soft-max minus a soft-min of log σ_i; scale invariant, needs singular values.

Why ``logdet_barrier`` is the default (``DEFAULT_CONDITION``):

- cheap and smooth: a Gram product and an r x r Cholesky per factor; no SVD in the training step, nothing
  non-differentiable (the soft-max of ``smooth_log_cond`` needs ``svdvals``, ``gram_deviation`` is a norm, which
  has a kink at its minimum);
- a barrier: it grows like −(2/r) log σ_r as a factor loses rank, so the optimizer cannot trade a singular factor
  for a small penalty. ``gram_deviation`` saturates instead: on diag(1, 1/k) it tends to 1/√2 as k -> ∞, and
  its gradient in σ_r vanishes with σ_r;
- scale: kron(c U_1, U_2 / c) = kron(U_1, U_2), and a ReLU network is unchanged when one layer is scaled up and
  the next down. A term that the optimizer can lower by such a rescaling does not regularize conditioning.
  ``gram_deviation`` is degree-2 homogeneous, gram_deviation(cA) = c² gram_deviation(A), so shrinking a factor
  lowers it without touching cond. The logdet barrier is not lowered below its scale-free part: minimized over
  the scale c it equals 1 + log(mean σ_i² / geomean σ_i²), a function of the singular value ratios alone (>= 1,
  = 1 iff cond = 1). Its minimizer, orthonormal factors, also makes kron(U_1, ..., U_d) orthonormal, i.e. a
  1-Lipschitz layer, which is what the robustness side wants (Parseval networks).

Sparsity terms: ``l1`` (Σ |a|) and ``log`` (Σ log(1 + ρ a²), a smooth, non-convex stand-in for the count of
nonzeros).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from edgesep.errors import ConfigError, UnknownNameError
from edgesep.layers.kron import KronLinear

__all__ = [
    "CONDITION_TERMS",
    "DEFAULT_CONDITION",
    "SPARSITY_TERMS",
    "gram_deviation",
    "l1",
    "log_sparsity",
    "logdet_barrier",
    "regularization",
    "separable_factors",
    "smooth_log_cond",
]


# ----------------------------------------------------------------------------------------------------------------
# sparsity


def l1(A: Tensor) -> Tensor:
    """Σ |a_ij| (its gradient at 0 is torch's subgradient 0)."""
    return A.abs().sum()


def log_sparsity(A: Tensor, rho: float = 1.0) -> Tensor:
    """Σ log(1 + ρ a_ij²): smooth everywhere, ~ρ a² near 0 and ~log(ρ a²) for large entries.

    Args:
        A: any tensor.
        rho: sharpness; 1/√ρ is the magnitude where an entry starts to count as "nonzero".
    """
    return torch.log1p(rho * A.square()).sum()


# ----------------------------------------------------------------------------------------------------------------
# conditioning


def _gram(A: Tensor) -> Tensor:
    """The r x r Gram matrix of A (m, n), r = min(m, n): AᵀA for tall / square A, AAᵀ for wide A."""
    if A.dim() != 2:
        raise ConfigError(f"condition terms take a factor matrix (m, n), got a tensor of shape {tuple(A.shape)}")
    return A.mT @ A if A.shape[0] >= A.shape[1] else A @ A.mT  # (r, r)


def logdet_barrier(A: Tensor, eps: float = 1e-6) -> Tensor:
    """(1/r) (||A||_F² − log det(G + εI)) = (1/r) Σ_i (σ_i² − log(σ_i² + ε)).

    Property (tested): with ε = 0 the value is >= 1, with equality iff every σ_i = 1 (A has orthonormal rows or
    columns), because s − log s >= 1 with equality iff s = 1. For ε > 0 the value is the formula above, finite
    for every A (also rank-deficient), and >= 1 − ε with equality iff every σ_i² = 1 − ε; an orthonormal A gives
    1 − log(1 + ε). Minimized over a scale c, logdet_barrier(cA, 0) = 1 + log(mean σ_i² / geomean σ_i²).

    Args:
        A: factor matrix (m, n).
        eps: jitter added to G's diagonal; bounds the barrier's growth by −log(ε) / r per lost rank and its
            gradient by (2/r)(||A||_2 + 1 / (2√ε)). Keep it well above the dtype's resolution of ||G|| (float32:
            ~1e-7 ||G||); below that the value comes from G's clamped eigenvalues instead of a Cholesky.
    Returns:
        0-dim tensor.
    """
    g = _gram(A)  # (r, r)
    r = g.shape[0]
    gj = g + eps * torch.eye(r, dtype=g.dtype, device=g.device)
    chol, info = torch.linalg.cholesky_ex(gj)
    if bool(info.any()):
        # not numerically positive definite (ε below the dtype's resolution of ||G||): fall back to the clamped
        # spectrum, which is the same value whenever G + εI is positive definite
        logdet = torch.log(torch.linalg.eigvalsh(g).clamp_min(0) + eps).sum()
    else:
        logdet = 2.0 * torch.log(torch.diagonal(chol)).sum()
    return (torch.diagonal(g).sum() - logdet) / r


def gram_deviation(A: Tensor) -> Tensor:
    """||G − (||A||_F² / r) I||_F: the distance of the Gram matrix from its nearest multiple of the identity.

    Zero iff A has orthogonal rows (wide A) or columns (tall A) of equal norm, i.e. iff cond(A) = 1 (or A = 0).
    Degree-2 homogeneous: gram_deviation(cA) = c² gram_deviation(A). Equals sqrt(Σ_i (σ_i² − mean σ²)²) in terms
    of the singular values. Not differentiable where it is zero (a norm's kink); torch returns the subgradient 0.
    """
    g = _gram(A)  # (r, r)
    r = g.shape[0]
    mean = torch.diagonal(g).sum() / r
    return torch.linalg.matrix_norm(g - mean * torch.eye(r, dtype=g.dtype, device=g.device))


def smooth_log_cond(A: Tensor, t: float = 0.1, eps: float = 1e-12) -> Tensor:
    """A smooth upper bound of log cond(A): t·LSE(ℓ / t) + t·LSE(−ℓ / t) with ℓ_i = ½ log(σ_i² + ε).

    With ε = 0 this is log(||σ||_p ||1/σ||_p), p = 1/t (Schatten norms), and (tested)

        log(σ_1 / σ_r) <= smooth_log_cond(A) <= log(σ_1 / σ_r) + 2 t log r,

    since max <= t·LSE(x / t) <= max + t log r. It tends to the exact log cond as t -> 0 and is invariant under
    A -> cA. ε > 0 keeps it finite for rank-deficient A (the bounds then hold for σ̃_i = sqrt(σ_i² + ε)).

    Args:
        A: factor matrix (m, n).
        t: temperature (> 0); smaller is sharper but concentrates the gradient on σ_1 and σ_r.
        eps: added to σ_i² before the log.
    Returns:
        0-dim tensor.
    Raises:
        ConfigError: if t <= 0.
    """
    if not t > 0:
        raise ConfigError(f"smooth_log_cond needs a temperature t > 0, got {t}")
    if A.dim() != 2:
        raise ConfigError(f"condition terms take a factor matrix (m, n), got a tensor of shape {tuple(A.shape)}")
    ell = 0.5 * torch.log(torch.linalg.svdvals(A).square() + eps)  # (r,)
    return t * (torch.logsumexp(ell / t, 0) + torch.logsumexp(-ell / t, 0))


# ----------------------------------------------------------------------------------------------------------------
# registries and the model-level sum

SPARSITY_TERMS: dict[str, Callable[[Tensor], Tensor]] = {"l1": l1, "log": log_sparsity}
CONDITION_TERMS: dict[str, Callable[[Tensor], Tensor]] = {
    "logdet": logdet_barrier,
    "gram": gram_deviation,
    "smooth_log_cond": smooth_log_cond,
}
DEFAULT_CONDITION = "logdet"


def separable_factors(model: nn.Module) -> list[Tensor]:
    """Every factor matrix U_k of every KronLinear in ``model`` (a shared layer counts once), in module order."""
    return [u for m in model.modules() if isinstance(m, KronLinear) for u in m.factors]


def _check_lambda(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
    return value


def regularization(
    model: nn.Module,
    *,
    lambda_s: float = 0.0,
    lambda_c: float = 0.0,
    sparsity: str = "l1",
    condition: str = DEFAULT_CONDITION,
) -> Tensor:
    """lambda_s Σ_U sparsity(U) + lambda_c Σ_U condition(U) over the separable factors U of ``model``.

    A term whose lambda is 0 is not evaluated (no SVD / Cholesky); a model without KronLinear layers, or both
    lambdas 0, gives a constant 0.

    Args:
        model: any module; its KronLinear layers are found by ``separable_factors``.
        lambda_s, lambda_c: weights (>= 0) of the sparsity and the condition term.
        sparsity: a key of SPARSITY_TERMS.
        condition: a key of CONDITION_TERMS.
    Returns:
        0-dim tensor, differentiable w.r.t. the factors, on their device and dtype (without factors: the
        first parameter's, or CPU float32).
    Raises:
        UnknownNameError: for a term name that is not registered.
        ConfigError: for a negative or non-finite lambda.
    """
    if sparsity not in SPARSITY_TERMS:
        raise UnknownNameError("sparsity term", sparsity, SPARSITY_TERMS)
    if condition not in CONDITION_TERMS:
        raise UnknownNameError("condition term", condition, CONDITION_TERMS)
    lambda_s, lambda_c = _check_lambda("lambda_s", lambda_s), _check_lambda("lambda_c", lambda_c)
    factors = separable_factors(model)
    if not factors:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device, dtype=p.dtype) if p is not None else torch.zeros(())
    total = factors[0].new_zeros(())
    if lambda_s > 0:
        total = total + lambda_s * sum(SPARSITY_TERMS[sparsity](u) for u in factors)
    if lambda_c > 0:
        total = total + lambda_c * sum(CONDITION_TERMS[condition](u) for u in factors)
    return total
