"""A small Vision Transformer whose linear maps (qkv, proj, mlp fc1/fc2) can be Kronecker-structured.

With ``kron=True`` every token-wise linear map is a ``KronTokenLinear``: the token dimension D = a*b is viewed
as an (a, b) matrix and mapped by ``KronLinear((a, b), (c, d))``. The patch embedding (a conv) and the classifier
stay dense.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from edgesep.errors import ConfigError
from edgesep.layers.kron import KronLinear
from edgesep.models._common import Normalize, as_shape, balanced_factors, norm_stats, variant
from edgesep.models._registry import register_model

__all__ = ["KronTokenLinear", "ViT", "kron_vit_tiny", "vit_tiny"]


class KronTokenLinear(nn.Module):
    """A Kronecker-structured linear map over the last axis of a token tensor: (..., D_in) -> (..., D_out).

    D_in and D_out are split into balanced factor pairs (64 -> (8, 8), 192 -> (12, 16)) unless given.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.in_factors = tuple(in_factors or balanced_factors(in_features, 2))
        out_factors = tuple(out_factors or balanced_factors(out_features, len(self.in_factors)))
        self.kron = KronLinear(self.in_factors, out_factors, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, *self.in_factors)  # (B, T, D_in) -> (B*T, a, b)
        y = self.kron(x)  # (B*T, a, b) -> (B*T, c, d)
        return y.reshape(*lead, self.out_features)  # (B*T, c, d) -> (B, T, D_out)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, linear: Callable[[int, int], nn.Module]):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = linear(dim, 3 * dim)
        self.proj = linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        hs = D // self.heads
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, hs)  # (B, T, 3D) -> (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, T, 3, nh, hs) -> 3 x (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * self.scale  # (B, nh, T, T)
        y = att.softmax(dim=-1) @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, nh, T, hs) -> (B, T, D)
        return self.proj(y)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, linear: Callable[[int, int], nn.Module]):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, linear)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = linear(mlp_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Normalize -> patch embedding (conv) + class token + positional embedding -> blocks -> LN -> Linear."""

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        patch: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        kron: bool,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        super().__init__()
        c, h, w = in_shape
        self.in_shape, self.num_classes = in_shape, num_classes
        self.normalize = Normalize(mean, std)
        self.patch_embed = nn.Conv2d(c, dim, patch, stride=patch)
        tokens = (h // patch) * (w // patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        linear: Callable[[int, int], nn.Module] = KronTokenLinear if kron else nn.Linear
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim, linear) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(self.normalize(x))  # (B, C, H, W) -> (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, D, H/p, W/p) -> (B, T, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, T+1, D)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])  # class token (B, D) -> (B, num_classes)


@register_model("vit_tiny")
def vit_tiny(
    *,
    in_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    patch: int = 4,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: float = 2.0,
    kron: bool = False,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
) -> ViT:
    """A small ViT (64-dim tokens, 4 blocks, 4 heads by default; 8x8 patches of 4x4 pixels on CIFAR).

    Args:
        in_shape: (C, H, W); H and W must be multiples of patch.
        num_classes: outputs.
        patch: patch side in pixels.
        dim: token dimension; with kron=True it is split into two balanced factors (64 -> 8x8).
        depth: transformer blocks.
        heads: attention heads; must divide dim.
        mlp_ratio: MLP hidden width = round(dim * mlp_ratio).
        kron: make qkv, proj, fc1 and fc2 Kronecker-structured (KronTokenLinear).
        mean, std: per-channel normalization inside the model (default none).
    """
    in_shape = as_shape(in_shape, "in_shape", 3)
    patch, dim, depth, heads = (
        as_shape(v, n, 1)[0] for v, n in ((patch, "patch"), (dim, "dim"), (depth, "depth"), (heads, "heads"))
    )
    if in_shape[1] % patch or in_shape[2] % patch:
        raise ConfigError(f"vit_tiny: patch {patch} must divide the image size {in_shape[1:]}")
    if dim % heads:
        raise ConfigError(f"vit_tiny: heads {heads} must divide dim {dim}")
    if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0):
        raise ConfigError(f"vit_tiny: mlp_ratio must be positive, got {mlp_ratio!r}")
    mlp_dim = max(1, round(dim * mlp_ratio))
    m, s = norm_stats(mean, std, in_shape[0])
    return ViT(in_shape, int(num_classes), patch, dim, depth, heads, mlp_dim, bool(kron), m, s)


kron_vit_tiny = register_model("kron_vit_tiny")(variant(vit_tiny, kron=True))
