"""Tensor-train models: ``tt_mlp`` (Novikov et al. 2015) and ``tt_convnet`` (Garipov et al. 2016), with the
dense twin ``garipov_convnet``, and the whole-network compression ratio ``tt_compression``.

Sources:

- ``tt_mlp``: "Tensorizing Neural Networks" (Novikov, Podoprikhin, Osokin, Vetrov, NeurIPS 2015), MNIST: a TT
  layer into 1024 hidden units (modes 4x8x8x4, all TT ranks equal, 8 by default) and a dense 1024 -> 10
  classifier. The paper pads MNIST to 32x32 (1024 = 4x8x8x4 inputs); here the 28x28 input is used as is,
  784 = 4x7x4x7 (each image axis split in two). Its dense twin is ``mlp(hidden=[1024])``.
- ``tt_convnet``: "Ultimate tensorization: compressing convolutional and FC layers alike" (Garipov, Podoprikhin,
  Novikov, Vetrov, 2016), the CIFAR-10 "TT-conv-TT-fc" network of the authors' code, timgaripov/TensorNet-TF,
  ``experiments/cifar-10/conv-Ultimate-Tensorization/nets/TT-conv-TT-fc.py``: a dense 3x3 conv 3 -> 64, five
  3x3 TT convs (64 -> 64 modes 4x4x4 -> 4x4x4; maxpool; 64 -> 128 4x4x4 -> 4x8x4; 128 -> 128 4x8x4 -> 4x8x4;
  maxpool; two more 128 -> 128), ranks (r_0..r_3) = (16, 16, 16, 1); flatten (in the code's NHWC order) 8192 ->
  TT FC 1536 (modes 8x8x8x16 -> 4x6x8x8, ranks 40), TT FC 1536 -> 512 (4x6x8x8 -> 4x4x4x8, ranks 30), dense
  512 -> 10; batch norm + ReLU after every layer but the last; no biases before batch norm. The dense twin
  ``garipov_convnet`` is the same file's "conv-fc" network (nets/conv-fc.py). Max pooling is 3x3 stride 2 with
  padding 1 (the code's TF 'SAME' pads only the far side; the output size is the same).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from edgesep.errors import ConfigError, ShapeMismatchError
from edgesep.layers.tt import CONV_FORWARDS, TTConv2d, TTLinear, tt_modes
from edgesep.models._common import Normalize, as_shape, norm_stats
from edgesep.models._registry import register_model

__all__ = ["TTMLP", "GaripovConvNet", "garipov_convnet", "tt_compression", "tt_convnet", "tt_mlp"]


def tt_compression(model: nn.Module) -> dict[str, Any]:
    """Whole-network compression: parameters, the dense-equivalent count (every TT layer counted as the dense
    layer it replaces, everything else as is) and their ratio."""
    tt = [m for m in model.modules() if isinstance(m, (TTLinear, TTConv2d))]
    params = sum(p.numel() for p in model.parameters())
    dense = params + sum(m.dense_params() - m.num_params() for m in tt)
    return {
        "params": params,
        "dense_equivalent_params": dense,
        "ratio": dense / params if params else math.nan,
        "tt_layers": len(tt),
    }


# ----------------------------------------------------------------------------------------------------------------
# TT MLP


def _image_modes(in_shape: Sequence[int]) -> tuple[int, ...]:
    """Default input modes: each image axis split in two balanced factors, channels first when > 1.

    (1, 28, 28) -> (4, 7, 4, 7); (1, 8, 8) -> (2, 4, 2, 4); (3, 32, 32) -> (3, 4, 8, 4, 8).
    """
    c, *hw = (int(s) for s in in_shape)
    modes = [m for s in hw for m in tt_modes(s, 2)]
    return (c, *modes) if c > 1 else tuple(modes)


class TTMLP(nn.Module):
    """Normalize -> flatten -> [TTLinear + ReLU] per hidden layer -> Linear(num_classes).

    Args:
        in_shape: (C, H, W).
        num_classes: outputs.
        in_modes: modes of the flattened input (prod = C H W).
        hidden_modes: output modes of each hidden TT layer (same number of modes as in_modes).
        ranks: per hidden layer, an int or that layer's inner ranks.
        mean, std: normalization inside the model.
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        in_modes: tuple[int, ...],
        hidden_modes: Sequence[tuple[int, ...]],
        ranks: Sequence[int | Sequence[int]],
        mean: Sequence[float],
        std: Sequence[float],
    ):
        super().__init__()
        self.in_shape, self.num_classes = in_shape, num_classes
        if math.prod(in_modes) != math.prod(in_shape):
            raise ShapeMismatchError(
                f"tt_mlp: in_modes {in_modes} hold {math.prod(in_modes)} features but the input {in_shape} has "
                f"{math.prod(in_shape)}"
            )
        self.normalize = Normalize(mean, std, ndim=len(in_shape))
        layers: list[nn.Module] = []
        prev = in_modes
        for i, (modes, r) in enumerate(zip(hidden_modes, ranks, strict=True)):
            if len(modes) != len(prev):
                raise ShapeMismatchError(
                    f"tt_mlp: hidden_modes[{i}] = {modes} has {len(modes)} modes but its input modes {prev} have "
                    f"{len(prev)}; give every layer {len(prev)} modes"
                )
            layers += [TTLinear(prev, modes, r), nn.ReLU()]
            prev = modes
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(math.prod(prev), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x).flatten(1)  # (B, C, H, W) -> (B, C*H*W)
        return self.classifier(self.features(x))


