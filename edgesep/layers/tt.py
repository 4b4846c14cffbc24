"""Tensor-train (TT) layers: ``TTLinear`` (Novikov et al. 2015) and ``TTConv2d`` (Garipov et al. 2016).

**TT-matrix convention.** A weight W of shape (M, N), M = prod m_k, N = prod n_k, is stored as d cores
G_k of shape (r_{k-1}, m_k, n_k, r_k) with r_0 = r_d = 1 (the layout of tensorly's ``tensor_train_matrix`` and
tensorly-torch's ``BlockTT``)::

    W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] @ G_2[:, i_2, j_2, :] @ ... @ G_d[:, i_d, j_d, :]

with row-major multi-indices (PyTorch's ``reshape``): ``y = x @ W.T`` for x of shape (B, N).

**Forward without W.** ``tt_linear`` contracts the cores one at a time, last core first, exactly like the
Kronecker layer's mode products: at step k the state is (B, A, n_k r_k), one MatMul with the core reshaped to
(n_k r_k, r_{k-1} m_k) (weight on the right: per-channel INT8 scales land on the output axis), then the new axis
m_k is rotated to the front. Only Reshape / Transpose / MatMul: the ONNX graph keeps the cores.

**TT convolution** (Garipov et al., "Ultimate tensorization"). The kernel (C_out, C_in, kh, kw) with
C_in = prod n_k, C_out = prod m_k is a TT-matrix with one extra leading core, the spatial core S of shape
(kh, kw, r_0) (a TT-matrix core (1, 1, kh kw, r_0))::

    K[(o_1..o_d), (c_1..c_d), y, x] = S[y, x, :] @ G_1[:, o_1, c_1, :] @ ... @ G_d[:, o_d, c_d, :]

channel cores G_k (r_{k-1}, m_k, n_k, r_k), r_d = 1 (the paper's ranks list is (r_0, ..., r_d)). Two forwards:

- ``"reconstruct"``: build the kernel, then one ``F.conv2d`` (storage savings only, as the paper's code
  ``tt_conv_full``);
- ``"factorized"``: a chain of standard ops: one Conv with r_0 filters of shape (kh, kw) over every input channel
  separately, then d MatMuls over the channel cores in channel-last layout (1x1 convolutions). Its MACs are
  ``TTConv2d.macs("factorized")``; it is faster than the dense conv only at low ranks (measured in
  benchmarks/bench_tt.py).
- ``"auto"`` (the module default): reconstruct in eager mode (fast training on CPU: one dense conv), factorized
  when torch is tracing (torch.export, the ONNX exporter), so an exported graph stores the cores only and is not
  re-densified by constant folding.

**TT-SVD** (Oseledets 2011): ``tt_svd`` splits a dense matrix into cores by d - 1 truncated SVDs of successive
unfoldings, with given maximal ranks and/or a relative tolerance eps (each SVD truncated at
eps / sqrt(d - 1) * ||W||_F, so ||W - TT||_F <= eps ||W||_F).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgesep.errors import ConfigError, ShapeMismatchError

__all__ = [
    "CONV_FORWARDS",
    "TTConv2d",
    "TTLinear",
    "apply_tt_structure",
    "convert_to_tt",
    "tt_conv2d",
    "tt_conv_kernel",
    "tt_conv_macs",
    "tt_linear",
    "tt_macs",
    "tt_matrix_dense",
    "tt_modes",
    "tt_params",
    "tt_svd",
]

CONV_FORWARDS = ("auto", "reconstruct", "factorized")


# ----------------------------------------------------------------------------------------------------------------
# shapes and ranks


def _as_modes(modes: int | Sequence[int], what: str) -> tuple[int, ...]:
    try:
        t = (int(modes),) if isinstance(modes, (int, np.integer)) else tuple(int(s) for s in modes)
    except (TypeError, ValueError):
        t = ()
    if not t or any(s < 1 for s in t):
        raise ShapeMismatchError(f"{what} must be a non-empty list of positive ints, got {modes!r}")
    return t


def _full_ranks(ranks: int | Sequence[int] | None, d: int, what: str = "ranks") -> tuple[int, ...] | None:
    """(r_0, ..., r_d) with r_0 = r_d = 1 from an int (every inner rank), d - 1 inner ranks or all d + 1."""
    if ranks is None:
        return None
    if isinstance(ranks, (int, np.integer)):
        inner = [int(ranks)] * (d - 1)
    else:
        r = [int(v) for v in ranks]
        if len(r) == d + 1:
            if r[0] != 1 or r[-1] != 1:
                raise ConfigError(f"{what} {tuple(r)}: the boundary ranks r_0 and r_d must be 1")
            inner = r[1:-1]
        elif len(r) == d - 1:
            inner = r
        else:
            raise ConfigError(
                f"{what} {tuple(r)} has {len(r)} entries; give one int, the {d - 1} inner ranks or all {d + 1} "
                "(with 1 at both ends)"
            )
    if any(v < 1 for v in inner):
        raise ConfigError(f"{what} must be >= 1, got {tuple(inner)}")
    return (1, *inner, 1)


def tt_modes(n: int, d: int) -> tuple[int, ...]:
    """d factors of n, as balanced as possible (largest factor smallest), ascending: (784, 4) -> (4, 4, 7, 7)."""
    best: tuple[int, ...] | None = None

    def rec(rest: int, k: int, lo: int, acc: tuple[int, ...]) -> None:
        nonlocal best
        if k == 1:
            if rest >= lo:
                cand = (*acc, rest)
                if best is None or (cand[-1], -cand[0]) < (best[-1], -best[0]):
                    best = cand
            return
        f = lo
        while f**k <= rest:
            if rest % f == 0:
                rec(rest // f, k - 1, f, (*acc, f))
            f += 1

    if n < 1 or d < 1:
        raise ConfigError(f"cannot factor {n} into {d} positive modes")
    rec(n, d, 1, ())
    assert best is not None  # (1, ..., 1, n) always exists
    return best


def tt_params(out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Closed form: sum_k r_{k-1} m_k n_k r_k (ranks (r_0..r_d) with r_0 = r_d = 1)."""
    return sum(ranks[k] * m * n * ranks[k + 1] for k, (m, n) in enumerate(zip(out_modes, in_modes, strict=True)))


