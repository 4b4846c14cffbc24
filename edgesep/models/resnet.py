"""CIFAR ResNets (He et al. 2016, section 4.2) with option-A shortcuts, key-compatible with the
akamaster/pytorch_resnet_cifar10 checkpoints in shared/models/akamaster_resnet_cifar10/.

conv3x3(3 -> 16)-BN-ReLU, three stages of n BasicBlocks (16, 32, 64 channels; stride 2 at the first block of
stages 2 and 3), global average pool, Linear(64 -> num_classes); n = 3 for ResNet-20, 5 for ResNet-32. Where a
block changes shape, the shortcut subsamples ``x[:, :, ::2, ::2]`` and zero-pads planes//4 channels on each side
(no parameters). The checkpoints expect RGB in [0, 1] normalized with the ImageNet mean/std, which is the
default here and happens inside the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from edgesep.models._common import Normalize, as_shape, load_pretrained, norm_stats
from edgesep.models._registry import register_model

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "BasicBlock", "CifarResNet", "resnet20", "resnet32"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad ``pad`` channels on each side (no parameters)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        # (B, C, H, W) -> (B, C + 2*pad, H/2, W/2)
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ShortcutA(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR.

    Args:
        in_shape: (C, H, W) of one input.
        num_classes: outputs.
        n: BasicBlocks per stage.
        mean, std: per-channel normalization inside the model.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        n: int,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        super().__init__()
        self.in_shape, self.num_classes = in_shape, num_classes
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_shape[0], 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes = 16
        self.layer1 = self._stage(planes, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(self.normalize(x))))  # (B, 16, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 64, H/4, W/4)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 64, H/4, W/4) -> (B, 64, 1, 1) -> (B, 64)
        return self.linear(x)


def _resnet(
    n: int,
    in_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float] | float | None,
    std: Sequence[float] | float | None,
    pretrained: str | Path | None,
) -> CifarResNet:
    shape = as_shape(in_shape, "in_shape", 3)
    m, s = norm_stats(mean, std, shape[0], IMAGENET_MEAN, IMAGENET_STD)
    model = CifarResNet(shape, int(num_classes), n, m, s)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


@register_model("resnet20")
def resnet20(
    *,
    in_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    pretrained: str | None = None,
) -> CifarResNet:
    """ResNet-20 for CIFAR (0.27M parameters).

    Args:
        in_shape: (C, H, W).
        num_classes: outputs.
        mean, std: normalization inside the model (default the ImageNet statistics the checkpoints expect).
        pretrained: path to a safetensors checkpoint (e.g. shared/models/akamaster_resnet_cifar10/
            resnet20.safetensors), loaded with strict key matching.
    Raises:
        CheckpointError: the checkpoint is missing, unreadable, or its keys / shapes do not match.
    """
    return _resnet(3, in_shape, num_classes, mean, std, pretrained)


@register_model("resnet32")
def resnet32(
    *,
    in_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    pretrained: str | None = None,
) -> CifarResNet:
    """ResNet-32 for CIFAR (0.46M parameters). Arguments as :func:`resnet20`."""
    return _resnet(5, in_shape, num_classes, mean, std, pretrained)
