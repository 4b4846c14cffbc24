"""Exact model statistics: parameters (total and fully-connected part), nonzeros, MACs, separable-layer spectra."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgesep.layers.kron import KronLinear

__all__ = ["count_macs", "kron_layer_stats", "model_stats"]


def _is_fc(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear | KronLinear)


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on a single sample of shape input_shape (C, H, W).

    Counted by torch's FlopCounterMode on the eager path (every matmul, conv and attention product; KronLinear
    runs as its d small matmuls there, so its MACs are the factored ones). Element-wise ops are not counted.
    """
    p = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def kron_layer_stats(model: nn.Module) -> list[dict[str, Any]]:
    """One JSON-ready row per KronLinear: shapes, parameters (and dense), nonzeros, MACs, spectral norm, cond."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, KronLinear):
            rows.append(
                {
                    "name": name,
                    "in_shape": list(m.in_shape),
                    "out_shape": list(m.out_shape),
                    "params": m.num_params(),
                    "dense_params": m.dense_params(),
                    "nonzeros": m.nonzeros(),
                    "macs": m.macs(),
                    "dense_macs": m.dense_macs(),
                    "spectral_norm": m.spectral_norm(),
                    "condition_number": m.condition_number(),
                }
            )
    return rows


def model_stats(model: nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
    """Parameters (total, fully-connected part), nonzeros, MACs per sample and per-separable-layer statistics."""
    # KronLinear keeps its factors in a child ParameterList: count each FC layer's whole parameter set
    fc_params = sum(p.numel() for m in model.modules() if _is_fc(m) for p in m.parameters())
    fc_dense = sum(
        m.dense_params() if isinstance(m, KronLinear) else sum(p.numel() for p in m.parameters())
        for m in model.modules()
        if _is_fc(m)
    )
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "fc_params": fc_params,
        "fc_dense_equivalent_params": fc_dense,
        "nonzeros": sum(int((p != 0).sum()) for p in model.parameters()),
        "macs": count_macs(model, input_shape),
        "kron_layers": kron_layer_stats(model),
    }
