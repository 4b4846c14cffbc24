"""KronLinear and its functional core against independent references (explicit index formula, numpy, dense)."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgesep.errors import ShapeMismatchError
from edgesep.layers.kron import KronLinear, kron_dense, kron_linear, kron_macs, nearest_kronecker

F64 = torch.float64
FAST = settings(max_examples=25, deadline=None)


@st.composite
def kron_shapes(draw, max_d: int = 3, max_side: int = 4):
    """(in_shape, out_shape, batch) with d in 1..max_d and sides in 1..max_side."""
    d = draw(st.integers(1, max_d))
    side = st.integers(1, max_side)
    in_shape = tuple(draw(st.lists(side, min_size=d, max_size=d)))
    out_shape = tuple(draw(st.lists(side, min_size=d, max_size=d)))
    return in_shape, out_shape, draw(st.integers(1, 3))


def _layer(in_shape, out_shape, *, seed: int = 0, bias: bool = True, dtype=F64) -> KronLinear:
    torch.manual_seed(seed)
    layer = KronLinear(in_shape, out_shape, bias=bias).to(dtype)
    with torch.no_grad():  # away from the init's uniform ranges, and a nonzero bias
        for u in layer.factors:
            u.normal_()
        if bias:
            layer.bias.normal_()
    return layer


def _index_formula_dense(factors: list[np.ndarray]) -> np.ndarray:
    """W[(i_1..i_d), (j_1..j_d)] = prod_k U_k[i_k, j_k] with row-major multi-indices, by einsum."""
    d = len(factors)
    rows, cols = "abcdefgh"[:d], "pqrstuvw"[:d]
    spec = ",".join(f"{i}{j}" for i, j in zip(rows, cols, strict=True)) + f"->{rows}{cols}"
    t = np.einsum(spec, *factors)  # (m_1..m_d, n_1..n_d)
    return t.reshape(math.prod(u.shape[0] for u in factors), math.prod(u.shape[1] for u in factors))


def _np_factors(layer: KronLinear) -> list[np.ndarray]:
    return [u.detach().numpy() for u in layer.factors]


# ----------------------------------------------------------------------------------------------------------------
# dense equivalent and forward


@FAST
@given(kron_shapes())
def test_to_dense_matches_np_kron_and_index_formula(shapes):
    in_shape, out_shape, _ = shapes
    layer = _layer(in_shape, out_shape)
    w = layer.to_dense().detach().numpy()
    np_factors = _np_factors(layer)
    assert w.shape == (math.prod(out_shape), math.prod(in_shape))
    np.testing.assert_allclose(w, functools.reduce(np.kron, np_factors), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w, _index_formula_dense(np_factors), rtol=1e-12, atol=1e-12)
    torch_chain = functools.reduce(torch.kron, list(layer.factors)).detach().numpy()
    np.testing.assert_allclose(w, torch_chain, rtol=1e-12, atol=1e-12)


@FAST
@given(kron_shapes(), st.booleans())
def test_forward_matches_dense_matmul(shapes, use_op):
    in_shape, out_shape, batch = shapes
    layer = _layer(in_shape, out_shape, seed=1)
    x = torch.randn(batch, *in_shape, dtype=F64)
    w = torch.from_numpy(_index_formula_dense(_np_factors(layer)))
    expected = (x.reshape(batch, -1) @ w.T + layer.bias.detach().reshape(-1)).reshape(batch, *out_shape)
    y = kron_linear(x, list(layer.factors), layer.bias, use_op=use_op)
    assert y.shape == (batch, *out_shape)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("use_op", [False, True])
def test_d2_is_u1_x_u2t_per_sample(use_op):
    torch.manual_seed(0)
    u1, u2 = torch.randn(3, 5, dtype=F64), torch.randn(4, 2, dtype=F64)
    x = torch.randn(6, 5, 2, dtype=F64)
    expected = torch.einsum("ij,bjk,lk->bil", u1, x, u2)  # Y_b = U1 X_b U2ᵀ
    torch.testing.assert_close(kron_linear(x, [u1, u2], use_op=use_op), expected)


def test_to_linear_is_equivalent_on_flattened_inputs():
    layer = _layer((2, 3, 4), (3, 2, 2), seed=2)
    x = torch.randn(5, 2, 3, 4, dtype=F64)
    lin = layer.to_linear().to(F64)
    torch.testing.assert_close(lin(x.reshape(5, -1)).reshape(5, 3, 2, 2), layer(x))


@pytest.mark.parametrize("shapes", [((3, 5), (2, 4)), ((2, 3, 2), (3, 1, 2))])
def test_op_and_reference_paths_give_the_same_gradients(shapes):
    in_shape, out_shape = shapes
    grads = []
    for use_op in (False, True):
        layer = _layer(in_shape, out_shape, seed=3)
        x = torch.randn(4, *in_shape, dtype=F64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        g = torch.randn(4, *out_shape, dtype=F64, generator=torch.Generator().manual_seed(1))
        (kron_linear(x, list(layer.factors), layer.bias, use_op=use_op) * g).sum().backward()
        grads.append([x.grad, *(u.grad for u in layer.factors), layer.bias.grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_factor_gradients_match_the_dense_chain_rule():
    # dL/dW for y = x Wᵀ is gᵀ x; backprop through to_dense() gives the factor gradients independently
    layer = _layer((3, 2, 2), (2, 3, 2), seed=4, bias=False)
    x = torch.randn(5, 3, 2, 2, dtype=F64)
    g = torch.randn(5, 2, 3, 2, dtype=F64)
    (kron_linear(x, list(layer.factors), use_op=True) * g).sum().backward()
    via_op = [u.grad.clone() for u in layer.factors]
    layer.zero_grad()
    (layer.to_dense() * (g.reshape(5, -1).T @ x.reshape(5, -1))).sum().backward()
    for a, u in zip(via_op, layer.factors, strict=True):
        torch.testing.assert_close(a, u.grad)


# ----------------------------------------------------------------------------------------------------------------
# the custom op


@pytest.mark.parametrize(
    "in_shape, out_shape, batch",
    [((5,), (3,), 2), ((3, 5), (2, 4), 3), ((2, 3, 4), (3, 2, 1), 2), ((1, 4), (4, 1), 1)],
)
def test_opcheck(in_shape, out_shape, batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *in_shape, dtype=F64, generator=g, requires_grad=True)
    factors = [
        torch.randn(m, n, dtype=F64, generator=g, requires_grad=True) for m, n in zip(out_shape, in_shape, strict=True)
    ]
    torch.library.opcheck(torch.ops.edgesep.kron_linear.default, (x, factors))
    with torch.no_grad():  # also without autograd in the picture
        torch.library.opcheck(torch.ops.edgesep.kron_linear.default, (x.detach(), [u.detach() for u in factors]))


@pytest.mark.parametrize("in_shape, out_shape", [((3, 2), (2, 4)), ((2, 3, 2), (3, 2, 2))])
def test_gradcheck_through_custom_op(in_shape, out_shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *in_shape, dtype=F64, generator=g, requires_grad=True)
    factors = [
        torch.randn(m, n, dtype=F64, generator=g, requires_grad=True) for m, n in zip(out_shape, in_shape, strict=True)
    ]

    def f(x, *fs):
        return torch.ops.edgesep.kron_linear.default(x, list(fs))

    assert torch.autograd.gradcheck(f, (x, *factors))


def test_export_keeps_one_custom_op_node():
    layer = KronLinear((3, 5), (2, 4))
    ep = torch.export.export(nn.Sequential(layer), (torch.randn(2, 3, 5),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.edgesep.kron_linear.default) == 1


# ----------------------------------------------------------------------------------------------------------------
# nearest Kronecker product


def _rearranged_np(w: np.ndarray, in_shape, out_shape) -> np.ndarray:
    """Van Loan–Pitsianis rearrangement for d = 2: R[(i1, j1), (i2, j2)] = W[i1 m2 + i2, j1 n2 + j2]."""
    (m1, m2), (n1, n2) = out_shape, in_shape
    r = np.empty((m1 * n1, m2 * n2))
    for i1, j1, i2, j2 in np.ndindex(m1, n1, m2, n2):
        r[i1 * n1 + j1, i2 * n2 + j2] = w[i1 * m2 + i2, j1 * n2 + j2]
    return r


def _rel_err(w: torch.Tensor, factors) -> float:
    return ((w - kron_dense(list(factors))).norm() / w.norm()).item()


@pytest.mark.parametrize(
    "in_shape, out_shape", [((4,), (3,)), ((3, 4), (2, 5)), ((2, 3, 2), (3, 2, 2)), ((2, 2, 2), (1, 3, 2))]
)
def test_from_dense_recovers_an_exact_kronecker_product(in_shape, out_shape):
    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(m, n, dtype=F64, generator=g) for m, n in zip(out_shape, in_shape, strict=True)]
    w = kron_dense(factors)
    lin = nn.Linear(w.shape[1], w.shape[0], dtype=F64)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = KronLinear.from_dense(lin, in_shape, out_shape)
    assert layer.approx_error < 1e-10
    torch.testing.assert_close(layer.to_dense(), w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.bias.reshape(-1), lin.bias)
    x = torch.randn(3, math.prod(in_shape), dtype=F64)
    torch.testing.assert_close(layer(x).reshape(3, -1), lin(x))


@pytest.mark.parametrize("in_shape, out_shape", [((3, 4), (2, 5)), ((4, 2), (3, 3)), ((1, 3), (2, 1))])
def test_nearest_kronecker_d2_error_is_the_analytic_one(in_shape, out_shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(math.prod(out_shape), math.prod(in_shape), dtype=F64, generator=g)
    factors, err = nearest_kronecker(w, in_shape, out_shape)
    s = np.linalg.svd(_rearranged_np(w.numpy(), in_shape, out_shape), compute_uv=False)
    analytic = math.sqrt(max(0.0, 1.0 - s[0] ** 2 / (s**2).sum()))
    assert err == pytest.approx(analytic, abs=1e-10)
    assert _rel_err(w, factors) == pytest.approx(analytic, abs=1e-10)


def test_nearest_kronecker_d3_is_locally_optimal_and_bounded():
    torch.manual_seed(2)
    in_shape, out_shape = (2, 3, 2), (3, 2, 2)
    M, N = math.prod(out_shape), math.prod(in_shape)
    w = torch.randn(M, N, dtype=F64)
    factors, err = nearest_kronecker(w, in_shape, out_shape)
    assert err == pytest.approx(_rel_err(w, factors), abs=1e-12)
    # lower bound: a d=3 Kronecker product is also a d=2 one with factors (U1 ⊗ U2, U3)
    s = np.linalg.svd(_rearranged_np(w.numpy(), (6, 2), (6, 2)), compute_uv=False)
    assert err >= math.sqrt(1.0 - s[0] ** 2 / (s**2).sum()) - 1e-12
    # never worse than a random Kronecker product, even one optimally scaled
    for _ in range(50):
        k = kron_dense([torch.randn(m, n, dtype=F64) for m, n in zip(out_shape, in_shape, strict=True)])
        cos = (w * k).sum() / (w.norm() * k.norm())
        assert err <= math.sqrt(1.0 - cos.item() ** 2) + 1e-12
    # a stationary point: small perturbations of the factors do not help
    for _ in range(20):
        perturbed = [u + 1e-3 * torch.randn_like(u) for u in factors]
        assert _rel_err(w, perturbed) >= err - 1e-9


def test_nearest_kronecker_error_does_not_increase_with_iterations():
    torch.manual_seed(3)
    w = torch.randn(12, 12, dtype=F64)
    errs = [nearest_kronecker(w, (2, 3, 2), (2, 2, 3), iters=i, tol=0.0)[1] for i in (0, 1, 2, 5, 20, 100)]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(errs))
    # iters=0 is the HOSVD start, optimally scaled: its error is that of the best multiple of its product
    start, err0 = nearest_kronecker(w, (2, 3, 2), (2, 2, 3), iters=0)
    k = kron_dense(start)
    cos = ((w * k).sum() / (w.norm() * k.norm())).item()
    assert err0 == pytest.approx(math.sqrt(1.0 - cos**2), abs=1e-12)


@pytest.mark.parametrize("in_shape", [(3, 4), (2, 3, 2)])
def test_nearest_kronecker_of_zero_is_zero(in_shape):
    factors, err = nearest_kronecker(torch.zeros(12, 12), in_shape, in_shape)
    assert err == 0.0
    assert all(torch.equal(u, torch.zeros_like(u)) for u in factors)


def test_from_dense_keeps_dtype_and_reports_error_of_float32_weights():
    torch.manual_seed(4)
    lin = nn.Linear(12, 6)
    layer = KronLinear.from_dense(lin, (3, 4), (2, 3))
    assert layer.factors[0].dtype == torch.float32
    direct = ((lin.weight - layer.to_dense()).norm() / lin.weight.norm()).item()
    assert layer.approx_error == pytest.approx(direct, rel=1e-5)


def test_shape_mismatch_errors_mention_both_shapes():
    lin = nn.Linear(12, 6)
    with pytest.raises(ShapeMismatchError, match=r"12.*\(3, 5\)"):
        KronLinear.from_dense(lin, (3, 5), (2, 3))
    with pytest.raises(ShapeMismatchError, match=r"\(6, 12\).*\(2, 4\).*\(3, 4\)"):
        nearest_kronecker(lin.weight, (3, 4), (2, 4))
    with pytest.raises(ShapeMismatchError, match=r"\(3, 4\).*\(6,\)"):
        nearest_kronecker(lin.weight, (3, 4), (6,))


# ----------------------------------------------------------------------------------------------------------------
# counts and spectra


@FAST
@given(kron_shapes())
def test_num_params_and_macs(shapes):
    in_shape, out_shape, batch = shapes
    layer = _layer(in_shape, out_shape)
    assert layer.num_params() == sum(m * n for m, n in zip(out_shape, in_shape, strict=True)) + math.prod(out_shape)
    assert layer.num_params() == sum(p.numel() for p in layer.parameters())
    assert layer.dense_params() == sum(p.numel() for p in layer.to_linear().parameters())
    assert layer.dense_macs() == math.prod(in_shape) * math.prod(out_shape)
    x = torch.randn(batch, *in_shape, dtype=F64)
    with FlopCounterMode(display=False) as counter:
        kron_linear(x, list(layer.factors), use_op=False)
    assert counter.get_total_flops() == 2 * batch * layer.macs()
    assert layer.macs() == kron_macs(in_shape, out_shape)


def test_macs_hand_formula_d2():
    # step 1: (n1, n2) @ U2ᵀ costs n1 n2 m2; step 2: (m2, n1) @ U1ᵀ costs m2 n1 m1
    (n1, n2), (m1, m2) = (3, 7), (5, 2)
    assert KronLinear((n1, n2), (m1, m2)).macs() == n1 * n2 * m2 + m2 * n1 * m1


def test_nonzeros_counts_factors_and_bias():
    layer = _layer((2, 3), (3, 2))
    with torch.no_grad():
        layer.factors[0][0, :] = 0  # 2 entries
        layer.bias[1, 1] = 0
    assert layer.nonzeros() == layer.num_params() - 3


@FAST
@given(kron_shapes())
def test_spectral_norm_matches_dense(shapes):
    in_shape, out_shape, _ = shapes
    layer = _layer(in_shape, out_shape, seed=5)
    dense = torch.linalg.matrix_norm(layer.to_dense().detach(), ord=2).item()
    assert layer.spectral_norm() == pytest.approx(dense, rel=1e-9)


@pytest.mark.parametrize(
    "in_shape, out_shape",
    [((3, 4), (2, 3)), ((2, 3, 4), (1, 2, 3)), ((2, 3), (3, 5)), ((2, 2, 3), (3, 2, 4)), ((4, 4), (4, 4))],
    ids=["wide", "wide-d3", "tall", "tall-d3", "square"],
)
def test_condition_number_matches_dense_when_factors_all_wide_or_all_tall(in_shape, out_shape):
    layer = _layer(in_shape, out_shape, seed=6)
    dense = torch.linalg.cond(layer.to_dense().detach()).item()
    assert layer.condition_number() == pytest.approx(dense, rel=1e-8)


def test_condition_number_mixed_factors_is_over_the_factor_determined_singular_values():
    # U1 wide (2x3), U2 tall (3x2): W is 6x6 but has only min(2,3)*min(3,2) = 4 nonzero singular values, so the
    # dense cond is infinite; condition_number() is the ratio over those 4 (what kron.py's docstring promises).
    layer = _layer((3, 2), (2, 3), seed=7)
    s = np.linalg.svd(layer.to_dense().detach().numpy(), compute_uv=False)
    assert s.shape == (6,)
    assert np.all(s[4:] < 1e-12 * s[0]) and np.all(s[:4] > 1e-6 * s[0])
    assert layer.condition_number() == pytest.approx(s[0] / s[3], rel=1e-8)
    assert torch.linalg.cond(layer.to_dense().detach()).item() > 1e12


def test_condition_number_of_singular_factor():
    layer = _layer((2, 2), (2, 2))
    with torch.no_grad():
        layer.factors[1][1] = layer.factors[1][0]  # rank 1: σ_min is 0 up to rounding
    assert layer.condition_number() > 1e12
    with torch.no_grad():
        layer.factors[1].zero_()  # σ_min exactly 0
    assert layer.condition_number() == math.inf


# ----------------------------------------------------------------------------------------------------------------
# input validation


@pytest.mark.parametrize("use_op", [False, True])
def test_wrong_trailing_shape_is_a_shape_mismatch_naming_both_shapes(use_op):
    layer = KronLinear((3, 5), (2, 4))
    with pytest.raises(ShapeMismatchError, match=r"\(B, 3, 5\).*\(4, 5, 3\)"):
        layer(torch.randn(4, 5, 3))
    with pytest.raises(ShapeMismatchError, match=r"\(7, 3, 4\).*\(B, 3, 5\)"):
        kron_linear(torch.randn(7, 3, 4), list(layer.factors), use_op=use_op)
    with pytest.raises(ShapeMismatchError, match=r"\(3, 5\)"):  # no batch axis
        kron_linear(torch.randn(3, 5), list(layer.factors), use_op=use_op)
    with pytest.raises(ShapeMismatchError, match=r"\(2, 6, 3, 5\)"):  # two batch axes: rejected, not mis-shaped
        kron_linear(torch.randn(2, 6, 3, 5), list(layer.factors), use_op=use_op)
    with pytest.raises(ShapeMismatchError):
        kron_linear(torch.randn(2, 3), [], use_op=use_op)


def test_flattened_input_is_accepted():
    layer = _layer((2, 3, 4), (3, 2, 2), seed=8)
    x = torch.randn(5, 2, 3, 4, dtype=F64)
    torch.testing.assert_close(layer(x.reshape(5, 24)), layer(x))
    with pytest.raises(ShapeMismatchError, match=r"\(B, 24\).*\(5, 25\)"):
        layer(torch.randn(5, 25, dtype=F64))


def test_constructor_validation():
    with pytest.raises(ShapeMismatchError, match=r"\(3, 5\).*\(2,\)"):
        KronLinear((3, 5), (2,))
    with pytest.raises(ShapeMismatchError, match="positive"):
        KronLinear((3, 0), (2, 2))
    with pytest.raises(ShapeMismatchError, match="non-empty"):
        KronLinear((), ())
    assert KronLinear(7, 3).in_shape == (7,)


# ----------------------------------------------------------------------------------------------------------------
# init and repr


@pytest.mark.parametrize("in_shape, out_shape", [((16, 16), (8, 16)), ((8, 8, 8), (4, 8, 8))])
def test_init_variance_matches_nn_linear(in_shape, out_shape):
    # Var(W_ij) of nn.Linear's default init is 1 / (3 N); the entries of a Kronecker product are correlated, so
    # average the empirical variance over several draws and allow a loose tolerance.
    N = math.prod(in_shape)
    torch.manual_seed(9)
    kron_var = np.mean([KronLinear(in_shape, out_shape).to_dense().detach().var().item() for _ in range(20)])
    lin_var = nn.Linear(N, math.prod(out_shape)).weight.detach().var().item()
    assert kron_var == pytest.approx(1 / (3 * N), rel=0.2)
    assert lin_var == pytest.approx(1 / (3 * N), rel=0.05)


def test_bias_init_bound():
    layer = KronLinear((4, 4), (2, 2))
    assert layer.bias.shape == (2, 2)
    assert layer.bias.abs().max().item() <= 1 / math.sqrt(16)
    assert KronLinear((4, 4), (2, 2), bias=False).bias is None


def test_extra_repr_has_shapes_and_counts():
    layer = KronLinear((3, 5), (2, 4))
    text = repr(layer)
    for part in (
        "in_shape=(3, 5)",
        "out_shape=(2, 4)",
        "2x3 ⊗ 4x5",
        f"params={layer.num_params()}",
        f"dense {layer.dense_params()}",
        f"macs={layer.macs()}",
        f"dense {layer.dense_macs()}",
    ):
        assert part in text
