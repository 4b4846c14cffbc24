"""Model statistics against independent hand counts."""

from __future__ import annotations

import torch
from torch import nn

from edgesep.layers.kron import KronLinear
from edgesep.models import create_model
from edgesep.stats import count_macs, model_stats


def test_mlp_counts_by_hand():
    model = create_model("mlp", in_shape=[1, 8, 8], hidden=[32, 16], num_classes=10)
    s = model_stats(model, (1, 8, 8))
    fc = (64 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10)
    assert s["params"] == fc and s["fc_params"] == fc and s["fc_dense_equivalent_params"] == fc
    assert s["macs"] == 64 * 32 + 32 * 16 + 16 * 10
    assert s["kron_layers"] == []


def test_kron_mlp_counts_include_the_factors():
    model = create_model("kron_mlp", in_shape=[1, 8, 8], hidden_shapes=[[1, 16, 16], [1, 16, 16]], num_classes=10)
    s = model_stats(model, (1, 8, 8))
    k1 = (1 * 1 + 16 * 8 + 16 * 8) + 256  # factors (1x1, 16x8, 16x8) + bias (1, 16, 16)
    k2 = (1 + 16 * 16 + 16 * 16) + 256
    head = 256 * 10 + 10
    assert s["fc_params"] == k1 + k2 + head == s["params"]
    assert s["fc_dense_equivalent_params"] == (64 * 256 + 256) + (256 * 256 + 256) + head
    kron = [m for m in model.modules() if isinstance(m, KronLinear)]
    assert s["macs"] == sum(m.macs() for m in kron) + 256 * 10
    assert [r["params"] for r in s["kron_layers"]] == [k1, k2]


def test_count_macs_counts_convs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    assert count_macs(model, (3, 16, 16)) == 8 * 16 * 16 * 3 * 9 + 8 * 16 * 16 * 10
    model.train()
    count_macs(model, (3, 16, 16))
    assert model.training  # mode restored


def test_nonzeros_after_zeroing():
    model = create_model("kron_mlp", in_shape=[1, 8, 8], num_classes=10)
    before = model_stats(model, (1, 8, 8))["nonzeros"]
    with torch.no_grad():
        model.get_submodule(next(n for n, m in model.named_modules() if isinstance(m, KronLinear))).factors[1].zero_()
    assert model_stats(model, (1, 8, 8))["nonzeros"] == before - 16 * 8
