"""edgesep.runtimes: one small Runtime interface over ONNX Runtime, TVM and TensorRT (numpy + that backend).

``import edgesep.runtimes`` needs numpy only; each backend module imports its own runtime when it is used.
"""

from edgesep.runtimes._base import (
    ARTIFACT_KINDS,
    BackendMissingError,
    Runtime,
    get_backend,
    list_backends,
    register_backend,
)

__all__ = ["ARTIFACT_KINDS", "BackendMissingError", "Runtime", "get_backend", "list_backends", "register_backend"]
