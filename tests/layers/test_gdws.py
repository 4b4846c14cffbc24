"""GDWSConv2d and the MEGO / LEGO allocations: optimality against brute force, exactness, forms, edge cases.

References are independent of the code under test: brute-force enumeration of every allocation, numpy SVDs and
numpy folds, torch's own dense / depthwise convs, and onnx.reference for the one-layer ONNX graphs.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgesep.errors import ConfigError, ShapeMismatchError
from edgesep.layers.gdws import GDWSConv2d, channel_svd, gdws_error, gdws_macs, lego, mego


def _np_scores(w: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """alpha_c * s_{c,i}^2 from numpy's SVD of each (M, K^2) block: (C, r)."""
    m, c = w.shape[:2]
    s = np.stack([np.linalg.svd(w[:, i].reshape(m, -1), compute_uv=False) for i in range(c)])
    return alpha[:, None] * s**2


def _np_error(scores: np.ndarray, g) -> float:
    return float(sum(scores[c, gc:].sum() for c, gc in enumerate(g)))


def _np_weighted_frobenius(w: np.ndarray, w_hat: np.ndarray, alpha: np.ndarray) -> float:
    return float(sum(alpha[c] * ((w[:, c] - w_hat[:, c]) ** 2).sum() for c in range(w.shape[1])))


def _np_fold(layer: GDWSConv2d) -> np.ndarray:
    """Dense weight from the factors with a plain loop (independent of gdws_fold)."""
    dw = layer.dw_weight.detach().double().numpy()[:, 0]  # (G, K1, K2)
    pw = layer.pw_weight.detach().double().numpy()[:, :, 0, 0]  # (M, G)
    w = np.zeros((layer.out_channels, layer.in_channels, *layer.kernel_size))
    k = 0
    for c, gc in enumerate(layer.g):
        for _ in range(gc):
            w[:, c] += pw[:, k, None, None] * dw[k][None]
            k += 1
    return w


def _conv(c=3, m=4, k=3, bias=False, seed=0, **kw) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(c, m, k, bias=bias, **kw).double()


# ---------------------------------------------------------------------------------------------------- optimality


@pytest.mark.parametrize("m,c,k", [(3, 3, 2), (2, 3, 3), (5, 2, 2)])  # (2, 3, 3): M < K^2, r = M
def test_mego_is_optimal_against_brute_force(m, c, k):
    rng = np.random.default_rng(m * 100 + c * 10 + k)
    w = rng.standard_normal((m, c, k, k))
    alpha = rng.uniform(0.1, 3.0, c)
    scores = _np_scores(w, alpha)
    r = scores.shape[1]
    assert r == min(m, k * k)
    allocs = list(itertools.product(range(r + 1), repeat=c))
    ts = channel_svd(torch.from_numpy(w)).scores(alpha)
    for budget in range(1, c * r + 1):
        g = mego(ts, budget)
        assert sum(g) == budget
        best = min(_np_error(scores, a) for a in allocs if sum(a) <= budget)
        assert _np_error(scores, g) == pytest.approx(best, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("m,c,k", [(3, 3, 2), (2, 3, 3), (4, 2, 2)])
def test_lego_is_optimal_against_brute_force(m, c, k):
    rng = np.random.default_rng(7 + m + c + k)
    w = rng.standard_normal((m, c, k, k))
    alpha = rng.uniform(0.1, 3.0, c)
    scores = _np_scores(w, alpha)
    r = scores.shape[1]
    allocs = list(itertools.product(range(r + 1), repeat=c))
    ts = channel_svd(torch.from_numpy(w)).scores(alpha)
    total = scores.sum()
    for beta in [0.0, *np.quantile(np.cumsum(np.sort(scores.ravel())), [0.1, 0.3, 0.5, 0.7, 0.9]), 0.05 * total]:
        g = lego(ts, float(beta))
        feasible = [a for a in allocs if _np_error(scores, a) <= beta * (1 + 1e-12) and sum(a) >= 1]
        assert _np_error(scores, g) <= beta * (1 + 1e-9) + 1e-12
        assert sum(g) == min(sum(a) for a in feasible)


def test_allocation_never_drops_below_one_kernel_and_says_why_through_the_error():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    s = channel_svd(w)
    g = lego(s.scores(), beta=1e9)  # a bound that would drop every kernel
    assert sum(g) == 1
    assert g[int(torch.argmax(s.s[:, 0]))] == 1  # the single kept kernel is the largest one
    assert gdws_error(s.s, g) > 0
    assert sum(mego(s.scores(), 0)) == 1
    assert sum(mego(s.scores(), 0, min_keep=3)) == 3
    with pytest.raises(ConfigError, match="at least one"):
        mego(s.scores(), 5, min_keep=0)
    with pytest.raises(ConfigError, match="beta"):
        lego(s.scores(), -1.0)


def test_error_is_monotone_in_the_budget():
    w = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    s = channel_svd(w)
    alpha = torch.rand(6, dtype=torch.float64) + 0.1
    sc = s.scores(alpha)
    errs = [gdws_error(s.s, mego(sc, b), alpha) for b in range(1, 6 * 8 + 1)]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(errs))
    assert errs[-1] == pytest.approx(0.0, abs=1e-18)
    betas = np.linspace(0, float(sc.sum()), 40)
    sizes = [sum(lego(sc, float(b))) for b in betas]
    assert all(a >= b for a, b in itertools.pairwise(sizes))


