"""An emulated ARM64 device: a Debian arm64 root run under qemu-user, for correctness of the aarch64 path.

Real aarch64 code (CPython, numpy, ONNX Runtime's and TVM's aarch64 kernels, libraries cross-compiled for a
Raspberry Pi) runs inside the root through ``qemu-aarch64-static``; timings there are meaningless (qemu is about
35x slower than native and its speed says nothing about a real core). Host side only: this module needs root,
``debootstrap``, ``qemu-user-static`` and ``dpkg-deb``, never torch.

The root is built in steps, each with its own stamp under ``ROOT/.edgesep/``, so an interrupted build resumes where
it stopped and a damaged root is repaired; ``ROOT/.edgesep/stamp.json`` holds the hash of the recipe (suite,
packages, wheels), and a root whose stamp matches and whose key files are present is left alone:

1. ``debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 bookworm ROOT MIRROR`` (the mirror
   comes from apt's own sources unless given);
2. every ``.deb`` it downloaded is unpacked into ROOT with ``dpkg-deb -x`` (the second stage of debootstrap needs
   binfmt_misc, which containers rarely have; unpacking is all python needs);
3. ``/usr/bin/qemu-aarch64-static`` is copied into ``ROOT/usr/bin``;
4. the aarch64 wheels (``DEFAULT_WHEELS``) are fetched with ``pip download`` into a cache directory and unzipped
   into ``ROOT/usr/local/lib/python3.11/dist-packages``. Python in the root writes its own bytecode on first
   import (``import tvm``: about 17 s the first time, 8-10 s after; byte-compiling everything with the host's
   Python 3.11 at build time cost 11 s and saved no more than that, so the build does not).

Code runs in the root with ``run_in_root`` (``chroot ROOT /usr/bin/qemu-aarch64-static /usr/bin/python3.11``,
in a private mount and PID namespace with its own ``/proc``; the host's ``/sys`` is never mounted: aarch64 ONNX
Runtime segfaults reading it under qemu). ``copy_bundle`` stages a bundle and the numpy-side ``edgesep`` modules
under ``ROOT/opt/edgesep``; ``start_rpc_server`` runs an in-process TVM RPC server in the root (the stock
``tvm.exec.rpc_server`` exec()s a second python, which fails without binfmt_misc).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from edgesep._io import atomic_write_json, sha256_file
from edgesep.errors import ConfigError, EdgesepError

__all__ = [
    "DEFAULT_WHEELS",
    "DEVICE_MODULES",
    "DEVICE_SUBPACKAGE_MODULES",
    "HOST_TOOLS",
    "IN_ROOT_PREFIX",
    "EmulatorError",
    "FetchError",
    "HostToolMissingError",
    "PrivilegeError",
    "RpcServer",
    "build_arm64_root",
    "copy_bundle",
    "debian_mirror",
    "default_root",
    "default_wheel_cache",
    "describe_root",
    "install_edgesep",
    "is_complete",
    "missing_host_tools",
    "run_in_root",
    "start_rpc_server",
]

Log = Callable[[str], None]

# Exact pins: the root is a reproducible device, and its numpy / ONNX Runtime / TVM are the host's versions, so that
# a difference between host and device outputs is the architecture's, never a version's. apache-tvm-ffi 0.1.15.post2
# segfaults in tvm.ir.save_json (see ../shared/TOOLCHAIN.md). onnx is left out: nothing on the device parses graphs.
DEFAULT_WHEELS: tuple[str, ...] = (
    "apache-tvm==0.27.0.post1",
    "apache-tvm-ffi==0.1.14.post1",
    "numpy==2.4.6",
    "ml_dtypes==0.6.0",
    "onnxruntime==1.32.0",
    "typing_extensions==4.16.0",
    "psutil==7.2.2",
    "tornado==6.6.1",
    "cloudpickle==3.1.2",
    "packaging==26.3",
    "protobuf==7.36.2",
    "flatbuffers==25.12.19",
    "sympy==1.14.0",
    "mpmath==1.3.0",
)
# Python version -> the Debian suite whose python3 it is (the wheels are fetched for this CPython ABI)
_SUITES: dict[str, str] = {"3.11": "bookworm"}
_WHEEL_PLATFORM = "manylinux_2_28_aarch64"  # manylinux2014_aarch64 alone finds no TVM and an old onnxruntime
_RECIPE_VERSION = 1  # bump when the steps change in a way that invalidates existing roots
# host tool -> the Debian package that provides it (None: optional, see HOST_TOOLS)
HOST_TOOLS: dict[str, str] = {
    "debootstrap": "debootstrap",
    "qemu-aarch64-static": "qemu-user-static",
    "dpkg-deb": "dpkg",
    "chroot": "coreutils",
    "unshare": "util-linux",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",  # only to cross-compile TVM libraries for the device
}
_BUILD_TOOLS = ("debootstrap", "qemu-aarch64-static", "dpkg-deb", "chroot")
IN_ROOT_PREFIX = PurePosixPath("/opt/edgesep")  # where copy_bundle / install_edgesep put things inside the root
# the numpy-side modules of `edgesep` that device code needs (plus every module of edgesep.runtimes)
DEVICE_MODULES: tuple[str, ...] = ("__init__", "errors", "_io", "_config", "bundle")
# modules of sub-packages that device code needs: the on-device runner and what it imports (numpy-only). Each
# sub-package gets a docstring-only __init__.py: the host's would import modules that are not copied (the attack
# registry, device profiles, transports)
DEVICE_SUBPACKAGE_MODULES: dict[str, tuple[str, ...]] = {
    "attacks": ("square",),
    "devices": ("_result", "_env", "runner"),
}
_QEMU = "/usr/bin/qemu-aarch64-static"
_STATE = ".edgesep"  # ROOT/.edgesep: stamps, logs, lock
_IN_ROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "PYTHONPATH": str(IN_ROOT_PREFIX),
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",  # the host has few cores and other work; one thread keeps qemu runs predictable
}
_NETWORK_HINTS = re.compile(
    r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|Network is unreachable|"
    r"Connection refused|timed out|Could not resolve|Failed getting release file|Could not connect",
    re.IGNORECASE,
)


class EmulatorError(EdgesepError):
    """The emulated device could not be built or run; the base class of this module's errors."""


