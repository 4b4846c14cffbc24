"""PGD (L-inf / L2) against torchattacks as the independent reference, plus its invariants."""

from __future__ import annotations

import itertools

import pytest
import torch
import torchattacks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from edgesep.attacks import pgd
from edgesep.errors import ConfigError, ShapeMismatchError

TOL_BALL = 1e-6


def acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def assert_in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> None:
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert size.max().item() <= eps + TOL_BALL
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


# ----------------------------------------------------------------------------------------- vs torchattacks


@pytest.mark.parametrize("seed", [0, 1])
def test_linf_matches_torchattacks(mlp, test_xy, seed):
    x, y = test_xy  # 500 examples
    eps, steps, alpha = 0.1, 10, 0.025
    torch.manual_seed(seed)
    ours = pgd(mlp, x, y, eps, steps=steps, step_size=alpha)
    torch.manual_seed(seed)
    ref = torchattacks.PGD(mlp, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)
    a, b = acc(mlp, ours, y), acc(mlp, ref, y)
    assert 0.1 < b < 0.8, f"budget should leave a mid-range robust accuracy, got {b}"
    assert abs(a - b) <= 0.01, f"ours {a:.3f} vs torchattacks {b:.3f}"


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies by k."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.k, None


class _MeanAsSum(nn.Module):
    """torchattacks differentiates the batch-mean CE, we the sum (batch-independent gradients); the two L2
    steps differ only through the 1e-10 guard in its normalization, which matters for saturated examples.
    Scaling the input gradient by N aligns the two."""

    def __init__(self, model: nn.Module, n: int):
        super().__init__()
        self.model, self.n = model, n

    def forward(self, x):
        return self.model(_ScaleGrad.apply(x, float(self.n)))


def test_l2_without_random_start_equals_torchattacks(mlp, test_xy):
    x, y = test_xy
    eps, steps = 0.5, 10
    ours = pgd(mlp, x, y, eps, steps=steps, norm="l2", random_start=False)
    ref = torchattacks.PGDL2(mlp, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=False)(x, y)
    assert torch.equal(correct(mlp, ours, y), correct(mlp, ref, y))  # as is: same verdict on every example
    ref = torchattacks.PGDL2(
        _MeanAsSum(mlp, len(x)), eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=False
    )(x, y)
    # same loss scale: the same points, up to the guard on the few near-zero gradients (steps are 0.125)
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)


def test_l2_matches_torchattacks(mlp, test_xy):
    x, y = test_xy
    eps, steps = 0.5, 20
    ours, ref = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        ours.append(acc(mlp, pgd(mlp, x, y, eps, steps=steps, norm="l2"), y))
        torch.manual_seed(seed)
        ref.append(acc(mlp, torchattacks.PGDL2(mlp, eps=eps, alpha=2.5 * eps / steps, steps=steps)(x, y), y))
    a, b = sum(ours) / 3, sum(ref) / 3
    assert 0.1 < b < 0.8, f"budget should leave a mid-range robust accuracy, got {b}"
    # Our random start is uniform in the L2 ball as specified (radius eps * U^(1/d): almost always at the
    # surface in 64-d); torchattacks draws radius eps * U, nearer the clean input. On this model theirs ends
    # 1.0-1.3 points stronger (seeds 0-2, 20 to 100 steps; without random start the two are identical, see
    # above), so the tolerance is 2 points; test_random_start_is_uniform_in_the_ball checks our start itself.
    assert abs(a - b) <= 0.02, f"ours {ours} vs torchattacks {ref}"


# ----------------------------------------------------------------------------------------- strength