def tt_macs(out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Exact multiply-accumulates per sample of ``tt_linear`` (last core first).

    Step k multiplies a (A_k, n_k r_k) state by the (n_k r_k, r_{k-1} m_k) core, A_k = prod m_{>k} prod n_{<k}.
    """
    d = len(out_modes)
    return sum(
        math.prod(out_modes[k + 1 :]) * math.prod(in_modes[:k]) * in_modes[k] * ranks[k + 1] * ranks[k] * out_modes[k]
        for k in range(d)
    )


# ----------------------------------------------------------------------------------------------------------------
# functional core


def _chain(lead: Tensor, cores: Sequence[Tensor]) -> Tensor:
    """Contract a leading (L, r_0) matrix with TT-matrix cores: returns (L, M, N) (row-major multi-indices)."""
    L = lead.shape[0]
    t = lead.reshape(L, 1, 1, lead.shape[1])  # (L, M_k, N_k, r_k) with M_0 = N_0 = 1
    for g in cores:
        r, m, n, s = g.shape
        Mk, Nk = t.shape[1], t.shape[2]
        t = (t.reshape(-1, r) @ g.reshape(r, m * n * s)).reshape(L, Mk, Nk, m, n, s)  # (L, M_k, N_k, m, n, s)
        t = t.permute(0, 1, 3, 2, 4, 5).reshape(L, Mk * m, Nk * n, s)  # -> (L, M_k m, N_k n, s)
    return t[..., 0]


def tt_matrix_dense(cores: Sequence[Tensor]) -> Tensor:
    """The dense (M, N) matrix of TT-matrix cores G_k (r_{k-1}, m_k, n_k, r_k) (row-major multi-indices)."""
    one = torch.ones(1, 1, dtype=cores[0].dtype, device=cores[0].device)
    return _chain(one, cores)[0]


def _check_cores(cores: Sequence[Tensor], first_rank: int | None = 1) -> None:
    if len(cores) < 1:
        raise ShapeMismatchError("a TT-matrix needs at least one core")
    for k, g in enumerate(cores):
        if g.dim() != 4:
            raise ShapeMismatchError(f"core {k} has shape {tuple(g.shape)}; TT-matrix cores are (r_prev, m, n, r)")
        if k > 0 and g.shape[0] != cores[k - 1].shape[3]:
            raise ShapeMismatchError(
                f"core {k - 1} ends with rank {cores[k - 1].shape[3]} but core {k} starts with rank {g.shape[0]}"
            )
    if first_rank is not None and cores[0].shape[0] != first_rank:
        raise ShapeMismatchError(f"the first core must start with rank {first_rank}, got {cores[0].shape[0]}")
    if cores[-1].shape[3] != 1:
        raise ShapeMismatchError(f"the last core must end with rank 1, got {cores[-1].shape[3]}")


def tt_linear(x: Tensor, cores: Sequence[Tensor], bias: Tensor | None = None) -> Tensor:
    """y = x @ W.T + bias for the TT-matrix W of ``cores``, without forming W.

    Args:
        x: (B, N), N = prod n_k.
        cores: G_k of shape (r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1.
        bias: None or (M,).
    Returns:
        (B, M), M = prod m_k.
    """
    B = x.shape[0]
    n_last = cores[-1].shape[2]
    y = x.reshape(B, -1, n_last)  # (B, N) -> (B, n_1..n_{d-1}, n_d r_d), r_d = 1
    for k in range(len(cores) - 1, -1, -1):
        r0, m, n, r1 = cores[k].shape
        w = cores[k].permute(2, 3, 0, 1).reshape(n * r1, r0 * m)  # (r_{k-1}, m_k, n_k, r_k) -> (n_k r_k, r_{k-1} m_k)
        # (B, A, n_k r_k) -> (B, A, r_{k-1} m_k), A = m_{k+1..d} n_1..n_{k-1}: weight on the right of the matmul
        y = torch.matmul(y, w)
        # (B, A, r_{k-1} m_k) -> (B, A r_{k-1}, m_k) -> (B, m_k, A r_{k-1}): rotate the new axis to the front
        y = y.reshape(B, -1, m).transpose(1, 2)
        if k > 0:
            # (B, m_k, A r_{k-1}) -> (B, m_k m_{k+1..d} n_1..n_{k-2}, n_{k-1} r_{k-1}): the next pair is last
            y = y.reshape(B, -1, cores[k - 1].shape[2] * r0)
    y = y.reshape(B, -1)  # (B, m_1, m_2..m_d, r_0 = 1) -> (B, M)
    return y if bias is None else y + bias


def tt_conv_kernel(spatial: Tensor, cores: Sequence[Tensor]) -> Tensor:
    """The dense kernel (C_out, C_in, kh, kw) of a TT convolution (spatial core (kh, kw, r_0), channel cores)."""
    kh, kw, r0 = spatial.shape
    t = _chain(spatial.reshape(kh * kw, r0), cores)  # (kh kw, C_out, C_in)
    return t.permute(1, 2, 0).reshape(t.shape[1], t.shape[2], kh, kw)  # -> (C_out, C_in, kh, kw)


def _pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    t = (int(v), int(v)) if isinstance(v, (int, np.integer)) else tuple(int(s) for s in v)
    if len(t) != 2:
        raise ConfigError(f"{what} must be an int or a pair of ints, got {v!r}")
    return t  # type: ignore[return-value]


def tt_conv2d(
    x: Tensor,
    spatial: Tensor,
    cores: Sequence[Tensor],
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    forward: str = "factorized",
) -> Tensor:
    """A TT convolution.

    Args:
        x: (B, C_in, H, W), C_in = prod n_k.
        spatial: (kh, kw, r_0).
        cores: channel cores G_k (r_{k-1}, m_k, n_k, r_k), r_d = 1.
        bias: None or (C_out,).
        stride, padding, dilation: as ``F.conv2d`` (ints or pairs; zero padding).
        forward: "reconstruct" (kernel, then F.conv2d) or "factorized" (Conv + MatMul chain, no kernel).
    Returns:
        (B, C_out, H_out, W_out).
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if forward == "reconstruct":
        return F.conv2d(x, tt_conv_kernel(spatial, cores), bias, stride, padding, dilation)
    if forward != "factorized":
        raise ConfigError(f"forward must be 'reconstruct' or 'factorized', got {forward!r}")
    B, C, H, W = x.shape
    n1 = cores[0].shape[2]
    # (B, C_in, H, W) -> (B C_in, 1, H, W): each input channel meets the r_0 spatial filters on its own
    z = F.conv2d(x.reshape(B * C, 1, H, W), spatial.permute(2, 0, 1).unsqueeze(1), None, stride, padding, dilation)
    Ho, Wo = z.shape[-2], z.shape[-1]
    P = Ho * Wo
    # (B C_in, r_0, Ho, Wo) -> (B, n_1, n_2..n_d r_0, P) -> (B, P, n_2..n_d r_0, n_1): channel-last, (r_0, n_1) last
    y = z.reshape(B, n1, -1, P).permute(0, 3, 2, 1)
    for k, g in enumerate(cores):
        rp, m, n, r = g.shape
        if k > 0:
            # (B, P, n_k, X) -> (B, P, X, n_k), X = n_{k+1..d} m_1..m_{k-1} r_{k-1}: the pair (r_{k-1}, n_k) last
            y = y.reshape(B, P, n, -1).transpose(2, 3)
        w = g.permute(0, 2, 1, 3).reshape(rp * n, m * r)  # (r_{k-1}, m_k, n_k, r_k) -> (r_{k-1} n_k, m_k r_k)
        # (B, P X', r_{k-1} n_k) -> (B, P X', m_k r_k): a 1x1 convolution in channel-last layout
        y = torch.matmul(y.reshape(B, -1, rp * n), w)
    # (B, P m_1..m_d r_d) -> (B, P, C_out) -> (B, C_out, P) -> (B, C_out, Ho, Wo)
    y = y.reshape(B, P, -1).transpose(1, 2).reshape(B, -1, Ho, Wo)
    return y if bias is None else y + bias.reshape(1, -1, 1, 1)


def tt_conv_macs(
    out_modes: Sequence[int],
    in_modes: Sequence[int],
    ranks: Sequence[int],
    kernel_size: Sequence[int],
    out_hw: Sequence[int],
    forward: str,
) -> int:
    """Exact multiply-accumulates per sample of a TT convolution with output size out_hw.

    ``ranks`` is (r_0, ..., r_d), r_d = 1. "reconstruct": the dense conv, C_out C_in kh kw P (the kernel build,
    once per call whatever the batch, is not counted). "factorized": the spatial conv, C_in r_0 kh kw P, plus
    step k, P prod n_{>k} prod m_{<k} (r_{k-1} n_k)(m_k r_k).
    """
    P = int(out_hw[0]) * int(out_hw[1])
    K = int(kernel_size[0]) * int(kernel_size[1])
    cin, cout = math.prod(in_modes), math.prod(out_modes)
    if forward == "reconstruct":
        return cout * cin * K * P
    macs = cin * ranks[0] * K * P
    for k in range(len(in_modes)):
        a = P * math.prod(in_modes[k + 1 :]) * math.prod(out_modes[:k])
        macs += a * ranks[k] * in_modes[k] * out_modes[k] * ranks[k + 1]
    return macs


# ----------------------------------------------------------------------------------------------------------------
# TT-SVD


def tt_svd(
    w: Any,
    out_modes: Sequence[int],
    in_modes: Sequence[int],
    ranks: int | Sequence[int] | None = None,
    *,
    tol: float | None = None,
) -> tuple[list[Any], float]:
    """TT-SVD of a dense matrix into TT-matrix cores.

    Args:
        w: (M, N) numpy array or torch tensor, M = prod out_modes, N = prod in_modes (row-major convention).
        out_modes, in_modes: (m_1..m_d), (n_1..n_d).
        ranks: maximal ranks: one int, the d - 1 inner ranks, or all d + 1; None: no cap.
        tol: relative tolerance eps: every SVD drops the smallest singular values whose root-sum-square is at most
            eps / sqrt(d - 1) ||W||_F, so the result has ||W - TT||_F <= eps ||W||_F. None: no tolerance.
            Without ranks and tol the decomposition is exact.
    Returns:
        (cores, relative error ||W - TT||_F / ||W||_F): cores G_k (r_{k-1}, m_k, n_k, r_k) of w's type and dtype
        (computed in float64).
    Raises:
        ShapeMismatchError: w does not have shape (prod out_modes, prod in_modes).
        ConfigError: bad ranks or tol.
    """
    out_modes, in_modes = _as_modes(out_modes, "out_modes"), _as_modes(in_modes, "in_modes")
    d = len(out_modes)
    if len(in_modes) != d:
        raise ShapeMismatchError(f"out_modes {out_modes} and in_modes {in_modes} need the same number of modes")
    is_torch = isinstance(w, Tensor)
    a = w.detach().cpu().to(torch.float64).numpy() if is_torch else np.asarray(w, dtype=np.float64)
    M, N = math.prod(out_modes), math.prod(in_modes)
    if a.shape != (M, N):
        raise ShapeMismatchError(
            f"weight of shape {tuple(a.shape)} does not factor into out_modes {out_modes} x in_modes {in_modes} "
            f"(needs ({M}, {N}))"
        )
    if tol is not None and not (tol >= 0 and math.isfinite(tol)):
        raise ConfigError(f"tol must be a finite number >= 0, got {tol!r}")
    cap = _full_ranks(ranks, d) or (1, *([None] * (d - 1)), 1)
    t = a.reshape(*out_modes, *in_modes)  # (M, N) -> (m_1..m_d, n_1..n_d)
    t = t.transpose([i for k in range(d) for i in (k, d + k)])  # -> (m_1, n_1, ..., m_d, n_d)
    norm = float(np.linalg.norm(a))
    delta = (tol / math.sqrt(d - 1)) * norm if (tol is not None and d > 1) else 0.0
    cores: list[np.ndarray] = []
    r_prev = 1
    c = t.reshape(out_modes[0] * in_modes[0], -1)  # (r_0 m_1 n_1, rest)
    for k in range(d - 1):
        u, s, vh = np.linalg.svd(c, full_matrices=False)
        r = len(s)
        if cap[k + 1] is not None:
            r = min(r, int(cap[k + 1]))
        if delta > 0:
            tail = np.sqrt(np.cumsum((s**2)[::-1]))[::-1]  # tail[j] = ||s[j:]||
            r = min(r, max(1, int(np.sum(tail > delta))))
        cores.append(u[:, :r].reshape(r_prev, out_modes[k], in_modes[k], r))
        # (r, rest) -> (r m_{k+1} n_{k+1}, rest')
        c = (s[:r, None] * vh[:r]).reshape(r * out_modes[k + 1] * in_modes[k + 1], -1)
        r_prev = r
    cores.append(c.reshape(r_prev, out_modes[-1], in_modes[-1], 1))
    dense = tt_matrix_dense([torch.from_numpy(np.ascontiguousarray(g)) for g in cores]).numpy()
    err = float(np.linalg.norm(a - dense) / norm) if norm > 0 else 0.0
    if is_torch:
        return [torch.from_numpy(np.ascontiguousarray(g)).to(w.dtype).to(w.device) for g in cores], err
    dtype = w.dtype if isinstance(w, np.ndarray) and np.issubdtype(w.dtype, np.floating) else np.float64
    return [np.ascontiguousarray(g, dtype=dtype) for g in cores], err


# ----------------------------------------------------------------------------------------------------------------
# modules


def _init_cores_(tensors: Sequence[Tensor], ranks: Sequence[int], fan_in: int) -> None:
    """i.i.d. normal entries scaled so the dense equivalent has nn.Linear's / nn.Conv2d's RMS, 1 / sqrt(3 fan_in).

    An entry of the dense weight is a sum over prod(inner ranks) products of one entry per core, so its variance is
    prod_k sigma_k^2 * prod(inner ranks); each core takes the same share.
    """
    target_var = 1.0 / (3.0 * fan_in)
    inner = math.prod(ranks)
    sigma = (target_var / inner) ** (0.5 / len(tensors))
    with torch.no_grad():
        for t in tensors:
            nn.init.normal_(t, 0.0, sigma)


@torch.no_grad()
def _cond(mat: Tensor) -> float:
    s = torch.linalg.svdvals(mat.detach().double())
    return (s[0] / s[-1]).item() if s[-1] > 0 else math.inf


class TTLinear(nn.Module):
    """A fully-connected layer whose weight (M, N) is a TT-matrix; never formed in the forward.

    Args:
        in_modes: (n_1, ..., n_d), N = prod n_k.
        out_modes: (m_1, ..., m_d), M = prod m_k; same length as in_modes.
        ranks: one int (every inner rank), the d - 1 inner ranks, or (1, r_1, ..., r_{d-1}, 1). Ranks above what
            the unfoldings allow are kept (redundant, as in published configurations); ``from_dense`` finds the
            smallest exact ones.
        bias: learn a bias (M,).
    Input (B, N) (or (B, ...) with N features, flattened); output (B, M).
    """

    def __init__(
        self, in_modes: Sequence[int], out_modes: Sequence[int], ranks: int | Sequence[int], bias: bool = True
    ):
        super().__init__()
        self.in_modes = _as_modes(in_modes, "in_modes")
        self.out_modes = _as_modes(out_modes, "out_modes")
        if len(self.in_modes) != len(self.out_modes):
            raise ShapeMismatchError(
                f"in_modes {self.in_modes} and out_modes {self.out_modes} must have the same number of modes"
            )
        self.ranks = _full_ranks(ranks, self.d)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.ranks[k], m, n, self.ranks[k + 1]))
            for k, (m, n) in enumerate(zip(self.out_modes, self.in_modes, strict=True))
        )
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None
        self.reset_parameters()

    @property
    def d(self) -> int:
        return len(self.in_modes)

    @property
    def in_features(self) -> int:
        return math.prod(self.in_modes)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_modes)

    def reset_parameters(self) -> None:
        _init_cores_(list(self.cores), self.ranks[1:-1], self.in_features)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            x = x.reshape(x.shape[0], -1)  # (B, ...) -> (B, N)
        if x.shape[1] != self.in_features:
            raise ShapeMismatchError(
                f"TTLinear expects {self.in_features} input features (in_modes {self.in_modes}), got {x.shape[1]}"
            )
        return tt_linear(x, list(self.cores), self.bias)

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        in_modes: Sequence[int],
        out_modes: Sequence[int],
        ranks: int | Sequence[int] | None = None,
        *,
        tol: float | None = None,
    ) -> TTLinear:
        """The TT-SVD of ``linear.weight`` at maximal ``ranks`` and/or tolerance ``tol`` (None, None: exact).

        The layer's ranks are those TT-SVD kept; the relative error is in ``.approx_error``.
        """
        in_modes, out_modes = _as_modes(in_modes, "in_modes"), _as_modes(out_modes, "out_modes")
        if (linear.out_features, linear.in_features) != (math.prod(out_modes), math.prod(in_modes)):
            raise ShapeMismatchError(
                f"nn.Linear({linear.in_features} -> {linear.out_features}) does not match in_modes {in_modes} "
                f"(N={math.prod(in_modes)}) and out_modes {out_modes} (M={math.prod(out_modes)})"
            )
        cores, err = tt_svd(linear.weight, out_modes, in_modes, ranks, tol=tol)
        found = (1, *(int(g.shape[3]) for g in cores))
        layer = cls(in_modes, out_modes, found, bias=linear.bias is not None).to(linear.weight.device)
        layer = layer.to(linear.weight.dtype)
        with torch.no_grad():
            for p, g in zip(layer.cores, cores, strict=True):
                p.copy_(g)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.approx_error = err
        return layer

    def to_dense(self) -> Tensor:
        """The exactly equivalent dense weight (M, N)."""
        return tt_matrix_dense(list(self.cores))

    def to_linear(self) -> nn.Linear:
        g = self.cores[0]
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=g.device, dtype=g.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def num_params(self) -> int:
        bias = self.out_features if self.bias is not None else 0
        return tt_params(self.out_modes, self.in_modes, self.ranks) + bias

    def dense_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def macs(self) -> int:
        """Multiply-accumulates per sample of the contraction sequence (bias adds not counted)."""
        return tt_macs(self.out_modes, self.in_modes, self.ranks)

    def dense_macs(self) -> int:
        return self.in_features * self.out_features

    def condition_number(self) -> float:
        """sigma_max / sigma_min of the dense equivalent (its min(M, N) singular values)."""
        return _cond(self.to_dense())

    def extra_repr(self) -> str:
        modes = " x ".join(f"{m}x{n}" for m, n in zip(self.out_modes, self.in_modes, strict=True))
        return (
            f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}, cores=[{modes}], "
            f"bias={self.bias is not None}, params={self.num_params()} (dense {self.dense_params()}), "
            f"macs={self.macs()} (dense {self.dense_macs()})"
        )


