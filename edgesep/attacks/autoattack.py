"""AutoAttack (Croce & Hein, ICML 2020) through ``torchattacks.AutoAttack``.

torch and torchattacks are imported when the attack is called, not when this module is imported, so
``import edgesep.attacks`` stays torch-free. torchattacks is installed with ``--no-deps`` (it pins an old
``requests`` and pulls torchvision, which would replace the pinned torch build).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgesep.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = ["VERSIONS", "autoattack"]

VERSIONS = ("standard", "plus", "rand")
_NORMS = {"linf": "Linf", "l2": "L2"}
INSTALL_HINT = "pip install --no-deps torchattacks==3.5.1"


def autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    norm: str = "Linf",
    version: str = "standard",
    seed: int = 0,
    n_classes: int = 10,
) -> Tensor:
    """Run AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square) and return the adversarial inputs.

    As with :func:`edgesep.attacks.pgd`, the model runs in eval mode and each module's mode is restored, the
    parameters' ``.grad`` are left untouched (FAB calls ``backward()``; the parameters are frozen meanwhile),
    and the caller's global torch RNG state is restored (torchattacks reseeds it with ``seed``).

    Args:
        model: classifier on pixels in [0, 1], returning logits.
        x: inputs (N, ...) in [0, 1].
        y: integer labels (N,).
        eps: radius of the perturbation ball.
        norm: "Linf" or "L2" (case-insensitive).
        version: "standard", "plus" or "rand".
        seed: seed of the attacks' random starts.
        n_classes: number of classes of the model (the targeted attacks use ``n_classes - 1`` targets).

    Returns:
        Detached adversarial inputs; the clean input where no attack succeeded.

    Raises:
        ConfigError: torchattacks is missing, or eps / norm / version / n_classes is invalid.
    """
    key = norm.lower() if isinstance(norm, str) else norm
    if key not in _NORMS:
        raise ConfigError(f"unknown AutoAttack norm {norm!r}; use one of {', '.join(_NORMS.values())}")
    if version not in VERSIONS:
        raise ConfigError(f"unknown AutoAttack version {version!r}; use one of {', '.join(VERSIONS)}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ConfigError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    try:
        import torchattacks
    except ImportError as e:
        raise ConfigError(f"AutoAttack needs torchattacks, which is not importable ({e}); {INSTALL_HINT}") from e
    import torch

    from edgesep.attacks._torch import check_eps, eval_mode, frozen_params, prepare_inputs

    eps = check_eps(eps)
    x, y = prepare_inputs(model, x, y)
    if x.shape[0] == 0:
        return x.clone()
    devices = [x.device] if x.device.type == "cuda" else []
    with eval_mode(model), frozen_params(model), torch.random.fork_rng(devices=devices):
        with torch.no_grad():
            n_out = model(x[:1]).shape[-1]
        if n_out != n_classes:
            raise ConfigError(f"the model has {n_out} outputs but n_classes={n_classes}; pass n_classes={n_out}")
        attack = torchattacks.AutoAttack(
            model, norm=_NORMS[key], eps=eps, version=version, n_classes=n_classes, seed=seed
        )
        x_adv = attack(x, y)
    return x_adv.detach()
