"""Small frozen config objects that serialize to {"_type", "_version", "_data"} and load back from an allow-list.

In the style of torchao's configs: behaviour is chosen by a config object, the object is written into result and
run files, and reading one back never instantiates anything that is not registered here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from edgesep.errors import ConfigError

__all__ = ["SerializableConfig", "config_from_dict", "register_config"]

_REGISTRY: dict[str, type[SerializableConfig]] = {}
T = TypeVar("T", bound="SerializableConfig")


def register_config(cls: type[T]) -> type[T]:
    """Class decorator: allow ``cls`` to be loaded back by ``config_from_dict``."""
    _REGISTRY[cls.__name__] = cls
    return cls


class SerializableConfig:
    """Mixin for frozen dataclasses: ``to_dict`` / ``from_dict`` with type, version and unknown-field checks."""

    VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        return {"_type": type(self).__name__, "_version": self.VERSION, "_data": dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        if not isinstance(d, dict) or d.get("_type") != cls.__name__:
            raise ConfigError(f"expected a serialized {cls.__name__}, got {str(d)[:120]!r}")
        if d.get("_version") != cls.VERSION:
            raise ConfigError(
                f"{cls.__name__} version {d.get('_version')} is not supported (this edgesep reads version "
                f"{cls.VERSION}); re-create the file with this version"
            )
        data = d.get("_data", {})
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(names)}")
        return cls(**data)


def config_from_dict(d: dict[str, Any]) -> SerializableConfig:
    """Load any registered config; refuses types that are not on the allow-list."""
    name = d.get("_type") if isinstance(d, dict) else None
    if name not in _REGISTRY:
        raise ConfigError(f"refusing to load config type {name!r}; allowed: {sorted(_REGISTRY)}")
    return _REGISTRY[name].from_dict(d)
