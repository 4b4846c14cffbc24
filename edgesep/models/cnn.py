"""A small CNN: two conv layers and a fully-connected head whose hidden layer is dense or Kronecker.

With ``head="kron"`` the hidden FC layer is a ``KronLinear`` on the un-flattened (C, H, W) feature map, e.g.
MNIST (32, 7, 7) -> (8, 4, 4).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from edgesep.errors import ConfigError
from edgesep.models._common import FCHead, Normalize, as_shape, norm_stats, resolve_head, variant
from edgesep.models._registry import register_model

__all__ = ["CNNSmall", "cnn_small", "kron_cnn_small"]


class CNNSmall(nn.Module):
    """Normalize -> [conv3x3 + ReLU + maxpool2] x 2 -> FCHead.

    Args:
        in_shape: (C, H, W), H and W at least 4.
        num_classes: outputs.
        channels: output channels of the two conv layers.
        hidden: hidden FC width.
        hidden_shape: KronLinear output shape (3 factors) for a Kronecker head, None for a dense one.
        mean, std: per-channel normalization inside the model.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        channels: tuple[int, int],
        hidden: int,
        hidden_shape: tuple[int, ...] | None,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        super().__init__()
        c, h, w = in_shape
        if h < 4 or w < 4:
            raise ConfigError(f"cnn_small needs inputs of at least 4x4 (two 2x2 poolings), got in_shape {in_shape}")
        self.in_shape, self.num_classes = in_shape, num_classes
        c1, c2 = channels
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.feature_shape = (c2, h // 4, w // 4)
        self.head = FCHead(self.feature_shape, num_classes, hidden, hidden_shape)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.normalize(x))  # (B, C, H, W) -> (B, c2, H/4, W/4)
        return self.head(x)


@register_model("cnn_small")
def cnn_small(
    *,
    in_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    head: str = "dense",
    channels: Sequence[int] = (16, 32),
    hidden: int | None = None,
    hidden_shape: Sequence[int] | None = None,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
) -> CNNSmall:
    """Two conv layers + FC head.

    Args:
        in_shape: (C, H, W) of one input.
        num_classes: outputs.
        head: "dense" (nn.Linear hidden layer) or "kron" (KronLinear on the (C, H, W) feature map).
        channels: the two conv layers' output channels.
        hidden: hidden FC width (default 128).
        hidden_shape: KronLinear output shape, 3 entries (default balanced factors of hidden: (8, 4, 4)).
        mean, std: per-channel normalization inside the model (default none).
    """
    in_shape = as_shape(in_shape, "in_shape", 3)
    ch = as_shape(channels, "channels", 2)
    width, shape = resolve_head(head, hidden, hidden_shape, 128, 3, "cnn_small")
    m, s = norm_stats(mean, std, in_shape[0])
    return CNNSmall(in_shape, int(num_classes), ch, width, shape, m, s)


kron_cnn_small = register_model("kron_cnn_small")(variant(cnn_small, head="kron"))