class HostToolMissingError(EmulatorError):
    """A host program the emulated device needs is not installed; the message names the Debian packages."""

    def __init__(self, tools: Sequence[str]):
        self.tools = tuple(tools)
        packages = sorted({HOST_TOOLS.get(t, t) for t in self.tools})
        super().__init__(
            f"{', '.join(self.tools)} not found on this machine: install the Debian package"
            f"{'s' if len(packages) > 1 else ''} with `apt-get install -y {' '.join(packages)}` (as root)"
        )


class PrivilegeError(EmulatorError):
    """An operation that needs root (debootstrap, chroot) was asked for by another user."""


class FetchError(EmulatorError):
    """A Debian package, the mirror's index or a wheel could not be downloaded.

    Attributes:
        item: what could not be fetched (a package or wheel name, or a mirror URL).
        network: True when the cause looks like no network (as opposed to a name or version that does not exist).
    """

    def __init__(self, message: str, *, item: str, network: bool = False):
        self.item, self.network = item, network
        super().__init__(message)


# ---------------------------------------------------------------------------------------------------------- paths


def default_root() -> Path:
    """``$EDGESEP_ARM64_ROOT``, else ``$XDG_CACHE_HOME/edgesep/arm64-root`` (``~/.cache/edgesep/arm64-root``)."""
    env = os.environ.get("EDGESEP_ARM64_ROOT")
    return Path(env) if env else _cache_home() / "arm64-root"


def default_wheel_cache() -> Path:
    """``$XDG_CACHE_HOME/edgesep/wheels-aarch64``: downloaded wheels, kept across rebuilds of any root."""
    return _cache_home() / "wheels-aarch64"


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgesep"


def _site_packages(root: Path, python: str) -> Path:
    return root / f"usr/local/lib/python{python}/dist-packages"


# ------------------------------------------------------------------------------------------------- host checks


