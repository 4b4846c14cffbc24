"""Robust low-rank layers: W = U S Vᵀ with orthonormal U, V and a small full core S (CondLR).

"Robust low-rank training via approximate orthonormal constraints" (Savostianova, Zangrando, Ceruti, Tudisco,
NeurIPS 2023): a weight W (m x n) is stored as U (m x r) and V (n x r) with orthonormal columns and a full r x r
matrix S. With U, V orthonormal the singular values of W are those of S, so cond(W) = cond(S); the CondLR
optimizer (``edgesep.optim.CondLR``) keeps UᵀU = VᵀV = I and cond(S) <= tau after every step.

Conventions:

- Linear: ``y = x @ Wᵀ + b`` (nn.Linear's convention), W = U S Vᵀ of shape (out_features, in_features). The
  forward never forms W: ``h = x @ V`` (B, r), then ``y = h @ (U S)ᵀ + b``; U S (m x r) is weight preparation
  (batch-independent, folded to one constant by the ONNX simplifier), so ``macs() = r (n + m)`` per sample.
- Conv2d: the kernel (C_out, C_in, k_h, k_w) reshaped row-major to the matrix (C_out, C_in k_h k_w) is W. The
  forward is a k_h x k_w conv from C_in to r channels with kernel ``Vᵀ.reshape(r, C_in, k_h, k_w)`` (stride,
  padding, dilation here), then a 1x1 conv from r to C_out channels with kernel ``(U S).reshape(C_out, r, 1, 1)``
  and the bias: standard Conv ops only.
- Rank: explicit ``rank`` in [1, min(m, n)], or from ``rank_ratio`` (the fraction of the full rank removed):
  r = ceil((1 - rank_ratio) min(m, n)) (``rank_from_ratio``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgesep.errors import ConfigError, ShapeMismatchError

__all__ = [
    "LowRankConv2d",
    "LowRankLinear",
    "lowrank_layer_stats",
    "lowrank_layers",
    "rank_from_ratio",
    "sign_fixed_qr",
]


# ----------------------------------------------------------------------------------------------------------------
# functional core


def rank_from_ratio(m: int, n: int, rank_ratio: float | None = None, rank: int | None = None) -> int:
    """The rank of an (m x n) low-rank layer: ``rank`` if given, else ceil((1 - rank_ratio) min(m, n)).

    Raises:
        ConfigError: both or neither given, a ratio outside [0, 1), or a rank outside [1, min(m, n)].
    """
    full = min(int(m), int(n))
    if (rank is None) == (rank_ratio is None):
        raise ConfigError("give exactly one of rank and rank_ratio (e.g. rank_ratio=0.5 keeps half the full rank)")
    if rank is not None:
        if int(rank) != rank or not 1 <= int(rank) <= full:
            raise ConfigError(f"rank must be an int in [1, {full}] for a {m}x{n} weight, got {rank!r}")
        return int(rank)
    if not 0.0 <= float(rank_ratio) < 1.0:
        raise ConfigError(f"rank_ratio must be in [0, 1) (the fraction of the rank removed), got {rank_ratio!r}")
    # round before ceil so 0.2 * 10 = 2.0000000000000004 gives 2, not 3
    return max(1, math.ceil(round((1.0 - float(rank_ratio)) * full, 9)))


def sign_fixed_qr(x: Tensor) -> Tensor:
    """The Q factor of x = Q R (x of shape (m, r), m >= r) with diag(R) >= 0: a unique, continuous retraction onto
    the Stiefel manifold (a QR's column signs are otherwise arbitrary). Computed in float64, returned in x's dtype."""
    q, r = torch.linalg.qr(x.double(), mode="reduced")
    d = torch.sign(torch.diagonal(r))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return (q * d).to(x.dtype)  # (m, r) * (r,): flip column j by sign(R_jj)


def lowrank_dense(u: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """W = U S Vᵀ: (m, r) @ (r, r) @ (r, n) -> (m, n)."""
    return u @ s @ v.transpose(0, 1)


def _svd_init(w: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD of w (m, n) in float64: (U (m, r), diag(sigma_1..r) (r, r), V (n, r)) in w's dtype."""
    p, sig, qh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    u, s, v = p[:, :rank], torch.diag(sig[:rank]), qh[:rank].transpose(0, 1)
    return u.to(w.dtype), s.to(w.dtype), v.to(w.dtype)


def _cond(sv: Tensor) -> float:
    smax, smin = sv.max().item(), sv.min().item()
    if math.isnan(smax) or math.isnan(smin):
        return math.nan
    return smax / smin if smin > 0 else math.inf


class _LowRankBase(nn.Module):
    """Shared parameters (U, S, V, bias), conversion and statistics of the low-rank layers."""

    out_dim: int  # m: rows of W
    in_dim: int  # n: columns of W
    rank: int

    def _init_factors(self, m: int, n: int, rank: int, bias: bool) -> None:
        self.out_dim, self.in_dim, self.rank = int(m), int(n), int(rank)
        self.U = nn.Parameter(torch.empty(m, rank))  # (m, r), orthonormal columns
        self.S = nn.Parameter(torch.empty(rank, rank))  # (r, r), full
        self.V = nn.Parameter(torch.empty(n, rank))  # (n, r), orthonormal columns
        self.bias = nn.Parameter(torch.empty(self._bias_shape())) if bias else None

    def _bias_shape(self) -> tuple[int, ...]:
        return (self.out_dim,)

    def _dense_init(self) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The truncated SVD of the matching dense layer's default (Kaiming-uniform) init, so the low-rank layer
        starts at the dense layer's scale; the bias is drawn as the dense layer's."""
        w, b = self._dense_init()
        u, s, v = _svd_init(w, self.rank)
        self.U.copy_(u)
        self.S.copy_(s)
        self.V.copy_(v)
        if self.bias is not None:
            self.bias.copy_(b.reshape(self.bias.shape))

    # -- the factored pieces ------------------------------------------------------------------------------------

    def weight_matrix(self) -> Tensor:
        """W = U S Vᵀ as the (m, n) matrix (tests and conversion only; the forward never forms it)."""
        return lowrank_dense(self.U, self.S, self.V)

    def _load_factors(self, u: Tensor, s: Tensor, v: Tensor, bias: Tensor | None) -> None:
        with torch.no_grad():
            self.U.copy_(u)
            self.S.copy_(s)
            self.V.copy_(v)
            if self.bias is not None and bias is not None:
                self.bias.copy_(bias.reshape(self.bias.shape))

    # -- exact counts and spectra ---------------------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def dense_params(self) -> int:
        return self.out_dim * self.in_dim + (self.bias.numel() if self.bias is not None else 0)

    @torch.no_grad()
    def singular_values(self) -> Tensor:
        """The r singular values of U S Vᵀ (float64, descending), exact also when U, V drifted from orthonormal
        (plain optimizers): with U = Q_u R_u and V = Q_v R_v they are those of R_u S R_vᵀ."""
        if not all(torch.isfinite(p).all() for p in (self.U, self.S, self.V)):
            return torch.full((self.rank,), math.nan, dtype=torch.float64)  # diverged training: report nan
        ru = torch.linalg.qr(self.U.double(), mode="r")[1]  # (r, r)
        rv = torch.linalg.qr(self.V.double(), mode="r")[1]  # (r, r)
        return torch.linalg.svdvals(ru @ self.S.double() @ rv.transpose(0, 1))

    @torch.no_grad()
    def cond_s(self) -> float:
        """cond(S) = sigma_max(S) / sigma_min(S) (inf if S is singular)."""
        if not torch.isfinite(self.S).all():
            return math.nan
        return _cond(torch.linalg.svdvals(self.S.double()))

    def condition_number(self) -> float:
        """The layer's condition number over its r nonzero singular values (= cond(S) when U, V are orthonormal)."""
        return _cond(self.singular_values())

    def spectral_norm(self) -> float:
        return self.singular_values().max().item()

    @torch.no_grad()
    def orthonormality_error(self) -> tuple[float, float]:
        """(||UᵀU - I||_F, ||VᵀV - I||_F) in float64."""
        eye = torch.eye(self.rank, dtype=torch.float64, device=self.U.device)
        u, v = self.U.double(), self.V.double()
        return (u.T @ u - eye).norm().item(), (v.T @ v - eye).norm().item()

    def factor_params(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """(U, S, V): what ``edgesep.optim.CondLR`` treats as one low-rank triplet."""
        return self.U, self.S, self.V


class LowRankLinear(_LowRankBase):
    """A fully-connected layer y = x Wᵀ + b with W = U S Vᵀ (U (out, r), V (in, r) orthonormal, S (r, r)).

    Args:
        in_features, out_features: n and m.
        rank: explicit rank r in [1, min(m, n)]; or
        rank_ratio: the fraction of the full rank removed, r = ceil((1 - rank_ratio) min(m, n)).
        bias: learn a bias of shape (out_features,).
    Raises:
        ConfigError: both or neither of rank / rank_ratio, or values out of range.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | None = None,
        *,
        rank_ratio: float | None = None,
        bias: bool = True,
    ):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        r = rank_from_ratio(out_features, in_features, rank_ratio, rank)
        self._init_factors(self.out_features, self.in_features, r, bias)
        self.reset_parameters()

    def _dense_init(self) -> tuple[Tensor, Tensor]:
        lin = nn.Linear(self.in_features, self.out_features)
        return lin.weight.detach(), lin.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        """x (..., n) -> (..., m): x @ V (r), then @ (U S)ᵀ, plus bias."""
        if x.shape[-1] != self.in_features:
            raise ShapeMismatchError(f"LowRankLinear expects input (..., {self.in_features}), got {tuple(x.shape)}")
        h = torch.matmul(x, self.V)  # (..., n) @ (n, r) -> (..., r)
        return F.linear(h, self.U @ self.S, self.bias)  # (..., r) @ (U S)ᵀ (r, m) -> (..., m)

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, rank: int | None = None, *, rank_ratio: float | None = None
    ) -> LowRankLinear:
        """The best rank-r approximation of ``linear`` (truncated SVD, Eckart–Young); ``.approx_error`` holds the
        relative Frobenius error ||W - U S Vᵀ||_F / ||W||_F. At full rank it reproduces the layer."""
        layer = cls(linear.in_features, linear.out_features, rank, rank_ratio=rank_ratio, bias=linear.bias is not None)
        layer = layer.to(linear.weight.device, linear.weight.dtype)
        u, s, v = _svd_init(linear.weight, layer.rank)
        layer._load_factors(u, s, v, linear.bias)
        layer.approx_error = _rel_err(linear.weight, u, s, v)
        return layer

    def to_dense(self) -> Tensor:
        """The equivalent dense weight W = U S Vᵀ, (out_features, in_features)."""
        return self.weight_matrix()

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None).to(self.U.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.to(self.U.device, self.U.dtype)

    def macs(self) -> int:
        """Multiply-accumulates per sample: r (n + m) (U S is weight preparation; bias adds not counted)."""
        return self.rank * (self.in_features + self.out_features)

    def dense_macs(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, params={self.num_params()} (dense {self.dense_params()}), "
            f"macs={self.macs()} (dense {self.dense_macs()})"
        )


def _pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    t = (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)
    if len(t) != 2:
        raise ConfigError(f"{what} must be an int or a pair of ints, got {v!r}")
    return t  # type: ignore[return-value]


class LowRankConv2d(_LowRankBase):
    """A 2-D convolution whose kernel, as the matrix (C_out, C_in k_h k_w), is U S Vᵀ.

    Forward: a k_h x k_w conv C_in -> r (kernel Vᵀ, with stride / padding / dilation), then a 1x1 conv r -> C_out
    (kernel U S) plus bias. Zero padding and groups = 1 only.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation: as ``nn.Conv2d`` (padding an int or
            a pair; no string padding).
        rank, rank_ratio, bias: as ``LowRankLinear`` (m = C_out, n = C_in k_h k_w).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        rank: int | None = None,
        *,
        rank_ratio: float | None = None,
        bias: bool = True,
    ):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        n = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        r = rank_from_ratio(self.out_channels, n, rank_ratio, rank)
        self._init_factors(self.out_channels, n, r, bias)
        self.reset_parameters()

    def _dense_init(self) -> tuple[Tensor, Tensor]:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size)
        return conv.weight.detach().reshape(self.out_channels, -1), conv.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C_in, H, W) -> (B, C_out, H', W')."""
        kh, kw = self.kernel_size
        v_kernel = self.V.transpose(0, 1).reshape(self.rank, self.in_channels, kh, kw)  # (n, r) -> (r, C_in, kh, kw)
        h = F.conv2d(x, v_kernel, None, self.stride, self.padding, self.dilation)  # (B, r, H', W')
        us = (self.U @ self.S).reshape(self.out_channels, self.rank, 1, 1)  # (C_out, r) -> (C_out, r, 1, 1)
        return F.conv2d(h, us, self.bias)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank: int | None = None, *, rank_ratio: float | None = None) -> LowRankConv2d:
        """Truncated SVD of ``conv``'s kernel matrix (C_out, C_in k_h k_w); ``.approx_error`` as LowRankLinear.

        Raises:
            ConfigError: grouped convs, non-zero padding modes, or string padding.
        """
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ConfigError(
                f"LowRankConv2d converts only groups=1 convolutions with numeric zero padding; {conv} has "
                f"groups={conv.groups}, padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
            )
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, rank,
            rank_ratio=rank_ratio, bias=conv.bias is not None,
        )  # fmt: skip
        layer = layer.to(conv.weight.device, conv.weight.dtype)
        w = conv.weight.reshape(conv.out_channels, -1)  # (C_out, C_in, kh, kw) -> (C_out, C_in kh kw)
        u, s, v = _svd_init(w, layer.rank)
        layer._load_factors(u, s, v, conv.bias)
        layer.approx_error = _rel_err(w, u, s, v)
        return layer

    def to_dense(self) -> Tensor:
        """The equivalent dense kernel (C_out, C_in, k_h, k_w) = (U S Vᵀ).reshape(...)."""
        return self.weight_matrix().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def to_conv(self) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            bias=self.bias is not None,
        ).to(self.U.dtype)  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(self.to_dense())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv.to(self.U.device, self.U.dtype)

    def _out_hw(self, hw: Sequence[int]) -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            (h + 2 * p - d * (k - 1) - 1) // s + 1
            for h, p, d, k, s in zip(hw, self.padding, self.dilation, self.kernel_size, self.stride, strict=True)
        )

    def macs(self, input_hw: Sequence[int]) -> int:
        """Multiply-accumulates per sample for an input of spatial size (H, W): r (C_in k_h k_w + C_out) H' W'."""
        ho, wo = self._out_hw(input_hw)
        return self.rank * (self.in_dim + self.out_channels) * ho * wo

    def dense_macs(self, input_hw: Sequence[int]) -> int:
        ho, wo = self._out_hw(input_hw)
        return self.in_dim * self.out_channels * ho * wo

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, rank={self.rank}, bias={self.bias is not None}, "
            f"params={self.num_params()} (dense {self.dense_params()})"
        )


def _rel_err(w: Tensor, u: Tensor, s: Tensor, v: Tensor) -> float:
    w64 = w.detach().double()
    norm = w64.norm().item()
    return (w64 - lowrank_dense(u.double(), s.double(), v.double())).norm().item() / norm if norm > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# model-level helpers


def lowrank_layers(model: nn.Module) -> list[tuple[str, LowRankLinear | LowRankConv2d]]:
    """(name, layer) for every low-rank layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _LowRankBase)]


def lowrank_layer_stats(model: nn.Module) -> list[dict[str, Any]]:
    """One JSON-ready row per low-rank layer: type, shape (m, n), rank, parameters (and dense), cond(S), the
    layer's condition number and spectral norm, and the orthonormality errors of U and V."""
    rows = []
    for name, m in lowrank_layers(model):
        eu, ev = m.orthonormality_error()
        rows.append(
            {
                "name": name,
                "type": type(m).__name__,
                "shape": [m.out_dim, m.in_dim],
                "rank": m.rank,
                "params": m.num_params(),
                "dense_params": m.dense_params(),
                "cond_s": m.cond_s(),
                "condition_number": m.condition_number(),
                "spectral_norm": m.spectral_norm(),
                "orth_error_U": eu,
                "orth_error_V": ev,
            }
        )
    return rows
