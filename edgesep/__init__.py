"""edgesep: robust and lightweight neural networks, from training to edge devices.

Importing this package must stay cheap and must not import torch: the device side (runtimes, the on-device
runner) runs where only numpy and one runtime are installed. Host-side modules (layers, models, training) are
imported explicitly, e.g. ``from edgesep.layers import KronLinear``.
"""

from edgesep.errors import (
    ConfigError,
    DatasetError,
    EdgesepError,
    ShapeMismatchError,
    UnknownNameError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DatasetError",
    "EdgesepError",
    "ShapeMismatchError",
    "UnknownNameError",
    "__version__",
]
