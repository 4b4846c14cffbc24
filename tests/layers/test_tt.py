"""Tensor-train layers: TT-SVD, TTLinear, TTConv2d, conversion.

Independent references: tensorly's ``tt_matrix_to_tensor`` and ``tensor_train_matrix`` (TT-SVD), a numpy einsum
reconstruction, numpy SVDs of the unfoldings (the TT-SVD error bounds), the dense layer (``x @ W.T``,
``F.conv2d`` with the dense kernel), tensorly-torch's BlockTT (parameters, matrix, forward), torch's
FlopCounterMode (MACs), torch.autograd.gradcheck, ONNX Runtime (exported layers).
"""

from __future__ import annotations

import itertools
import math
import string

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from edgesep.errors import ConfigError, ShapeMismatchError  # noqa: E402
from edgesep.layers.tt import (  # noqa: E402
    TTConv2d,
    TTLinear,
    apply_tt_structure,
    convert_to_tt,
    tt_conv_macs,
    tt_macs,
    tt_matrix_dense,
    tt_modes,
    tt_params,
    tt_svd,
)

tl = pytest.importorskip("tensorly")


def _np_tt_dense(cores: list[np.ndarray]) -> np.ndarray:
    """Independent reconstruction: one einsum over all cores, then (m_1..m_d, n_1..n_d) -> (M, N)."""
    d = len(cores)
    letters = iter(string.ascii_letters)
    r = [next(letters) for _ in range(d + 1)]
    m = [next(letters) for _ in range(d)]
    n = [next(letters) for _ in range(d)]
    spec = ",".join(f"{r[k]}{m[k]}{n[k]}{r[k + 1]}" for k in range(d)) + "->" + r[0] + "".join(m) + "".join(n) + r[d]
    t = np.einsum(spec, *cores)[0, ..., 0]
    M = math.prod(c.shape[1] for c in cores)
    return t.reshape(M, -1)