def test_error_formula_matches_the_weighted_frobenius_error():
    conv = _conv(c=5, m=6, k=3, seed=3)
    w = conv.weight.detach().numpy()
    alpha = np.random.default_rng(0).uniform(0, 2, 5)
    for g in ([1, 2, 3, 0, 6], [2, 2, 2, 2, 2], [6, 0, 1, 4, 5]):
        layer = GDWSConv2d.from_conv(conv, g)
        actual = _np_weighted_frobenius(w, _np_fold(layer), alpha)
        s = channel_svd(conv.weight)
        assert gdws_error(s.s, g, alpha) == pytest.approx(actual, rel=1e-9, abs=1e-12)
        assert gdws_error(s.s, g, alpha) == pytest.approx(_np_error(_np_scores(w, alpha), g), rel=1e-9)


# ---------------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("m,c,k", [(4, 3, 3), (2, 3, 3), (12, 2, 3)])
def test_exact_at_full_rank(m, c, k):
    conv = _conv(c=c, m=m, k=k, bias=True, padding=1, seed=m)
    r = min(m, k * k)
    layer = GDWSConv2d.from_conv(conv, [r] * c)
    np.testing.assert_allclose(_np_fold(layer), conv.weight.detach().numpy(), atol=1e-12)
    x = torch.randn(2, c, 7, 6, dtype=torch.float64)
    for form in ("gather", "multiplier", "branches"):
        torch.testing.assert_close(layer.set_form(form)(x), conv(x), atol=1e-11, rtol=1e-11)


def test_exact_when_g_equals_the_rank_of_each_channel_block():
    # channel blocks of rank 1, 2, 0: LEGO with beta = 0 finds exactly those ranks and is exact
    rng = np.random.default_rng(1)
    m, k = 5, 3
    blocks = [rng.standard_normal((m, r)) @ rng.standard_normal((r, k * k)) for r in (1, 2)] + [np.zeros((m, k * k))]
    w = np.stack(blocks, 1).reshape(m, 3, k, k)  # (M, C, K^2) -> (M, C, K, K)
    conv = _conv(c=3, m=m, k=k)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w))
    layer = GDWSConv2d.from_conv(conv, beta=1e-20)
    assert list(layer.g) == [1, 2, 0]
    np.testing.assert_allclose(_np_fold(layer), w, atol=1e-12)


