"""Regularizers against numpy/scipy computations from singular values, and the properties training relies on."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp
from torch import nn

from edgesep.errors import ConfigError, UnknownNameError
from edgesep.layers.kron import KronLinear
from edgesep.regularizers import (
    CONDITION_TERMS,
    DEFAULT_CONDITION,
    SPARSITY_TERMS,
    gram_deviation,
    l1,
    log_sparsity,
    logdet_barrier,
    regularization,
    separable_factors,
    smooth_log_cond,
)

F64 = torch.float64
FAST = settings(max_examples=30, deadline=None)
SHAPES = [(5, 3), (3, 5), (4, 4), (1, 4), (4, 1), (1, 1)]  # tall, wide, square, vectors


@st.composite
def matrices(draw, max_side: int = 7) -> np.ndarray:
    """A random float64 matrix of a random shape (tall, wide or square)."""
    m, n = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    return scale * np.random.default_rng(seed).standard_normal((m, n))


def _svals(a: np.ndarray) -> np.ndarray:
    return np.linalg.svd(a, compute_uv=False)


def _with_singular_values(m: int, n: int, s, seed: int = 0) -> torch.Tensor:
    """Q diag(s) Rᵀ with random orthonormal Q (m, r), R (n, r), r = min(m, n) = len(s)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    q = torch.linalg.qr(torch.randn(m, r, dtype=F64, generator=g))[0]
    rr = torch.linalg.qr(torch.randn(n, r, dtype=F64, generator=g))[0]
    return q @ torch.diag(torch.as_tensor(s, dtype=F64)) @ rr.T


def _cond(a: torch.Tensor) -> float:
    s = torch.linalg.svdvals(a.detach())
    return (s[0] / s[-1]).item()


# ----------------------------------------------------------------------------------------------------------------
# values against numpy


@FAST
@given(matrices(), st.sampled_from([0.5, 1.0, 10.0]))
def test_sparsity_terms_match_numpy(a, rho):
    A = torch.from_numpy(a)
    assert l1(A).item() == pytest.approx(np.abs(a).sum(), rel=1e-12)
    assert log_sparsity(A, rho).item() == pytest.approx(np.log1p(rho * a**2).sum(), rel=1e-12)
    assert SPARSITY_TERMS["l1"] is l1 and SPARSITY_TERMS["log"] is log_sparsity


@FAST
@given(matrices(), st.sampled_from([0.0, 1e-6, 1e-2]))
def test_logdet_barrier_matches_singular_values(a, eps):
    s2 = _svals(a) ** 2
    expected = (s2.sum() - np.log(s2 + eps).sum()) / len(s2)
    assert logdet_barrier(torch.from_numpy(a), eps=eps).item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


@FAST
@given(matrices())
def test_gram_deviation_matches_singular_values_and_definition(a):
    s2 = _svals(a) ** 2
    expected = np.sqrt(((s2 - s2.mean()) ** 2).sum())
    value = gram_deviation(torch.from_numpy(a)).item()
    assert value == pytest.approx(expected, rel=1e-9, abs=1e-10)
    g = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T  # the definition, r x r
    direct = np.linalg.norm(g - np.trace(g) / len(g) * np.eye(len(g)))
    assert value == pytest.approx(direct, rel=1e-9, abs=1e-10)


@FAST
@given(matrices(), st.sampled_from([0.05, 0.1, 0.5]), st.sampled_from([0.0, 1e-8]))
def test_smooth_log_cond_matches_singular_values(a, t, eps):
    ell = 0.5 * np.log(_svals(a) ** 2 + eps)
    expected = t * logsumexp(ell / t) + t * logsumexp(-ell / t)
    assert smooth_log_cond(torch.from_numpy(a), t=t, eps=eps).item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


@FAST
@given(matrices(), st.sampled_from([0.02, 0.1, 0.5]))
def test_smooth_log_cond_brackets_the_exact_log_cond(a, t):
    s = _svals(a)
    exact = np.log(s[0] / s[-1])
    value = smooth_log_cond(torch.from_numpy(a), t=t, eps=0.0).item()
    assert exact - 1e-9 <= value <= exact + 2 * t * np.log(len(s)) + 1e-9