def _random_cores(out_modes, in_modes, ranks, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    full = (1, *ranks, 1)
    pairs = enumerate(zip(out_modes, in_modes, strict=True))
    return [rng.standard_normal((full[k], m, n, full[k + 1])) for k, (m, n) in pairs]


# ----------------------------------------------------------------------------------------------------------------
# reconstruction and TT-SVD


@pytest.mark.parametrize(
    ("out_modes", "in_modes", "ranks"),
    [((3,), (5,), ()), ((2, 3), (4, 5), (3,)), ((2, 3, 4), (3, 2, 2), (4, 5)), ((4, 1, 2, 3), (2, 3, 1, 2), (2, 3, 2))],
)
def test_tt_matrix_dense_matches_tensorly_and_numpy_einsum(out_modes, in_modes, ranks):
    from tensorly.tt_matrix import tt_matrix_to_tensor

    cores = _random_cores(out_modes, in_modes, ranks)
    got = tt_matrix_dense([torch.from_numpy(c) for c in cores]).numpy()
    ref_tl = np.asarray(tt_matrix_to_tensor(cores)).reshape(math.prod(out_modes), math.prod(in_modes))
    np.testing.assert_allclose(got, ref_tl, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, _np_tt_dense(cores), rtol=1e-12, atol=1e-12)
    layer = TTLinear(in_modes, out_modes, ranks if ranks else 1).double()
    with torch.no_grad():
        for p, c in zip(layer.cores, cores, strict=True):
            p.copy_(torch.from_numpy(c))
    np.testing.assert_allclose(layer.to_dense().detach().numpy(), ref_tl, rtol=1e-12, atol=1e-12)


def _unfolding_tails(w: np.ndarray, out_modes, in_modes, ranks) -> list[float]:
    """Best rank-r_k approximation error of each TT unfolding of the (m_1 n_1, ..., m_d n_d) tensor (numpy SVD)."""
    d = len(out_modes)
    t = w.reshape(*out_modes, *in_modes).transpose([i for k in range(d) for i in (k, d + k)])
    sizes = [m * n for m, n in zip(out_modes, in_modes, strict=True)]
    tails = []
    for k in range(1, d):
        s = np.linalg.svd(t.reshape(math.prod(sizes[:k]), -1), compute_uv=False)
        tails.append(float(np.sqrt(np.sum(s[ranks[k - 1] :] ** 2))))
    return tails


def test_tt_svd_is_exact_at_full_rank_numpy_and_torch():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((24, 30))
    cores, err = tt_svd(w, (2, 3, 4), (5, 3, 2))
    assert isinstance(cores[0], np.ndarray) and err < 1e-13
    np.testing.assert_allclose(_np_tt_dense(cores), w, atol=1e-12)
    wt = torch.from_numpy(w).float()
    cores_t, err_t = tt_svd(wt, (2, 3, 4), (5, 3, 2))
    assert all(isinstance(c, torch.Tensor) and c.dtype == torch.float32 for c in cores_t) and err_t < 1e-6
    # the exact ranks are the unfolding ranks: (1, min(10, 72), min(10*9, 8), 1)
    assert [int(c.shape[3]) for c in cores_t] == [10, 8, 1]


def test_tt_svd_error_is_monotone_within_the_oseledets_bounds_and_matches_tensorly():
    from tensorly.decomposition import tensor_train_matrix
    from tensorly.tt_matrix import tt_matrix_to_tensor

    rng = np.random.default_rng(2)
    out_modes, in_modes = (4, 4, 4), (3, 4, 5)
    # a matrix with decaying structure, so truncation errors differ from rank to rank
    w = _np_tt_dense(_random_cores(out_modes, in_modes, (6, 6), seed=3)) + 0.05 * rng.standard_normal((64, 60))
    norm = np.linalg.norm(w)
    errs = []
    for r in (1, 2, 3, 4, 6, 8):
        cores, err = tt_svd(w, out_modes, in_modes, r)
        np.testing.assert_allclose(err, np.linalg.norm(w - _np_tt_dense(cores)) / norm, rtol=1e-10)
        tails = _unfolding_tails(w, out_modes, in_modes, [int(c.shape[3]) for c in cores[:-1]])
        # Oseledets (2011), Thm 2.2: max_k eps_k <= ||W - TT|| <= sqrt(sum_k eps_k^2)
        assert max(tails) <= err * norm * (1 + 1e-9)
        assert err * norm <= math.sqrt(sum(t**2 for t in tails)) * (1 + 1e-9)
        ref = tensor_train_matrix(w.reshape(*out_modes, *in_modes), rank=[1, r, r, 1])
        ref_dense = np.asarray(tt_matrix_to_tensor(ref.factors)).reshape(w.shape)
        np.testing.assert_allclose(err, np.linalg.norm(w - ref_dense) / norm, rtol=1e-6, atol=1e-12)
        errs.append(err)
    assert all(a > b for a, b in itertools.pairwise(errs)), errs
    assert tt_svd(w, out_modes, in_modes, 20)[1] < 1e-12  # >= both unfolding ranks (12, 20): exact


def test_tt_svd_tolerance_bounds_the_error_with_fewer_parameters():
    rng = np.random.default_rng(4)
    w = _np_tt_dense(_random_cores((4, 4, 4), (4, 4, 4), (3, 3), seed=5)) + 1e-3 * rng.standard_normal((64, 64))
    for tol in (0.3, 0.1, 0.01):
        cores, err = tt_svd(w, (4, 4, 4), (4, 4, 4), tol=tol)
        assert err <= tol
    cores, err = tt_svd(w, (4, 4, 4), (4, 4, 4), tol=0.01)
    assert [int(c.shape[3]) for c in cores] == [3, 3, 1]  # the noise is below the tolerance: the true ranks
    cores, err = tt_svd(w, (4, 4, 4), (4, 4, 4), 2, tol=0.01)  # a rank cap wins over the tolerance
    assert [int(c.shape[3]) for c in cores] == [2, 2, 1] and err > 0.01


def test_tt_svd_rejects_bad_shapes_and_options():
    w = np.zeros((12, 10))
    with pytest.raises(ShapeMismatchError, match="does not factor"):
        tt_svd(w, (3, 4), (2, 4))
    with pytest.raises(ShapeMismatchError, match="same number of modes"):
        tt_svd(w, (3, 4), (10,))
    with pytest.raises(ConfigError, match="boundary ranks"):
        tt_svd(w, (3, 4), (2, 5), (2, 3, 1))
    with pytest.raises(ConfigError, match="tol"):
        tt_svd(w, (3, 4), (2, 5), tol=-1.0)
    assert tt_svd(w, (3, 4), (2, 5), 2)[1] == 0.0  # a zero matrix: zero error, no division by zero


def test_tt_modes_are_balanced_factorizations():
    assert tt_modes(784, 4) == (4, 4, 7, 7)
    assert tt_modes(64, 3) == (4, 4, 4) and tt_modes(128, 3) == (4, 4, 8)
    assert tt_modes(13, 2) == (1, 13)
    for n, d in ((1024, 4), (1536, 4), (96, 3)):
        assert math.prod(tt_modes(n, d)) == n and len(tt_modes(n, d)) == d


# ----------------------------------------------------------------------------------------------------------------
# TTLinear


def _layer(in_modes=(4, 7, 4, 7), out_modes=(4, 8, 8, 4), ranks=(3, 5, 2), bias=True, seed=0) -> TTLinear:
    torch.manual_seed(seed)
    return TTLinear(in_modes, out_modes, ranks, bias=bias).double()


@pytest.mark.parametrize(
    ("in_modes", "out_modes", "ranks"),
    [((4, 7, 4, 7), (4, 8, 8, 4), (3, 5, 2)), ((5,), (3,), 1), ((2, 3), (3, 2), 4), ((3, 1, 4), (2, 5, 1), (2, 2))],
)
def test_ttlinear_forward_equals_the_dense_layer(in_modes, out_modes, ranks):
    layer = _layer(in_modes, out_modes, ranks)
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    ref = x @ layer.to_dense().T + layer.bias
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.to_linear().double()(x), ref, rtol=1e-12, atol=1e-12)
    # un-flattened inputs (an image) are flattened row-major
    if layer.in_features == 784:
        img = x.reshape(5, 1, 28, 28)
        torch.testing.assert_close(layer(img), ref, rtol=1e-12, atol=1e-12)


