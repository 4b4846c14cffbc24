"""Adversarial attacks: white-box FGSM / PGD / AutoAttack (torch) and the query-only Square Attack (numpy).

Importing this package does not import torch: the device side imports ``edgesep.attacks.square`` (numpy only)
against compiled engines, and the attack specs below are plain data. ``fgsm`` and ``pgd`` are loaded on first
access (``from edgesep.attacks import pgd`` works as usual); ``autoattack`` imports torch and torchattacks only
when it is called.

Inputs of every attack are pixels in [0, 1]; normalization lives inside the model.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from edgesep.attacks.autoattack import autoattack
from edgesep.attacks.square import SquareResult, square_attack
from edgesep.errors import ConfigError, UnknownNameError

if TYPE_CHECKING:
    from edgesep.attacks._torch import fgsm, pgd

__all__ = [
    "ATTACKS",
    "NORMS",
    "SPEC_SYNTAX",
    "AttackSpec",
    "SquareResult",
    "autoattack",
    "fgsm",
    "get_attack",
    "parse",
    "pgd",
    "square_attack",
]

NORMS = ("linf", "l2")
SPEC_SYNTAX = (
    "'clean', 'fgsm:NORM:EPS', 'pgd:NORM:EPS[:STEPS][:step_size=S][:restarts=R]' or 'autoattack:NORM:EPS', "
    "with NORM linf or l2 and EPS a number or a fraction (e.g. 'pgd:linf:8/255:40:restarts=5')"
)

# name -> (module, attribute); resolved on first use so that the registry itself does not import torch.
_REGISTRY: dict[str, tuple[str, str]] = {
    "autoattack": ("edgesep.attacks.autoattack", "autoattack"),
    "fgsm": ("edgesep.attacks._torch", "fgsm"),
    "pgd": ("edgesep.attacks._torch", "pgd"),
}
_SPEC_NAMES = ("clean", *_REGISTRY)


class _AttackRegistry(Mapping[str, Callable[..., Any]]):
    """Read-only name -> attack function mapping whose functions are imported on first access."""

    def __getitem__(self, name: str) -> Callable[..., Any]:
        if name not in _REGISTRY:
            raise UnknownNameError("attack", name, _REGISTRY)
        module, attr = _REGISTRY[name]
        return getattr(importlib.import_module(module), attr)

    def __contains__(self, name: object) -> bool:  # without importing the attack (Mapping's would)
        return name in _REGISTRY

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(_REGISTRY))

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return f"ATTACKS({', '.join(self)})"


ATTACKS: Mapping[str, Callable[..., Any]] = _AttackRegistry()


def get_attack(name: str) -> Callable[..., Any]:
    """Return the attack function registered as ``name`` ("fgsm", "pgd" or "autoattack").

    Raises:
        UnknownNameError: ``name`` is not registered.
    """
    return ATTACKS[name]


def __getattr__(name: str) -> Any:
    # fgsm / pgd import torch: load them on first access only (PEP 562).
    if name in ("fgsm", "pgd"):
        value = getattr(importlib.import_module("edgesep.attacks._torch"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class AttackSpec:
    """One attack and its budget, e.g. ``AttackSpec("pgd", "linf", eps=0.1, steps=40)``; see :func:`parse`.

    Fields that do not apply to an attack stay ``None``: ``steps`` is 1 for fgsm and ``None`` for autoattack
    and clean; ``step_size=None`` means PGD's default ``2.5 * eps / steps``. ``clean`` has ``eps == 0`` and
    norm "linf". Names and norms are lower-cased; after construction ``eps`` is always a float.

    Raises:
        UnknownNameError: unknown attack name.
        ConfigError: a value that is out of range or does not apply to the attack.
    """

    name: str
    norm: str = "linf"
    eps: float | None = None
    steps: int | None = None
    step_size: float | None = None
    restarts: int = 1

    def __post_init__(self) -> None:
        name = self.name.lower() if isinstance(self.name, str) else self.name
        if name not in _SPEC_NAMES:
            raise UnknownNameError("attack", str(self.name), _SPEC_NAMES)
        norm = self.norm.lower() if isinstance(self.norm, str) else self.norm
        if norm not in NORMS:
            raise ConfigError(f"{name}: unknown norm {self.norm!r}; use one of {', '.join(NORMS)}")
        eps, steps, step_size, restarts = self.eps, self.steps, self.step_size, self.restarts
        if name == "clean":
            if eps not in (None, 0, 0.0) or steps not in (None, 0) or step_size is not None or restarts != 1:
                raise ConfigError("'clean' takes no eps, steps, step_size or restarts; leave them unset")
            eps, steps, restarts, norm = 0.0, None, 1, "linf"  # norm is meaningless here: one canonical form
        else:
            if eps is None:
                raise ConfigError(f"{name}: eps is required, e.g. AttackSpec({name!r}, {norm!r}, eps=0.1)")
            if not _is_number(eps) or not math.isfinite(eps) or eps < 0:
                raise ConfigError(f"{name}: eps must be a finite number >= 0, got {eps!r}")
            eps = float(eps)
            if not _is_int(restarts) or restarts < 1:
                raise ConfigError(f"{name}: restarts must be an integer >= 1, got {restarts!r}")
            if name == "pgd":
                steps = 10 if steps is None else steps
                if not _is_int(steps) or steps < 1:
                    raise ConfigError(f"pgd: steps must be an integer >= 1, got {steps!r}")
                if step_size is not None:
                    if not _is_number(step_size) or not math.isfinite(step_size) or step_size <= 0:
                        raise ConfigError(f"pgd: step_size must be a finite number > 0, got {step_size!r}")
                    step_size = float(step_size)
            else:
                if name == "fgsm" and steps not in (None, 1):
                    raise ConfigError(f"fgsm takes exactly one step, got steps={steps!r}; use pgd for more")
                if name == "autoattack" and steps is not None:
                    raise ConfigError("autoattack chooses its own iterations; leave steps unset")
                if step_size is not None or restarts != 1:
                    raise ConfigError(f"{name} takes no step_size or restarts; use pgd for those")
                steps = 1 if name == "fgsm" else None
        normalized = {"name": name, "norm": norm, "eps": eps, "steps": steps, "step_size": step_size}
        for field, value in (*normalized.items(), ("restarts", restarts)):
            object.__setattr__(self, field, value)

    def effective_step_size(self) -> float | None:
        """The PGD step size actually used (``2.5 * eps / steps`` unless set); ``None`` for other attacks."""
        if self.name != "pgd":
            return None
        if self.step_size is not None:
            return self.step_size
        return 2.5 * float(self.eps or 0.0) / int(self.steps or 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` reads it back."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AttackSpec:
        """Build a spec from :meth:`to_dict` output.

        Raises:
            ConfigError: not a mapping, a missing ``name`` or an unknown key.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"an attack spec must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown attack spec keys {unknown}; valid keys: {', '.join(sorted(known))}")
        if "name" not in d:
            raise ConfigError(f"attack spec {dict(d)!r} has no 'name'; valid names: {', '.join(_SPEC_NAMES)}")
        return cls(**d)

    def __str__(self) -> str:
        """The canonical string form, which :func:`parse` reads back to an equal spec."""
        if self.name == "clean":
            return "clean"
        s = f"{self.name}:{self.norm}:{self.eps!r}"
        if self.name == "pgd":
            s += f":{self.steps}"
            if self.step_size is not None:
                s += f":step_size={self.step_size!r}"
            if self.restarts != 1:
                s += f":restarts={self.restarts}"
        return s


