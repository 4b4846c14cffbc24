"""White-box gradient attacks in torch: FGSM (optionally the fast random-start variant) and PGD (L-inf / L2).

Conventions shared by every attack here:

* inputs are pixels in [0, 1] and adversarial examples are clamped to [0, 1];
* the model runs in eval mode during the attack, and each module's train/eval flag is restored afterwards
  (adversarial training calls these on a model in train mode; BatchNorm statistics must not move);
* gradients are taken with ``torch.autograd.grad`` w.r.t. the input only, so the parameters' ``.grad`` are
  never touched; the returned tensors are detached;
* losses are summed over the batch, so an example's gradient does not depend on the batch it sits in.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgesep.errors import ConfigError, ShapeMismatchError

__all__ = ["fgsm", "pgd"]

NORMS = ("linf", "l2")
LOSSES = ("ce", "margin")
_TINY = 1e-12  # guards divisions by a zero gradient / perturbation norm
_RANGE_TOL = 1e-6


# --------------------------------------------------------------------------- shared helpers (also used by evaluate)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every module's own train/eval flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        model.train(flags[0][1])  # lets modules that override train() react
        for m, training in flags:  # then the exact per-module flags (a caller may keep a BatchNorm frozen)
            m.training = training


@contextlib.contextmanager
def frozen_params(model: nn.Module) -> Iterator[nn.Module]:
    """Turn off ``requires_grad`` on every parameter for the duration, so third-party attacks that call
    ``backward()`` cannot accumulate into ``.grad``; restores the flags on exit."""
    params = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in params:
            p.requires_grad_(flag)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first floating parameter (CPU / float32 if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def prepare_inputs(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Validate and move ``x`` (pixels in [0, 1]) and integer labels ``y`` to the model's device / dtype.

    Raises:
        ShapeMismatchError: ``y`` is not one label per example.
        ConfigError: ``x`` is not floating point or lies outside [0, 1].
    """
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.ndim < 2 or y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ShapeMismatchError(
            f"expected inputs x of shape (N, ...) and labels y of shape (N,), got x {tuple(x.shape)} and "
            f"y {tuple(y.shape)}"
        )
    if not x.is_floating_point():
        raise ConfigError(f"inputs must be float pixels in [0, 1], got dtype {x.dtype}; convert with x / 255")
    if y.is_floating_point() or y.is_complex():
        raise ConfigError(f"labels must be integers, got dtype {y.dtype}")
    if x.numel() and (x.min().item() < -_RANGE_TOL or x.max().item() > 1 + _RANGE_TOL):
        raise ConfigError(
            f"inputs must be pixels in [0, 1] (got min {x.min().item():.4g}, max {x.max().item():.4g}); "
            "normalization belongs inside the model"
        )
    device, dtype = model_device_dtype(model)
    return x.detach().to(device=device, dtype=dtype), y.detach().to(device=device, dtype=torch.long)


def check_norm(norm: str) -> str:
    """Lower-cased ``norm`` if it is "linf" or "l2"; ConfigError otherwise."""
    n = norm.lower() if isinstance(norm, str) else norm
    if n not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")
    return n


def check_eps(eps: float, what: str = "eps") -> float:
    """``eps`` as a float if it is a finite number >= 0; ConfigError otherwise."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ConfigError(f"{what} must be a finite number >= 0, got {eps!r}")
    return float(eps)


def _check_int(value: int, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def per_example_loss(logits: Tensor, y: Tensor, kind: str) -> Tensor:
    """Per-example loss the attacker maximizes: cross-entropy, or the CW margin ``max_{j!=y} z_j - z_y``."""
    if kind == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.amax(dim=1) - z_y


def _input_grad(model: nn.Module, x_adv: Tensor, y: Tensor, loss: str) -> Tensor:
    x_adv = x_adv.detach().requires_grad_(True)
    total = per_example_loss(model(x_adv), y, loss).sum()
    (grad,) = torch.autograd.grad(total, x_adv)
    return grad.detach()


def _flat_norm(t: Tensor) -> Tensor:
    """Per-example L2 norm, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.ndim - 1)))


def _step(x_adv: Tensor, grad: Tensor, alpha: float, norm: str) -> Tensor:
    if norm == "linf":
        return x_adv + alpha * grad.sign()
    return x_adv + alpha * grad / (_flat_norm(grad) + _TINY)


