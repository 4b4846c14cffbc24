"""Magnitude pruning of the factors of separable (Kronecker) layers, with masks to keep pruned entries at zero.

Why not ``torch.nn.utils.prune``: it re-applies its masks in a forward pre-hook of the module that owns the
parameter, and a KronLinear's factors live in an ``nn.ParameterList``, which is never called; the masks would
silently stop holding after the first optimizer step. Here the masks are plain tensors keyed by parameter name
(``prune_masks``), and ``apply_masks_`` re-applies them (e.g. after each ``optimizer.step()``):

    report = magnitude_prune_(model, 0.5)  # JSON-ready counts
    masks = prune_masks(model)             # taken right after pruning
    ...; optimizer.step(); apply_masks_(model, masks)

Scopes (``scope=``) decide which entries compete for the smallest magnitudes:

- ``"factor"`` (default): each factor matrix U_k loses ``amount`` of its own entries. The only scope that does not
  depend on how the scale is split between the factors: kron(c U_1, U_2 / c) = kron(U_1, U_2) for any c, which
  changes a cross-factor ranking but never the ranking inside one factor. It also never empties a whole factor
  (which would zero the layer).
- ``"layer"``: the entries of all factors of one KronLinear compete together.
- ``"global"``: all factor entries of the whole model compete together.

Each group with n entries loses exactly floor(amount * n) entries (the smallest |a|; ties broken by position).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from edgesep.errors import ConfigError, ShapeMismatchError, UnknownNameError
from edgesep.layers.kron import KronLinear

__all__ = ["PRUNE_SCOPES", "apply_masks_", "magnitude_prune_", "nonzeros", "prune_masks"]

PRUNE_SCOPES = ("factor", "layer", "global")


def _kron_layers(model: nn.Module) -> list[tuple[str, KronLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, KronLinear)]


def _factor_names(prefix: str, layer: KronLinear) -> list[str]:
    """The ``model.named_parameters()`` names of a layer's factors."""
    return [f"{prefix}.factors.{i}" if prefix else f"factors.{i}" for i in range(len(layer.factors))]


def nonzeros(model: nn.Module) -> int:
    """Nonzero entries in the factors of every KronLinear of ``model`` (biases and other layers not counted)."""
    return sum(int(torch.count_nonzero(u)) for _, m in _kron_layers(model) for u in m.factors)


def _keep_masks(tensors: list[Tensor], amount: float) -> list[Tensor]:
    """Masks (True = keep) dropping the floor(amount * n) smallest-magnitude of the n entries of ``tensors``."""
    flat = torch.cat([t.detach().reshape(-1).abs() for t in tensors])  # (n,)
    n_drop = math.floor(amount * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if n_drop > 0:
        keep[torch.argsort(flat, stable=True)[:n_drop]] = False
    return [k.reshape(t.shape) for k, t in zip(keep.split([t.numel() for t in tensors]), tensors, strict=True)]


def magnitude_prune_(
    model: nn.Module, amount: float, *, scope: Literal["factor", "layer", "global"] = "factor"
) -> dict[str, Any]:
    """Zero, in place, the smallest-magnitude fraction ``amount`` of the KronLinear factor entries of ``model``.

    Args:
        model: any module; only KronLinear factors are pruned (biases are kept).
        amount: fraction in [0, 1) of the entries of each group (see ``scope``) to set to zero. Entries that are
            already zero are the smallest and count towards it.
        scope: "factor", "layer" or "global" (module docstring).
    Returns:
        A JSON-ready report ``{"amount", "scope", "params", "nonzeros_before", "nonzeros_after", "layers"}``;
        ``layers`` maps each KronLinear's module name to ``{"params", "nonzeros_before", "nonzeros_after"}``
        (counts over its factor entries). Take ``prune_masks(model)`` right after to keep the zeros in training.
    Raises:
        ConfigError: if amount is not in [0, 1) or scope is unknown.
    """
    amount = float(amount)
    if not 0.0 <= amount < 1.0:  # also rejects NaN
        raise ConfigError(f"pruning amount must be in [0, 1), got {amount}")
    if scope not in PRUNE_SCOPES:
        raise ConfigError(f"pruning scope must be one of {', '.join(PRUNE_SCOPES)}, got {scope!r}")
    layers = _kron_layers(model)
    factors = [u for _, m in layers for u in m.factors]
    before = {prefix: sum(int(torch.count_nonzero(u)) for u in m.factors) for prefix, m in layers}

    if scope == "factor":
        groups = [[u] for u in factors]
    elif scope == "layer":
        groups = [list(m.factors) for _, m in layers]
    else:
        groups = [factors] if factors else []
    keep = [k for group in groups for k in _keep_masks(group, amount)]  # same order as `factors`

    with torch.no_grad():
        for u, k in zip(factors, keep, strict=True):
            u.masked_fill_(~k, 0)  # not mul_: a non-finite entry times 0 stays NaN
    report_layers = {
        prefix: {
            "params": sum(u.numel() for u in m.factors),
            "nonzeros_before": before[prefix],
            "nonzeros_after": sum(int(torch.count_nonzero(u)) for u in m.factors),
        }
        for prefix, m in layers
    }
    return {
        "amount": amount,
        "scope": scope,
        "params": sum(v["params"] for v in report_layers.values()),
        "nonzeros_before": sum(v["nonzeros_before"] for v in report_layers.values()),
        "nonzeros_after": sum(v["nonzeros_after"] for v in report_layers.values()),
        "layers": report_layers,
    }


def prune_masks(model: nn.Module) -> dict[str, Tensor]:
    """The nonzero pattern of every KronLinear factor, keyed by parameter name, for ``apply_masks_``.

    Taken right after ``magnitude_prune_`` these are its masks (True = kept); entries that were exactly zero
    before pruning are masked too.
    """
    return {
        name: u.detach() != 0
        for prefix, m in _kron_layers(model)
        for name, u in zip(_factor_names(prefix, m), m.factors, strict=True)
    }


def apply_masks_(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Zero, in place, the parameter entries whose mask is False (call after each optimizer step to keep them 0).

    Args:
        model: the module the masks were made for.
        masks: parameter name (as in ``model.named_parameters()``) -> bool tensor of the parameter's shape.
    Raises:
        UnknownNameError: for a mask whose name is not a parameter of ``model``.
        ShapeMismatchError: for a mask whose shape is not its parameter's.
    """
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            if name not in params:
                raise UnknownNameError("parameter", name, params)
            p = params[name]
            if tuple(mask.shape) != tuple(p.shape):
                raise ShapeMismatchError(
                    f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter has {tuple(p.shape)}"
                )
            p.masked_fill_(~mask.to(device=p.device, dtype=torch.bool), 0)