def _parse_number(text: str, what: str, s: str) -> float:
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"attack spec {s!r}: {what} {text!r} is not a number; expected {SPEC_SYNTAX}") from None


def _parse_int(text: str, what: str, s: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"attack spec {s!r}: {what} {text!r} is not an integer; expected {SPEC_SYNTAX}") from None


def parse(s: str) -> AttackSpec:
    """Parse an attack spec string such as ``"pgd:linf:0.1:40"``, ``"fgsm:l2:0.5"`` or ``"clean"``.

    Syntax: ``name:norm:eps[:steps][:step_size=S][:restarts=R]``; ``eps`` may be a fraction (``8/255``).
    ``str(spec)`` gives back a string that parses to an equal spec.

    Raises:
        ConfigError: the string does not follow the syntax, or a value is invalid; the message shows the syntax.
    """
    if not isinstance(s, str):
        raise ConfigError(f"an attack spec must be a string, got {type(s).__name__}; expected {SPEC_SYNTAX}")
    text = s.strip()
    parts = [p.strip() for p in text.split(":")]
    name = parts[0].lower()
    if name not in _SPEC_NAMES:
        raise ConfigError(
            f"unknown attack {parts[0]!r} in spec {s!r}; valid attacks: {', '.join(_SPEC_NAMES)}; "
            f"expected {SPEC_SYNTAX}"
        )
    if name == "clean":
        if len(parts) != 1:
            raise ConfigError(f"attack spec {s!r}: 'clean' takes no arguments; expected {SPEC_SYNTAX}")
        return AttackSpec("clean")
    if len(parts) < 3:
        raise ConfigError(f"attack spec {s!r} needs at least a norm and an eps; expected {SPEC_SYNTAX}")
    kwargs: dict[str, Any] = {"norm": parts[1], "eps": _parse_number(parts[2], "eps", s)}
    rest = parts[3:]
    if rest and "=" not in rest[0]:
        kwargs["steps"] = _parse_int(rest.pop(0), "steps", s)
    for item in rest:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ("steps", "step_size", "restarts"):
            raise ConfigError(
                f"attack spec {s!r}: unexpected part {item!r}; options are steps=, step_size=, restarts=; "
                f"expected {SPEC_SYNTAX}"
            )
        if key in kwargs:
            raise ConfigError(f"attack spec {s!r}: {key} is given twice; expected {SPEC_SYNTAX}")
        kwargs[key] = _parse_number(value, key, s) if key == "step_size" else _parse_int(value, key, s)
    try:
        return AttackSpec(name, **kwargs)
    except ConfigError as e:
        raise ConfigError(f"attack spec {s!r}: {e}; expected {SPEC_SYNTAX}") from None
