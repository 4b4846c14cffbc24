"""edgesep.runtimes: one small Runtime interface over ONNX Runtime, TVM and TensorRT (numpy + that backend).

``import edgesep.runtimes`` needs numpy only; each backend module imports its own runtime when it is used.

For apps: ``load(bundle)`` -> ``Session`` (``run`` / ``predict`` / ``classes`` / ``input_spec`` / ``info``);
``parity(session)`` checks an artifact against the ONNX Runtime fp32 reference on the bundle's eval data. Every
error a user can cause is an ``EdgesepError`` whose message says what to do.
"""

from edgesep.errors import EdgesepError
from edgesep.runtimes._base import (
    ARTIFACT_KINDS,
    BackendMissingError,
    Runtime,
    get_backend,
    list_backends,
    register_backend,
)
from edgesep.runtimes._load import (
    BACKEND_ORDER,
    HOST_TARGET,
    PRECISION_ORDER,
    PREFERRED_KEY,
    Selection,
    Session,
    load,
    select_artifact,
)
from edgesep.runtimes._parity import PARITY_THRESHOLDS, compare_logits, parity, parity_ok

__all__ = [
    "ARTIFACT_KINDS",
    "BACKEND_ORDER",
    "HOST_TARGET",
    "PARITY_THRESHOLDS",
    "PRECISION_ORDER",
    "PREFERRED_KEY",
    "BackendMissingError",
    "EdgesepError",
    "Runtime",
    "Selection",
    "Session",
    "compare_logits",
    "get_backend",
    "list_backends",
    "load",
    "parity",
    "parity_ok",
    "register_backend",
    "select_artifact",
]
