"""edgesep.devices: device profiles (now); transports, the on-device runner and the host harness (later).

``import edgesep.devices`` needs the standard library only (no numpy, no torch): profiles are read with tomllib.
"""

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
    "list_profiles",
    "load_profile",
]
