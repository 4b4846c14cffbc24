"""Separable structured (Kronecker) fully-connected layers.

"Separable Structured Transformations": a fully-connected weight W (M x N) is the Kronecker product of d small
factors, W = U_1 ⊗ U_2 ⊗ ... ⊗ U_d with U_k of shape (m_k, n_k), M = prod m_k, N = prod n_k. The layer takes its
input un-flattened, X of shape (B, n_1, ..., n_d) (an image (C, H, W) or a feature map), and returns
Y of shape (B, m_1, ..., m_d) without ever forming W.

Vec convention (row-major, PyTorch's ``reshape``): with x = X.reshape(B, N) and y = Y.reshape(B, M),
``y = x @ W.T`` where ``W = torch.kron(U_1, torch.kron(U_2, ...))``. For d = 2 this is Y = U_1 X U_2ᵀ per sample.

The forward is d mode products. Factor k is applied to the *last* axis with the weight on the right-hand side of
a matmul (``x @ U_kᵀ``: per-channel INT8 scales then land on the output axis), and the new axis is rotated to the
front; after d steps the axes are back in order. This is exactly what the ONNX lowering emits (Reshape /
Transpose / MatMul), and it runs through the custom op ``edgesep::kron_linear`` so the exporter can find it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from edgesep.errors import ShapeMismatchError

__all__ = [
    "KronLinear",
    "kron_dense",
    "kron_linear",
    "kron_linear_reference",
    "kron_macs",
    "nearest_kronecker",
]


# ----------------------------------------------------------------------------------------------------------------
# functional core


def _check_shapes(x_shape: Sequence[int], factors: Sequence[Tensor]) -> None:
    d = len(factors)
    if d < 1:
        raise ShapeMismatchError("kron_linear needs at least one factor")
    n = tuple(int(u.shape[1]) for u in factors)
    # exactly one leading batch axis: the mode products rotate axes to position 1 (see kron_linear_reference)
    if len(x_shape) != d + 1 or tuple(x_shape[-d:]) != n:
        raise ShapeMismatchError(
            f"input of shape {tuple(x_shape)} does not match the factors' input shape (B, {', '.join(map(str, n))}); "
            "pass the input un-flattened with a leading batch axis"
        )


def kron_linear_reference(x: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """Apply kron(U_1, ..., U_d) to un-flattened x with plain torch ops (no custom op).

    Args:
        x: (B, n_1, ..., n_d).
        factors: U_k of shape (m_k, n_k).
    Returns:
        (B, m_1, ..., m_d).
    """
    d = len(factors)
    B = x.shape[0]
    y = x
    for k in range(d - 1, -1, -1):
        u = factors[k]
        # (B, m_{k+1..d}, n_1..n_k) -> (B, m_{k+1..d}, n_1..n_{k-1}, m_k): matmul on the last axis, weight on the right
        y = torch.matmul(y, u.transpose(0, 1))
        # (B, m_{k+1..d}, n_1..n_{k-1}, m_k) -> (B, m_k, m_{k+1..d}, n_1..n_{k-1}): rotate the new axis to the front
        y = y.movedim(-1, 1) if d > 1 else y
    return y.reshape(B, *(int(u.shape[0]) for u in factors))


def _mode_product(x: Tensor, u: Tensor, axis: int) -> Tensor:
    """x with its `axis` multiplied by u (m, n): (..., n, ...) -> (..., m, ...)."""
    return torch.tensordot(x, u, dims=([axis], [1])).movedim(-1, axis)


@torch.library.custom_op("edgesep::kron_linear", mutates_args=())
def _kron_linear_op(x: Tensor, factors: list[Tensor]) -> Tensor:
    return kron_linear_reference(x, factors).contiguous()


@_kron_linear_op.register_fake
def _(x: Tensor, factors: list[Tensor]) -> Tensor:
    _check_shapes(x.shape, factors)
    d = len(factors)
    return x.new_empty((*x.shape[: x.dim() - d], *(u.shape[0] for u in factors)))


def _setup_context(ctx, inputs, output) -> None:
    x, factors = inputs
    ctx.save_for_backward(x, *factors)


def _backward(ctx, grad: Tensor):
    x, *factors = ctx.saved_tensors
    d = len(factors)
    # Wᵀ = kron(U_1ᵀ, ..., U_dᵀ): the input gradient is the same operator with transposed factors.
    grad_x = _kron_linear_op(grad.contiguous(), [u.transpose(0, 1).contiguous() for u in factors])
    grad_factors = []
    for k in range(d):
        # z: x with every mode but k mapped to the output side, (B, m_1..m_{k-1}, n_k, m_{k+1}..m_d)
        z = x
        for j in range(d):
            if j != k:
                z = _mode_product(z, factors[j], j + 1)
        axes = [a for a in range(grad.dim()) if a != k + 1]
        grad_factors.append(torch.tensordot(grad, z, dims=(axes, axes)))  # (m_k, n_k)
    return grad_x, grad_factors


_kron_linear_op.register_autograd(_backward, setup_context=_setup_context)


def kron_linear(
    x: Tensor, factors: Sequence[Tensor], bias: Tensor | None = None, *, use_op: bool | None = None
) -> Tensor:
    """Y = (U_1 ⊗ ... ⊗ U_d) applied to un-flattened x, plus bias.

    Args:
        x: (B, n_1, ..., n_d).
        factors: U_k of shape (m_k, n_k), d >= 1.
        bias: None, or broadcastable to (m_1, ..., m_d).
        use_op: go through the custom op ``edgesep::kron_linear``. Default: when torch is tracing (torch.export,
            the ONNX exporter, torch.compile), so the graph holds one lowerable node per layer; in eager mode the
            same mode products run as plain torch ops, which saves the custom-op dispatch (~30 µs per call).
    Returns:
        (B, m_1, ..., m_d).
    Raises:
        ShapeMismatchError: if x's trailing axes are not (n_1, ..., n_d).
    """
    _check_shapes(x.shape, factors)
    if use_op is None:
        use_op = torch.compiler.is_compiling()
    y = _kron_linear_op(x, list(factors)) if use_op else kron_linear_reference(x, factors)
    return y if bias is None else y + bias


def kron_dense(factors: Sequence[Tensor]) -> Tensor:
    """The dense (M, N) weight kron(U_1, ..., U_d) under the row-major vec convention."""
    w = factors[0]
    for u in factors[1:]:
        w = torch.kron(w, u)
    return w


def kron_macs(in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """Exact multiply-accumulates per sample of the mode-product forward (last factor first)."""
    d = len(in_shape)
    macs = 0
    for k in range(d - 1, -1, -1):
        # at step k the tensor holds n_1..n_{k-1} (not yet mapped) and m_{k+1}..m_d (already mapped)
        macs += math.prod(in_shape[:k]) * in_shape[k] * out_shape[k] * math.prod(out_shape[k + 1 :])
    return macs


# ----------------------------------------------------------------------------------------------------------------
# nearest Kronecker product (Van Loan–Pitsianis for d = 2, alternating least squares for d > 2)


def _rearrange(w: Tensor, in_shape: Sequence[int], out_shape: Sequence[int]) -> Tensor:
    """(M, N) -> tensor of order d with modes (m_k * n_k), so kron(U_k) becomes an outer product of vec(U_k)."""
    d = len(in_shape)
    t = w.reshape(*out_shape, *in_shape)  # (M, N) -> (m_1..m_d, n_1..n_d)
    perm = [a for k in range(d) for a in (k, d + k)]
    t = t.permute(*perm)  # (m_1..m_d, n_1..n_d) -> (m_1, n_1, ..., m_d, n_d)
    return t.reshape(*(m * n for m, n in zip(out_shape, in_shape, strict=True)))  # -> (m_1 n_1, ..., m_d n_d)


def nearest_kronecker(
    w: Tensor,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    *,
    iters: int = 50,
    tol: float = 1e-10,
) -> tuple[list[Tensor], float]:
    """The Kronecker product nearest to w in Frobenius norm.

    Args:
        w: dense weight (M, N) with M = prod(out_shape), N = prod(in_shape) (row-major vec convention).
        in_shape, out_shape: (n_1..n_d) and (m_1..m_d).
        iters, tol: ALS limits (d > 2 only).
    Returns:
        (factors, relative error ||w - kron(factors)||_F / ||w||_F).
    """
    in_shape, out_shape = tuple(int(s) for s in in_shape), tuple(int(s) for s in out_shape)
    if len(in_shape) != len(out_shape):
        raise ShapeMismatchError(f"in_shape {in_shape} and out_shape {out_shape} need the same number of factors")
    if tuple(w.shape) != (math.prod(out_shape), math.prod(in_shape)):
        raise ShapeMismatchError(
            f"weight of shape {tuple(w.shape)} does not factor into out_shape {out_shape} x in_shape {in_shape} "
            f"(needs ({math.prod(out_shape)}, {math.prod(in_shape)}))"
        )
    d = len(in_shape)
    w64 = w.detach().to(torch.float64)
    t = _rearrange(w64, in_shape, out_shape)
    if d == 1:
        vecs = [t]
    elif d == 2:
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        root = s[0].sqrt()
        vecs = [u[:, 0] * root, vh[0] * root]
    elif t.norm() == 0:
        vecs = [torch.zeros(s, dtype=t.dtype, device=t.device) for s in t.shape]  # ALS would divide 0 by 0
    else:
        # rank-1 ALS (higher-order power method), started from each mode's leading left singular vector
        vecs = []
        for k in range(d):
            unfold = t.movedim(k, 0).reshape(t.shape[k], -1)
            vecs.append(torch.linalg.svd(unfold, full_matrices=False)[0][:, 0])
        scale = t
        for j in range(d - 1, -1, -1):  # <t, v_1 ⊗ ... ⊗ v_d>: the best scale of the start (iters = 0)
            scale = torch.tensordot(scale, vecs[j], dims=([j], [0]))
        prev = math.inf
        for _ in range(iters):
            for k in range(d):
                c = t
                for j in range(d - 1, -1, -1):  # contract every mode but k
                    if j != k:
                        c = torch.tensordot(c, vecs[j], dims=([j], [0]))
                scale = c.norm()
                vecs[k] = c / scale
            err = (t.norm() ** 2 - scale**2).clamp_min(0).sqrt().item()
            if prev - err <= tol * max(t.norm().item(), 1e-300):
                break
            prev = err
        root = scale.abs() ** (1.0 / d)
        vecs = [v * root for v in vecs]
        vecs[0] = vecs[0] * torch.sign(scale)
    factors = [v.reshape(m, n) for v, m, n in zip(vecs, out_shape, in_shape, strict=True)]
    norm = w64.norm().item()
    err = (w64 - kron_dense(factors)).norm().item() / norm if norm > 0 else 0.0
    return [f.to(w.dtype) for f in factors], err


# ----------------------------------------------------------------------------------------------------------------
# module


def _as_shape(shape: int | Sequence[int], what: str) -> tuple[int, ...]:
    t = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    if not t or any(s < 1 for s in t):
        raise ShapeMismatchError(f"{what} must be a non-empty tuple of positive ints, got {shape!r}")
    return t


class KronLinear(nn.Module):
    """A fully-connected layer whose weight is kron(U_1, ..., U_d), applied to un-flattened inputs.

    Args:
        in_shape: (n_1, ..., n_d), the trailing shape of the input (e.g. (C, H, W) of an image).
        out_shape: (m_1, ..., m_d), the trailing shape of the output; same length as in_shape.
        bias: learn a bias of shape out_shape.
    Raises:
        ShapeMismatchError: if the shapes do not have the same number of factors or are not positive.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], bias: bool = True):
        super().__init__()
        self.in_shape = _as_shape(in_shape, "in_shape")
        self.out_shape = _as_shape(out_shape, "out_shape")
        if len(self.in_shape) != len(self.out_shape):
            raise ShapeMismatchError(
                f"in_shape {self.in_shape} and out_shape {self.out_shape} must have the same number of factors"
            )
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(m, n)) for m, n in zip(self.out_shape, self.in_shape, strict=True)
        )
        self.bias = nn.Parameter(torch.empty(self.out_shape)) if bias else None
        self.reset_parameters()

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_shape)

    @property
    def d(self) -> int:
        return len(self.in_shape)

    def reset_parameters(self) -> None:
        """Initialize so the dense equivalent has exactly nn.Linear's RMS, 1 / sqrt(3 N).

        Each factor is drawn uniformly and rescaled to its share of that RMS (RMS of a Kronecker product = product
        of the factors' RMS). Without the rescale a small factor can come out far from its expected scale: a 1x1
        channel factor ((1, 8, 8) -> (1, 16, 16)) is a single random scalar, and near zero it silences the layer.
        """
        with torch.no_grad():
            for u in self.factors:
                nn.init.uniform_(u, -1.0, 1.0)
                target = (3.0 ** (-1.0 / self.d)) ** 0.5 / math.sqrt(u.shape[1])  # prod_k target_k = 1/sqrt(3N)
                u.mul_(target / u.pow(2).mean().sqrt().clamp_min(1e-12))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.in_shape:
            if x.dim() == 2 and x.shape[1] == self.in_features:
                x = x.reshape(x.shape[0], *self.in_shape)  # (B, N) -> (B, n_1, ..., n_d)
            else:
                raise ShapeMismatchError(
                    f"KronLinear expects input (B, {', '.join(map(str, self.in_shape))}) or (B, {self.in_features}),"
                    f" got {tuple(x.shape)}"
                )
        return kron_linear(x, list(self.factors), self.bias)

    # -- conversion -----------------------------------------------------------------------------------------------

    @classmethod
    def from_dense(cls, linear: nn.Linear, in_shape: Sequence[int], out_shape: Sequence[int]) -> KronLinear:
        """The KronLinear nearest to ``linear`` (Frobenius norm); ``.approx_error`` holds the relative error."""
        in_shape, out_shape = _as_shape(in_shape, "in_shape"), _as_shape(out_shape, "out_shape")
        if (linear.out_features, linear.in_features) != (math.prod(out_shape), math.prod(in_shape)):
            raise ShapeMismatchError(
                f"nn.Linear({linear.in_features} -> {linear.out_features}) does not match in_shape {in_shape} "
                f"(N={math.prod(in_shape)}) and out_shape {out_shape} (M={math.prod(out_shape)})"
            )
        layer = cls(in_shape, out_shape, bias=linear.bias is not None).to(linear.weight.device, linear.weight.dtype)
        factors, err = nearest_kronecker(linear.weight, in_shape, out_shape)
        with torch.no_grad():
            for p, f in zip(layer.factors, factors, strict=True):
                p.copy_(f)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.reshape(out_shape))
        layer.approx_error = err
        return layer

    def to_dense(self) -> Tensor:
        """The exactly equivalent dense weight (M, N) (row-major vec convention)."""
        return kron_dense(list(self.factors))

    def to_linear(self) -> nn.Linear:
        """An nn.Linear computing the same map on flattened inputs."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias.reshape(-1))
        return lin

    # -- exact counts and spectra ---------------------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(u.numel() for u in self.factors) + (self.bias.numel() if self.bias is not None else 0)

    def dense_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def nonzeros(self) -> int:
        return sum(int((u != 0).sum()) for u in self.factors) + (
            int((self.bias != 0).sum()) if self.bias is not None else 0
        )

    def macs(self) -> int:
        """Multiply-accumulates per sample (bias adds not counted)."""
        return kron_macs(self.in_shape, self.out_shape)

    def dense_macs(self) -> int:
        return self.in_features * self.out_features

    @torch.no_grad()
    def spectral_norm(self) -> float:
        """||W||_2 = prod_k ||U_k||_2 (singular values of a Kronecker product are products of the factors')."""
        return math.prod(torch.linalg.matrix_norm(u.double(), ord=2).item() for u in self.factors)

    @torch.no_grad()
    def condition_number(self) -> float:
        """prod_k cond(U_k): the dense operator's sigma_max / sigma_min over its prod_k min(m_k, n_k) singular
        values that the factors determine. That is the usual condition number when every factor is wide or every
        factor is tall (the dense W then has exactly that many singular values)."""
        c = 1.0
        for u in self.factors:
            s = torch.linalg.svdvals(u.double())
            c *= (s[0] / s[-1]).item() if s[-1] > 0 else math.inf
        return c

    def extra_repr(self) -> str:
        shapes = " ⊗ ".join(f"{m}x{n}" for m, n in zip(self.out_shape, self.in_shape, strict=True))
        return (
            f"in_shape={self.in_shape}, out_shape={self.out_shape}, factors=[{shapes}], "
            f"bias={self.bias is not None}, params={self.num_params()} (dense {self.dense_params()}), "
            f"macs={self.macs()} (dense {self.dense_macs()})"
        )
