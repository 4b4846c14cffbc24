"""Clean and adversarial accuracy of a torch model, batch by batch, as JSON-ready results.

Robust accuracy counts an example as robust when it is classified correctly both clean and under the attack
(the attacker may always leave an input unchanged), the convention of AutoAttack and RobustBench; so robust
accuracy never exceeds clean accuracy.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from edgesep.attacks import AttackSpec, get_attack
from edgesep.attacks._torch import eval_mode, prepare_inputs
from edgesep.errors import ConfigError

__all__ = ["accuracy", "evaluate", "robust_accuracy", "run_attack"]

ArrayLike = Tensor | np.ndarray


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


def _prepare(model: nn.Module, x: ArrayLike, y: ArrayLike) -> tuple[Tensor, Tensor]:
    x, y = prepare_inputs(model, x, y)
    if len(y) == 0:
        raise ConfigError("no examples to evaluate: x and y are empty")
    return x, y


def _batches(n: int, batch_size: int, desc: str, progress: bool) -> Iterator[slice]:
    # bars only for a person watching: never in logs, CI or when stderr is redirected
    show = progress and sys.stderr.isatty()
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not show, leave=False):
        yield slice(start, min(start + batch_size, n))


def _correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad(), eval_mode(model):
        return model(x).argmax(dim=1) == y


def run_attack(model: nn.Module, x: Tensor, y: Tensor, spec: AttackSpec, *, n_classes: int | None = None) -> Tensor:
    """Adversarial inputs for one batch as described by ``spec`` (``clean`` returns ``x`` unchanged).

    Args:
        model: classifier on pixels in [0, 1].
        x: inputs (N, ...) in [0, 1], on the model's device.
        y: integer labels (N,).
        spec: which attack and budget.
        n_classes: number of classes, for AutoAttack; default: the width of the model's output.
    """
    if spec.name == "clean":
        return x.detach()
    attack = get_attack(spec.name)
    if spec.name == "fgsm":
        return attack(model, x, y, spec.eps, norm=spec.norm)
    if spec.name == "pgd":
        return attack(
            model, x, y, spec.eps, steps=spec.steps, step_size=spec.step_size, norm=spec.norm, restarts=spec.restarts
        )
    if n_classes is None:
        with torch.no_grad(), eval_mode(model):
            n_classes = int(model(x[:1]).shape[-1])
    return attack(model, x, y, spec.eps, norm=spec.norm, n_classes=n_classes)


def accuracy(model: nn.Module, x: ArrayLike, y: ArrayLike, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (in eval mode; its modes are restored) on pixels ``x`` in [0, 1]."""
    batch_size = _check_batch_size(batch_size)
    x, y = _prepare(model, x, y)
    hits = sum(int(_correct(model, x[b], y[b]).sum()) for b in _batches(len(y), batch_size, "clean", False))
    return hits / len(y)


def _robust_hits(
    model: nn.Module, x: Tensor, y: Tensor, spec: AttackSpec, batch_size: int, progress: bool
) -> tuple[int, int]:
    """(clean hits, robust hits) over all batches."""
    clean = robust = 0
    n_classes: int | None = None
    for b in _batches(len(y), batch_size, str(spec), progress):
        xb, yb = x[b], y[b]
        ok = _correct(model, xb, yb)
        clean += int(ok.sum())
        if spec.name == "clean":
            robust += int(ok.sum())
            continue
        if n_classes is None:
            with torch.no_grad(), eval_mode(model):
                n_classes = int(model(xb[:1]).shape[-1])
        x_adv = run_attack(model, xb, yb, spec, n_classes=n_classes)
        robust += int((ok & _correct(model, x_adv, yb)).sum())
    return clean, robust


def robust_accuracy(
    model: nn.Module, x: ArrayLike, y: ArrayLike, spec: AttackSpec, *, batch_size: int = 256, progress: bool = False
) -> float:
    """Accuracy under the attack ``spec``: the fraction correct both clean and on the adversarial input.

    Args:
        model: classifier on pixels in [0, 1] (run in eval mode; its modes are restored).
        x: inputs (N, ...) in [0, 1], numpy or torch.
        y: integer labels (N,).
        spec: the attack, e.g. ``parse("pgd:linf:0.1:40")``.
        batch_size: examples per attack batch.
        progress: show a tqdm bar (only when stderr is a terminal).

    Raises:
        ConfigError: invalid inputs or batch size.
    """
    if not isinstance(spec, AttackSpec):
        raise ConfigError(f"spec must be an AttackSpec (see edgesep.attacks.parse), got {type(spec).__name__}")
    batch_size = _check_batch_size(batch_size)
    x, y = _prepare(model, x, y)
    return _robust_hits(model, x, y, spec, batch_size, progress)[1] / len(y)


def evaluate(
    model: nn.Module,
    x: ArrayLike,
    y: ArrayLike,
    specs: Sequence[AttackSpec],
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """Clean accuracy and the robust accuracy under each spec, as a JSON-ready dict.

    Returns:
        ``{"n": N, "clean": acc, "robust": [{"attack", "norm", "eps", "steps", "step_size", "restarts",
        "accuracy"}, ...]}`` in the order of ``specs``; ``step_size`` is the one PGD actually used.

    Raises:
        ConfigError: a spec that is not an AttackSpec, invalid inputs or batch size.
    """
    bad = [s for s in specs if not isinstance(s, AttackSpec)]
    if bad:
        raise ConfigError(f"specs must be AttackSpec objects (see edgesep.attacks.parse), got {bad[0]!r}")
    batch_size = _check_batch_size(batch_size)
    x, y = _prepare(model, x, y)
    n = len(y)
    clean = accuracy(model, x, y, batch_size=batch_size)
    robust = []
    for spec in specs:
        acc = _robust_hits(model, x, y, spec, batch_size, progress)[1] / n
        robust.append(
            {
                "attack": spec.name,
                "norm": spec.norm,
                "eps": spec.eps,
                "steps": spec.steps,
                "step_size": spec.effective_step_size(),
                "restarts": spec.restarts,
                "accuracy": acc,
            }
        )
    return {"n": n, "clean": clean, "robust": robust}