@register_model("tt_mlp")
def tt_mlp(
    *,
    in_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    in_modes: Sequence[int] | None = None,
    hidden_modes: Sequence[Sequence[int]] | None = None,
    ranks: int | Sequence[Any] = 8,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
) -> TTMLP:
    """TT MLP (Novikov et al. 2015): TT hidden layer(s) on the flattened image, dense classifier.

    Args:
        in_shape: (C, H, W).
        num_classes: outputs.
        in_modes: input modes; default each image axis split in two (MNIST: 4x7x4x7).
        hidden_modes: output modes per hidden TT layer; default one layer of 1024 units (4x8x8x4 for 4 modes).
        ranks: an int for every layer, or one entry (int or inner-rank list) per hidden layer.
        mean, std: normalization inside the model (default none).
    Raises:
        ConfigError, ShapeMismatchError: modes that do not fit the input or each other.
    """
    in_shape = as_shape(in_shape, "in_shape", 3)
    modes = as_shape(in_modes, "in_modes") if in_modes is not None else _image_modes(in_shape)
    if hidden_modes is None:
        hidden_modes = [(4, 8, 8, 4) if len(modes) == 4 else tt_modes(1024, len(modes))]
    if isinstance(hidden_modes, (int, str)) or not all(isinstance(h, (list, tuple)) for h in hidden_modes):
        raise ConfigError(f"hidden_modes must be a list of mode lists, e.g. [[4, 8, 8, 4]], got {hidden_modes!r}")
    hidden = [as_shape(h, f"hidden_modes[{i}]") for i, h in enumerate(hidden_modes)]
    if isinstance(ranks, int):
        per_layer: list[Any] = [ranks] * len(hidden)
    elif isinstance(ranks, (list, tuple)) and len(ranks) == len(hidden):
        per_layer = list(ranks)
    else:
        raise ConfigError(f"ranks must be an int or one entry per hidden layer ({len(hidden)}), got {ranks!r}")
    m, s = norm_stats(mean, std, in_shape[0])
    return TTMLP(in_shape, int(num_classes), modes, hidden, per_layer, m, s)


# ----------------------------------------------------------------------------------------------------------------
# Garipov et al. CIFAR-10 conv-net

# (in channels, out channels, in modes, out modes) of the five 3x3 conv layers after the dense first one; None
# marks the max pools
_CONVS: list[tuple[int, int, tuple[int, ...], tuple[int, ...]] | None] = [
    (64, 64, (4, 4, 4), (4, 4, 4)),
    None,
    (64, 128, (4, 4, 4), (4, 8, 4)),
    (128, 128, (4, 8, 4), (4, 8, 4)),
    None,
    (128, 128, (4, 8, 4), (4, 8, 4)),
    (128, 128, (4, 8, 4), (4, 8, 4)),
]
_FC1_OUT_MODES = (4, 6, 8, 8)  # 1536
_FC2_OUT_MODES = (4, 4, 4, 8)  # 512


