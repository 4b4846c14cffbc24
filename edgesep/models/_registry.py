"""Model registry in the style of timm: ``@register_model(name)``, ``create_model(name, **kwargs)``,
``list_models("kron*")``.

A builder takes JSON-serializable keyword arguments only (ints, floats, strings, lists), so the ``model`` and
``model_kwargs`` of a run directory's config.json rebuild the model exactly.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from edgesep.errors import ConfigError, UnknownNameError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["create_model", "get_model_builder", "is_model", "list_models", "register_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., Any])


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering ``fn(**kwargs) -> nn.Module`` under ``name``.

    Raises:
        ConfigError: if another builder already holds the name.
    """

    def decorator(fn: F) -> F:
        old = _MODELS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ConfigError(
                f"model name {name!r} is already registered by {old.__module__}.{old.__qualname__}; pick another"
            )
        _MODELS[name] = fn
        return fn

    return decorator


def is_model(name: str) -> bool:
    return name in _MODELS


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered under ``name``.

    Raises:
        UnknownNameError: if no model has that name.
    """
    try:
        return _MODELS[name]
    except KeyError:
        raise UnknownNameError("model", name, _MODELS) from None


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with keyword arguments ``kwargs``.

    Raises:
        UnknownNameError: unknown model name.
        ConfigError: a keyword the builder does not accept (the message lists those it does), or bad values.
    """
    fn = get_model_builder(name)
    sig = inspect.signature(fn)
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        accepted = ", ".join(
            p.name for p in sig.parameters.values() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        )
        raise ConfigError(f"model {name!r}: {e}; it accepts: {accepted}") from None
    return fn(**kwargs)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the fnmatch ``pattern`` (e.g. ``"kron*"``), sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))