def missing_host_tools(tools: Sequence[str] = _BUILD_TOOLS) -> list[str]:
    """The programs among ``tools`` (keys of ``HOST_TOOLS``) that are not on ``PATH`` (nor in /usr/sbin, /sbin)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
    return [t for t in tools if shutil.which(t, path=path) is None]


def _require_tools(tools: Sequence[str] = _BUILD_TOOLS) -> None:
    missing = missing_host_tools(tools)
    if missing:
        raise HostToolMissingError(missing)


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise PrivilegeError(
            f"{what} needs root (debootstrap creates device files and owners, chroot needs CAP_SYS_CHROOT): "
            "run this as root, e.g. `sudo -E edgesep device emulate arm64 ...`, or in a container"
        )


def debian_mirror(
    suite: str = "bookworm",
    sources: Sequence[str | os.PathLike] = ("/etc/apt/sources.list.d", "/etc/apt/sources.list"),
) -> str:
    """The Debian mirror apt itself uses for ``suite`` (deb822 ``*.sources`` and one-line ``*.list`` files).

    Security and ``-updates`` suites are skipped (debootstrap wants the main archive). Falls back to
    ``http://deb.debian.org/debian`` when apt's sources name no mirror for the suite.
    """
    files: list[Path] = []
    for s in map(Path, sources):
        if s.is_dir():
            files += sorted(p for p in s.iterdir() if p.suffix in (".sources", ".list"))
        elif s.is_file():
            files.append(s)
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        entries = _deb822_entries(text) if f.suffix == ".sources" else _one_line_entries(text)
        for types, uris, suites in entries:
            if "deb" in types and suite in suites:
                for uri in uris:
                    if uri.startswith(("http://", "https://")):
                        return uri.rstrip("/")
    return "http://deb.debian.org/debian"


def _deb822_entries(text: str) -> Iterator[tuple[list[str], list[str], list[str]]]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        yield fields.get("types", "").split(), fields.get("uris", "").split(), fields.get("suites", "").split()


def _one_line_entries(text: str) -> Iterator[tuple[list[str], list[str], list[str]]]:
    for line in text.splitlines():
        parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()  # drop `[arch=amd64 signed-by=...]`
        if len(parts) >= 3:
            yield [parts[0]], [parts[1]], [parts[2]]


# ------------------------------------------------------------------------------------------------------- progress


class _Progress:
    """Rich progress bars on a terminal (``enabled``), nothing otherwise; the log gets one line per step anyway."""

    def __init__(self, enabled: bool):
        self._bars: Any = None
        if enabled:
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            except ImportError:  # rich is in the train extra; progress is a nicety
                return
            self._bars = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(stderr=True), transient=True,
            )  # fmt: skip

    def __enter__(self) -> _Progress:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.stop()

    def task(self, description: str, total: int | None = None) -> Callable[..., None]:
        """Add a bar; returns ``advance(n=1, description=None)``."""
        if self._bars is None:
            return lambda n=1, description=None: None
        tid = self._bars.add_task(description, total=total)

        def advance(n: int = 1, description: str | None = None) -> None:
            self._bars.update(tid, advance=n, **({"description": description} if description else {}))

        return advance


# ------------------------------------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class _Recipe:
    python: str
    wheels: tuple[str, ...]
    include: tuple[str, ...] = ("python3",)
    suite: str = field(init=False)
    arch: str = "arm64"
    variant: str = "minbase"

    def __post_init__(self) -> None:
        if "python3" not in self.include:
            raise ConfigError(f"packages must include python3 (everything in the root runs on it), got {self.include}")
        if self.python not in _SUITES:
            raise ConfigError(
                f"python {self.python!r} is not supported for the arm64 root; supported: {sorted(_SUITES)} "
                "(the Debian suite's own python3 is used, so the version follows the suite)"
            )
        object.__setattr__(self, "suite", _SUITES[self.python])

    def base(self) -> dict[str, Any]:
        """What debootstrap produces (the mirror is where, not what: it is not part of the recipe)."""
        return {"suite": self.suite, "arch": self.arch, "variant": self.variant, "include": list(self.include)}

    def to_dict(self) -> dict[str, Any]:
        return {"recipe_version": _RECIPE_VERSION, **self.base(), "python": self.python, "wheels": list(self.wheels)}

    def digest(self, part: Mapping[str, Any] | None = None) -> str:
        blob = json.dumps(self.to_dict() if part is None else part, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stamp_ok(path: Path, digest: str) -> bool:
    data = _read_json(path)
    return isinstance(data, dict) and data.get("digest") == digest


def _write_stamp(path: Path, digest: str, **extra: Any) -> None:
    atomic_write_json(path, {"digest": digest, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra})


def is_complete(
    root: str | os.PathLike,
    *,
    python: str = "3.11",
    wheels: Sequence[str] = DEFAULT_WHEELS,
    packages: Sequence[str] = ("python3",),
) -> bool:
    """Whether ``root`` is a finished build of this recipe (stamp matches and the key files are present)."""
    return _complete(Path(root).absolute(), _Recipe(python, tuple(wheels), tuple(packages)))


def _complete(root: Path, recipe: _Recipe) -> bool:
    python = recipe.python
    stamp = _read_json(root / _STATE / "stamp.json")
    if not isinstance(stamp, dict) or stamp.get("digest") != recipe.digest():
        return False
    site = _site_packages(root, python)
    needed = [root / "usr/bin" / f"python{python}", root / _QEMU.lstrip("/")]
    needed += [site / d for d in stamp.get("dist_info", [])]
    return all(p.exists() for p in needed)


# -------------------------------------------------------------------------------------------------------- build


def build_arm64_root(
    root: str | os.PathLike,
    *,
    mirror: str | None = None,
    python: str = "3.11",
    wheels: Sequence[str] = DEFAULT_WHEELS,
    packages: Sequence[str] = ("python3",),
    wheel_cache: str | os.PathLike | None = None,
    progress: bool | None = None,
    log: Log | None = None,
) -> Path:
    """Build (or resume, or repair) a Debian arm64 root with python and the aarch64 runtimes; a no-op when complete.

    Safe to call from several processes at once (a lock file serializes them; the later ones find the root done).

    Args:
        root: the directory to build in (created if absent; an existing foreign directory is refused).
        mirror: Debian mirror URL; default: the one apt's own sources use (``debian_mirror()``).
        python: CPython version in the root; it picks the Debian suite (3.11: bookworm).
        wheels: pip requirement strings of the aarch64 wheels to unzip into the root (``DEFAULT_WHEELS``).
        packages: Debian packages to add to the minimal base (``debootstrap --include``); python3 is required.
        wheel_cache: where downloaded wheels are kept (default ``default_wheel_cache()``).
        progress: progress bars on stderr (default: when stderr is a terminal).
        log: callable taking one line of text (default: print to stderr).
    Returns:
        The root's path.
    Raises:
        HostToolMissingError: debootstrap, qemu-user-static or dpkg-deb is not installed (names the packages).
        PrivilegeError: not running as root.
        FetchError: a Debian package, the mirror or a wheel could not be downloaded (names it).
        ConfigError: an unsupported ``python`` or a ``root`` that is a file or someone else's non-empty directory.
    """
    root = Path(root).absolute()
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    recipe = _Recipe(python, tuple(wheels), tuple(packages))
    if _complete(root, recipe):
        log(f"{root}: up to date (recipe {recipe.digest()}); nothing to do")
        return root
    _require_tools()
    _require_root("building the arm64 root")
    _check_target(root)
    state = root / _STATE
    state.mkdir(parents=True, exist_ok=True)
    with _locked(state / "lock"):
        if _complete(root, recipe):  # another process finished it while we waited
            log(f"{root}: up to date (recipe {recipe.digest()}, built by another process)")
            return root
        started = time.monotonic()
        show = sys.stderr.isatty() if progress is None else progress
        with _Progress(show) as bars:
            mirror = mirror or debian_mirror(recipe.suite)
            _debootstrap(root, recipe, mirror, bars, log)
            _unpack_debs(root, recipe, bars, log)
            _install_qemu(root, log)
            files = _fetch_wheels(recipe.wheels, python, Path(wheel_cache or default_wheel_cache()), bars, log)
            dist_info = _unzip_wheels(root, python, files, bars, log)
        _write_stamp(state / "stamp.json", recipe.digest(), recipe=recipe.to_dict(), mirror=mirror, dist_info=dist_info)
        log(f"{root}: ready in {time.monotonic() - started:.0f} s, {_tree_size(root) / 1e6:.0f} MB "
            f"(recipe {recipe.digest()})")  # fmt: skip
    return root


def _check_target(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} is a file; give --root a directory (new, or one this command built)")
    if root.is_dir() and not (root / _STATE).is_dir() and any(root.iterdir()):
        raise ConfigError(
            f"{root} is a non-empty directory that this command did not build (no {_STATE}/ in it); "
            "give --root a new or empty directory"
        )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _streaming(cmd: Sequence[str]) -> Iterator[subprocess.Popen[str]]:
    """Run ``cmd`` with stdout and stderr as one stream of text lines; kill it if the caller stops early (Ctrl-C)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _debpaths(root: Path) -> list[Path]:
    """The .deb files debootstrap downloaded (its own list: ROOT/debootstrap/debpaths, ``name /path`` per line)."""
    listing = root / "debootstrap/debpaths"
    if not listing.is_file():
        return []
    return [root / line.split()[1].lstrip("/") for line in listing.read_text().splitlines() if len(line.split()) == 2]


