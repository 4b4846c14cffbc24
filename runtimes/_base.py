"""The one small interface every backend implements, and the backend registry.

A backend is one module (``edgesep.runtimes.<name>``) that defines a ``Runtime`` subclass decorated with
``@register_backend``; adding one touches nothing else (tinygrad's ``runtime/ops_<device>.py``). Backends are
imported lazily by name, so ``import edgesep.runtimes`` needs numpy only and a device imports only its runtime.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgesep.errors import BackendMissingError, UnknownNameError

__all__ = [
    "ARTIFACT_KINDS",
    "BackendMissingError",
    "Runtime",
    "get_backend",
    "list_backends",
    "register_backend",
]

# backend name -> module that registers it; the module is imported on first use only
_BACKEND_MODULES: dict[str, str] = {
    "onnxruntime": "edgesep.runtimes.onnxruntime",
    "tvm": "edgesep.runtimes.tvm",
    "tensorrt": "edgesep.runtimes.tensorrt",
}
# which artifact kinds (manifest ``artifacts[].kind``) each backend runs
ARTIFACT_KINDS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnx",),
    "tvm": ("tvm-lib",),
    "tensorrt": ("trt-onnx", "onnx"),
}
_REGISTRY: dict[str, type[Runtime]] = {}


class Runtime(ABC):
    """A loaded artifact that maps a float32 NCHW batch in [0, 1] to float32 logits.

    Subclasses set ``name`` and implement ``available``, ``version``, ``__init__`` (load the artifact at ``path``),
    ``run`` and ``info``.
    """

    name: ClassVar[str] = ""

    @classmethod
    @abstractmethod
    def available(cls) -> bool:
        """Whether the backend's runtime package can be imported here (cheap; never raises)."""

    @classmethod
    @abstractmethod
    def version(cls) -> str | None:
        """The runtime package's version, or None when it is not installed."""

    @abstractmethod
    def __init__(self, path: str | Path, *, precision: str, target: str = "any", threads: int | None = None,
                 input_name: str = "input", **options: Any):  # fmt: skip
        """Load the artifact at ``path`` (already hash-verified by the caller when it comes from a bundle)."""

    @abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, classes) float32 for a float32 batch (N, C, H, W) in [0, 1]."""

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """JSON-ready: backend, version, precision, target, threads, and backend-specific details."""

    def close(self) -> None:  # noqa: B027  (optional hook: most backends free their resources on GC)
        """Release what the session holds."""

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def register_backend(cls: type[Runtime]) -> type[Runtime]:
    """Class decorator: register a Runtime subclass under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} needs a non-empty `name`")
    _REGISTRY[cls.name] = cls
    return cls


def list_backends() -> list[str]:
    """Every known backend name (installed or not)."""
    return sorted(_BACKEND_MODULES)


def get_backend(name: str) -> type[Runtime]:
    """The Runtime class registered as ``name`` (imports its module on first use).

    Raises:
        UnknownNameError: for a name that is not a backend.
    """
    if name not in _BACKEND_MODULES:
        raise UnknownNameError("backend", name, _BACKEND_MODULES)
    if name not in _REGISTRY:
        importlib.import_module(_BACKEND_MODULES[name])
    return _REGISTRY[name]
