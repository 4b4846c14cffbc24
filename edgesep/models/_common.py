"""Pieces the models share: input normalization inside the model, argument checks, the FC head, checkpoints."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edgesep.errors import CheckpointError, ConfigError, ShapeMismatchError
from edgesep.layers.kron import KronLinear

__all__ = [
    "FCHead",
    "Normalize",
    "as_shape",
    "balanced_factors",
    "load_pretrained",
    "norm_stats",
    "variant",
]


class Normalize(nn.Module):
    """(x - mean) / std per channel, as the model's first layer, so models take pixels in [0, 1].

    mean and std are non-persistent buffers: they travel with ``.to()`` but never appear in the state_dict (they
    are part of the architecture, rebuilt from the model's kwargs, so checkpoints stay strict-loadable).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], ndim: int = 3):
        super().__init__()
        shape = (1, len(mean)) + (1,) * (ndim - 1)  # broadcast over (B, C, H, W)
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).reshape(shape), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std]).reshape(shape), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = ", ".join(f"{m:.4g}" for m in self.mean.flatten().tolist())
        std = ", ".join(f"{s:.4g}" for s in self.std.flatten().tolist())
        return f"mean=({mean}), std=({std})"


def as_shape(value: Any, what: str, ndim: int | None = None) -> tuple[int, ...]:
    """A tuple of positive ints from an int or a list (JSON gives lists).

    Raises:
        ConfigError: not positive ints, or not ``ndim`` of them.
    """
    seq = [value] if isinstance(value, int) else value
    try:
        shape = tuple(int(s) for s in seq)
        ok = all(int(s) == s for s in seq) and all(s >= 1 for s in shape) and len(shape) >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{what} must be a list of positive ints, got {value!r}")
    if ndim is not None and len(shape) != ndim:
        raise ConfigError(f"{what} must have {ndim} entries, got {value!r}")
    return shape