def test_ttlinear_from_dense_is_exact_at_full_rank_and_keeps_the_bias():
    torch.manual_seed(0)
    lin = nn.Linear(60, 24).double()
    t = TTLinear.from_dense(lin, (3, 4, 5), (2, 3, 4))
    assert t.approx_error < 1e-13 and t.ranks == (1, 6, 20, 1)
    torch.testing.assert_close(t.to_dense(), lin.weight, rtol=1e-12, atol=1e-12)
    x = torch.randn(7, 60, dtype=torch.float64)
    torch.testing.assert_close(t(x), lin(x), rtol=1e-12, atol=1e-12)
    low = TTLinear.from_dense(lin, (3, 4, 5), (2, 3, 4), 2)
    assert low.ranks == (1, 2, 2, 1) and 0 < low.approx_error < 1
    rel = (low.to_dense() - lin.weight).norm() / lin.weight.norm()
    assert rel.item() == pytest.approx(low.approx_error, rel=1e-9)


def test_ttlinear_counts_match_closed_forms_and_the_flop_counter():
    layer = TTLinear((4, 7, 4, 7), (4, 8, 8, 4), 8)
    r = (1, 8, 8, 8, 1)
    closed = 1 * 4 * 4 * 8 + 8 * 8 * 7 * 8 + 8 * 8 * 4 * 8 + 8 * 4 * 7 * 1
    assert tt_params((4, 8, 8, 4), (4, 7, 4, 7), r) == closed
    assert layer.num_params() == closed + 1024 == sum(p.numel() for p in layer.parameters())
    assert layer.dense_params() == 784 * 1024 + 1024
    x = torch.randn(3, 784)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    # the counter also sees nothing else: the forward is matmuls only (the core reshapes are free)
    assert counter.get_total_flops() // 2 == 3 * layer.macs() == 3 * tt_macs((4, 8, 8, 4), (4, 7, 4, 7), r)
    assert "ranks=(1, 8, 8, 8, 1)" in repr(layer) and f"params={closed + 1024}" in repr(layer)