def _debootstrap(root: Path, recipe: _Recipe, mirror: str, bars: _Progress, log: Log) -> None:
    stamp = root / _STATE / "debootstrap.done"
    digest = recipe.digest(recipe.base())
    debs = _debpaths(root)
    if _stamp_ok(stamp, digest) and debs and all(d.is_file() for d in debs):
        log(f"debootstrap: done before ({len(debs)} packages)")
        return
    cmd = [
        "debootstrap", f"--arch={recipe.arch}", "--foreign", f"--variant={recipe.variant}",
        f"--include={','.join(recipe.include)}", recipe.suite, str(root), mirror,
    ]  # fmt: skip
    log(f"debootstrap: {' '.join(cmd)}")
    started = time.monotonic()
    advance = bars.task("debootstrap: fetching")
    lines: list[str] = []
    with open(root / _STATE / "debootstrap.log", "w") as out, _streaming(cmd) as proc:
        for line in proc.stdout or ():
            out.write(line)
            lines.append(line.rstrip())
            m = re.match(r"I: (Retrieving|Validating|Extracting) (\S+)", line)
            if m:
                advance(1, f"debootstrap: {m.group(1).lower()} {m.group(2)}")
        rc = proc.wait()
    if rc != 0:
        _raise_debootstrap_failure(lines, mirror, root / _STATE / "debootstrap.log")
    debs = _debpaths(root)
    if not debs:
        raise EmulatorError(f"debootstrap finished but listed no packages in {root}/debootstrap/debpaths")
    size = sum(d.stat().st_size for d in debs)
    _write_stamp(stamp, digest, mirror=mirror, packages=len(debs))
    log(f"debootstrap: {len(debs)} packages ({size / 1e6:.0f} MB) from {mirror} in {time.monotonic() - started:.0f} s")


