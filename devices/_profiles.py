"""Device profiles: where a bundle runs, how edgesep reaches it, and what runtime it expects there.

A profile is a TOML file (the shipped ones live in ``devices/profiles/``; a user's from any path, or from
``$EDGESEP_PROFILES_DIR/*.toml``). Its fields (``id``, ``arch`` and ``transport`` and ``runtime`` are required):

- ``id``: the name (``[A-Za-z0-9_.-]+``); ``description``, ``notes``, ``power``: free text.
- ``arch``: ``"x86_64"`` or ``"aarch64"`` (``"native"``: this machine's, resolved at load time).
- ``transport``: ``"local"``, ``"ssh"`` (needs ``address``, ``user`` and ``known_hosts``; ``key`` is a private-key
  path, or leave it out for agent auth) or ``"tvm-rpc"`` (needs ``address`` + ``port`` of an RPC server, or a
  ``tracker_key``, with ``address`` + ``port`` then naming the tracker when given).
- ``port``, ``python`` (the interpreter on the device), ``workdir`` (where bundles go on the device),
  ``connect_timeout`` (seconds to connect, for ssh and tvm-rpc; default 10).
- ``runtime``: ``"onnxruntime"``, ``"tvm"`` or ``"tensorrt"``; ``target``: a TVM target, a name that
  ``edgesep.runtimes.tvm.resolve_target`` understands (``"host"``, ``"rpi4"``, ``"rpi5"``, a TVM tag) or a table
  (required when ``runtime = "tvm"``).
- ``versions``: the runtime versions expected on the device, e.g. ``{onnxruntime = ">=1.18", tensorrt = "10.3.*"}``.
- ``emulated`` (with ``root``, the emulated root's directory): a qemu-user root, for correctness, never timing.

Profiles never hold passwords: a ``password`` field is refused. Validation is strict: an unknown field, a wrong
type or a field the transport needs but lacks is a ``ConfigError`` naming the file and the field.

Standard library only (``tomllib``): no numpy, no torch.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgesep.errors import ConfigError, UnknownNameError

try:  # the standard library from Python 3.11; tomli is the same parser for 3.10
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 only
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

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

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
PROFILES_ENV = "EDGESEP_PROFILES_DIR"
ARCHS: tuple[str, ...] = ("x86_64", "aarch64")
TRANSPORTS: tuple[str, ...] = ("local", "ssh", "tvm-rpc")
RUNTIMES: tuple[str, ...] = ("onnxruntime", "tvm", "tensorrt")
DEFAULT_EMULATED_ROOT = "~/.cache/edgesep/arm64-root"
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_MACHINE_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


@dataclass(frozen=True)
class DeviceProfile:
    """One validated device profile. ``source`` is the TOML file it was read from."""

    id: str
    arch: str
    transport: str
    runtime: str
    description: str = ""
    address: str | None = None
    port: int | None = None
    user: str | None = None
    known_hosts: str | None = None
    key: str | None = None
    tracker_key: str | None = None
    python: str = "python3"
    workdir: str | None = None
    connect_timeout: float | None = None
    target: str | dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    emulated: bool = False
    root: str | None = None
    power: str | None = None
    notes: str = ""
    source: str | None = field(default=None, compare=False)

    @property
    def shipped(self) -> bool:
        """Whether this profile is one of edgesep's own (``devices/profiles/``)."""
        return self.source is not None and Path(self.source).parent == PROFILES_DIR

    def root_path(self) -> Path | None:
        """The emulated root's directory (``$EDGESEP_ARM64_ROOT`` wins), or None for a real device."""
        if not self.emulated:
            return None
        env = os.environ.get("EDGESEP_ARM64_ROOT")
        return Path(env) if env else Path(self.root or DEFAULT_EMULATED_ROOT).expanduser()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (``source`` included)."""
        return asdict(self)


# field name -> (accepted types, a description for the error message)
_STR = ((str,), "a string")
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "id": _STR,
    "description": _STR,
    "arch": _STR,
    "transport": _STR,
    "address": _STR,
    "port": ((int,), "an integer"),
    "user": _STR,
    "known_hosts": _STR,
    "key": _STR,
    "tracker_key": _STR,
    "python": _STR,
    "workdir": _STR,
    "connect_timeout": ((int, float), "a number of seconds"),
    "runtime": _STR,
    "target": ((str, dict), "a string (a target name) or a table (a TVM target dict)"),
    "versions": ((dict,), 'a table such as {onnxruntime = ">=1.18"}'),
    "emulated": ((bool,), "true or false"),
    "root": _STR,
    "power": _STR,
    "notes": _STR,
}
_REQUIRED = ("id", "arch", "transport", "runtime")
_TRANSPORT_NEEDS = {"local": (), "ssh": ("address", "user", "known_hosts"), "tvm-rpc": ()}


def _native_arch() -> str:
    machine = platform.machine().lower()
    return _MACHINE_ALIASES.get(machine, machine)


def _validate(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Check a parsed profile table; return the constructor's keyword arguments. Errors name ``where`` and the field."""

    def bad(fld: str, msg: str) -> ConfigError:
        return ConfigError(f"{where}: field {fld!r} {msg}")

    if "password" in data:
        raise bad(
            "password",
            'is not allowed: profiles never hold passwords. Remove it and use key = "~/.ssh/id_ed25519" '
            "(a private-key path) or ssh-agent auth",
        )
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise bad(unknown[0], f"is unknown; valid fields: {', '.join(_FIELDS)}")
    for fld in _REQUIRED:
        if fld not in data:
            raise bad(fld, "is missing (required in every profile)")
    for fld, value in data.items():
        types, desc = _FIELDS[fld]
        # bool is an int in Python: port = true is not a port
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise bad(fld, f"must be {desc}, not {type(value).__name__} {value!r}")
        if isinstance(value, str) and not value.strip() and fld not in ("description", "notes"):
            raise bad(fld, "is empty")
    kw = dict(data)

    if not _ID_RE.match(kw["id"]):
        raise bad("id", f"{kw['id']!r} must match [A-Za-z0-9_.-]+")
    if kw["arch"] == "native":
        kw["arch"] = _native_arch()
    elif kw["arch"] not in ARCHS:
        raise bad("arch", f"is {kw['arch']!r}; valid: {', '.join(ARCHS)} (or native: this machine's)")
    if kw["transport"] not in TRANSPORTS:
        raise bad("transport", f"is {kw['transport']!r}; valid: {', '.join(TRANSPORTS)}")
    if kw["runtime"] not in RUNTIMES:
        raise bad("runtime", f"is {kw['runtime']!r}; valid: {', '.join(RUNTIMES)}")
    if "port" in kw and not 1 <= kw["port"] <= 65535:
        raise bad("port", f"is {kw['port']}; must be in 1..65535")
    if "connect_timeout" in kw:
        if not 0 < kw["connect_timeout"] <= 3600:
            raise bad("connect_timeout", f"is {kw['connect_timeout']}; must be in (0, 3600] seconds")
        kw["connect_timeout"] = float(kw["connect_timeout"])
    for name, spec in kw.get("versions", {}).items():
        if name not in RUNTIMES and name != "python":
            raise bad(f"versions.{name}", f"is not a runtime; valid: {', '.join((*RUNTIMES, 'python'))}")
        if not isinstance(spec, str) or not spec.strip():
            raise bad(f"versions.{name}", f'must be a version specifier string such as ">=1.18", not {spec!r}')

    transport = kw["transport"]
    for fld in _TRANSPORT_NEEDS[transport]:
        if fld not in kw:
            raise bad(fld, f"is missing (required with transport = {transport!r})")
    if transport == "tvm-rpc" and not ("address" in kw and "port" in kw) and "tracker_key" not in kw:
        missing = "port" if "address" in kw else "address"
        raise bad(missing, "is missing: transport = 'tvm-rpc' needs address + port (an RPC server) or a tracker_key")
    if "tracker_key" in kw and transport != "tvm-rpc":
        raise bad("tracker_key", f"is only used with transport = 'tvm-rpc', not {transport!r}")
    if kw["runtime"] == "tvm" and "target" not in kw:
        raise bad("target", "is missing (required with runtime = 'tvm'): a name such as 'rpi4' or a target table")

    if kw.get("emulated"):
        if transport != "local":
            raise bad(
                "emulated", f"needs transport = 'local' (an emulated root runs on this machine), not {transport!r}"
            )
        kw.setdefault("root", DEFAULT_EMULATED_ROOT)
    elif "root" in kw:
        raise bad("root", "is only used with emulated = true")
    kw["versions"] = dict(kw.get("versions", {}))
    if isinstance(kw.get("target"), dict):
        kw["target"] = dict(kw["target"])
    return kw


