"""The torchattacks AutoAttack wrapper: strength against PGD, and the same contract as our attacks."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from edgesep.attacks import autoattack, pgd
from edgesep.errors import ConfigError, EdgesepError

N = 150
EPS = 0.1


def acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def test_at_least_as_strong_as_pgd(mlp, test_xy):
    x, y = test_xy
    x, y = x[:N], y[:N]
    adv = autoattack(mlp, x, y, EPS)
    torch.manual_seed(0)
    pgd_acc = acc(mlp, pgd(mlp, x, y, EPS, steps=20), y)
    aa_acc = acc(mlp, adv, y)
    assert aa_acc <= pgd_acc + 0.02, (aa_acc, pgd_acc)
    assert aa_acc < acc(mlp, x, y) - 0.3
    assert (adv - x).abs().max().item() <= EPS + 1e-6
    assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0 and not adv.requires_grad


def test_l2(mlp, test_xy):
    x, y = test_xy
    x, y = x[:40], y[:40]
    adv = autoattack(mlp, x, y, 0.5, norm="l2", version="rand")  # case-insensitive norm
    assert (adv - x).flatten(1).norm(dim=1).max().item() <= 0.5 + 1e-4
    assert acc(mlp, adv, y) <= acc(mlp, x, y)


def test_modes_grads_and_rng_restored(mlp, test_xy):
    x, y = test_xy
    x, y = x[:24], y[:24]
    mlp.train()
    mlp[1].eval()  # a per-module flag that must survive
    flags = [m.training for m in mlp.modules()]
    rng = torch.get_rng_state()
    adv = autoattack(mlp, x, y, 0.02, seed=3)
    assert [m.training for m in mlp.modules()] == flags
    assert all(p.grad is None and p.requires_grad for p in mlp.parameters())
    assert torch.equal(rng, torch.get_rng_state())  # torchattacks reseeds the global RNG; we restore it
    # the check on .grad is not vacuous: examples survived APGD, so FAB-T (which calls backward()) ran
    assert acc(mlp, adv, y) > 0


def test_bn_dropout_model_in_train_mode(test_xy):
    x, y = test_xy
    x, y = x[:24], y[:24]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.Linear(16, 10))
    model.train()
    model[2].eval()
    flags = [m.training for m in model.modules()]
    mean = model[2].running_mean.clone()
    autoattack(model, x, y, EPS)
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(mean, model[2].running_mean)


def test_missing_torchattacks_says_how_to_install(mlp, test_xy, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # makes `import torchattacks` raise ImportError
    x, y = test_xy
    with pytest.raises(EdgesepError, match=r"pip install --no-deps torchattacks==3\.5\.1"):
        autoattack(mlp, x[:4], y[:4], EPS)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"norm": "L1"}, "unknown AutoAttack norm"),
        ({"version": "fast"}, "unknown AutoAttack version"),
        ({"n_classes": 1}, "n_classes must be"),
        ({"n_classes": 7}, "pass n_classes=10"),
    ],
)
def test_validation(mlp, test_xy, kwargs, match):
    x, y = test_xy
    with pytest.raises(ConfigError, match=match):
        autoattack(mlp, x[:4], y[:4], EPS, **kwargs)
    with pytest.raises(ConfigError, match="eps must be"):
        autoattack(mlp, x[:4], y[:4], -1.0)
