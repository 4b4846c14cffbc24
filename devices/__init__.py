"""edgesep.devices: device profiles, transports (local, ssh, tvm-rpc), ``device check``, the on-device runner.

``import edgesep.devices`` needs the standard library only (no numpy, no torch): profiles are read with tomllib,
and the transport / check names below are imported lazily on first use (``edgesep.devices.transports`` and
``edgesep.devices.check`` are host-side: numpy, paramiko).
"""

from typing import Any

from edgesep.devices._profiles import (
    ARCHS,
    PROFILES_DIR,
    PROFILES_ENV,
    RUNTIMES,
    TRANSPORTS,
    DeviceProfile,
    list_profiles,
    load_profile,
)

__all__ = [
    "ARCHS",
    "PROFILES_DIR",
    "PROFILES_ENV",
    "RUNTIMES",
    "TRANSPORTS",
    "DeviceProfile",
    "HostKeyError",
    "RemoteResult",
    "Transport",
    "TransportError",
    "check_device",
    "list_profiles",
    "load_profile",
    "open_transport",
]

_LAZY = {
    "HostKeyError": "edgesep.devices.transports",
    "RemoteResult": "edgesep.devices.transports",
    "Transport": "edgesep.devices.transports",
    "TransportError": "edgesep.devices.transports",
    "open_transport": "edgesep.devices.transports",
    "check_device": "edgesep.devices.check",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgesep.devices' has no attribute {name!r}")