def test_ttlinear_matches_tensorly_torch_blocktt_params_matrix_and_forward():
    tltorch = pytest.importorskip("tltorch")
    in_modes, out_modes, ranks = (4, 7, 4, 7), (5, 5, 5, 5), (1, 6, 8, 6, 1)
    ours = TTLinear(in_modes, out_modes, ranks).double()
    peer = tltorch.FactorizedLinear(in_modes, out_modes, factorization="blocktt", rank=list(ranks)).double()
    peer_cores = [p for n, p in peer.named_parameters() if n.startswith("weight.")]
    assert [tuple(p.shape) for p in peer_cores] == [tuple(c.shape) for c in ours.cores]
    assert sum(p.numel() for p in peer.parameters()) == ours.num_params()
    with torch.no_grad():
        for p, c in zip(peer_cores, ours.cores, strict=True):
            p.copy_(c)
        peer.bias.copy_(ours.bias)
    torch.testing.assert_close(peer.weight.to_matrix(), ours.to_dense(), rtol=1e-12, atol=1e-12)
    x = torch.randn(4, 784, dtype=torch.float64)
    torch.testing.assert_close(peer(x), ours(x), rtol=1e-10, atol=1e-10)


def test_ttlinear_gradcheck_float64():
    layer = TTLinear((2, 3, 2), (3, 2, 2), (2, 3)).double()
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    cores = [c.detach().clone().requires_grad_(True) for c in layer.cores]
    bias = layer.bias.detach().clone().requires_grad_(True)
    from edgesep.layers.tt import tt_linear

    assert torch.autograd.gradcheck(lambda x, b, *cs: tt_linear(x, list(cs), b), (x, bias, *cores))


def test_ttlinear_rejects_bad_inputs():
    with pytest.raises(ShapeMismatchError, match="same number of modes"):
        TTLinear((4, 7), (4, 8, 8), 2)
    with pytest.raises(ConfigError, match="entries"):
        TTLinear((4, 7, 4), (4, 8, 8), (2, 2, 2))
    with pytest.raises(ShapeMismatchError, match="784 input features"):
        TTLinear((4, 7, 4, 7), (4, 8, 8, 4), 2)(torch.randn(2, 100))
    with pytest.raises(ShapeMismatchError, match="does not match"):
        TTLinear.from_dense(nn.Linear(10, 12), (2, 5), (3, 3))


# ----------------------------------------------------------------------------------------------------------------
# TTConv2d


def _conv(in_modes=(2, 3), out_modes=(3, 2), k=3, ranks=(4, 3), seed=0, **kw) -> TTConv2d:
    torch.manual_seed(seed)
    return TTConv2d(in_modes, out_modes, k, ranks, **kw).double()