def _project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Project onto the eps ball around ``x``, then onto the pixel box [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _flat_norm(delta).clamp_min(_TINY)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def _random_start(x: Tensor, eps: float, norm: str) -> Tensor:
    """A point drawn uniformly from the eps ball around ``x`` (global torch RNG), clamped to [0, 1]."""
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        # uniform in the L2 ball: Gaussian direction, radius eps * U^(1/d)
        d = x[0].numel()
        direction = torch.randn_like(x)
        direction = direction / _flat_norm(direction).clamp_min(_TINY)
        radius = eps * torch.rand(x.shape[0], device=x.device, dtype=x.dtype) ** (1.0 / d)
        delta = direction * radius.view(-1, *([1] * (x.ndim - 1)))
    return (x + delta).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- attacks


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    norm: str = "linf",
    random_start: bool = False,
    alpha: float | None = None,
) -> Tensor:
    """Fast Gradient Sign Method (Goodfellow et al. 2015); L2 takes a normalized-gradient step instead.

    With ``random_start=True`` it is the "fast FGSM" of Wong et al. 2020: start uniformly in the eps ball,
    take one step of size ``alpha`` (default ``1.25 * eps``), then project back onto the ball.

    Args:
        model: classifier on pixels in [0, 1], returning logits.
        x: inputs (N, ...) in [0, 1].
        y: integer labels (N,).
        eps: radius of the perturbation ball (L-inf or L2).
        norm: "linf" or "l2".
        random_start: start from a uniform point of the ball (Wong et al. 2020).
        alpha: step size; default ``eps`` without random start, ``1.25 * eps`` with it.

    Returns:
        Detached adversarial inputs, inside the eps ball and [0, 1].

    Raises:
        ConfigError: negative eps or alpha, unknown norm, inputs outside [0, 1].
        ShapeMismatchError: labels that do not match the inputs.
    """
    norm, eps = check_norm(norm), check_eps(eps)
    if alpha is None:
        alpha = 1.25 * eps if random_start else eps
    alpha = check_eps(alpha, "alpha")
    x, y = prepare_inputs(model, x, y)
    with eval_mode(model):
        if random_start:
            start = _random_start(x, eps, norm)
            x_adv = _project(_step(start, _input_grad(model, start, y, "ce"), alpha, norm), x, eps, norm)
        else:
            x_adv = _step(x, _input_grad(model, x, y, "ce"), alpha, norm)
            # a step of length alpha <= eps from x stays in the ball: clamp only, as in the textbook x + eps*sign(g)
            x_adv = _project(x_adv, x, eps, norm) if alpha > eps else x_adv.clamp(0.0, 1.0)
    return x_adv.detach()


def _pgd_once(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, alpha: float, norm: str, start: bool, loss: str
) -> Tensor:
    x_adv = _random_start(x, eps, norm) if start else x.clone()
    for _ in range(steps):
        x_adv = _project(_step(x_adv, _input_grad(model, x_adv, y, loss), alpha, norm), x, eps, norm)
    return x_adv


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    random_start: bool = True,
    restarts: int = 1,
    loss: str = "ce",
) -> Tensor:
    """Projected Gradient Descent (Madry et al. 2018), L-inf (sign steps) or L2 (normalized-gradient steps).

    Each restart runs ``steps`` steps from a fresh uniform point of the eps ball and returns its last iterate.
    Across restarts each example keeps its worst case: a misclassified iterate wins, otherwise the one with
    the highest loss; an example is not restarted once it is misclassified. Without ``random_start`` every
    restart would be the same, so one is run.

    Args:
        model: classifier on pixels in [0, 1], returning logits.
        x: inputs (N, ...) in [0, 1].
        y: integer labels (N,).
        eps: radius of the perturbation ball.
        steps: gradient steps per restart.
        step_size: step length (L-inf: per pixel; L2: of the whole step); default ``2.5 * eps / steps``.
        norm: "linf" or "l2".
        random_start: start each restart from a uniform point of the ball (global torch RNG).
        restarts: independent runs; the worst case per example is kept.
        loss: "ce" (cross-entropy) or "margin" (Carlini-Wagner margin on the logits).

    Returns:
        Detached adversarial inputs, inside the eps ball and [0, 1].

    Raises:
        ConfigError: eps < 0, steps < 1, restarts < 1, step_size < 0, unknown norm or loss, inputs outside [0, 1].
        ShapeMismatchError: labels that do not match the inputs.
    """
    norm, eps = check_norm(norm), check_eps(eps)
    steps, restarts = _check_int(steps, "steps"), _check_int(restarts, "restarts")
    if loss not in LOSSES:
        raise ConfigError(f"unknown PGD loss {loss!r}; use one of {', '.join(LOSSES)}")
    alpha = 2.5 * eps / steps if step_size is None else check_eps(step_size, "step_size")
    x, y = prepare_inputs(model, x, y)
    if not random_start:
        restarts = 1
    best = x.clone()
    best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device, dtype=x.dtype)
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with eval_mode(model):
        for _ in range(restarts):
            todo = (~fooled).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            xs, ys = x[todo], y[todo]
            adv = _pgd_once(model, xs, ys, eps, steps, alpha, norm, random_start, loss)
            with torch.no_grad():
                logits = model(adv)
                adv_loss = per_example_loss(logits, ys, loss)
                adv_fooled = logits.argmax(dim=1) != ys
            # `todo` holds only examples not fooled so far: a fooling iterate always wins, else the higher loss
            take = adv_fooled | (adv_loss > best_loss[todo])
            idx = todo[take]
            best[idx] = adv[take]
            best_loss[idx] = adv_loss[take]
            fooled[idx] = adv_fooled[take]
    return best.detach()