class TTConv2d(nn.Module):
    """A 2-D convolution whose kernel is a TT-matrix with a spatial core (Garipov et al. 2016).

    Args:
        in_modes: (n_1, ..., n_d), C_in = prod n_k.
        out_modes: (m_1, ..., m_d), C_out = prod m_k.
        kernel_size: int or (kh, kw).
        ranks: (r_0, ..., r_{d-1}) or (r_0, ..., r_{d-1}, 1) as in the paper's code, or one int for all;
            r_0 links the spatial core to the first channel core. r_0 > kh kw is redundant but allowed (the paper's
            3x3 layers use r_0 = 16).
        stride, padding, dilation: as nn.Conv2d (zero padding).
        bias: learn a bias (C_out,).
        forward: "auto" (reconstruct in eager mode, factorized when traced/exported), "reconstruct" or
            "factorized"; a plain attribute (``layer.forward_mode``), changeable at any time.
    """

    def __init__(
        self,
        in_modes: Sequence[int],
        out_modes: Sequence[int],
        kernel_size: int | Sequence[int],
        ranks: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        forward: str = "auto",
    ):
        super().__init__()
        self.in_modes = _as_modes(in_modes, "in_modes")
        self.out_modes = _as_modes(out_modes, "out_modes")
        d = len(self.in_modes)
        if len(self.out_modes) != d:
            raise ShapeMismatchError(
                f"in_modes {self.in_modes} and out_modes {self.out_modes} must have the same number of modes"
            )
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.padding, self.dilation = (
            _pair(stride, "stride"),
            _pair(padding, "padding"),
            _pair(dilation, "dilation"),
        )
        if isinstance(ranks, (int, np.integer)):
            r = [int(ranks)] * d
        else:
            r = [int(v) for v in ranks]
            if len(r) == d + 1:
                if r[-1] != 1:
                    raise ConfigError(f"ranks {tuple(r)}: the last rank r_d must be 1")
                r = r[:-1]
            elif len(r) != d:
                raise ConfigError(
                    f"ranks {tuple(r)}: give one int, the {d} ranks r_0..r_{d - 1} or {d + 1} ending in 1"
                )
        if any(v < 1 for v in r):
            raise ConfigError(f"ranks must be >= 1, got {tuple(r)}")
        self.ranks = (*r, 1)  # (r_0, ..., r_d), r_d = 1
        self.forward_mode = forward
        self.spatial = nn.Parameter(torch.empty(*self.kernel_size, self.ranks[0]))
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.ranks[k], m, n, self.ranks[k + 1]))
            for k, (m, n) in enumerate(zip(self.out_modes, self.in_modes, strict=True))
        )
        self.bias = nn.Parameter(torch.empty(self.out_channels)) if bias else None
        self.reset_parameters()

    @property
    def forward_mode(self) -> str:
        return self._forward_mode

    @forward_mode.setter
    def forward_mode(self, value: str) -> None:
        if value not in CONV_FORWARDS:
            raise ConfigError(f"TTConv2d forward must be one of {CONV_FORWARDS}, got {value!r}")
        self._forward_mode = value

    @property
    def d(self) -> int:
        return len(self.in_modes)

    @property
    def in_channels(self) -> int:
        return math.prod(self.in_modes)

    @property
    def out_channels(self) -> int:
        return math.prod(self.out_modes)

    def reset_parameters(self) -> None:
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        _init_cores_([self.spatial, *self.cores], self.ranks[:-1], fan_in)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _mode(self) -> str:
        if self._forward_mode != "auto":
            return self._forward_mode
        return "factorized" if torch.compiler.is_compiling() else "reconstruct"

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ShapeMismatchError(
                f"TTConv2d expects input (B, {self.in_channels}, H, W) (in_modes {self.in_modes}), got {tuple(x.shape)}"
            )
        return tt_conv2d(
            x, self.spatial, list(self.cores), self.bias, self.stride, self.padding, self.dilation, self._mode()
        )

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        in_modes: Sequence[int],
        out_modes: Sequence[int],
        ranks: int | Sequence[int] | None = None,
        *,
        tol: float | None = None,
        forward: str = "auto",
    ) -> TTConv2d:
        """The TT-SVD of ``conv``'s kernel (as the (C_out, kh kw C_in) TT-matrix with the spatial core first).

        ``ranks``: (r_0..r_{d-1}) caps (or one int), None for none; ``tol`` as in ``tt_svd``. The relative kernel
        error is in ``.approx_error``.
        Raises:
            ConfigError: grouped convolutions, or a padding mode other than zeros.
            ShapeMismatchError: modes that do not multiply to the channel counts.
        """
        in_modes, out_modes = _as_modes(in_modes, "in_modes"), _as_modes(out_modes, "out_modes")
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ConfigError(
                f"TTConv2d.from_dense needs groups=1, zero padding given as ints (got groups={conv.groups}, "
                f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r})"
            )
        if (conv.out_channels, conv.in_channels) != (math.prod(out_modes), math.prod(in_modes)):
            raise ShapeMismatchError(
                f"Conv2d({conv.in_channels} -> {conv.out_channels}) does not match in_modes {in_modes} and "
                f"out_modes {out_modes}"
            )
        d = len(in_modes)
        kh, kw = conv.kernel_size
        # (C_out, C_in, kh, kw) -> (C_out, kh, kw, C_in) -> (C_out, kh kw C_in): in modes (kh kw, n_1..n_d)
        mat = conv.weight.detach().permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
        if ranks is None:
            caps = None
        elif isinstance(ranks, (int, np.integer)):
            caps = (1, *([int(ranks)] * d), 1)
        else:
            r = [int(v) for v in ranks]
            r = r[:-1] if len(r) == d + 1 else r
            if len(r) != d:
                raise ConfigError(f"ranks {tuple(ranks)}: give one int or the {d} ranks r_0..r_{d - 1}")
            caps = (1, *r, 1)
        cores, err = tt_svd(mat, (1, *out_modes), (kh * kw, *in_modes), caps, tol=tol)
        found = tuple(int(g.shape[3]) for g in cores)  # (r_0, ..., r_d)
        layer = cls(
            in_modes,
            out_modes,
            (kh, kw),
            found,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            forward=forward,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.spatial.copy_(cores[0].reshape(kh, kw, found[0]))  # (1, 1, kh kw, r_0) -> (kh, kw, r_0)
            for p, g in zip(layer.cores, cores[1:], strict=True):
                p.copy_(g)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.approx_error = err
        return layer

    def to_dense(self) -> Tensor:
        """The exactly equivalent dense kernel (C_out, C_in, kh, kw)."""
        return tt_conv_kernel(self.spatial, list(self.cores))

    def to_conv(self) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
            device=self.spatial.device,
            dtype=self.spatial.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.to_dense())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def num_params(self) -> int:
        kh, kw = self.kernel_size
        cores = tt_params(self.out_modes, self.in_modes, self.ranks)
        return kh * kw * self.ranks[0] + cores + (self.out_channels if self.bias is not None else 0)

    def dense_params(self) -> int:
        kh, kw = self.kernel_size
        return self.out_channels * self.in_channels * kh * kw + (self.out_channels if self.bias is not None else 0)

    def out_hw(self, hw: Sequence[int]) -> tuple[int, int]:
        """Output (H, W) for an input (H, W)."""
        return tuple(  # type: ignore[return-value]
            (int(hw[i]) + 2 * self.padding[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1) // self.stride[i] + 1
            for i in range(2)
        )

    def macs(self, hw: Sequence[int], forward: str | None = None) -> int:
        """Multiply-accumulates per sample for an input of spatial size hw, for ``forward`` (default: eager mode's)."""
        mode = forward or ("reconstruct" if self._forward_mode == "auto" else self._forward_mode)
        return tt_conv_macs(self.out_modes, self.in_modes, self.ranks, self.kernel_size, self.out_hw(hw), mode)

    def condition_number(self) -> float:
        """sigma_max / sigma_min of the kernel as a (C_out, C_in kh kw) matrix."""
        return _cond(self.to_dense().reshape(self.out_channels, -1))

    def extra_repr(self) -> str:
        return (
            f"in_modes={self.in_modes}, out_modes={self.out_modes}, kernel_size={self.kernel_size}, "
            f"ranks={self.ranks}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}, forward={self._forward_mode!r}, params={self.num_params()} "
            f"(dense {self.dense_params()})"
        )


# ----------------------------------------------------------------------------------------------------------------
# post-training conversion


def _split_channels(c: int, d: int) -> tuple[int, ...] | None:
    """d modes of c, all >= 2, as balanced as possible; None if c has no such factorization."""
    modes = tt_modes(c, d)
    return modes if min(modes) >= 2 else None


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def convert_to_tt(
    model: nn.Module,
    ranks: int | None = None,
    *,
    rank: int | None = None,
    tol: float | None = None,
    d: int = 3,
    min_features: int = 64,
    convs: bool = True,
    linears: bool = True,
    conv_forward: str = "auto",
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Replace dense layers by their TT-SVD (in place): ``nn.Linear`` -> ``TTLinear``, ``nn.Conv2d`` -> ``TTConv2d``.

    The ``tt`` converter of ``edgesep convert RUN --to tt --rank R [--option tol=0.1] [--option d=4] ...``.
    A layer is converted when both its sizes (features or channels) are >= ``min_features`` and split into ``d``
    modes >= 2 (balanced: 1024 -> (8, 8, 16)); so the classifier (10 outputs) and an RGB first conv (3 channels)
    stay dense, as in Garipov et al. Grouped or non-zero-padded convolutions stay dense.

    Args:
        model: the model (modified in place and returned).
        ranks, rank: maximal TT ranks (every inner rank; for a conv r_0..r_{d-1}); ``rank`` is the CLI's name.
            Default 8 unless ``tol`` is given (then no cap).
        tol: relative tolerance of each layer's TT-SVD (see ``tt_svd``).
        d: number of modes per layer.
        min_features: smallest in/out size converted.
        convs, linears: which layer types to convert.
        conv_forward: TTConv2d forward mode ("auto", "reconstruct", "factorized").
        layers, exclude: fnmatch patterns of module names to convert (default all eligible) / to keep dense.
    Returns:
        (model, transforms): ``transforms`` is ``[{"kind": "tt", "layers": {name: spec}}]`` for the run's config;
        ``apply_tt_structure`` rebuilds the structure from it. Each spec also records the TT-SVD error.
    Raises:
        ConfigError: bad options, or no layer selected.
    """
    import fnmatch

    if ranks is not None and rank is not None and ranks != rank:
        raise ConfigError(f"convert --to tt: give the rank once (ranks={ranks}, rank={rank})")
    cap = ranks if ranks is not None else rank
    if cap is None and tol is None:
        cap = 8
    if cap is not None and (not isinstance(cap, (int, np.integer)) or cap < 1):
        raise ConfigError(f"convert --to tt: rank must be an integer >= 1, got {cap!r}")
    if conv_forward not in CONV_FORWARDS:
        raise ConfigError(f"conv_forward must be one of {CONV_FORWARDS}, got {conv_forward!r}")
    if int(d) < 1:
        raise ConfigError(f"convert --to tt: d must be >= 1, got {d}")
    specs: dict[str, dict[str, Any]] = {}
    for name, m in list(model.named_modules()):
        if not name or any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if layers is not None and not any(fnmatch.fnmatchcase(name, p) for p in layers):
            continue
        if linears and type(m) is nn.Linear and min(m.in_features, m.out_features) >= min_features:
            n_modes, m_modes = _split_channels(m.in_features, d), _split_channels(m.out_features, d)
            if n_modes is None or m_modes is None:
                continue
            layer: nn.Module = TTLinear.from_dense(m, n_modes, m_modes, cap, tol=tol)
            specs[name] = {"type": "linear", "in_modes": list(layer.in_modes), "out_modes": list(layer.out_modes),
                           "ranks": list(layer.ranks), "bias": layer.bias is not None,
                           "approx_error": layer.approx_error}  # fmt: skip
        elif convs and type(m) is nn.Conv2d and min(m.in_channels, m.out_channels) >= min_features:
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                continue
            n_modes, m_modes = _split_channels(m.in_channels, d), _split_channels(m.out_channels, d)
            if n_modes is None or m_modes is None:
                continue
            layer = TTConv2d.from_dense(m, n_modes, m_modes, cap, tol=tol, forward=conv_forward)
            specs[name] = {"type": "conv2d", "in_modes": list(layer.in_modes), "out_modes": list(layer.out_modes),
                           "kernel_size": list(layer.kernel_size), "ranks": list(layer.ranks),
                           "stride": list(layer.stride), "padding": list(layer.padding),
                           "dilation": list(layer.dilation), "bias": layer.bias is not None,
                           "forward": conv_forward, "approx_error": layer.approx_error}  # fmt: skip
        else:
            continue
        _set_module(model, name, layer.train(m.training))
    if not specs:
        raise ConfigError(
            f"convert --to tt: no nn.Linear / nn.Conv2d selected with both sizes >= {min_features} that split into "
            f"{d} modes >= 2; lower --option min_features=N or --option d=N, or check --layers / --exclude"
        )
    return model, [{"kind": "tt", "layers": specs}]


def apply_tt_structure(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Rebuild the TT layers a ``convert_to_tt`` transform recorded (shapes only; weights come from the checkpoint).

    Raises:
        ConfigError: a layer name the model does not have, or an unknown layer type.
    """
    for name, s in dict(spec.get("layers", {})).items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"tt transform names layer {name!r}, which the model does not have") from None
        if s.get("type") == "linear":
            new: nn.Module = TTLinear(s["in_modes"], s["out_modes"], s["ranks"], bias=bool(s["bias"]))
        elif s.get("type") == "conv2d":
            new = TTConv2d(
                s["in_modes"],
                s["out_modes"],
                s["kernel_size"],
                s["ranks"],
                stride=s["stride"],
                padding=s["padding"],
                dilation=s["dilation"],
                bias=bool(s["bias"]),
                forward=s.get("forward", "auto"),
            )
        else:
            raise ConfigError(f"tt transform: layer {name!r} has unknown type {s.get('type')!r}")
        p = next(old.parameters(), None)
        if p is not None:
            new = new.to(device=p.device, dtype=p.dtype)
        _set_module(model, name, new)
    return model