@pytest.mark.parametrize(
    ("k", "stride", "padding", "dilation", "bias"),
    [
        (3, 1, 1, 1, True),
        (3, 2, 0, 1, False),
        ((3, 1), (2, 1), (1, 0), 1, True),
        (3, 1, 2, 2, True),
        (1, 1, 0, 1, True),
    ],
)
def test_ttconv_both_forwards_equal_conv2d_with_the_dense_kernel(k, stride, padding, dilation, bias):
    layer = _conv((2, 3, 2), (3, 2, 2), k, (5, 4, 3), stride=stride, padding=padding, dilation=dilation, bias=bias)
    x = torch.randn(2, 12, 9, 8, dtype=torch.float64)
    ref = F.conv2d(x, layer.to_dense(), layer.bias, stride, padding, dilation)
    outs = {}
    for mode in ("reconstruct", "factorized", "auto"):
        layer.forward_mode = mode
        outs[mode] = layer(x)
        torch.testing.assert_close(outs[mode], ref, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(outs["reconstruct"], outs["factorized"], rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(layer.to_conv().double()(x), ref, rtol=1e-11, atol=1e-11)
    assert tuple(ref.shape[-2:]) == layer.out_hw((9, 8))


def test_ttconv_kernel_matches_a_numpy_einsum_of_the_cores():
    layer = _conv((2, 3), (3, 2), 3, (4, 3))
    s = layer.spatial.detach().numpy()
    g1, g2 = (c.detach().numpy() for c in layer.cores)
    # K[o1 o2, c1 c2, y, x] = S[y, x, a] G1[a, o1, c1, b] G2[b, o2, c2, 1]
    k = np.einsum("yxa,aocb,bpde->opcdyx", s, g1, g2[..., :1]).reshape(6, 6, 3, 3)
    np.testing.assert_allclose(layer.to_dense().detach().numpy(), k, rtol=1e-12, atol=1e-12)


def test_ttconv_from_dense_is_exact_at_full_rank_and_monotone_below():
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 12, 3, stride=2, padding=1, bias=True).double()
    full = TTConv2d.from_dense(conv, (4, 4), (3, 4))
    assert full.approx_error < 1e-12 and full.ranks[-1] == 1
    torch.testing.assert_close(full.to_dense(), conv.weight, rtol=1e-11, atol=1e-11)
    x = torch.randn(2, 16, 7, 7, dtype=torch.float64)
    for mode in ("reconstruct", "factorized"):
        full.forward_mode = mode
        torch.testing.assert_close(full(x), conv(x), rtol=1e-10, atol=1e-10)
    errs = [TTConv2d.from_dense(conv, (4, 4), (3, 4), r).approx_error for r in (1, 2, 4, 8)]
    assert all(a > b for a, b in itertools.pairwise(errs)), errs
    with pytest.raises(ConfigError, match="groups=1"):
        TTConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), (2, 2), (2, 2))


def test_ttconv_counts_match_closed_forms_the_flop_counter_and_tltorch_blocktt():
    tltorch = pytest.importorskip("tltorch")
    layer = TTConv2d((4, 4, 4), (4, 8, 4), 3, (16, 16, 16, 1), padding=1, bias=False)
    closed = 9 * 16 + 16 * 4 * 4 * 16 + 16 * 8 * 4 * 16 + 16 * 4 * 4 * 1  # the paper's tt_conv2.1
    assert layer.num_params() == closed == sum(p.numel() for p in layer.parameters())
    assert layer.dense_params() == 128 * 64 * 9
    # the same family in tensorly-torch: a BlockTT of the (C_out, kh kw C_in) matrix, modes ((1, m..), (9, n..))
    peer = tltorch.BlockTT.new(((1, 4, 8, 4), (9, 4, 4, 4)), rank=[1, 16, 16, 16, 1])
    assert sum(f.numel() for f in peer.factors) == closed
    with torch.no_grad():
        peer.factors[0].copy_(layer.spatial.reshape(1, 1, 9, 16))
        for f, c in zip(list(peer.factors)[1:], layer.cores, strict=True):
            f.copy_(c)
    kernel = layer.to_dense().permute(0, 2, 3, 1).reshape(128, -1)  # (C_out, C_in, y, x) -> (C_out, y x C_in)
    torch.testing.assert_close(peer.to_matrix(), kernel, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 64, 8, 8)
    for mode in ("reconstruct", "factorized"):
        layer.forward_mode = mode
        with FlopCounterMode(display=False) as counter:
            layer(x)
        counted = counter.get_total_flops() // 2
        if mode == "factorized":
            assert counted == 2 * layer.macs((8, 8), mode)
        else:  # the dense conv plus the kernel build (once per call)
            assert counted >= 2 * layer.macs((8, 8), mode) == 2 * 128 * 64 * 9 * 64
    assert tt_conv_macs((4, 8, 4), (4, 4, 4), layer.ranks, (3, 3), (8, 8), "reconstruct") == 128 * 64 * 9 * 64


def test_ttconv_gradcheck_float64_both_forwards():
    from edgesep.layers.tt import tt_conv2d

    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    s = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    g1 = torch.randn(2, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    g2 = torch.randn(3, 3, 2, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for mode in ("reconstruct", "factorized"):
        fn = lambda x, s, g1, g2, b, mode=mode: tt_conv2d(x, s, [g1, g2], b, 2, 1, 1, mode)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, s, g1, g2, b))