def test_accuracy_falls_with_eps(mlp, test_xy):
    x, y = test_xy
    clean = acc(mlp, x, y)
    accs = []
    for eps in (0.0, 0.025, 0.05, 0.1, 0.2, 0.5):
        torch.manual_seed(0)
        accs.append(acc(mlp, pgd(mlp, x, y, eps, steps=10), y))
    assert accs[0] == clean  # eps = 0 is the identity
    for lo, hi in itertools.pairwise(accs):
        assert hi <= lo + 0.005, accs
    assert accs[-1] < 0.05, accs
    assert accs[3] < clean - 0.3, accs  # eps = 0.1 breaks an undefended model


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 0.5)])
def test_more_steps_do_not_help_the_defender(mlp, test_xy, norm, eps):
    x, y = test_xy
    torch.manual_seed(0)
    few = acc(mlp, pgd(mlp, x, y, eps, steps=5, norm=norm), y)
    torch.manual_seed(0)
    many = acc(mlp, pgd(mlp, x, y, eps, steps=40, norm=norm), y)
    assert many <= few + 0.01, (few, many)


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 0.5)])
def test_restarts_never_increase_robust_accuracy(mlp, test_xy, norm, eps):
    x, y = test_xy
    torch.manual_seed(3)
    one = correct(mlp, pgd(mlp, x, y, eps, steps=5, norm=norm), y)
    torch.manual_seed(3)  # the first restart then draws the same start as the single run
    four = correct(mlp, pgd(mlp, x, y, eps, steps=5, norm=norm, restarts=4), y)
    assert not (four & ~one).any(), "an example robust to 1 restart must stay fooled with more restarts"
    assert four.sum() <= one.sum()