def test_dws_special_case_is_a_depthwise_then_pointwise_conv():
    conv = _conv(c=4, m=6, k=3, bias=True, padding=1, stride=2)
    layer = GDWSConv2d.from_conv(conv, [1] * 4)
    assert layer.form == "branches"  # "auto" for equal g: one plain depthwise-separable branch here
    # an ordinary depthwise-separable pair built from numpy's top singular triplets
    w = conv.weight.detach().numpy()
    dw = nn.Conv2d(4, 4, 3, padding=1, stride=2, groups=4, bias=False).double()
    pw = nn.Conv2d(4, 6, 1).double()
    with torch.no_grad():
        for c in range(4):
            u, s, vt = np.linalg.svd(w[:, c].reshape(6, 9))
            dw.weight[c, 0] = torch.from_numpy(vt[0].reshape(3, 3))
            pw.weight[:, c, 0, 0] = torch.from_numpy(u[:, 0] * s[0])
        pw.bias.copy_(conv.bias)
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64)
    # singular vectors are defined up to sign; the product u v^T is not
    torch.testing.assert_close(layer(x), pw(dw(x)), atol=1e-11, rtol=1e-11)
    s = np.stack([np.linalg.svd(w[:, c].reshape(6, 9), compute_uv=False) for c in range(4)])
    assert gdws_error(channel_svd(conv.weight).s, [1] * 4) == pytest.approx(float((s[:, 1:] ** 2).sum()), rel=1e-9)


# ---------------------------------------------------------------------------------------------------- forms


@pytest.mark.parametrize(
    "kw",
    [
        {"padding": 1},
        {"stride": 2, "padding": 1, "bias": True},
        {"dilation": 2, "padding": 2},
        {"stride": (2, 1), "padding": (0, 1), "bias": True},
        {"padding": "same"},
        {"padding": 1, "padding_mode": "reflect"},
    ],
)
def test_forms_and_folded_conv_agree_with_the_dense_reference(kw):
    bias = kw.pop("bias", False)
    conv = _conv(c=3, m=5, k=3, bias=bias, seed=4, **kw)
    uniform = GDWSConv2d.from_conv(conv, [2, 2, 2])
    ragged = GDWSConv2d.from_conv(conv, [3, 0, 1])
    x = torch.randn(2, 3, 8, 7, dtype=torch.float64)
    for layer in (uniform, ragged):
        ref = F.conv2d(
            F.pad(x, conv._reversed_padding_repeated_twice, mode=kw["padding_mode"]) if "padding_mode" in kw else x,
            torch.from_numpy(_np_fold(layer)),
            conv.bias,
            conv.stride,
            0 if "padding_mode" in kw else conv.padding,
            conv.dilation,
        )
        torch.testing.assert_close(layer.set_form("gather")(x), ref, atol=1e-11, rtol=1e-11)
        torch.testing.assert_close(layer.set_form("branches")(x), ref, atol=1e-11, rtol=1e-11)
        torch.testing.assert_close(layer.to_conv()(x), ref, atol=1e-11, rtol=1e-11)
        if layer.uniform:
            torch.testing.assert_close(layer.set_form("multiplier")(x), ref, atol=1e-11, rtol=1e-11)
        if conv.bias is not None:
            torch.testing.assert_close(layer.bias, conv.bias)
        assert layer.out_hw(x.shape[2:]) == tuple(ref.shape[2:])
    with pytest.raises(ConfigError, match="same number of kernels"):
        ragged.set_form("multiplier")


def test_macs_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    conv = _conv(c=6, m=8, k=3, padding=1, stride=2).float()
    layer = GDWSConv2d.from_conv(conv, [1, 2, 0, 3, 1, 1]).float()
    x = torch.zeros(1, 6, 11, 11)
    for form in ("gather", "branches"):  # the same MACs in both forms
        with FlopCounterMode(display=False) as fc:
            layer.set_form(form)(x)
        assert fc.get_total_flops() // 2 == layer.macs((11, 11)) == gdws_macs(layer.g, 8, (3, 3), (6, 6))
    with FlopCounterMode(display=False) as fc:
        conv(x)
    assert fc.get_total_flops() // 2 == layer.dense_macs((11, 11))


def test_one_layer_onnx_graphs_match_torch_with_the_reference_evaluator():
    from onnx.reference import ReferenceEvaluator

    from edgesep.gdws import _layer_onnx

    conv = _conv(c=3, m=4, k=3, bias=True, padding=1, stride=2, seed=5).float()
    x = torch.rand(2, 3, 9, 9)
    for g in ([2, 2, 2], [3, 0, 1]):
        layer = GDWSConv2d.from_conv(conv, g).float()
        want = torch.nn.functional.conv2d(x, layer.dense_weight(), layer.bias, stride=2, padding=1).detach().numpy()
        for form in ("dense", "gather", "branches") + (("multiplier",) if layer.uniform else ()):
            got = ReferenceEvaluator(_layer_onnx(layer, form, (3, 9, 9), 2)).run(None, {"x": x.numpy()})[0]
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4, err_msg=f"{g} {form}")