def _raise_debootstrap_failure(lines: list[str], mirror: str, logfile: Path) -> None:
    errors = [ln[3:] for ln in lines if ln.startswith("E: ")] or lines[-3:]
    text = "; ".join(errors)
    network = bool(_NETWORK_HINTS.search("\n".join(lines)))
    m = re.search(r"Couldn't (?:find these debs|download packages?):\s*(.+)", text)
    if m:
        item = m.group(1).strip()
        raise FetchError(
            f"debootstrap could not fetch the Debian package(s) {item} from {mirror}: {text}. Check the package "
            f"name and that the mirror serves arm64 (another one with --mirror); log: {logfile}",
            item=item, network=network,
        )  # fmt: skip
    if network or "release file" in text.lower():
        raise FetchError(
            f"debootstrap could not reach the Debian mirror {mirror}: {text}. Check the network, or give another "
            f"mirror with --mirror; log: {logfile}",
            item=mirror, network=True,
        )  # fmt: skip
    raise EmulatorError(f"debootstrap failed: {text}; log: {logfile}")


def _unpack_debs(root: Path, recipe: _Recipe, bars: _Progress, log: Log) -> None:
    stamp = root / _STATE / "unpack.done"
    debs = _debpaths(root)
    digest = recipe.digest({**recipe.base(), "debs": sorted(d.name for d in debs)})
    if _stamp_ok(stamp, digest) and (root / "usr/bin" / f"python{recipe.python}").exists():
        log(f"unpack: done before ({len(debs)} packages)")
        return
    started = time.monotonic()
    advance = bars.task("unpacking .debs", total=len(debs))
    for deb in debs:
        # the foreign first stage extracts only the essential packages; the second stage (which would
        # configure the rest) needs binfmt_misc, so everything is unpacked as-is: python needs no maintainer scripts
        r = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], capture_output=True, text=True)
        if r.returncode != 0:
            raise EmulatorError(f"dpkg-deb -x {deb.name} failed: {r.stderr.strip()}; delete {deb} and re-run")
        advance(1, f"unpacking {deb.name.split('_')[0]}")
    if not (root / "usr/bin" / f"python{recipe.python}").exists():
        raise EmulatorError(f"the unpacked root has no /usr/bin/python{recipe.python}: is {recipe.suite} right?")
    _write_stamp(stamp, digest, packages=len(debs))
    log(f"unpack: {len(debs)} packages unpacked with dpkg-deb -x in {time.monotonic() - started:.0f} s")


def _install_qemu(root: Path, log: Log) -> None:
    dst = root / _QEMU.lstrip("/")
    src = Path(_QEMU)
    if not src.is_file():
        raise HostToolMissingError(["qemu-aarch64-static"])
    if dst.is_file() and dst.stat().st_size == src.stat().st_size and sha256_file(dst) == sha256_file(src):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)
    log(f"qemu: copied {src} ({src.stat().st_size / 1e6:.1f} MB) into the root")


def _cached_wheel(spec: str, cache: Path) -> Path | None:
    """The cached wheel of an exact pin ``name==version`` (any platform tag: the cache holds aarch64 ones only)."""
    m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)\s*", spec)
    if not m:
        return None
    name, version = _canon(m.group(1)), m.group(2)
    found = [f for f in cache.glob("*.whl") if _canon(f.name.split("-")[0]) == name and f.name.split("-")[1] == version]
    return found[0] if len(found) == 1 else None


def _fetch_wheels(specs: Sequence[str], python: str, cache: Path, bars: _Progress, log: Log) -> list[Path]:
    """``pip download`` the aarch64 wheels (one resolver run for all) into ``cache``; the files in spec order.

    When every spec is an exact pin already in the cache, pip is not run at all (a repair works offline).
    """
    cache.mkdir(parents=True, exist_ok=True)
    cached = [_cached_wheel(s, cache) for s in specs]
    if all(cached):
        log(f"wheels: all {len(specs)} in {cache}")
        return [f for f in cached if f is not None]
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform", _WHEEL_PLATFORM,
        "--python-version", python, "--implementation", "cp", "--disable-pip-version-check", "--progress-bar", "off",
        "-d", str(cache), *specs,
    ]  # fmt: skip
    started = time.monotonic()
    advance = bars.task("wheels: pip download", total=len(specs))
    lines, files = [], []
    with _streaming(cmd) as proc:
        for line in proc.stdout or ():
            lines.append(line.rstrip())
            m = re.match(r"\s*(?:Saved|File was already downloaded)\s+(\S+\.whl)", line)
            if m:
                files.append(Path(m.group(1)))
                advance(1, f"wheels: {Path(m.group(1)).name.split('-')[0]}")
        rc = proc.wait()
    if rc != 0:
        text = "\n".join(lines)
        network = bool(_NETWORK_HINTS.search(text))
        m = re.search(r"No matching distribution found for (\S+)", text) or re.search(
            r"satisfies the requirement (\S+)", text
        )
        item = m.group(1) if m else " ".join(specs)
        errors = [ln for ln in lines if ln.startswith("ERROR")][-2:] or lines[-2:]
        raise FetchError(
            f"could not download the aarch64 wheel {item} ({_WHEEL_PLATFORM}, cp{python.replace('.', '')})"
            + (": no network to the package index?" if network else ": no such version for aarch64?")
            + f" pip said: {' '.join(errors)}",
            item=item, network=network,
        )  # fmt: skip
    by_name = {_canon(f.name.split("-")[0]): f for f in files}
    ordered = [by_name.get(_canon(_req_name(s))) for s in specs]
    if any(f is None for f in ordered) or len(set(ordered)) != len(specs):
        raise EmulatorError(f"pip download reported {[f.name for f in files]} for {list(specs)}: cannot match them")
    size = sum(f.stat().st_size for f in files)
    log(f"wheels: {len(files)} aarch64 wheels ({size / 1e6:.0f} MB) in {cache} in {time.monotonic() - started:.0f} s")
    return [f for f in ordered if f is not None]


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _req_name(spec: str) -> str:
    return re.split(r"[\s<>=!~;\[@]", spec.strip(), maxsplit=1)[0]


