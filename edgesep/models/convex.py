"""The small provably-robust CNN of Wong & Kolter (2018), key-compatible with the locuslab/convex_adversarial
checkpoints in shared/models/convex_adversarial/.

Conv(C -> 16, k4, s2, p1)-ReLU-Conv(16 -> 32, k4, s2, p1)-ReLU-Flatten-Linear(F -> 100)-ReLU-Linear(100 -> 10),
an ``nn.Sequential`` so the keys are ``0.*``, ``2.*``, ``5.*``, ``7.*``. Inputs are pixels in [0, 1], not
normalized (that is how the checkpoints were trained, and their eps is in pixel units).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from edgesep.errors import ConfigError
from edgesep.models._common import as_shape, load_pretrained
from edgesep.models._registry import register_model

__all__ = ["ConvexSmall", "convex_small"]


def _conv_out(n: int) -> int:
    return (n + 2 * 1 - 4) // 2 + 1  # kernel 4, stride 2, padding 1


class ConvexSmall(nn.Sequential):
    """The Wong & Kolter small CNN as an nn.Sequential (no normalization)."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int = 10):
        c, h, w = in_shape
        h2, w2 = _conv_out(_conv_out(h)), _conv_out(_conv_out(w))
        if h2 < 1 or w2 < 1:
            raise ConfigError(f"convex_small needs inputs of at least 4x4, got in_shape {in_shape}")
        super().__init__(
            nn.Conv2d(c, 16, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(1),  # (B, 32, H/4, W/4) -> (B, 32*H/4*W/4)
            nn.Linear(32 * h2 * w2, 100),
            nn.ReLU(),
            nn.Linear(100, num_classes),
        )
        self.in_shape, self.num_classes = in_shape, num_classes


@register_model("convex_small")
def convex_small(
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    pretrained: str | None = None,
    in_shape: Sequence[int] | None = None,
) -> ConvexSmall:
    """Wong & Kolter's small CNN.

    Args:
        in_channels: input channels; without in_shape the image size is that of the shipped checkpoints:
            28x28 for 1 channel ((Fashion-)MNIST, F = 1568), 32x32 otherwise (SVHN, F = 2048).
        num_classes: outputs.
        pretrained: path to a safetensors checkpoint (e.g. shared/models/convex_adversarial/mnist.safetensors).
        in_shape: (C, H, W), overriding the default size; its C wins over in_channels left at 1, and must
            equal any other in_channels.
    Raises:
        ConfigError: in_shape and in_channels disagree.
        CheckpointError: the checkpoint is missing, unreadable, or its keys / shapes do not match.
    """
    c = as_shape(in_channels, "in_channels", 1)[0]
    if in_shape is None:
        shape = (c, 28, 28) if c == 1 else (c, 32, 32)
    else:
        shape = as_shape(in_shape, "in_shape", 3)
        if c != 1 and shape[0] != c:
            raise ConfigError(f"convex_small: in_shape {shape} has {shape[0]} channels but in_channels={c}")
    model = ConvexSmall(shape, int(num_classes))
    if pretrained is not None:
        load_pretrained(model, Path(pretrained))
    return model
