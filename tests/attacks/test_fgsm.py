"""FGSM against torchattacks.FGSM (bit-exact) and fast FGSM against a hand-written Wong et al. reference."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import nn

from edgesep.attacks import fgsm
from edgesep.errors import ConfigError


def acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3])
def test_equals_torchattacks(mlp, test_xy, eps):
    x, y = test_xy
    ours = fgsm(mlp, x, y, eps)
    ref = torchattacks.FGSM(mlp, eps=eps)(x, y)
    assert torch.equal(ours, ref)
    assert acc(mlp, ours, y) < acc(mlp, x, y)


def test_fast_fgsm_matches_wong_reference(mlp, test_xy):
    """Wong, Rice & Kolter 2020, Alg. 3: delta ~ U(-eps, eps), one step of alpha = 1.25 eps, clip to the ball."""
    x, y = test_xy
    eps = 0.1
    alpha = 1.25 * eps
    torch.manual_seed(0)
    ours = fgsm(mlp, x, y, eps, random_start=True)
    torch.manual_seed(0)
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = torch.max(torch.min(delta, 1 - x), -x).requires_grad_(True)  # keep x + delta in [0, 1]
    loss = nn.functional.cross_entropy(mlp(x + delta), y)
    (grad,) = torch.autograd.grad(loss, delta)
    delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
    delta = torch.max(torch.min(delta, 1 - x), -x)
    ref = (x + delta).detach()
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert (ours - x).abs().max().item() <= eps + 1e-6


def test_fast_fgsm_is_stronger_than_nothing_and_in_ball(mlp, test_xy):
    x, y = test_xy
    torch.manual_seed(0)
    adv = fgsm(mlp, x, y, 0.1, random_start=True, alpha=0.2)
    assert (adv - x).abs().max().item() <= 0.1 + 1e-6
    assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0
    assert acc(mlp, adv, y) < acc(mlp, x, y) - 0.2


def test_l2_is_a_normalized_gradient_step(mlp, test_xy):
    x, y = test_xy
    eps = 0.5
    adv = fgsm(mlp, x, y, eps, norm="l2")
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(mlp(xr), y, reduction="sum"), xr)
    g = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(adv, (x + eps * g).clamp(0, 1), atol=1e-6, rtol=0)
    assert (adv - x).flatten(1).norm(dim=1).max().item() <= eps + 1e-5


@pytest.mark.parametrize("train", [True, False])
def test_modes_and_grads(test_xy, train):
    x, y = test_xy
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 10))
    model.train(train)
    mean = model[2].running_mean.clone()
    a, b = fgsm(model, x[:32], y[:32], 0.1), fgsm(model, x[:32], y[:32], 0.1)
    assert torch.equal(a, b)  # dropout off
    assert torch.equal(mean, model[2].running_mean)  # BatchNorm statistics untouched
    assert all(m.training == train for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert not a.requires_grad


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eps": -1.0}, "eps must be"),
        ({"eps": 0.1, "norm": "l0"}, "unknown norm"),
        ({"eps": 0.1, "alpha": -1}, "alpha"),
    ],
)
def test_validation(mlp, test_xy, kwargs, match):
    x, y = test_xy
    with pytest.raises(ConfigError, match=match):
        fgsm(mlp, x[:4], y[:4], **kwargs)