def test_smooth_log_cond_tends_to_exact_log_cond():
    A = _with_singular_values(6, 4, [3.0, 2.0, 0.5, 0.1])
    exact = math.log(30.0)
    gaps = [smooth_log_cond(A, t=t, eps=0.0).item() - exact for t in (0.5, 0.1, 0.02, 0.004)]
    assert all(b < a for a, b in itertools.pairwise(gaps))
    assert gaps[-1] < 1e-3


# ----------------------------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "term",
    [
        l1,
        log_sparsity,
        lambda A: log_sparsity(A, rho=4.0),
        logdet_barrier,
        lambda A: logdet_barrier(A, eps=0.0),
        gram_deviation,
        smooth_log_cond,
        lambda A: smooth_log_cond(A, t=0.5),
    ],
    ids=["l1", "log", "log-rho4", "logdet", "logdet-eps0", "gram", "smooth", "smooth-t0.5"],
)
def test_gradcheck(term, shape):
    if term is gram_deviation and min(shape) == 1:
        pytest.skip("r = 1: gram_deviation is identically 0, at its kink")
    A = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(sum(shape)), requires_grad=True)
    assert torch.autograd.gradcheck(term, (A,))


@pytest.mark.parametrize("name", sorted(CONDITION_TERMS))
def test_condition_terms_are_finite_with_finite_gradients_on_rank_deficient_factors(name):
    A = _with_singular_values(5, 3, [1.0, 0.5, 0.0]).requires_grad_()
    value = CONDITION_TERMS[name](A)
    (grad,) = torch.autograd.grad(value, A)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_logdet_barrier_stays_finite_when_jitter_is_below_float32_resolution():
    # ||G|| ~ 1e8 in float32: G + 1e-6 I is singular to working precision, the Cholesky fails, the clamped
    # eigenvalue fallback keeps the barrier finite
    A = (1e4 * _with_singular_values(4, 4, [1.0, 1.0, 0.0, 0.0])).float().requires_grad_()
    value = logdet_barrier(A)
    (grad,) = torch.autograd.grad(value, A)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


# ----------------------------------------------------------------------------------------------------------------
# minima and scale behaviour


@pytest.mark.parametrize("shape", SHAPES)
def test_orthonormal_factors_are_the_minimum(shape):
    r = min(shape)
    Q = _with_singular_values(*shape, [1.0] * r, seed=1)
    assert gram_deviation(Q).item() == pytest.approx(0.0, abs=1e-12)
    assert logdet_barrier(Q, eps=0.0).item() == pytest.approx(1.0, abs=1e-12)
    assert logdet_barrier(Q, eps=1e-3).item() == pytest.approx(1.0 - math.log1p(1e-3), abs=1e-12)
    # at cond = 1 every soft-max/soft-min pays its full t log r
    assert smooth_log_cond(Q, t=0.1, eps=0.0).item() == pytest.approx(2 * 0.1 * math.log(r), abs=1e-12)


@pytest.mark.parametrize("c", [0.1, 0.5, 2.0, 7.0])
def test_scaled_orthonormal_factors(c):
    Q = _with_singular_values(6, 4, [1.0] * 4, seed=2)
    A = _with_singular_values(6, 4, [2.0, 1.0, 0.3, 0.2], seed=3)
    # gram: zero on every scaled orthonormal matrix, and degree-2 homogeneous
    assert gram_deviation(c * Q).item() == pytest.approx(0.0, abs=1e-12)
    assert gram_deviation(c * A).item() == pytest.approx(c**2 * gram_deviation(A).item(), rel=1e-12)
    # logdet: pays for the scale, s - log s per singular value, > 1 away from c = 1
    assert logdet_barrier(c * Q, eps=0.0).item() == pytest.approx(c**2 - math.log(c**2), rel=1e-12)
    assert logdet_barrier(c * Q, eps=0.0).item() > 1.0
    # smooth_log_cond: scale invariant
    assert smooth_log_cond(c * A, eps=0.0).item() == pytest.approx(smooth_log_cond(A, eps=0.0).item(), rel=1e-12)


