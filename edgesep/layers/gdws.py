"""Generalized depthwise-separable (GDWS) convolutions: optimal post-training approximation of a K x K conv.

Dbouk & Shanbhag, "Generalized Depthwise-Separable Convolutions for Adversarially Robust and Efficient Neural
Networks" (NeurIPS 2021). A conv weight W of shape (M, C, K1, K2) is split per input channel into the blocks
W_c = W[:, c].reshape(M, K1*K2) (M x K^2). Input channel c is filtered by g_c depthwise K1 x K2 kernels (G =
sum g_c intermediate channels), then a 1 x 1 conv maps G -> M. With the SVD W_c = U_c S_c V_cᵀ the best rank-g_c
approximation keeps the top g_c singular triplets (Eckart-Young): depthwise kernel i of channel c is the unit-norm
right singular vector V_c[:, i] (reshaped to K1 x K2) and its 1 x 1 column is U_c[:, i] * s_{c,i} (the singular
value sits in the 1 x 1 conv, so every intermediate channel has the same scale: good for per-tensor INT8
activations). The weighted squared error is

    E(g) = sum_c alpha_c sum_{i >= g_c} s_{c,i}^2          (singular values 0-indexed, descending)

with alpha_c >= 0 per input channel (alpha = 1: the plain Frobenius error). Cost per output pixel: G (K^2 + M)
MACs, against M C K^2 for the original conv. Per channel at most r = min(M, K^2) kernels are useful (the rank).

Allocations (both optimal, tests check them against brute force):

- **MEGO** (complexity-constrained): at most G kernels; keep the G largest scores alpha_c s_{c,i}^2. Within a
  channel the scores are non-increasing in i, so the kept set per channel is a prefix and g_c is its size.
- **LEGO** (error-constrained): weighted error at most beta; discard the smallest scores while their running sum
  stays <= beta (discarding the cheapest errors first discards the most kernels).

Both keep at least ``min_keep`` (default 1) kernels per layer: a layer with G = 0 would output only its bias.

Deployment forms of ``GDWSConv2d`` (all compute the same function):

- ``"gather"``: ``x[:, index]`` (channel repeat, ONNX Gather) -> depthwise conv with groups = G -> 1 x 1 conv.
- ``"multiplier"``: when every g_c equals one g, a single depthwise conv with groups = C and channel multiplier g
  (no gather); the kernels are stored channel-major, so the same weights serve both forms.
- ``"branches"``: a sum of depthwise-separable branches. Branch i holds the i-th kernel of every channel with
  g_c > i: a depthwise conv with channel multiplier 1 (on x itself when every channel has one, else on the
  gathered channels that do) and a 1 x 1 conv; the branch outputs are added (the bias once). The same MACs, the
  same weights. On CPUs it is the fast form: a multiplier-1 depthwise conv is the one ONNX Runtime runs in its
  blocked-layout (NCHWc) kernel, the G-channel intermediate never exists at once, and each Add fuses into the
  next 1 x 1 conv. The multiplier form goes through ONNX Runtime's generic grouped-conv path instead (measured on
  resnet20: 1.2–1.6x faster than the original with branches, 0.6–0.8x with the multiplier form; benchmarks/README).
- folded back to a dense conv (``to_conv()``): W_hat[m, c] = sum_{k: index[k] = c} pw[m, k] * dw[k].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgesep.errors import ConfigError, ShapeMismatchError

__all__ = [
    "FORMS",
    "ChannelSVD",
    "GDWSConv2d",
    "channel_svd",
    "gdws_branches",
    "gdws_conv2d",
    "gdws_error",
    "gdws_fold",
    "gdws_macs",
    "lego",
    "mego",
]

FORMS = ("gather", "multiplier", "branches")


# ----------------------------------------------------------------------------------------------------------------
# the decomposition and the two allocation algorithms


@dataclass(frozen=True)
class ChannelSVD:
    """Per-input-channel SVD of a conv weight (M, C, K1, K2), in float64.

    u: (C, M, r); s: (C, r) descending; vh: (C, r, K1*K2); r = min(M, K1*K2).
    """

    u: Tensor
    s: Tensor
    vh: Tensor
    kernel_size: tuple[int, int]

    @property
    def rank_bound(self) -> int:
        return int(self.s.shape[1])

    def scores(self, alpha: Tensor | Sequence[float] | None = None) -> Tensor:
        """alpha_c * s_{c,i}^2, shape (C, r); alpha None means 1 for every channel."""
        a = _alpha(alpha, self.s.shape[0])
        return a[:, None] * self.s**2


def _alpha(alpha: Tensor | Sequence[float] | None, c: int) -> Tensor:
    if alpha is None:
        return torch.ones(c, dtype=torch.float64)
    a = torch.as_tensor(alpha, dtype=torch.float64).detach().cpu().flatten()
    if a.numel() != c:
        raise ShapeMismatchError(f"alpha has {a.numel()} entries but the conv has {c} input channels; give one each")
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
        raise ConfigError("alpha must be finite and >= 0 (one sensitivity weight per input channel)")
    return a


def channel_svd(weight: Tensor) -> ChannelSVD:
    """SVD of every per-channel block W_c = weight[:, c].reshape(M, K1*K2) (float64, batched over C)."""
    if weight.dim() != 4:
        raise ShapeMismatchError(f"expected a conv weight (M, C, K1, K2), got shape {tuple(weight.shape)}")
    m, c, k1, k2 = weight.shape
    wc = weight.detach().to(torch.float64).cpu().permute(1, 0, 2, 3).reshape(c, m, k1 * k2)  # (C, M, K^2)
    u, s, vh = torch.linalg.svd(wc, full_matrices=False)  # (C, M, r), (C, r), (C, r, K^2)
    return ChannelSVD(u, s, vh, (int(k1), int(k2)))


def gdws_error(s: Tensor, g: Sequence[int], alpha: Tensor | Sequence[float] | None = None) -> float:
    """E(g) = sum_c alpha_c sum_{i >= g_c} s_{c,i}^2 for singular values s (C, r)."""
    a = _alpha(alpha, s.shape[0])
    gt = torch.as_tensor(list(g), dtype=torch.long)
    dropped = torch.arange(s.shape[1])[None, :] >= gt[:, None]  # (C, r)
    return float((a[:, None] * s.to(torch.float64) ** 2 * dropped).sum())


def _check_scores(scores: Tensor) -> Tensor:
    if scores.dim() != 2:
        raise ShapeMismatchError(f"scores must be (C, r), got shape {tuple(scores.shape)}")
    return scores.detach().to(torch.float64).cpu()


def _counts(flat_idx: Tensor, c: int, r: int) -> list[int]:
    return torch.bincount(flat_idx // r, minlength=c).tolist()


def _order(scores: Tensor, descending: bool) -> Tensor:
    """Flat indices into scores (C, r) sorted by score; ties broken by kernel index i so that, within a channel,
    earlier (larger-singular-value) kernels always come first when keeping: every kept set is a prefix."""
    c, r = scores.shape
    flat = scores.reshape(-1)
    i = torch.arange(r).repeat(c).to(torch.float64)
    # lexsort: primary key the score, secondary the kernel index (kept first: small i; dropped first: large i)
    key2 = torch.argsort(-i if descending else i, stable=True)
    key1 = torch.argsort(flat[key2], descending=descending, stable=True)
    return key2[key1]


def mego(scores: Tensor, budget: int, *, min_keep: int = 1) -> list[int]:
    """Complexity-constrained minimum-error GDWS: g (per channel) keeping the ``budget`` largest scores.

    Args:
        scores: (C, r) alpha_c * s_{c,i}^2, non-increasing along i.
        budget: the most kernels G to keep (clamped to [min_keep, C*r]).
        min_keep: keep at least this many kernels.
    Returns:
        g, a list of C ints with sum(g) = min(max(budget, min_keep), C*r).
    """
    scores = _check_scores(scores)
    c, r = scores.shape
    if min_keep < 1:
        raise ConfigError("min_keep must be >= 1: a GDWS layer needs at least one kernel")
    k = min(max(int(budget), min_keep), c * r)
    return _counts(_order(scores, True)[:k], c, r)


def lego(scores: Tensor, beta: float, *, min_keep: int = 1) -> list[int]:
    """Error-constrained minimum-complexity GDWS: the fewest kernels whose weighted error stays <= beta.

    Discards the smallest scores while their running sum stays <= beta; then keeps at least ``min_keep``
    (in which case the error bound may be exceeded: the caller reports it).

    Args:
        scores: (C, r) alpha_c * s_{c,i}^2, non-increasing along i.
        beta: the weighted squared error allowed (>= 0).
    Returns:
        g, a list of C ints.
    """
    scores = _check_scores(scores)
    if not math.isfinite(beta) or beta < 0:
        raise ConfigError(f"beta must be a finite number >= 0, got {beta}")
    c, r = scores.shape
    order = _order(scores, False)  # ascending: discard from the front
    csum = torch.cumsum(scores.reshape(-1)[order], 0)
    n_drop = int((csum <= beta).sum())  # csum is non-decreasing (scores >= 0)
    n_keep = max(c * r - n_drop, min(min_keep, c * r))
    return _counts(order[c * r - n_keep :], c, r)


def gdws_macs(g: Sequence[int], out_channels: int, kernel_size: Sequence[int], out_hw: Sequence[int]) -> int:
    """MACs of one GDWS conv on one sample: G (K1*K2 + M) per output pixel."""
    return sum(g) * (math.prod(kernel_size) + out_channels) * math.prod(out_hw)


# ----------------------------------------------------------------------------------------------------------------
# functional core


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def gdws_index(g: Sequence[int]) -> Tensor:
    """The input channel of every intermediate channel: (G,) long, ascending (channel-major kernel order)."""
    return torch.repeat_interleave(torch.arange(len(g)), torch.as_tensor(list(g), dtype=torch.long))


def gdws_branches(g: Sequence[int]) -> list[tuple[list[int] | None, list[int]]]:
    """The ``"branches"`` form's plan: per branch i, (input channels with g_c > i, or None for all of them;
    positions of their i-th kernels in the channel-major kernel order)."""
    offsets = [0]
    for v in g:
        offsets.append(offsets[-1] + int(v))
    plan = []
    for i in range(max(g, default=0)):
        chans = [c for c, v in enumerate(g) if v > i]
        plan.append((None if len(chans) == len(g) else chans, [offsets[c] + i for c in chans]))
    return plan


def gdws_fold(dw_weight: Tensor, pw_weight: Tensor, index: Tensor, in_channels: int) -> Tensor:
    """The dense conv weight (M, C, K1, K2) the GDWS factors compute: W[m, c] = sum_{k: index[k]=c} pw[m,k] dw[k].

    Args:
        dw_weight: (G, 1, K1, K2) depthwise kernels.
        pw_weight: (M, G, 1, 1) 1 x 1 weights.
        index: (G,) input channel of each kernel.
    """
    _, _, k1, k2 = dw_weight.shape
    m = pw_weight.shape[0]
    prod = pw_weight[:, :, 0, 0, None, None] * dw_weight[None, :, 0]  # (M, G, 1, 1) x (G, K1, K2) -> (M, G, K1, K2)
    w = prod.new_zeros(m, in_channels, k1, k2)
    return w.index_add(1, index.to(prod.device), prod)  # (M, G, K1, K2) -> (M, C, K1, K2)


def gdws_conv2d(
    x: Tensor,
    dw_weight: Tensor,
    pw_weight: Tensor,
    bias: Tensor | None,
    index: Tensor,
    *,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] | str = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    multiplier: int | None = None,
    branches: Sequence[tuple[Sequence[int] | None, Sequence[int]]] | None = None,
) -> Tensor:
    """GDWS convolution of x (B, C, H, W) -> (B, M, H', W').

    ``multiplier=None``: gather x[:, index] -> (B, G, H, W), depthwise conv with groups = G, 1 x 1 conv.
    ``multiplier=g``: depthwise conv with groups = C and channel multiplier g (requires G = C * g and index the
    channel-major repeat), then the 1 x 1 conv.
    ``branches=gdws_branches(g)``: the sum over branches of (depthwise conv, multiplier 1) -> 1 x 1 conv.
    """
    if branches is not None:
        y = None
        uniform = dw_weight.shape[0] == len(branches) * x.shape[1]  # every g_c = the number of branches
        for i, (chans, pos) in enumerate(branches):
            xi = x if chans is None else torch.index_select(x, 1, torch.as_tensor(chans, device=x.device))
            if uniform:  # kernel i of every channel: a strided slice of the weights (constant-folded in ONNX)
                dw, pw = dw_weight[i :: len(branches)], pw_weight[:, i :: len(branches)]
            else:
                p = torch.as_tensor(pos, device=x.device)
                dw, pw = dw_weight[p], pw_weight[:, p]
            t = F.conv2d(xi, dw, None, stride, padding, dilation, len(pos))  # (B, C_i, H', W')
            t = F.conv2d(t, pw, bias if y is None else None)  # (B, C_i, H', W') -> (B, M, H', W')
            y = t if y is None else y + t
        return y
    if multiplier is None:
        x = torch.index_select(x, 1, index)  # (B, C, H, W) -> (B, G, H, W); ONNX Gather(axis=1)
        groups = dw_weight.shape[0]
    else:
        groups = x.shape[1]
    y = F.conv2d(x, dw_weight, None, stride, padding, dilation, groups)  # (B, G, H', W')
    return F.conv2d(y, pw_weight, bias)  # (B, G, H', W') -> (B, M, H', W')


# ----------------------------------------------------------------------------------------------------------------
# the module


class GDWSConv2d(nn.Module):
    """A GDWS convolution: per-channel depthwise kernels (g_c for input channel c) followed by a 1 x 1 conv.

    Parameters: ``dw_weight`` (G, 1, K1, K2), ``pw_weight`` (M, G, 1, 1), ``bias`` (M,) or None. The kernel
    order is channel-major (index = [0]*g_0 + [1]*g_1 + ...), a non-persistent buffer rebuilt from ``g``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode: as nn.Conv2d.
        g: kernels per input channel (C non-negative ints, sum >= 1).
        form: "gather", "multiplier" (needs equal g_c), "branches" or "auto" (branches when all g_c are equal,
            else gather).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        g: Sequence[int],
        *,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        form: str = "auto",
    ):
        super().__init__()
        g = [int(v) for v in g]
        if len(g) != in_channels:
            raise ShapeMismatchError(f"g has {len(g)} entries but the conv has {in_channels} input channels")
        if any(v < 0 for v in g) or sum(g) < 1:
            raise ConfigError(f"g must be non-negative with at least one kernel in total, got {g}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode
        self.g = tuple(g)
        n = sum(g)
        k1, k2 = self.kernel_size
        self.dw_weight = nn.Parameter(torch.empty(n, 1, k1, k2))
        self.pw_weight = nn.Parameter(torch.empty(out_channels, n, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.dw_weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.pw_weight, a=math.sqrt(5))
        self.register_buffer("index", gdws_index(g), persistent=False)
        if padding_mode != "zeros":
            # the same explicit padding nn.Conv2d applies for non-zero modes
            ref = nn.Conv2d(1, 1, self.kernel_size, padding=padding, dilation=self.dilation)
            self._pad = tuple(ref._reversed_padding_repeated_twice)
        else:
            self._pad = None
        self.form = self._check_form(form)

    # -- construction ------------------------------------------------------------------------------------------

    def _check_form(self, form: str) -> str:
        if form == "auto":
            return "branches" if len(set(self.g)) == 1 else "gather"
        if form not in FORMS:
            raise ConfigError(f"unknown GDWS form {form!r}; use one of {(*FORMS, 'auto')}")
        if form == "multiplier" and len(set(self.g)) != 1:
            raise ConfigError(
                f"form 'multiplier' needs the same number of kernels for every input channel, got g = "
                f"{sorted(set(self.g))}; use form 'gather'"
            )
        return form

    def set_form(self, form: str) -> GDWSConv2d:
        """Switch between the deployment forms (same weights); returns self."""
        self.form = self._check_form(form)
        return self

    @property
    def uniform(self) -> bool:
        """All g_c equal: the channel-multiplier form is available."""
        return len(set(self.g)) == 1

    @staticmethod
    def check_convertible(conv: nn.Module) -> None:
        """Raise ConfigError unless ``conv`` is an ungrouped nn.Conv2d."""
        if not isinstance(conv, nn.Conv2d):
            raise ConfigError(f"GDWS converts nn.Conv2d layers, got {type(conv).__name__}")
        if conv.groups != 1:
            kind = "a depthwise conv (already separable)" if conv.groups == conv.in_channels else "a grouped conv"
            raise ConfigError(
                f"cannot convert {kind} with groups={conv.groups}: GDWS approximates a dense (groups=1) conv; "
                "leave this layer out (edgesep.gdws skips it and says so)"
            )

    @classmethod
    def like(cls, conv: nn.Conv2d, g: Sequence[int], form: str = "auto") -> GDWSConv2d:
        """An (untrained) GDWS layer with the hyper-parameters of ``conv`` and the allocation ``g``."""
        cls.check_convertible(conv)
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            g,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            form=form,
        )
        return layer.to(device=conv.weight.device, dtype=conv.weight.dtype)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        g: Sequence[int] | None = None,
        *,
        alpha: Tensor | Sequence[float] | None = None,
        kernels: int | None = None,
        beta: float | None = None,
        min_keep: int = 1,
        form: str = "auto",
        svd: ChannelSVD | None = None,
    ) -> GDWSConv2d:
        """The optimal GDWS approximation of ``conv``.

        Give exactly one of: ``g`` (the allocation), ``kernels`` (MEGO: at most G kernels) or ``beta`` (LEGO:
        weighted squared error <= beta). ``alpha`` (C,) weights the error per input channel (default 1).
        ``g_c`` larger than the channel's rank bound min(M, K^2) is refused.

        Raises:
            ConfigError: a grouped / depthwise conv, not exactly one of g / kernels / beta, a bad g.
        """
        cls.check_convertible(conv)
        if sum(v is not None for v in (g, kernels, beta)) != 1:
            raise ConfigError("give exactly one of g (allocation), kernels (MEGO budget) or beta (LEGO error bound)")
        svd = svd or channel_svd(conv.weight)
        r = svd.rank_bound
        if g is None:
            scores = svd.scores(alpha)
            if kernels is not None:
                g = mego(scores, kernels, min_keep=min_keep)
            else:
                g = lego(scores, beta, min_keep=min_keep)
        g = [int(v) for v in g]
        if len(g) != conv.in_channels or any(v < 0 or v > r for v in g):
            raise ConfigError(
                f"g must have {conv.in_channels} entries in [0, {r}] (the rank bound min(M, K^2)), got {g}"
            )
        layer = cls.like(conv, g, form)
        m = conv.out_channels
        k1, k2 = svd.kernel_size
        keep = torch.arange(r)[None, :] < torch.as_tensor(g)[:, None]  # (C, r), channel-major order when flattened
        vh = svd.vh[keep]  # (G, K^2)
        cols = (svd.u * svd.s[:, None, :]).permute(0, 2, 1)[keep]  # (C, M, r) -> (C, r, M) -> (G, M)
        with torch.no_grad():
            layer.dw_weight.copy_(vh.reshape(-1, 1, k1, k2).to(layer.dw_weight.dtype))  # (G, K^2) -> (G, 1, K1, K2)
            layer.pw_weight.copy_(cols.T.reshape(m, -1, 1, 1).to(layer.pw_weight.dtype))  # (M, G) -> (M, G, 1, 1)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    # -- forward and folding -------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        padding = self.padding
        if self._pad is not None:
            x = F.pad(x, self._pad, mode=self.padding_mode)
            padding = (0, 0)
        mult = self.g[0] if self.form == "multiplier" else None
        return gdws_conv2d(
            x,
            self.dw_weight,
            self.pw_weight,
            self.bias,
            self.index,
            stride=self.stride,
            padding=padding,
            dilation=self.dilation,
            multiplier=mult,
            branches=gdws_branches(self.g) if self.form == "branches" else None,
        )

    def dense_weight(self) -> Tensor:
        """The equivalent dense conv weight (M, C, K1, K2)."""
        return gdws_fold(self.dw_weight, self.pw_weight, self.index, self.in_channels)

    def to_conv(self) -> nn.Conv2d:
        """The equivalent dense nn.Conv2d (folded back: fast to evaluate where depthwise convs do not pay)."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
        ).to(device=self.dw_weight.device, dtype=self.dw_weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    # -- statistics ----------------------------------------------------------------------------------------------

    @property
    def num_kernels(self) -> int:
        """G, the number of depthwise kernels (intermediate channels)."""
        return sum(self.g)

    def out_hw(self, in_hw: Sequence[int]) -> tuple[int, int]:
        """Output (H', W') for an input (H, W)."""
        if isinstance(self.padding, str):  # "same" (stride 1) or "valid"
            if self.padding == "same":
                return int(in_hw[0]), int(in_hw[1])
            pad = (0, 0)
        else:
            pad = self.padding
        return tuple(
            (int(in_hw[i]) + 2 * pad[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1) // self.stride[i] + 1
            for i in range(2)
        )

    def macs(self, in_hw: Sequence[int]) -> int:
        """MACs on one sample of spatial size in_hw: G (K1*K2 + M) H' W'."""
        return gdws_macs(self.g, self.out_channels, self.kernel_size, self.out_hw(in_hw))

    def dense_macs(self, in_hw: Sequence[int]) -> int:
        """MACs of the dense conv it replaces: M C K1 K2 H' W'."""
        return self.out_channels * self.in_channels * math.prod(self.kernel_size) * math.prod(self.out_hw(in_hw))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        g = torch.as_tensor(self.g)
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, G={self.num_kernels}, g=[min {int(g.min())}, mean {float(g.float().mean()):.2f}, "
            f"max {int(g.max())}], form={self.form}, bias={self.bias is not None}"
        )