def test_ttconv_rejects_bad_options():
    with pytest.raises(ConfigError, match="forward"):
        TTConv2d((2, 2), (2, 2), 3, 2, forward="fast")
    with pytest.raises(ConfigError, match="last rank"):
        TTConv2d((2, 2), (2, 2), 3, (2, 2, 2))
    with pytest.raises(ShapeMismatchError, match="expects input"):
        TTConv2d((2, 2), (2, 2), 3, 2)(torch.randn(1, 3, 5, 5))


def test_ttlayers_export_to_onnx_with_standard_ops_and_match_onnx_runtime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxsim")
    from edgesep.export._onnx import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(
        TTConv2d((2, 2), (2, 4), 3, (4, 4), padding=1),
        nn.ReLU(),
        nn.Flatten(),
        TTLinear((8, 4, 4, 4), (4, 4, 4, 4), 4),
    ).eval()
    rep = export_onnx(model, (4, 8, 8), tmp_path / "tt.onnx")
    ops = set(rep.census_after)
    assert ops <= {"Conv", "MatMul", "Reshape", "Transpose", "Add", "Relu", "Flatten"}, ops
    assert rep.largest_initializer_elems <= rep.max_param_elems  # cores only: nothing re-densified
    x = torch.rand(3, 4, 8, 8)
    with torch.no_grad():
        ref = model(x).numpy()  # eager: "auto" reconstructs the kernel; the graph runs the factorized chain
    sess = ort.InferenceSession(str(tmp_path / "tt.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# conversion


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.fc = nn.Linear(16 * 4 * 4, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.out(F.relu(self.fc(x)))


def test_convert_to_tt_at_full_rank_keeps_the_function_and_the_structure_rebuilds():
    torch.manual_seed(0)
    net = _Net().double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    ref = net(x)
    conv, transforms = convert_to_tt(net, rank=10_000, d=2, min_features=16)
    spec = transforms[0]
    assert spec["kind"] == "tt" and set(spec["layers"]) == {"conv2", "fc"}  # conv1 (3 channels) and out stay
    assert isinstance(conv.conv2, TTConv2d) and isinstance(conv.fc, TTLinear) and type(conv.out) is nn.Linear
    assert all(s["approx_error"] < 1e-12 for s in spec["layers"].values())
    torch.testing.assert_close(conv(x), ref, rtol=1e-10, atol=1e-10)
    rebuilt = apply_tt_structure(_Net().double(), spec)
    rebuilt.load_state_dict(conv.state_dict())  # strict: the same parameter names and shapes
    torch.testing.assert_close(rebuilt.eval()(x), ref, rtol=1e-10, atol=1e-10)


def test_convert_to_tt_low_rank_selection_and_errors():
    torch.manual_seed(0)
    net, transforms = convert_to_tt(_Net(), rank=2, d=2, min_features=16, layers=["fc"])
    (name,) = transforms[0]["layers"]
    assert name == "fc" and net.fc.ranks == (1, 2, 1) and transforms[0]["layers"]["fc"]["approx_error"] > 0
    with pytest.raises(ConfigError, match=r"no nn\.Linear"):
        convert_to_tt(_Net(), rank=2, min_features=1000)
    with pytest.raises(ConfigError, match="rank"):
        convert_to_tt(_Net(), rank=0)


def test_tt_converter_is_registered_with_convert_model():
    convert = pytest.importorskip("edgesep.convert")
    assert "tt" in convert.list_converters()
    torch.manual_seed(0)
    net = _Net()
    conv, transforms = convert.convert_model(net, "tt", rank=4, d=2, min_features=16)
    assert isinstance(conv.fc, TTLinear) and type(net.fc) is nn.Linear  # the input model is untouched
    from edgesep.runs import apply_transforms

    rebuilt = apply_transforms(_Net(), transforms)
    rebuilt.load_state_dict(conv.state_dict())
