"""VGG-16 for CIFAR-sized inputs (3x3 convs with BatchNorm, 5 max-pools), with a dense or separable FC head.

For 32x32 inputs the feature map is (512, 1, 1). A Kronecker head over (512, 1, 1) would be a dense 512x512
matrix in disguise, so the separable head reshapes the 512 features into balanced factors (8, 8, 8) and maps them
with ``KronLinear((8, 8, 8), (8, 8, 8))``: 192 weights instead of 262,144.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from edgesep.errors import ConfigError
from edgesep.models._common import (
    FCHead,
    Normalize,
    as_shape,
    balanced_factors,
    norm_stats,
    resolve_head,
    variant,
)
from edgesep.models._registry import register_model

__all__ = ["VGG", "kron_vgg16", "vgg16"]

_CFG16: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """Normalize -> conv3x3-BN-ReLU stacks with max-pools -> FCHead (hidden FC + ReLU + dropout + classifier).

    Args:
        in_shape: (C, H, W), H and W at least 32.
        num_classes: outputs.
        cfg: channels per conv layer, "M" for a 2x2 max-pool.
        hidden: hidden FC width.
        hidden_shape: KronLinear output shape for a separable head, None for a dense one.
        kron_in_shape: the KronLinear input shape the flattened features are reshaped to.
        dropout: after the hidden FC layer.
        mean, std: per-channel normalization inside the model.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        cfg: Sequence[int | str],
        hidden: int,
        hidden_shape: tuple[int, ...] | None,
        kron_in_shape: tuple[int, ...] | None,
        dropout: float,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        super().__init__()
        c, h, w = in_shape
        pools = sum(1 for v in cfg if v == "M")
        if h < 2**pools or w < 2**pools:
            raise ConfigError(
                f"VGG with {pools} max-pools needs inputs of at least {2**pools}x{2**pools}, got {in_shape}"
            )
        self.in_shape, self.num_classes = in_shape, num_classes
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU()]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.feature_shape = (c, h, w)
        self.head = FCHead(self.feature_shape, num_classes, hidden, hidden_shape, kron_in_shape, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.normalize(x))  # (B, C, H, W) -> (B, 512, H/32, W/32)
        return self.head(x)


@register_model("vgg16")
def vgg16(
    *,
    in_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    head: str = "dense",
    width: float = 1.0,
    hidden: int | None = None,
    hidden_shape: Sequence[int] | None = None,
    kron_in_shape: Sequence[int] | None = None,
    dropout: float = 0.0,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
) -> VGG:
    """VGG-16 with BatchNorm for CIFAR (13 conv layers, one hidden FC layer, classifier).

    Args:
        in_shape: (C, H, W), at least 32x32.
        num_classes: outputs.
        head: "dense" or "kron" (separable hidden FC layer).
        width: channel multiplier (0.25 -> 16..128 channels).
        hidden: hidden FC width (default 512).
        hidden_shape: KronLinear output shape (default balanced 3 factors of hidden: (8, 8, 8)).
        kron_in_shape: shape the flattened features are reshaped to for the KronLinear (default balanced factors
            of the feature count, with as many factors as hidden_shape).
        dropout: after the hidden FC layer (default none; BatchNorm regularizes).
        mean, std: per-channel normalization inside the model (default none).
    """
    in_shape = as_shape(in_shape, "in_shape", 3)
    if not (isinstance(width, (int, float)) and width > 0):
        raise ConfigError(f"vgg16: width must be a positive number, got {width!r}")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ConfigError(f"vgg16: dropout must be in [0, 1), got {dropout!r}")
    cfg = [v if v == "M" else max(1, round(int(v) * width)) for v in _CFG16]
    d = len(hidden_shape) if hidden_shape is not None else 3
    hid, shape = resolve_head(head, hidden, hidden_shape, 512, d, "vgg16")
    kin = None
    if shape is not None:
        h, w = in_shape[1] // 32, in_shape[2] // 32
        features = cfg[-2] * h * w
        if kron_in_shape is None:
            kin = tuple(sorted(balanced_factors(features, len(shape)), reverse=True))
        else:
            kin = as_shape(kron_in_shape, "kron_in_shape", len(shape))
    elif kron_in_shape is not None:
        raise ConfigError("vgg16: kron_in_shape is for head='kron'")
    m, s = norm_stats(mean, std, in_shape[0])
    return VGG(in_shape, int(num_classes), cfg, hid, shape, kin, float(dropout), m, s)


kron_vgg16 = register_model("kron_vgg16")(variant(vgg16, head="kron"))
