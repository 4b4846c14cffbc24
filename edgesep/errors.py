"""Typed user-facing errors. Each message says what went wrong and what to do about it.

The CLI prints these without a traceback and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "EdgesepError",
    "ShapeMismatchError",
    "UnknownNameError",
]


class EdgesepError(Exception):
    """Base class of every error a user can cause and fix."""


class UnknownNameError(EdgesepError, KeyError):
    """A name (model, dataset, attack, ...) that is not registered."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DatasetError(EdgesepError):
    """A dataset file that is missing, malformed or inconsistent."""


class ShapeMismatchError(EdgesepError, ValueError):
    """Shapes that do not fit together (factor shapes vs input shape, weights vs layer)."""


class ConfigError(EdgesepError, ValueError):
    """An invalid option or combination of options."""


class CheckpointError(EdgesepError):
    """A run directory or checkpoint that cannot be loaded."""