def _unzip_wheels(root: Path, python: str, files: Sequence[Path], bars: _Progress, log: Log) -> list[str]:
    """Unzip each wheel into the root's dist-packages unless its stamp says it is there; the dist-info dir names."""
    site = _site_packages(root, python)
    site.mkdir(parents=True, exist_ok=True)
    stamps = root / _STATE / "wheels"
    stamps.mkdir(parents=True, exist_ok=True)
    advance = bars.task("wheels: unzipping", total=len(files))
    dist_info, done, started = [], 0, time.monotonic()
    for whl in files:
        name, version = whl.name.split("-")[:2]
        info = f"{name}-{version}.dist-info"
        dist_info.append(info)
        stamp = stamps / f"{whl.name}.done"
        digest = sha256_file(whl)
        if _stamp_ok(stamp, digest) and (site / info / "RECORD").is_file():
            advance(1)
            continue
        _remove_other_versions(site, name, keep=info)
        try:
            _unzip_one(whl, site, root)
        except zipfile.BadZipFile as e:
            raise EmulatorError(f"{whl} is not a valid wheel ({e}): delete it and re-run to download it again") from e
        _write_stamp(stamp, digest)
        done += 1
        advance(1, f"wheels: {name} {version}")
    if done:
        took = time.monotonic() - started
        log(f"wheels: unzipped {done} of {len(files)} into {site.relative_to(root)} in {took:.0f} s")
    else:
        log(f"wheels: all {len(files)} unzipped before")
    return dist_info


def _remove_other_versions(site: Path, name: str, keep: str) -> None:
    """Delete the files of another installed version of the project (listed in its RECORD) before an upgrade."""
    for old in site.glob(f"{name}-*.dist-info"):
        if old.name == keep or _canon(old.name.split("-")[0]) != _canon(name):
            continue
        record = old / "RECORD"
        if record.is_file():
            for line in record.read_text().splitlines():
                rel = line.split(",")[0]
                target = (site / rel).resolve()
                if rel and target.is_relative_to(site.resolve()) and target.is_file():
                    target.unlink()
        shutil.rmtree(old, ignore_errors=True)


def _unzip_one(whl: Path, site: Path, root: Path) -> None:
    """Install a wheel the way pip would for files: ``*.data/{purelib,platlib}`` into site, scripts into bin."""
    data_dirs = {"purelib": site, "platlib": site, "scripts": root / "usr/local/bin", "data": root / "usr/local"}
    with zipfile.ZipFile(whl) as z:
        for member in z.infolist():
            parts = PurePosixPath(member.filename).parts
            if not parts or member.filename.startswith("/") or ".." in parts:
                raise EmulatorError(f"{whl.name}: unsafe path {member.filename!r} in the wheel; delete it from cache")
            if member.is_dir():
                continue
            base, rel = site, PurePosixPath(*parts)
            if parts[0].endswith(".data") and len(parts) > 2:
                if parts[1] not in data_dirs:  # headers: nothing on the device compiles against them
                    continue
                base, rel = data_dirs[parts[1]], PurePosixPath(*parts[2:])
            target = base / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            # a new inode replaces the old file: a process in the root that maps it (a .so) keeps its copy intact
            tmp = target.with_name(f".{target.name}.edgesep-tmp")
            with z.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            if (member.external_attr >> 16) & 0o111 or parts[1:2] == ("scripts",):
                tmp.chmod(0o755)
            os.replace(tmp, target)
        (site / f"{'-'.join(whl.name.split('-')[:2])}.dist-info" / "INSTALLER").write_text("edgesep\n")


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, n))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


# ---------------------------------------------------------------------------------------------------------- run


def _root_command(root: Path, argv: Sequence[str], mount_proc: bool) -> list[str]:
    inner = ["chroot", str(root), _QEMU, "/usr/bin/python3.11", *argv]
    if mount_proc and not missing_host_tools(["unshare"]):
        # a private mount namespace: /proc is mounted for this process tree only and vanishes with it (no stale
        # mount left in the root); a PID namespace: killing the process kills everything it started
        (root / "proc").mkdir(exist_ok=True)
        return ["unshare", "--mount", "--pid", "--fork", "--kill-child", f"--mount-proc={root / 'proc'}", *inner]
    return inner