class _NeverFooled(nn.Module):
    """Logits (0, f(x) / 4 - 5) with f(x) = ||x - 0.5||^2 <= 16: class 0 always wins; CE grows with f."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = (x - 0.5).flatten(1).pow(2).sum(1)
        return torch.stack([torch.zeros_like(f), f / 4 - 5], 1)


def test_restarts_keep_the_highest_loss_when_nothing_is_fooled(test_xy):
    x = test_xy[0][:50]
    y = torch.zeros(50, dtype=torch.long)
    model, eps, restarts = _NeverFooled(), 0.1, 5
    torch.manual_seed(0)
    adv = pgd(model, x, y, eps, steps=1, step_size=0.0, restarts=restarts)  # step 0: each restart = its start
    torch.manual_seed(0)  # reference: the same random starts drawn by hand, best by loss per example
    starts = torch.stack([(x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1) for _ in range(restarts)])
    f = (starts - 0.5).flatten(2).pow(2).sum(2)  # (restarts, N); CE is increasing in f
    expected = starts[f.argmax(0), torch.arange(50)]
    torch.testing.assert_close(adv, expected, atol=0, rtol=0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_is_uniform_in_the_ball(norm):
    from scipy import stats

    # step_size 0 returns the random start itself; x = 0.5 keeps the [0, 1] clamp out of the way
    eps, n, d = 0.4, 2000, 64
    x = torch.full((n, 1, 8, 8), 0.5)
    y = torch.zeros(n, dtype=torch.long)
    torch.manual_seed(0)
    delta = (pgd(_NeverFooled(), x, y, eps, steps=1, step_size=0.0, norm=norm) - x).flatten(1).double()
    if norm == "linf":  # each coordinate ~ U(-eps, eps)
        assert stats.kstest(delta[:, :3].flatten().numpy(), stats.uniform(-eps, 2 * eps).cdf).pvalue > 1e-3
    else:  # uniform in the d-ball: (r / eps)^d ~ U(0, 1), direction isotropic
        r = delta.norm(dim=1) / eps
        assert r.max().item() <= 1 + 1e-6
        assert stats.kstest((r**d).numpy(), "uniform").pvalue > 1e-3
        # coordinates have std ~ eps / sqrt(d): their means over n starts stay within 5 standard errors
        assert delta.mean(0).abs().max().item() < 5 * eps / (d * n) ** 0.5


def test_margin_loss_is_as_strong(mlp, test_xy):
    x, y = test_xy
    torch.manual_seed(0)
    ce = acc(mlp, pgd(mlp, x, y, 0.1, steps=20), y)
    torch.manual_seed(0)
    cw = acc(mlp, pgd(mlp, x, y, 0.1, steps=20, loss="margin"), y)
    assert abs(ce - cw) <= 0.05 and cw < acc(mlp, x, y) - 0.3, (ce, cw)


def test_batch_does_not_change_an_example(mlp, test_xy):
    x, y = test_xy
    full = pgd(mlp, x[:64], y[:64], 0.1, steps=5, random_start=False)
    part = pgd(mlp, x[:16], y[:16], 0.1, steps=5, random_start=False)
    torch.testing.assert_close(full[:16], part, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------- contract


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    eps=st.floats(0.0, 0.6),
    norm=st.sampled_from(["linf", "l2", "Linf", "L2"]),
    steps=st.integers(1, 3),
    step_size=st.one_of(st.none(), st.floats(0.0, 2.0)),
    restarts=st.integers(1, 2),
    random_start=st.booleans(),
)
def test_stays_in_ball_and_box(mlp, test_xy, eps, norm, steps, step_size, restarts, random_start):
    x, y = test_xy
    x, y = x[:32], y[:32]
    adv = pgd(mlp, x, y, eps, steps=steps, step_size=step_size, norm=norm, restarts=restarts, random_start=random_start)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert_in_ball(adv, x, eps, norm.lower())


def _bn_dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)
    )


@pytest.mark.parametrize("train", [True, False])
def test_runs_in_eval_mode_and_restores_modes(test_xy, train):
    x, y = test_xy
    x, y = x[:64], y[:64]
    model = _bn_dropout_model().train(train)
    model[2].eval()  # a caller may keep one BatchNorm frozen: that flag must survive too
    flags = [m.training for m in model.modules()]
    stats = model[2].running_mean.clone(), model[2].running_var.clone(), model[2].num_batches_tracked.clone()
    a = pgd(model, x, y, 0.1, steps=3, random_start=False)
    b = pgd(model, x, y, 0.1, steps=3, random_start=False)
    assert [m.training for m in model.modules()] == flags
    # dropout off during the attack: two runs agree; BatchNorm in eval: running statistics untouched
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    model[1].train()  # also with the BatchNorm in train mode before the call
    model[2].train()
    pgd(model, x, y, 0.1, steps=3, random_start=False)
    after = model[2].running_mean, model[2].running_var, model[2].num_batches_tracked
    for b, a in zip(stats, after, strict=True):
        assert torch.equal(b, a)
    assert model[2].training


def test_no_grads_on_parameters(mlp, test_xy):
    x, y = test_xy
    pgd(mlp, x[:32], y[:32], 0.1, steps=3, restarts=2)
    assert all(p.grad is None for p in mlp.parameters())
    # existing gradients (mid-training) are left exactly as they were
    for p in mlp.parameters():
        p.grad = torch.ones_like(p)
    pgd(mlp, x[:32], y[:32], 0.1, steps=3)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in mlp.parameters())


def test_accepts_numpy_and_returns_detached(mlp, digits):
    adv = pgd(mlp, digits.x_test[:8], digits.y_test[:8], 0.1, steps=2)
    assert isinstance(adv, torch.Tensor) and not adv.requires_grad and adv.shape == (8, 1, 8, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eps": -0.1}, "eps must be"),
        ({"eps": float("nan")}, "eps must be"),
        ({"eps": 0.1, "steps": 0}, "steps must be"),
        ({"eps": 0.1, "restarts": 0}, "restarts must be"),
        ({"eps": 0.1, "norm": "l1"}, "unknown norm 'l1'"),
        ({"eps": 0.1, "loss": "hinge"}, "unknown PGD loss"),
        ({"eps": 0.1, "step_size": -1.0}, "step_size must be"),
    ],
)
def test_validation(mlp, test_xy, kwargs, match):
    x, y = test_xy
    with pytest.raises(ConfigError, match=match):
        pgd(mlp, x[:4], y[:4], **kwargs)


def test_input_validation(mlp, test_xy):
    x, y = test_xy
    with pytest.raises(ShapeMismatchError):
        pgd(mlp, x[:4], y[:3], 0.1)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        pgd(mlp, x[:4] * 255, y[:4], 0.1)
    with pytest.raises(ConfigError, match="labels must be integers"):
        pgd(mlp, x[:4], y[:4].float(), 0.1)