@settings(max_examples=10, deadline=None)  # a 1-d optimization per example
@given(matrices())
def test_logdet_barrier_is_at_least_one_and_its_scale_free_part_is_am_over_gm(a):
    s2 = _svals(a) ** 2
    A = torch.from_numpy(a)
    assert logdet_barrier(A, eps=0.0).item() >= 1.0 - 1e-12
    # minimized over the scale c, the barrier is 1 + log(AM / GM) of the squared singular values
    best = minimize_scalar(
        lambda logc: logdet_barrier(math.exp(logc) * A, eps=0.0).item(),
        bounds=(-10, 10),
        method="bounded",
        options={"xatol": 1e-10},
    )
    expected = 1.0 + np.log(s2.mean()) - np.log(s2).mean()
    assert best.fun == pytest.approx(expected, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("name", sorted(CONDITION_TERMS))
@pytest.mark.parametrize("shape", [(2, 2), (2, 5), (5, 2)])
def test_condition_terms_increase_with_the_condition_number(name, shape):
    # diag(1, 1/k) embedded by random orthonormal maps: cond = k
    ks = [1.0, 1.2, 1.5, 2.0, 4.0, 10.0, 100.0, 1000.0]
    values = [CONDITION_TERMS[name](_with_singular_values(*shape, [1.0, 1.0 / k], seed=4)).item() for k in ks]
    assert all(b > a for a, b in itertools.pairwise(values)), values


@pytest.mark.parametrize("name", sorted(CONDITION_TERMS))
def test_condition_terms_increase_with_cond_on_a_log_spaced_spectrum(name):
    ks = [1.0, 3.0, 10.0, 30.0, 100.0]
    values = [
        CONDITION_TERMS[name](_with_singular_values(4, 7, np.logspace(0, -np.log10(k), 4), seed=5)).item() for k in ks
    ]
    assert all(b > a for a, b in itertools.pairwise(values)), values


def test_gram_deviation_saturates_where_logdet_does_not():
    # the docstring's argument for the default: gram -> 1/sqrt(2) on diag(1, 1/k), the logdet barrier grows ~log k
    g = [gram_deviation(torch.diag(torch.tensor([1.0, 1.0 / k], dtype=F64))).item() for k in (1e2, 1e4)]
    lb = [logdet_barrier(torch.diag(torch.tensor([1.0, 1.0 / k], dtype=F64)), eps=0.0).item() for k in (1e2, 1e4)]
    assert g[1] - g[0] < 1e-4 and g[1] == pytest.approx(1 / math.sqrt(2), abs=1e-4)
    assert lb[1] - lb[0] == pytest.approx(math.log(1e2), rel=1e-3)


@pytest.mark.parametrize("name", sorted(CONDITION_TERMS))
@pytest.mark.parametrize("shape", [(4, 6), (6, 4), (5, 5)])
def test_gradient_descent_on_a_condition_term_reduces_the_condition_number(name, shape):
    s = [1.0, 0.5, 0.2, 0.05] + [1.0] * (min(shape) - 4)
    A = _with_singular_values(*shape, s, seed=6).requires_grad_()
    term = CONDITION_TERMS[name]
    start_cond, start_value = _cond(A), term(A).item()
    conds = [start_cond]
    for _ in range(30):
        (grad,) = torch.autograd.grad(term(A), A)
        with torch.no_grad():
            A -= 0.01 * grad
        conds.append(_cond(A))
    assert start_cond == pytest.approx(20.0)
    assert term(A).item() < start_value
    assert conds[-1] < 0.6 * start_cond
    assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(conds)), conds


# ----------------------------------------------------------------------------------------------------------------
# model level


