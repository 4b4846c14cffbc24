"""The environment probe of the on-device runner: what machine, CPU, clocks and runtimes a result was measured on.

Standard library + numpy only (it runs on the device, beside the runner). Every field is best effort: whatever
cannot be read (no ``/sys`` under qemu-user, no permission, no ``nvpmodel``) is ``None``, never an exception.

Fields (the ``environment`` block of a result, see ``devices/_result.py``):

- ``hostname``, ``os`` (``platform.system()`` plus ``PRETTY_NAME`` of ``/etc/os-release``), ``kernel``
  (``platform.release()``), ``machine`` (``platform.machine()``: ``aarch64``, ``x86_64``), ``python``, ``numpy``;
- ``cpu_model``: ``/proc/cpuinfo`` "model name" (x86); on ARM, where the kernel names no model, the core
  (decoded from "CPU implementer"/"CPU part", e.g. ``ARM Cortex-A72``) and the board (``Model`` of
  ``/proc/cpuinfo``, ``/proc/device-tree/model`` or ``Hardware``), e.g.
  ``ARM Cortex-A72 (Raspberry Pi 4 Model B Rev 1.4)``. Under qemu-user the kernel's cpuinfo is the *host's*: the
  model then says so (see ``looks_emulated``);
- ``cores``: CPUs this process may run on (``os.sched_getaffinity``), else ``os.cpu_count()``;
- ``governor``: ``/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor`` (e.g. ``performance``, ``ondemand``);
- ``clocks_mhz``: ``{"cpu0": MHz, ...}`` from each CPU's ``cpufreq/scaling_cur_freq`` at probe time;
- ``temperature_c``: the hottest of ``/sys/class/thermal/thermal_zone*/temp`` (degrees Celsius) at probe time;
- ``jetson_power_mode``: ``nvpmodel -q`` (e.g. ``MAXN (mode 0)``), else the mode recorded in
  ``/var/lib/nvpmodel/status`` named from ``/etc/nvpmodel.conf``; ``None`` off a Jetson;
- ``runtime``: the backend that ran (``onnxruntime``, ``tvm``, ``tensorrt``); ``runtime_versions``:
  ``{name: version}`` of those of onnxruntime / tvm / tensorrt installed here, read from package metadata (or
  ``__version__`` of an already imported module) without importing them (``import tvm`` takes ~17 s under qemu);
- ``threads``: the runtime's intra-op threads as reported by the engine, else as requested, else ``None``
  (the runtime's default).
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ENV_FIELDS", "cpu_model", "looks_emulated", "probe_environment", "runtime_versions"]

ENV_FIELDS: tuple[str, ...] = (
    "hostname", "os", "kernel", "machine", "python", "numpy", "cpu_model", "cores", "governor", "clocks_mhz",
    "temperature_c", "jetson_power_mode", "runtime", "runtime_versions", "threads",
)  # fmt: skip
T = TypeVar("T")

# runtime -> (module name, distribution names that may provide it)
_RUNTIMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "onnxruntime": ("onnxruntime", ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")),
    "tvm": ("tvm", ("apache-tvm", "tvm", "mlc-ai-nightly")),
    "tensorrt": ("tensorrt", ("tensorrt", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-libs")),
}
# ARM "CPU implementer" -> {"CPU part" -> core}; the cores of the boards edgesep targets and their neighbours
_ARM_CORES: dict[int, tuple[str, dict[int, str]]] = {
    0x41: ("ARM", {
        0xD03: "Cortex-A53", 0xD04: "Cortex-A35", 0xD05: "Cortex-A55", 0xD07: "Cortex-A57", 0xD08: "Cortex-A72",
        0xD09: "Cortex-A73", 0xD0A: "Cortex-A75", 0xD0B: "Cortex-A76", 0xD0C: "Neoverse-N1", 0xD0D: "Cortex-A77",
        0xD40: "Neoverse-V1", 0xD41: "Cortex-A78", 0xD42: "Cortex-A78AE", 0xD44: "Cortex-X1", 0xD46: "Cortex-A510",
        0xD47: "Cortex-A710", 0xD48: "Cortex-X2", 0xD49: "Neoverse-N2", 0xD4B: "Cortex-A78C", 0xD4F: "Neoverse-V2",
    }),
    0x4E: ("NVIDIA", {0x004: "Carmel"}),
}  # fmt: skip
_X86_VENDORS = ("GenuineIntel", "AuthenticAMD", "HygonGenuine", "CentaurHauls")


def _safe(fn: Callable[[], T]) -> T | None:
    """``fn()``, or None when it raises anything (an unreadable field is missing, never fatal)."""
    try:
        return fn()
    except Exception:
        return None


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip()
    except (OSError, ValueError):
        return None


def _cpuinfo() -> list[tuple[str, str]]:
    """(key, value) lines of /proc/cpuinfo, in order; [] when unreadable."""
    text = _read("/proc/cpuinfo") or ""
    out = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out.append((key.strip(), value.strip()))
    return out


def _first(info: list[tuple[str, str]], key: str) -> str | None:
    return next((v for k, v in info if k == key and v), None)


def _os_name() -> str:
    pretty = None
    for line in (_read("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            pretty = line.split("=", 1)[1].strip().strip('"')
    return f"{platform.system()} ({pretty})" if pretty else platform.system()


def _board_model(info: list[tuple[str, str]]) -> str | None:
    model = _first(info, "Model")  # Raspberry Pi kernels
    if model is None:
        raw = _read("/proc/device-tree/model") or _read("/sys/firmware/devicetree/base/model")
        model = (raw.replace("\0", "").strip() or None) if raw else None  # Jetson, most ARM boards
    return model or _first(info, "Hardware")


def _arm_core(info: list[tuple[str, str]]) -> str | None:
    impl, part = _first(info, "CPU implementer"), _first(info, "CPU part")
    if impl is None or part is None:
        return None
    try:
        i, p = int(impl, 0), int(part, 0)
    except ValueError:
        return None
    vendor, parts = _ARM_CORES.get(i, (f"implementer {impl}", {}))
    return f"{vendor} {parts.get(p, f'part {part}')}"


def looks_emulated(machine: str | None = None, info: list[tuple[str, str]] | None = None) -> bool:
    """True when python runs an ARM build on an x86 kernel: qemu-user shows the host's ``/proc/cpuinfo``.

    (A native ARM kernel never lists an x86 ``vendor_id``.) False when cpuinfo is unreadable.
    """
    machine = (machine or platform.machine()).lower()
    info = _cpuinfo() if info is None else info
    return machine.startswith(("aarch64", "arm")) and _first(info, "vendor_id") in _X86_VENDORS


def cpu_model() -> str | None:
    """A human-readable CPU (and, on ARM boards, board) name; see the module docstring."""
    info = _cpuinfo()
    name = _first(info, "model name")
    if looks_emulated(info=info):
        return f"{name or 'x86 CPU'} (the host's CPU, seen through qemu-user: emulated {platform.machine()})"
    core, board = _arm_core(info), _board_model(info)
    if name and not (core and name.lower().startswith("arm")):  # ARM kernels may say "ARMv7 Processor rev 3 (v7l)"
        return name
    parts = [p for p in (core or name, f"({board})" if board else None) if p]
    return " ".join(parts) or None


def _cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _cpu_dirs() -> list[Path]:
    dirs = [Path(p) for p in glob.glob("/sys/devices/system/cpu/cpu[0-9]*")]
    return sorted(dirs, key=lambda p: int(re.sub(r"\D", "", p.name) or 0))


def _clocks_mhz() -> dict[str, float] | None:
    out: dict[str, float] = {}
    for d in _cpu_dirs():
        khz = _read(d / "cpufreq" / "scaling_cur_freq")
        if khz and khz.isdigit():
            out[d.name] = round(int(khz) / 1000.0, 1)
    return out or None


def _temperature_c() -> float | None:
    temps = []
    for zone in glob.glob("/sys/class/thermal/thermal_zone*/temp"):
        raw = _read(zone)
        try:
            v = int(raw) if raw is not None else None
        except ValueError:
            continue
        if v is not None and -40_000 < v < 150_000:  # millidegrees; drop sentinel values of absent sensors
            temps.append(v / 1000.0)
    return round(max(temps), 1) if temps else None


def _nvpmodel_names() -> dict[int, str]:
    names: dict[int, str] = {}
    for m in re.finditer(r"<\s*POWER_MODEL\s+ID\s*=\s*(\d+)\s+NAME\s*=\s*([^\s>]+)", _read("/etc/nvpmodel.conf") or ""):
        names[int(m.group(1))] = m.group(2)
    return names


def _jetson_power_mode() -> str | None:
    exe = shutil.which("nvpmodel") or next((p for p in ("/usr/sbin/nvpmodel", "/usr/bin/nvpmodel") if
                                            os.access(p, os.X_OK)), None)  # fmt: skip
    if exe is not None:
        try:
            r = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            r = None
        if r is not None and r.returncode == 0:
            text = r.stdout
            m = re.search(r"NV Power Mode:\s*(\S+)", text)
            if m:
                mode = re.search(r"^\s*(\d+)\s*$", text[m.end() :], re.MULTILINE)
                return f"{m.group(1)} (mode {mode.group(1)})" if mode else m.group(1)
    status = _read("/var/lib/nvpmodel/status")  # e.g. "pmode:0000 fmode:..."
    if status:
        m = re.search(r"pmode:(\d+)", status)
        if m:
            mode = int(m.group(1))
            name = _nvpmodel_names().get(mode)
            return f"{name} (mode {mode})" if name else f"mode {mode}"
    return None


def runtime_versions() -> dict[str, str]:
    """``{runtime: version}`` for the runtimes installed here, without importing them (see the module docstring)."""
    out: dict[str, str] = {}
    for name, (module, dists) in _RUNTIMES.items():
        mod = sys.modules.get(module)
        version = getattr(mod, "__version__", None) if mod is not None else None
        if version is None:
            if _safe(lambda m=module: importlib.util.find_spec(m)) is None:
                continue
            for dist in dists:
                version = _safe(lambda d=dist: importlib.metadata.version(d))
                if version:
                    break
        out[name] = str(version) if version else "installed (version unknown)"
    return out


def probe_environment(runtime: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """Every environment field (``ENV_FIELDS``); unreadable ones are None.

    Args:
        runtime: the backend that runs the artifact (recorded as given).
        threads: the engine's intra-op threads (None: the runtime's default).
    """

    def numpy_version() -> str | None:
        import numpy

        return numpy.__version__

    env: dict[str, Any] = {
        "hostname": _safe(socket.gethostname),
        "os": _safe(_os_name),
        "kernel": _safe(platform.release),
        "machine": _safe(platform.machine),
        "python": _safe(platform.python_version),
        "numpy": _safe(numpy_version),
        "cpu_model": _safe(cpu_model),
        "cores": _safe(_cores),
        "governor": _safe(lambda: _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") or None),
        "clocks_mhz": _safe(_clocks_mhz),
        "temperature_c": _safe(_temperature_c),
        "jetson_power_mode": _safe(_jetson_power_mode),
        "runtime": runtime,
        "runtime_versions": _safe(runtime_versions) or {},
        "threads": threads,
    }
    return env