def test_branches_plan_and_its_onnx_ops():
    from edgesep.layers.gdws import gdws_branches

    # branch i: the i-th kernel of every channel with g_c > i; None = all channels (no gather)
    assert gdws_branches([2, 2]) == [(None, [0, 2]), (None, [1, 3])]
    assert gdws_branches([3, 0, 1]) == [([0, 2], [0, 3]), ([0], [1]), ([0], [2])]
    assert gdws_branches([1, 1, 1]) == [(None, [0, 1, 2])]
    import onnx

    from edgesep.gdws import _layer_onnx

    layer = GDWSConv2d.from_conv(_conv(c=4, m=6, k=3, padding=1, seed=2), [2] * 4).float()
    ops = [n.op_type for n in onnx.load_from_string(_layer_onnx(layer, "branches", (4, 8, 8), 1)).graph.node]
    assert ops.count("Conv") == 4 and "Gather" not in ops  # equal g: two depthwise (multiplier 1) + two 1x1
    nodes = onnx.load_from_string(_layer_onnx(layer, "branches", (4, 8, 8), 1)).graph.node
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in nodes if n.op_type == "Conv"]
    assert groups == [4, 1, 4, 1]


# ---------------------------------------------------------------------------------------------------- edge cases


def test_grouped_and_depthwise_convs_are_refused_clearly():
    with pytest.raises(ConfigError, match="grouped conv with groups=2"):
        GDWSConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), kernels=4)
    with pytest.raises(ConfigError, match="depthwise conv"):
        GDWSConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=4), kernels=4)
    with pytest.raises(ConfigError, match=r"nn\.Conv2d"):
        GDWSConv2d.check_convertible(nn.Linear(3, 3))


def test_bad_allocations_and_alphas_are_refused():
    conv = _conv(c=3, m=2, k=3)  # rank bound min(2, 9) = 2
    with pytest.raises(ConfigError, match=r"\[0, 2\]"):
        GDWSConv2d.from_conv(conv, [3, 1, 1])
    with pytest.raises(ConfigError, match="exactly one"):
        GDWSConv2d.from_conv(conv, [1, 1, 1], beta=0.1)
    with pytest.raises(ShapeMismatchError, match="input channels"):
        GDWSConv2d.from_conv(conv, kernels=2, alpha=[1.0, 1.0])
    with pytest.raises(ConfigError, match=">= 0"):
        GDWSConv2d.from_conv(conv, kernels=2, alpha=[1.0, -1.0, 1.0])
    with pytest.raises(ConfigError, match="at least one kernel"):
        GDWSConv2d(3, 2, 3, [0, 0, 0])
    with pytest.raises(ConfigError, match="unknown GDWS form"):
        GDWSConv2d(3, 2, 3, [1, 1, 1], form="fast")


def test_weighted_allocation_follows_alpha():
    conv = _conv(c=4, m=6, k=3, seed=9)
    # a channel with alpha 0 costs nothing to drop; one with a huge alpha keeps its full rank first
    layer = GDWSConv2d.from_conv(conv, kernels=9, alpha=[0.0, 1e6, 1.0, 1.0])
    assert layer.g[0] == 0 and layer.g[1] == 6


def test_state_dict_and_repr():
    layer = GDWSConv2d.from_conv(_conv(c=3, m=4, bias=True), [1, 0, 2])
    assert set(layer.state_dict()) == {"dw_weight", "pw_weight", "bias"}  # index is rebuilt from g
    assert layer.dw_weight.shape == (3, 1, 3, 3) and layer.pw_weight.shape == (4, 3, 1, 1)
    assert layer.index.tolist() == [0, 2, 2]
    assert "G=3" in repr(layer) and "form=gather" in repr(layer)
    assert layer.num_params() == 3 * 9 + 4 * 3 + 4
