"""Low-rank layers W = U S Vᵀ. Independent references: numpy (products, SVD, Eckart–Young error, condition
numbers), the dense nn.Linear / nn.Conv2d / F.conv2d they replace, torch's FlopCounterMode for MACs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgesep.errors import ConfigError, ShapeMismatchError
from edgesep.layers.lowrank import (
    LowRankConv2d,
    LowRankLinear,
    lowrank_layer_stats,
    rank_from_ratio,
    sign_fixed_qr,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("m", "n", "ratio", "rank"),
    [(120, 400, 0.5, 60), (120, 400, 0.8, 24), (84, 120, 0.8, 17), (6, 25, 0.5, 3), (6, 25, 0.8, 2), (10, 10, 0.8, 2),
     (10, 10, 0.0, 10), (5, 7, 0.99, 1)],
)  # fmt: skip
def test_rank_from_ratio(m, n, ratio, rank):
    assert rank_from_ratio(m, n, ratio) == rank == max(1, math.ceil(round((1 - ratio) * min(m, n), 9)))


@pytest.mark.parametrize(
    ("kw", "match"),
    [({}, "exactly one"), ({"rank_ratio": 0.5, "rank": 3}, "exactly one"), ({"rank_ratio": 1.0}, r"\[0, 1\)"),
     ({"rank": 0}, "rank must be"), ({"rank": 11}, "rank must be")],
)  # fmt: skip
def test_rank_errors_are_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        rank_from_ratio(10, 12, **kw)


def test_init_is_orthonormal_and_to_dense_is_numpy_usvt():
    torch.manual_seed(0)
    layer = LowRankLinear(40, 30, rank=12)
    u, s, v = (p.detach().numpy().astype(np.float64) for p in (layer.U, layer.S, layer.V))
    np.testing.assert_allclose(u.T @ u, np.eye(12), atol=1e-6)
    np.testing.assert_allclose(v.T @ v, np.eye(12), atol=1e-6)
    with torch.no_grad():
        layer.S.normal_()  # a full S, not the diagonal of the SVD init
    s = layer.S.detach().numpy().astype(np.float64)
    np.testing.assert_allclose(layer.to_dense().detach().numpy(), u @ s @ v.T, rtol=1e-5, atol=1e-6)
    x = torch.randn(5, 40)
    ref = x.numpy().astype(np.float64) @ (u @ s @ v.T).T + layer.bias.detach().numpy()
    np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=1e-4, atol=1e-5)


def test_from_dense_full_rank_reproduces_the_linear_layer():
    torch.manual_seed(1)
    lin = nn.Linear(24, 16).double()
    low = LowRankLinear.from_dense(lin, rank=16)
    x = torch.randn(7, 24, dtype=torch.float64)
    torch.testing.assert_close(low(x), lin(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(low.to_dense(), lin.weight, rtol=1e-12, atol=1e-12)
    assert low.approx_error < 1e-13
    lin32 = nn.Linear(24, 16)
    torch.testing.assert_close(LowRankLinear.from_dense(lin32, rank=16)(x.float()), lin32(x.float()))


def test_truncation_error_is_eckart_young():
    torch.manual_seed(2)
    lin = nn.Linear(50, 30)
    low = LowRankLinear.from_dense(lin, rank_ratio=0.5)
    assert low.rank == 15
    sv = np.linalg.svd(lin.weight.detach().numpy().astype(np.float64), compute_uv=False)
    expected = math.sqrt((sv[15:] ** 2).sum() / (sv**2).sum())
    assert low.approx_error == pytest.approx(expected, rel=1e-6)
    w_err = np.linalg.norm(low.to_dense().detach().numpy() - lin.weight.detach().numpy()) / np.linalg.norm(sv)
    assert w_err == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "bias", "kernel"),
    [(1, 0, 1, True, 3), (2, 1, 1, False, 3), (1, 2, 2, True, (3, 5)), ((2, 1), (1, 2), 1, True, 5)],
)
def test_conv_forward_equals_conv2d_with_the_dense_kernel(stride, padding, dilation, bias, kernel):
    torch.manual_seed(3)
    conv = LowRankConv2d(4, 6, kernel, stride, padding, dilation, rank=3, bias=bias).double()
    with torch.no_grad():
        conv.S.normal_()
    x = torch.randn(2, 4, 13, 11, dtype=torch.float64)
    b = conv.bias if bias else None
    ref = F.conv2d(x, conv.to_dense(), b, conv.stride, conv.padding, conv.dilation)
    torch.testing.assert_close(conv(x), ref, rtol=1e-10, atol=1e-10)
    # the kernel is the row-major reshape of U S Vᵀ, checked in numpy
    u, s, v = (p.detach().numpy() for p in (conv.U, conv.S, conv.V))
    np.testing.assert_allclose(conv.to_dense().detach().numpy(), (u @ s @ v.T).reshape(conv.to_dense().shape))


def test_conv_from_dense_full_rank_reproduces_nn_conv2d():
    torch.manual_seed(4)
    dense = nn.Conv2d(3, 8, 3, stride=2, padding=1, dilation=1).double()
    low = LowRankConv2d.from_dense(dense, rank=8)  # min(8, 27) = 8: full rank
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(low(x), dense(x), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(low.to_conv()(x), dense(x), rtol=1e-11, atol=1e-11)
    with pytest.raises(ConfigError, match="groups=1"):
        LowRankConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), rank=2)


def test_macs_and_params_match_the_flop_counter():
    lin = LowRankLinear(400, 120, rank_ratio=0.5)
    with FlopCounterMode(display=False) as fc:
        lin(torch.zeros(1, 400))
    # FlopCounterMode also counts the batch-independent U @ S preparation (m r^2), which ONNX folds away
    assert fc.get_total_flops() // 2 == lin.macs() + 120 * 60 * 60
    assert lin.macs() == 60 * (400 + 120) and lin.num_params() == 120 * 60 + 60 * 60 + 400 * 60 + 120
    conv = LowRankConv2d(6, 16, 5, rank=8)
    with FlopCounterMode(display=False) as fc:
        conv(torch.zeros(1, 6, 14, 14))
    assert fc.get_total_flops() // 2 == conv.macs((14, 14)) + 16 * 8 * 8
    assert conv.dense_macs((14, 14)) == 16 * 150 * 100


def test_condition_numbers_against_numpy_also_off_the_manifold():
    torch.manual_seed(5)
    layer = LowRankLinear(20, 15, rank=6)
    with torch.no_grad():
        layer.S.copy_(torch.randn(6, 6))
        layer.U.add_(0.3 * torch.randn(15, 6))  # U no longer orthonormal (as after plain SGD)
    w = layer.to_dense().detach().numpy().astype(np.float64)
    sv = np.linalg.svd(w, compute_uv=False)[:6]
    assert layer.condition_number() == pytest.approx(sv[0] / sv[-1], rel=1e-4)
    assert layer.spectral_norm() == pytest.approx(sv[0], rel=1e-5)
    s_sv = np.linalg.svd(layer.S.detach().numpy().astype(np.float64), compute_uv=False)
    assert layer.cond_s() == pytest.approx(s_sv[0] / s_sv[-1], rel=1e-6)
    row = lowrank_layer_stats(nn.Sequential(layer))[0]
    assert row["rank"] == 6 and row["shape"] == [15, 20] and row["orth_error_U"] > 0.1


def test_sign_fixed_qr_is_orthonormal_with_positive_r_diagonal():
    x = torch.randn(30, 7, dtype=torch.float64)
    q = sign_fixed_qr(x)
    torch.testing.assert_close(q.T @ q, torch.eye(7, dtype=torch.float64))
    r = q.T @ x  # x = q r with r upper triangular and a positive diagonal
    assert torch.all(torch.diagonal(r) > 0)
    torch.testing.assert_close(torch.tril(r, -1), torch.zeros(7, 7, dtype=torch.float64), atol=1e-12, rtol=0)


def test_bad_input_shape_is_a_shape_error():
    with pytest.raises(ShapeMismatchError, match=r"\(\.\.\., 8\)"):
        LowRankLinear(8, 4, rank=2)(torch.zeros(3, 9))
