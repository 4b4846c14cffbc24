"""Multi-layer perceptrons: dense (``mlp``) and Kronecker-structured (``kron_mlp``), same depth.

``kron_mlp`` keeps the input un-flattened: each hidden layer is ``KronLinear(shape_in, shape_out)`` on the
previous layer's shape, e.g. MNIST (1, 28, 28) -> (1, 16, 16) -> (1, 16, 16). The classifier stays a dense
``nn.Linear``: 10 classes do not factor into useful Kronecker shapes, and that layer is small anyway.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from edgesep.errors import ConfigError, ShapeMismatchError
from edgesep.layers.kron import KronLinear
from edgesep.models._common import Normalize, as_shape, norm_stats
from edgesep.models._registry import register_model

__all__ = ["MLP", "default_hidden_shape", "kron_mlp", "mlp"]


def default_hidden_shape(in_shape: Sequence[int]) -> tuple[int, ...]:
    """Default hidden shape for an input shape: the channels kept, every other axis 16.

    digits (1, 8, 8) -> (1, 16, 16); MNIST (1, 28, 28) -> (1, 16, 16); CIFAR (3, 32, 32) -> (3, 16, 16).
    ``mlp``'s default width is the same number of units (256, 256, 768). On digits, (1, 16, 16) reaches 0.92
    after 3 epochs of FGSM training where (1, 8, 8) (64 units, 8x8 factors) reaches 0.71.
    """
    return (int(in_shape[0]), *(16 for _ in in_shape[1:]))


class MLP(nn.Module):
    """Normalize -> hidden layers (Linear or KronLinear) + ReLU -> flatten -> Linear(num_classes).

    Args:
        in_shape: shape of one input, e.g. (C, H, W).
        num_classes: outputs.
        hidden_shapes: one output shape per hidden layer; for a dense layer a 1-tuple (width,).
        kron: KronLinear hidden layers on un-flattened inputs (each hidden shape has len(in_shape) factors)
            instead of nn.Linear on flattened ones.
        mean, std: per-channel normalization applied inside the model.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        hidden_shapes: Sequence[Sequence[int]],
        kron: bool,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.num_classes = num_classes
        self.kron = kron
        self.normalize = Normalize(mean, std, ndim=len(self.in_shape))
        layers: list[nn.Module] = []
        prev = self.in_shape if kron else (math.prod(self.in_shape),)
        for i, shape in enumerate(hidden_shapes):
            if kron:
                if len(shape) != len(prev):
                    raise ShapeMismatchError(
                        f"kron_mlp: hidden_shapes[{i}] = {tuple(shape)} has {len(shape)} factors but its input "
                        f"shape {prev} has {len(prev)}; give every hidden shape {len(prev)} entries "
                        f"(e.g. {list(default_hidden_shape(prev))})"
                    )
                try:
                    layers.append(KronLinear(prev, shape))
                except ShapeMismatchError as e:
                    raise ShapeMismatchError(f"kron_mlp hidden layer {i} ({prev} -> {tuple(shape)}): {e}") from e
            else:
                layers.append(nn.Linear(math.prod(prev), math.prod(shape)))
            layers.append(nn.ReLU())
            prev = tuple(shape)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(math.prod(prev), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x)
        if not self.kron:
            x = x.flatten(1)  # (B, C, H, W) -> (B, C*H*W)
        x = self.features(x)
        x = x.flatten(1)  # (B, m_1, ..., m_d) -> (B, m_1*...*m_d)
        return self.classifier(x)


@register_model("mlp")
def mlp(
    *,
    in_shape: Sequence[int] = (1, 8, 8),
    num_classes: int = 10,
    hidden: Sequence[int] | int | None = None,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
) -> MLP:
    """Dense MLP: flatten -> (Linear + ReLU) per hidden width -> Linear(num_classes).

    Args:
        in_shape: (C, H, W) of one input.
        num_classes: outputs.
        hidden: hidden widths; default two layers as wide as ``kron_mlp``'s default (256 for digits and MNIST,
            768 for CIFAR).
        mean, std: per-channel normalization inside the model (default none).
    """
    in_shape = as_shape(in_shape, "in_shape")
    if hidden is None:
        width = math.prod(default_hidden_shape(in_shape))
        hidden = (width, width)
    widths = as_shape(hidden, "hidden")
    m, s = norm_stats(mean, std, in_shape[0])
    return MLP(in_shape, int(num_classes), [(w,) for w in widths], False, m, s)


@register_model("kron_mlp")
def kron_mlp(
    *,
    in_shape: Sequence[int] = (1, 8, 8),
    num_classes: int = 10,
    hidden_shapes: Sequence[Sequence[int]] | None = None,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
) -> MLP:
    """Kronecker MLP: ``KronLinear`` hidden layers on the un-flattened input, dense classifier.

    Args:
        in_shape: (C, H, W) of one input; the first KronLinear maps this shape.
        num_classes: outputs.
        hidden_shapes: output shape of each hidden layer, each with len(in_shape) entries; default two layers of
            ``default_hidden_shape(in_shape)`` ((1, 16, 16) for digits and MNIST).
        mean, std: per-channel normalization inside the model (default none).
    Raises:
        ShapeMismatchError: a hidden shape whose number of factors differs from in_shape's.
    """
    in_shape = as_shape(in_shape, "in_shape")
    if hidden_shapes is None:
        hidden_shapes = [default_hidden_shape(in_shape)] * 2
    if isinstance(hidden_shapes, (int, str)) or not all(isinstance(h, (list, tuple)) for h in hidden_shapes):
        raise ConfigError(
            f"hidden_shapes must be a list of shapes, e.g. [[1, 16, 16], [1, 16, 16]], got {hidden_shapes!r}"
        )
    shapes = [as_shape(h, f"hidden_shapes[{i}]") for i, h in enumerate(hidden_shapes)]
    m, s = norm_stats(mean, std, in_shape[0])
    return MLP(in_shape, int(num_classes), shapes, True, m, s)