def _model() -> nn.Module:
    torch.manual_seed(0)
    shared = KronLinear((2, 5), (3, 2))
    return nn.Sequential(
        KronLinear((3, 4), (2, 5)),
        nn.ReLU(),
        shared,
        nn.Sequential(nn.Flatten(), nn.Linear(6, 6), nn.Unflatten(1, (2, 3))),
        KronLinear((2, 3), (1, 2), bias=False),
        shared,  # the same layer twice: its factors count once
    )


def test_separable_factors_are_exactly_the_kron_factors():
    model = _model()
    expected = [model[0].factors[0], model[0].factors[1], model[2].factors[0], model[2].factors[1]]
    expected += [model[4].factors[0], model[4].factors[1]]
    got = separable_factors(model)
    assert len(got) == len(expected) and all(a is b for a, b in zip(got, expected, strict=True))
    assert separable_factors(nn.Sequential(nn.Linear(3, 3))) == []


@pytest.mark.parametrize("sparsity", sorted(SPARSITY_TERMS))
@pytest.mark.parametrize("condition", sorted(CONDITION_TERMS))
def test_regularization_is_the_manual_sum(sparsity, condition):
    model = _model()
    factors = separable_factors(model)
    value = regularization(model, lambda_s=0.3, lambda_c=0.7, sparsity=sparsity, condition=condition)
    manual = 0.3 * sum(SPARSITY_TERMS[sparsity](u) for u in factors) + 0.7 * sum(
        CONDITION_TERMS[condition](u) for u in factors
    )
    assert value.dim() == 0
    torch.testing.assert_close(value, manual)
    value.backward()
    grads = [u.grad.clone() for u in factors]
    model.zero_grad()
    manual.backward()
    for g, u in zip(grads, factors, strict=True):
        torch.testing.assert_close(g, u.grad)


def test_regularization_terms_separately():
    model = _model()
    factors = separable_factors(model)
    only_s = regularization(model, lambda_s=2.0)
    torch.testing.assert_close(only_s, 2.0 * sum(l1(u) for u in factors))
    only_c = regularization(model, lambda_c=0.5)
    torch.testing.assert_close(only_c, 0.5 * sum(CONDITION_TERMS[DEFAULT_CONDITION](u) for u in factors))


def test_regularization_is_zero_without_factors_or_lambdas(monkeypatch):
    dense = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    value = regularization(dense, lambda_s=1.0, lambda_c=1.0)
    assert value.dim() == 0 and value.item() == 0.0
    assert regularization(dense.double(), lambda_c=1.0).dtype == F64  # on the model's dtype / device

    def boom(*args, **kwargs):
        raise AssertionError("a decomposition ran although its lambda is 0")

    for fn in ("svdvals", "svd", "cholesky_ex", "eigvalsh"):
        monkeypatch.setattr(torch.linalg, fn, boom)
    for name in CONDITION_TERMS:
        value = regularization(_model(), condition=name, sparsity="log")
        assert value.dim() == 0 and value.item() == 0.0
        assert regularization(_model(), lambda_s=1.0, condition=name).item() > 0


def test_regularization_rejects_unknown_names_and_bad_lambdas():
    model = _model()
    with pytest.raises(UnknownNameError, match=r"unknown sparsity term 'l0'.*l1, log"):
        regularization(model, lambda_s=1.0, sparsity="l0")
    with pytest.raises(UnknownNameError, match=r"unknown condition term 'svd'.*gram, logdet, smooth_log_cond"):
        regularization(model, lambda_c=1.0, condition="svd")
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ConfigError, match="lambda_c"):
            regularization(model, lambda_c=bad)
    with pytest.raises(ConfigError, match="temperature"):
        smooth_log_cond(torch.eye(2), t=0.0)
    with pytest.raises(ConfigError, match=r"\(2, 2, 2\)"):
        gram_deviation(torch.ones(2, 2, 2))


def test_default_condition_is_registered():
    assert DEFAULT_CONDITION in CONDITION_TERMS
    assert CONDITION_TERMS[DEFAULT_CONDITION] is logdet_barrier