def run_in_root(
    root: str | os.PathLike,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 900,
    mount_proc: bool = True,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``python3.11 *argv`` inside the arm64 root under qemu; capture its output.

    Args:
        root: a root built by ``build_arm64_root``.
        argv: python's arguments as seen inside the root, e.g. ``["-c", code]`` or ``["/opt/edgesep/x.py"]``.
        env: extra environment variables (the base is a clean one with ``PYTHONPATH=/opt/edgesep``).
        timeout: seconds before the whole process tree is killed (qemu is about 35x slower than native).
        mount_proc: give the process its own ``/proc`` (in a private namespace; the host's ``/sys`` is never
            mounted: aarch64 ONNX Runtime segfaults reading it under qemu).
        check: raise ``EmulatorError`` (with the output's tail) on a non-zero exit.
    Raises:
        PrivilegeError: not root. EmulatorError: a non-zero exit with ``check``, or the timeout.
    """
    root = Path(root).absolute()
    _require_root("running code in the arm64 root")
    _require_tools(["chroot", "qemu-aarch64-static"])
    if not (root / _QEMU.lstrip("/")).is_file():
        raise EmulatorError(f"{root} is not an arm64 root: build it with `edgesep device emulate arm64 --root {root}`")
    cmd = _root_command(root, argv, mount_proc)
    try:
        r = subprocess.run(cmd, env={**_IN_ROOT_ENV, **(env or {})}, capture_output=True, text=True,
                           errors="replace", timeout=timeout, start_new_session=True)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise EmulatorError(f"python in the arm64 root ran past {timeout} s: {' '.join(argv)[:200]}") from e
    if check and r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        raise EmulatorError(f"python in the arm64 root exited with {r.returncode}: {' '.join(argv)[:200]}\n{tail}")
    return r


_VERSIONS_SCRIPT = """
import json, platform, sys
out = {"machine": platform.machine(), "python": platform.python_version()}
for mod in ("numpy", "onnxruntime", "tvm"):
    try:
        out[mod] = __import__(mod).__version__
    except Exception as e:
        out[mod] = "unavailable: " + type(e).__name__ + ": " + str(e)[:200]
print(json.dumps(out))
"""


def describe_root(root: str | os.PathLike, *, versions: bool = True) -> dict[str, Any]:
    """What the root holds: size, recipe, and (``versions``) machine and versions as seen by python in the root.

    Importing TVM under qemu takes about 20 s, so ``versions=False`` skips running anything.
    """
    root = Path(root).absolute()
    stamp = _read_json(root / _STATE / "stamp.json") or {}
    info: dict[str, Any] = {
        "root": str(root),
        "size_bytes": _tree_size(root),
        "recipe": stamp.get("digest"),
        "built": stamp.get("time"),
        "mirror": stamp.get("mirror"),
        "wheels": [d.removesuffix(".dist-info") for d in stamp.get("dist_info", [])],
    }
    if versions:
        r = run_in_root(root, ["-c", _VERSIONS_SCRIPT], timeout=300)
        info.update(json.loads(r.stdout.strip().splitlines()[-1]))
    return info


# ------------------------------------------------------------------------------------------------------ staging


def _package_dirs() -> tuple[Path, Path]:
    """The source folders of ``edgesep`` and ``edgesep.runtimes`` (``runtimes/`` via setuptools' package-dir)."""
    dirs = []
    for name in ("edgesep", "edgesep.runtimes"):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise EmulatorError(f"cannot locate the {name} package to copy into the root")
        dirs.append(Path(next(iter(spec.submodule_search_locations))))
    return dirs[0], dirs[1]


def _in_root(root: Path, inside: PurePosixPath) -> Path:
    if not inside.is_absolute() or ".." in inside.parts:
        raise ConfigError(f"{inside} must be an absolute path inside the root, without '..'")
    return root / inside.relative_to("/")


def install_edgesep(root: str | os.PathLike, *, prefix: str | PurePosixPath = IN_ROOT_PREFIX) -> Path:
    """Copy the numpy-side ``edgesep`` modules (``DEVICE_MODULES``, all of ``edgesep.runtimes`` and
    ``DEVICE_SUBPACKAGE_MODULES``: the runner ``python -m edgesep.devices.runner`` and the Square attack) into the root.

    They land in ``ROOT/<prefix>/edgesep`` (replacing an earlier copy), importable there as ``edgesep`` and
    ``edgesep.runtimes`` with ``PYTHONPATH=<prefix>`` (``run_in_root`` sets ``/opt/edgesep``). Torch-side modules
    are not copied: device code that imports them fails inside the root, as it would on a device.

    Args:
        root: a root built by ``build_arm64_root``.
        prefix: the directory inside the root; processes that stage concurrently use one each.
    Returns:
        The host path of the copied package.
    """
    root = Path(root).absolute()
    pkg_src, rt_src = _package_dirs()
    dst = _in_root(root, PurePosixPath(prefix)) / "edgesep"
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "runtimes").mkdir(parents=True)
    for mod in DEVICE_MODULES:
        shutil.copy2(pkg_src / f"{mod}.py", dst / f"{mod}.py")
    for f in sorted(rt_src.glob("*.py")):
        shutil.copy2(f, dst / "runtimes" / f.name)
    for sub, mods in DEVICE_SUBPACKAGE_MODULES.items():
        spec = importlib.util.find_spec(f"edgesep.{sub}")
        if spec is None or not spec.submodule_search_locations:
            raise EmulatorError(f"cannot locate the edgesep.{sub} package to copy into the root")
        src = Path(next(iter(spec.submodule_search_locations)))
        (dst / sub).mkdir()
        (dst / sub / "__init__.py").write_text(f'"""edgesep.{sub} on a device: {", ".join(mods)} only."""\n')
        for mod in mods:
            shutil.copy2(src / f"{mod}.py", dst / sub / f"{mod}.py")
    return dst


def copy_bundle(
    root: str | os.PathLike, bundle: str | os.PathLike, *, prefix: str | PurePosixPath = IN_ROOT_PREFIX
) -> PurePosixPath:
    """Copy a bundle directory into ``ROOT/<prefix>/bundles/`` and the device-side ``edgesep`` into ``<prefix>``.

    Returns:
        The bundle's path as seen inside the root (e.g. ``/opt/edgesep/bundles/kron.bundle``); run code there with
        ``run_in_root(root, argv, env={"PYTHONPATH": str(prefix)})`` (the default prefix needs no env).
    """
    root, bundle = Path(root).absolute(), Path(bundle)
    if not bundle.is_dir():
        raise ConfigError(f"{bundle} is not a bundle directory")
    install_edgesep(root, prefix=prefix)
    inside = PurePosixPath(prefix) / "bundles" / bundle.name
    dst = _in_root(root, inside)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(bundle, dst, symlinks=True)  # the loader refuses links; copy them as links so it still does
    return inside


# ---------------------------------------------------------------------------------------------------------- RPC

_RPC_SCRIPT = """
import sys, time
t0 = time.time()
from tvm.rpc.server import PopenRPCServerState
host, port, port_end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
state = PopenRPCServerState(host, port, port_end, silent=True)
print(f"EDGESEP_RPC_READY {state.port} after {time.time() - t0:.1f} s", flush=True)
state.thread.join()
"""


@dataclass
class RpcServer:
    """A TVM RPC server running in-process in python inside the arm64 root; ``stop()`` (or ``with``) kills it."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    startup_s: float

    def stop(self, *, keep_log: bool = False) -> None:
        """Kill the server's process tree (its PID namespace dies with it), wait for it, and delete its log."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)  # unshare --kill-child then SIGKILLs the python
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if not keep_log:
            self.log_path.unlink(missing_ok=True)

    def log(self) -> str:
        """What the server printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def __enter__(self) -> RpcServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_rpc_server(
    root: str | os.PathLike, port: int = 0, *, host: str = "127.0.0.1", timeout: float = 240
) -> RpcServer:
    """Start a TVM RPC server inside the arm64 root and wait until it accepts connections.

    The server runs ``tvm.rpc.server.PopenRPCServerState`` in one python under qemu (about 25 s to listen: most of
    it is ``import tvm``). It executes whatever a client sends, so it binds to ``host`` (loopback by default) only.

    Args:
        root: a root built by ``build_arm64_root``.
        port: first port to try (the next 50 are tried too); 0 picks a free one.
        host: the address to bind; the root shares the host's network, so clients connect to it directly.
        timeout: seconds to wait for the server to listen.
    Returns:
        An ``RpcServer`` (host, the bound port, the process); stop it with ``stop()`` or a ``with`` block.
    Raises:
        EmulatorError: the server exited or did not listen within ``timeout`` (with its output).
    """
    root = Path(root).absolute()
    _require_root("running the TVM RPC server in the arm64 root")
    if not (root / _QEMU.lstrip("/")).is_file():
        raise EmulatorError(f"{root} is not an arm64 root: build it with `edgesep device emulate arm64 --root {root}`")
    port = port or _free_port(host)
    logs = root / _STATE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"rpc-{host}-{port}.log"
    cmd = _root_command(root, ["-c", _RPC_SCRIPT, host, str(port), str(port + 50)], mount_proc=True)
    started = time.monotonic()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, env=_IN_ROOT_ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = RpcServer(host, port, proc, log_path, 0.0)
    try:
        while True:
            m = re.search(r"EDGESEP_RPC_READY (\d+)", server.log())
            if m:  # printed after listen(): clients can connect from now on
                server.port = int(m.group(1))
                server.startup_s = time.monotonic() - started
                return server
            if proc.poll() is not None:
                problem = f"exited with {proc.returncode}"
            elif time.monotonic() - started > timeout:
                problem = f"did not listen within {timeout} s"
            else:
                time.sleep(0.25)
                continue
            raise EmulatorError(f"the TVM RPC server in {root} {problem}:\n{server.log()[-2000:]}")
    except BaseException:
        server.stop()
        raise