def norm_stats(
    mean: Sequence[float] | float | None,
    std: Sequence[float] | float | None,
    channels: int,
    default_mean: float | Sequence[float] = 0.0,
    default_std: float | Sequence[float] = 1.0,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of length ``channels``; a single value is broadcast; None takes the default.

    Raises:
        ConfigError: wrong length, or a std that is not positive.
    """

    def one(v: Any, default: Any, what: str) -> tuple[float, ...]:
        v = default if v is None else v
        t = (float(v),) if isinstance(v, (int, float)) else tuple(float(x) for x in v)
        if len(t) == 1:
            t = t * channels
        if len(t) != channels:
            raise ConfigError(f"{what} has {len(t)} values but the input has {channels} channels")
        if not all(math.isfinite(x) for x in t):
            raise ConfigError(f"{what} must be finite, got {t}")
        return t

    m, s = one(mean, default_mean, "mean"), one(std, default_std, "std")
    if any(x <= 0 for x in s):
        raise ConfigError(f"std must be positive, got {s}")
    return m, s


def _factorizations(n: int, d: int, lo: int):
    if d == 1:
        if n >= lo:
            yield (n,)
        return
    f = lo
    while f**d <= n:
        if n % f == 0:
            for rest in _factorizations(n // f, d - 1, f):
                yield (f, *rest)
        f += 1


def balanced_factors(n: int, d: int) -> tuple[int, ...]:
    """d ints, ascending, whose product is n and whose largest is as small as possible (512, 3 -> (8, 8, 8))."""
    if n < 1 or d < 1:
        raise ConfigError(f"cannot factor {n} into {d} positive factors")
    return min(_factorizations(n, d, 1), key=lambda t: (t[-1], -t[0]))


def resolve_head(
    head: str, hidden: int | None, hidden_shape: Sequence[int] | None, default_hidden: int, d: int, model: str
) -> tuple[int, tuple[int, ...] | None]:
    """(hidden width, KronLinear output shape or None) from a model's head kwargs.

    Raises:
        ConfigError: unknown head, hidden_shape with a dense head, or hidden and hidden_shape that disagree.
        ShapeMismatchError: a hidden_shape with a number of factors other than d.
    """
    if head not in ("dense", "kron"):
        raise ConfigError(f"{model}: head must be 'dense' or 'kron', got {head!r}")
    if hidden is not None:
        hidden = as_shape(hidden, "hidden", 1)[0]
    if head == "dense":
        if hidden_shape is not None:
            raise ConfigError(f"{model}: hidden_shape is for head='kron'; give a dense head its width as hidden")
        return hidden or default_hidden, None
    if hidden_shape is None:
        shape = tuple(sorted(balanced_factors(hidden or default_hidden, d), reverse=True))
    else:
        shape = as_shape(hidden_shape, "hidden_shape")
        if len(shape) != d:
            raise ShapeMismatchError(
                f"{model}: hidden_shape {shape} has {len(shape)} factors but the KronLinear input has {d}; "
                f"give hidden_shape {d} entries"
            )
    if hidden is not None and hidden != math.prod(shape):
        raise ConfigError(f"{model}: hidden={hidden} but hidden_shape {shape} has {math.prod(shape)} features")
    return math.prod(shape), shape


class FCHead(nn.Module):
    """Hidden fully-connected layer (dense ``nn.Linear`` or ``KronLinear``) + ReLU (+ dropout) + dense classifier.

    The classifier stays dense: ``num_classes`` (10) does not factor into useful Kronecker shapes, and it is small.

    Args:
        in_shape: shape of one sample's features, e.g. a (C, H, W) feature map.
        num_classes: outputs.
        hidden: width of the hidden layer.
        hidden_shape: KronLinear output shape (m_1, ..., m_d), or None for a dense hidden layer.
        kron_in_shape: KronLinear input shape (n_1, ..., n_d) the features are reshaped to; default in_shape.
        dropout: dropout probability after the hidden layer (0: none).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        hidden: int,
        hidden_shape: Sequence[int] | None = None,
        kron_in_shape: Sequence[int] | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        in_features = math.prod(in_shape)
        self.kron_in_shape = tuple(kron_in_shape or in_shape) if hidden_shape is not None else None
        if self.kron_in_shape is not None:
            if math.prod(self.kron_in_shape) != in_features:
                raise ShapeMismatchError(
                    f"KronLinear input shape {self.kron_in_shape} does not hold the {in_features} features of shape "
                    f"{tuple(in_shape)}"
                )
            self.fc = KronLinear(self.kron_in_shape, hidden_shape)
        else:
            self.fc = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # (B, C, H, W) -> (B, n_1, ..., n_d) for a KronLinear, else -> (B, C*H*W)
        x = x.reshape(x.shape[0], *self.kron_in_shape) if self.kron_in_shape is not None else x.flatten(1)
        x = self.drop(self.act(self.fc(x)))
        x = x.flatten(1)  # (B, m_1, ..., m_d) -> (B, m_1*...*m_d)
        return self.classifier(x)


def load_pretrained(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a safetensors checkpoint into ``model`` with strict key and shape matching.

    Only ``*.num_batches_tracked`` may be missing (checkpoints saved by older torch versions lack it; it does
    not affect eval-mode outputs).

    Raises:
        CheckpointError: a missing or unreadable file, or missing / unexpected / mis-shaped keys (listed).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"pretrained checkpoint {path} not found; pass the path to its .safetensors file")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:10]}{' ...' if len(shapes) > 10 else ''}")
        raise CheckpointError(
            f"{path} does not fit {type(model).__name__}: {'; '.join(parts)}. Was it written for another model "
            "or other kwargs (num_classes, in_shape, width)?"
        )
    model.load_state_dict(state, strict=False)
    return model


def variant(base: Callable[..., nn.Module], **fixed: Any) -> Callable[..., nn.Module]:
    """A builder calling ``base`` with some kwargs fixed (``kron_vgg16 = vgg16(head="kron")``); its signature
    leaves the fixed kwargs out, so ``create_model`` rejects them by name."""
    sig = inspect.signature(base)

    def builder(**kwargs: Any) -> nn.Module:
        clash = sorted(set(kwargs) & set(fixed))
        if clash:
            raise ConfigError(f"{', '.join(clash)} is fixed by this model variant ({fixed}); use {base.__name__}")
        return base(**kwargs, **fixed)

    builder.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name not in fixed])
    builder.__doc__ = f"{base.__name__} with {', '.join(f'{k}={v!r}' for k, v in fixed.items())}."
    builder.__name__ = builder.__qualname__ = f"{base.__name__}_" + "_".join(f"{k}_{v}" for k, v in fixed.items())
    builder.__module__ = base.__module__
    return builder