def _read(path: Path) -> DeviceProfile:
    where = str(path)
    if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
        raise ConfigError(f"{where}: reading device profiles needs Python 3.11+ (tomllib) or `pip install tomli`")
    if not path.is_file():
        raise ConfigError(f"{where}: no such profile file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: not valid TOML ({e})") from e
    except OSError as e:
        raise ConfigError(f"{where}: cannot read the profile ({e})") from e
    return DeviceProfile(**_validate(data, where), source=where)


def _shipped_files() -> list[Path]:
    return sorted(PROFILES_DIR.glob("*.toml"))


def _user_files() -> list[Path]:
    env = os.environ.get(PROFILES_ENV)
    if not env:
        return []
    d = Path(env).expanduser()
    if not d.is_dir():
        raise ConfigError(f"${PROFILES_ENV} is {env!r}, which is not a directory; point it at a folder of *.toml")
    return sorted(d.glob("*.toml"))


def list_profiles() -> list[DeviceProfile]:
    """Every profile: the shipped ones, then ``$EDGESEP_PROFILES_DIR/*.toml`` when set. Each is validated.

    Raises:
        ConfigError: an invalid profile (the message names its file and field), or two profiles with one id.
    """
    profiles: list[DeviceProfile] = []
    seen: dict[str, str] = {}
    for path in [*_shipped_files(), *_user_files()]:
        p = _read(path)
        if p.id in seen:
            raise ConfigError(f"{path}: field 'id' is {p.id!r}, already the id of {seen[p.id]}; rename one of them")
        seen[p.id] = str(path)
        profiles.append(p)
    return profiles


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """A profile by id (shipped, or in ``$EDGESEP_PROFILES_DIR``) or from a TOML file's path.

    Raises:
        UnknownNameError: an id that no profile has (the message lists the known ids).
        ConfigError: an invalid profile file, or a path that does not exist.
    """
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or "/" in text or os.sep in text or text.endswith(".toml"):
        return _read(Path(text).expanduser())
    for path in _shipped_files():
        if path.stem == text:
            return _read(path)
    for path in _user_files():
        p = _read(path)
        if p.id == text:
            return p
    known = [p.stem for p in _shipped_files()] + [p.stem for p in _user_files()]
    raise UnknownNameError("device profile", text, known)