class GaripovConvNet(nn.Module):
    """The CIFAR-10 conv-net of Garipov et al., dense ("conv-fc") or tensorized ("TT-conv-TT-fc").

    Args:
        in_shape: (C, H, W); H and W divisible by 4.
        num_classes: outputs.
        tt: TT conv and TT FC layers (else dense ones).
        conv_ranks: TT conv ranks (r_0, ..., r_2) (or one int), the paper's (16, 16, 16).
        fc_ranks: inner ranks of the two TT FC layers (ints), the paper's (40, 30).
        conv_forward: TTConv2d forward mode ("auto", "reconstruct", "factorized").
        mean, std: normalization inside the model.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        tt: bool,
        conv_ranks: int | Sequence[int],
        fc_ranks: Sequence[int],
        conv_forward: str,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        super().__init__()
        c, h, w = in_shape
        if h % 4 or w % 4:
            raise ConfigError(f"the Garipov conv-net needs H and W divisible by 4 (two stride-2 pools), got {in_shape}")
        self.in_shape, self.num_classes, self.tt = in_shape, num_classes, tt
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = [nn.Conv2d(c, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
        for spec in _CONVS:
            if spec is None:
                layers.append(nn.MaxPool2d(3, 2, padding=1))
                continue
            cin, cout, n_modes, m_modes = spec
            if tt:
                conv: nn.Module = TTConv2d(n_modes, m_modes, 3, conv_ranks, padding=1, bias=False, forward=conv_forward)
            else:
                conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            layers += [conv, nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        feats = 128 * (h // 4) * (w // 4)
        if tt:
            fc1_in = (8, 8, 8, 16) if feats == 8192 else tt_modes(feats, 4)
            fc1: nn.Module = TTLinear(fc1_in, _FC1_OUT_MODES, fc_ranks[0], bias=False)
            fc2: nn.Module = TTLinear(_FC1_OUT_MODES, _FC2_OUT_MODES, fc_ranks[1], bias=False)
        else:
            fc1, fc2 = nn.Linear(feats, 1536, bias=False), nn.Linear(1536, 512, bias=False)
        self.head = nn.Sequential(fc1, nn.BatchNorm1d(1536), nn.ReLU(), fc2, nn.BatchNorm1d(512), nn.ReLU())
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.normalize(x))  # (B, C, H, W) -> (B, 128, H/4, W/4)
        x = x.permute(0, 2, 3, 1).flatten(1)  # -> (B, H/4, W/4, 128) -> (B, 128 H W / 16): the code's NHWC order
        return self.classifier(self.head(x))


def _convnet(in_shape, num_classes, tt, conv_ranks, fc_ranks, conv_forward, mean, std) -> GaripovConvNet:
    in_shape = as_shape(in_shape, "in_shape", 3)
    if conv_forward not in CONV_FORWARDS:
        raise ConfigError(f"conv_forward must be one of {CONV_FORWARDS}, got {conv_forward!r}")
    cr: int | tuple[int, ...] = conv_ranks if isinstance(conv_ranks, int) else as_shape(conv_ranks, "conv_ranks")
    fr = as_shape(fc_ranks, "fc_ranks", 2)
    m, s = norm_stats(mean, std, in_shape[0])
    return GaripovConvNet(in_shape, int(num_classes), tt, cr, fr, conv_forward, m, s)


@register_model("tt_convnet")
def tt_convnet(
    *,
    in_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    conv_ranks: int | Sequence[int] = (16, 16, 16),
    fc_ranks: Sequence[int] = (40, 30),
    conv_forward: str = "auto",
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
) -> GaripovConvNet:
    """Garipov et al.'s TT-conv-TT-fc CIFAR-10 network (see the module docstring for the configuration).

    Args:
        in_shape: (C, H, W), default CIFAR-10's (3, 32, 32).
        num_classes: outputs.
        conv_ranks: TT conv ranks (r_0, r_1, r_2) (r_3 = 1), or one int; the paper's (16, 16, 16).
        fc_ranks: the two TT FC layers' inner ranks; the paper's (40, 30).
        conv_forward: "auto" (reconstruct the kernel in eager mode, factorized when exported), "reconstruct",
            "factorized".
        mean, std: normalization inside the model (default none).
    """
    return _convnet(in_shape, num_classes, True, conv_ranks, fc_ranks, conv_forward, mean, std)


@register_model("garipov_convnet")
def garipov_convnet(
    *,
    in_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
) -> GaripovConvNet:
    """The dense twin of ``tt_convnet``: Garipov et al.'s "conv-fc" CIFAR-10 network (six 3x3 convs with 64, 64,
    128, 128, 128, 128 channels, FC 8192 -> 1536 -> 512 -> 10, batch norm + ReLU)."""
    return _convnet(in_shape, num_classes, False, 16, (40, 30), "auto", mean, std)
