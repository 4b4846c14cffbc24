"""LeNet-5 for 28x28 grey images (MNIST, Fashion-MNIST): dense (``lenet5``) and robust low-rank
(``lowrank_lenet5``, every conv and hidden FC layer ``edgesep.layers.lowrank``; train it with ``--optimizer condlr``).

Architecture (the classic one, ReLU + max pooling): Normalize -> conv 5x5 1->6 (padding 2) -> ReLU -> maxpool 2
-> conv 5x5 6->16 -> ReLU -> maxpool 2 -> flatten (16 x 5 x 5 = 400) -> fc 400->120 -> ReLU -> fc 120->84 -> ReLU
-> fc 84->num_classes. Other input sizes work as long as the feature map stays >= 1 pixel (the flatten width
is computed from in_shape).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from edgesep.errors import ConfigError
from edgesep.layers.lowrank import LowRankConv2d, LowRankLinear
from edgesep.models._common import Normalize, as_shape, norm_stats
from edgesep.models._registry import register_model

__all__ = ["LeNet5", "lenet5", "lowrank_lenet5"]

LAYERS = ("conv1", "conv2", "fc1", "fc2", "fc3")


class LeNet5(nn.Module):
    """LeNet-5; ``ranks`` maps layer names (conv1, conv2, fc1, fc2, fc3) to the rank of a low-rank replacement.

    Args:
        in_shape: (C, H, W) of one input.
        num_classes: outputs.
        mean, std: per-channel normalization inside the model.
        ranks: {layer name: rank} for the layers that are low-rank (``LowRankConv2d`` / ``LowRankLinear``);
            the others are dense.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        ranks: dict[str, int] | None = None,
    ):
        super().__init__()
        ranks = dict(ranks or {})
        self.in_shape = tuple(in_shape)
        self.num_classes = num_classes
        c = self.in_shape[0]
        self.normalize = Normalize(mean, std, ndim=3)

        def conv(name: str, cin: int, cout: int, padding: int) -> nn.Module:
            if name in ranks:
                return LowRankConv2d(cin, cout, 5, padding=padding, rank=ranks[name])
            return nn.Conv2d(cin, cout, 5, padding=padding)

        def fc(name: str, n: int, m: int) -> nn.Module:
            return LowRankLinear(n, m, rank=ranks[name]) if name in ranks else nn.Linear(n, m)

        self.conv1 = conv("conv1", c, 6, 2)
        self.conv2 = conv("conv2", 6, 16, 0)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        with torch.no_grad():
            flat = self._features(torch.zeros(1, *self.in_shape)).shape[1]
        self.fc1 = fc("fc1", flat, 120)
        self.fc2 = fc("fc2", 120, 84)
        self.fc3 = fc("fc3", 84, int(num_classes))

    def _features(self, x: Tensor) -> Tensor:
        x = self.pool(self.act(self.conv1(x)))  # (B, C, H, W) -> (B, 6, H/2, W/2)
        x = self.pool(self.act(self.conv2(x)))  # -> (B, 16, (H/2-4)/2, (W/2-4)/2)
        return x.flatten(1)  # (B, 16, h, w) -> (B, 16 h w)

    def forward(self, x: Tensor) -> Tensor:
        x = self._features(self.normalize(x))
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return self.fc3(x)


def _lenet_dims(in_shape: Sequence[int], num_classes: int) -> dict[str, tuple[int, int]]:
    """(m, n) of each layer's weight matrix."""
    c, h, w = in_shape
    fh, fw = (h // 2 - 4) // 2, (w // 2 - 4) // 2
    if fh < 1 or fw < 1:
        raise ConfigError(f"LeNet-5 needs inputs of at least 12x12 pixels, got in_shape {tuple(in_shape)}")
    return {
        "conv1": (6, c * 25),
        "conv2": (16, 6 * 25),
        "fc1": (120, 16 * fh * fw),
        "fc2": (84, 120),
        "fc3": (int(num_classes), 84),
    }


@register_model("lenet5")
def lenet5(
    *,
    in_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
) -> LeNet5:
    """Dense LeNet-5 (61.7k parameters on MNIST)."""
    in_shape = as_shape(in_shape, "in_shape", 3)
    _lenet_dims(in_shape, num_classes)
    m, s = norm_stats(mean, std, in_shape[0])
    return LeNet5(in_shape, int(num_classes), m, s)


@register_model("lowrank_lenet5")
def lowrank_lenet5(
    *,
    in_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    rank_ratio: float = 0.5,
    ranks: dict[str, int] | None = None,
    lowrank_classifier: bool = False,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
) -> LeNet5:
    """LeNet-5 with low-rank conv1, conv2, fc1, fc2 (and fc3 if ``lowrank_classifier``).

    Args:
        rank_ratio: fraction of each layer's full rank removed, r = ceil((1 - rank_ratio) min(m, n)); on MNIST
            0.5 gives ranks conv1 3, conv2 8, fc1 60, fc2 42; 0.8 gives 2, 4, 24, 17.
        ranks: explicit {layer: rank}, overriding rank_ratio for the layers it names.
        lowrank_classifier: make the 84 -> num_classes classifier low-rank too (default dense: at ratio 0.8 it
            would have rank 2 for 10 classes).
    Raises:
        ConfigError: an unknown layer name in ranks, or ranks out of range.
    """
    from edgesep.layers.lowrank import rank_from_ratio

    in_shape = as_shape(in_shape, "in_shape", 3)
    dims = _lenet_dims(in_shape, num_classes)
    ranks = dict(ranks or {})
    unknown = sorted(set(ranks) - set(LAYERS))
    if unknown:
        raise ConfigError(f"lowrank_lenet5: unknown layers {unknown} in ranks; layers are {list(LAYERS)}")
    chosen = [n for n in LAYERS if n != "fc3" or lowrank_classifier or "fc3" in ranks]
    resolved = {
        n: rank_from_ratio(*dims[n], rank=ranks[n]) if n in ranks else rank_from_ratio(*dims[n], rank_ratio)
        for n in chosen
    }
    m, s = norm_stats(mean, std, in_shape[0])
    return LeNet5(in_shape, int(num_classes), m, s, ranks=resolved)
