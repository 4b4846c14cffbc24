"""edgesep.devices: device profiles, transports, the on-device runner and the host harness.

Not implemented yet (see the device-harness issue). The package exists so the layout and import names are fixed.
"""

__all__: list[str] = []
