"""Transports: how the host reaches a device profile's machine to upload a bundle and run code there.

Three kinds, chosen by the profile's ``transport`` (``open_transport(profile)`` returns the right one):

- ``local`` (``LocalTransport``): this machine, with ``subprocess``; or, for an emulated profile (``arm64-qemu``),
  python inside the qemu-user arm64 root through ``devices.emulate.run_in_root`` (remote paths are then paths as
  seen inside the root, and files are copied into it). For the non-emulated ``host`` profile, ``python = "python3"``
  means the interpreter edgesep itself runs in (``sys.executable``): the host *is* this Python.
- ``ssh`` (``SshTransport``): paramiko. Host keys come from the profile's ``known_hosts`` plus the system's
  (``~/.ssh/known_hosts``, ``/etc/ssh/ssh_known_hosts``); an unknown host key is **refused** (``HostKeyError``
  with its SHA256 fingerprint) unless ``trust_new_host=True``, which prints the fingerprint and appends the key to
  the profile's ``known_hosts``; a **changed** key is always refused. Key-file or ssh-agent auth only (never
  passwords, ``look_for_keys=False``). Every remote argument is shell-quoted (``shlex.quote``), files go over SFTP.
  Connect timeout: the profile's ``connect_timeout`` (default 10 s); command timeout: ``run(timeout=...)``.
- ``tvm-rpc`` (``TvmRpcTransport``): not a shell. ``connect()`` opens a ``tvm.rpc`` session (directly to
  ``address:port``, or through an RPC tracker with ``tracker_key``); ``engine(lib)`` uploads a TVM library and
  returns an object with ``run(x) -> logits`` and ``time_batch1(number, repeat) -> [ms]`` timed on the device.

Resumable uploads. ``put_bundle`` hashes the remote copy (one remote python call) and sends only the files whose
sha256 differs from the manifest; each file is written as ``<file>.part`` and renamed into place, files the
manifest does not list are removed, and ``manifest.json`` (when it changed) is removed first and written **last**,
after the files it lists were re-hashed on the device: a half-finished upload never looks like a complete bundle,
and re-running after a dropped connection sends only what is missing.
``install_edgesep`` syncs the device-side ``edgesep`` package (what ``devices.emulate.install_edgesep`` stages:
the numpy-only modules, ``edgesep.runtimes`` and the runner modules) to ``<workdir>/lib`` the same way.

Remote file operations (hashing, listing, free disk) run as small standard-library python snippets with the
profile's python, so a device needs nothing but python3 and sshd. Host side only: never imports torch.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import posixpath
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from edgesep._io import sha256_file
from edgesep.devices._profiles import DeviceProfile
from edgesep.errors import ConfigError, EdgesepError

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DISK_MARGIN_BYTES",
    "DiskFullError",
    "HostKeyError",
    "LocalTransport",
    "RemoteResult",
    "RpcEngine",
    "SshTransport",
    "Transport",
    "TransportError",
    "TvmRpcTransport",
    "default_workdir",
    "fingerprint",
    "open_transport",
]

Log = Callable[[str], None]

DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds: TCP connect, ssh banner and auth (the profile's connect_timeout wins)
DISK_MARGIN_BYTES = 64 << 20  # free space kept on the device beyond what an upload needs (results, logs, pycache)
BUNDLES_DIR = "bundles"  # <workdir>/bundles/<NAME>.bundle-<manifest sha256[:12]>: keyed by content
LIB_DIR = "lib"  # <workdir>/lib/edgesep: the device-side package; PYTHONPATH=<workdir>/lib
_EOF_GRACE_S = 2.0  # after a remote exit status, how long to wait for the rest of the output (EOF)
_PART = ".part"  # an upload in progress: <file>.part, renamed into place when complete
_RERUN = "re-run the same command: uploads are skipped when unchanged"


class TransportError(EdgesepError):
    """The device could not be reached, the connection dropped or timed out, or a remote command failed."""


class HostKeyError(TransportError):
    """An ssh host key that is unknown (refused unless ``--trust-new-host``) or changed (always refused)."""

    def __init__(self, message: str, *, host: str, fingerprint: str, changed: bool = False):
        self.host, self.fingerprint, self.changed = host, fingerprint, changed
        super().__init__(message)


class DiskFullError(TransportError):
    """The device has less free space in its workdir than an upload needs (plus ``DISK_MARGIN_BYTES``)."""


@dataclass
class RemoteResult:
    """What a remote command did: its argv, exit code (-1: killed by a signal) and decoded output."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def _stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _mb(n: int | float) -> str:
    return f"{n / 1e6:,.1f} MB"


def default_workdir(profile: DeviceProfile) -> str:
    """The profile's ``workdir``, else ``~/edgesep`` (ssh), ``/opt/edgesep/work`` (emulated root) or
    ``~/.cache/edgesep/device/<id>`` (this machine)."""
    if profile.workdir:
        return profile.workdir
    if profile.emulated:
        return "/opt/edgesep/work"
    if profile.transport == "ssh":
        return "~/edgesep"
    return f"~/.cache/edgesep/device/{profile.id}"


def fingerprint(key: Any) -> str:
    """``SHA256:<base64>`` of an ssh public key (a paramiko ``PKey``), as ``ssh-keygen -lf`` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


# ------------------------------------------------------------------------------------------ remote file operations

# Standard-library python run on the device (ssh: `python3 -c _OPS op ARG_JSON`; local: exec'd here). One call
# hashes a whole directory tree, so comparing a bundle costs one round trip whatever its number of files.
_OPS = r"""
import hashlib, json, os, shutil, stat, sys

def _sha(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()

def op_hashes(paths):
    out = {}
    for p in paths:
        p2 = os.path.expanduser(p)
        try:
            out[p] = _sha(p2) if stat.S_ISREG(os.lstat(p2).st_mode) else None
        except OSError:
            out[p] = None
    return out

def op_scan(d):
    d = os.path.expanduser(d)
    files = {}
    if not os.path.isdir(d):
        return files
    for top, dirs, names in os.walk(d):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        for n in names:
            p = os.path.join(top, n)
            rel = os.path.relpath(p, d).replace(os.sep, "/")
            files[rel] = _sha(p) if stat.S_ISREG(os.lstat(p).st_mode) else "not-a-file"
    return files

def op_free(p):
    p = os.path.abspath(os.path.expanduser(p))
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    s = os.statvfs(p)
    return {"path": p, "free": s.f_bavail * s.f_frsize, "total": s.f_blocks * s.f_frsize}

def op_mkdir(p):
    for q in ([p] if isinstance(p, str) else p):
        os.makedirs(os.path.expanduser(q), exist_ok=True)
    return os.path.abspath(os.path.expanduser(p)) if isinstance(p, str) else len(p)

def op_remove(paths):
    for p in paths:
        p = os.path.expanduser(p)
        if os.path.islink(p) or os.path.isfile(p):
            os.unlink(p)
        elif os.path.isdir(p):
            shutil.rmtree(p)
    return len(paths)

def op_batch(ops):
    return [globals()["op_" + op](arg) for op, arg in ops]

if __name__ == "__main__":
    print(json.dumps(globals()["op_" + sys.argv[1]](json.loads(sys.argv[2]))))
"""
_LOCAL_OPS: dict[str, Any] = {}
exec(compile(_OPS, "<edgesep.devices.transports._OPS>", "exec"), _LOCAL_OPS)  # our own constant, not input


@contextlib.contextmanager
def _staged_device_package() -> Iterator[Path]:
    """Stage the device-side package with ``devices.emulate.install_edgesep`` into a temp dir; yield its path."""
    from edgesep.devices.emulate import install_edgesep

    with tempfile.TemporaryDirectory(prefix="edgesep-stage-") as tmp:
        yield install_edgesep(tmp, prefix="/lib")


# -------------------------------------------------------------------------------------------------- the interface


class Transport(ABC):
    """A shell-capable way to a device: run commands, move files, keep a bundle and the device package in sync.

    A context manager: ``with open_transport(profile) as t: ...`` closes the connection. Remote paths are POSIX
    strings; a leading ``~`` is the remote user's home.
    """

    profile: DeviceProfile

    def __init__(self, profile: DeviceProfile, *, log: Log | None = None):
        self.profile = profile
        self.log = log or _stderr_log
        self.last_uploaded: list[str] = []  # the files the last put_bundle / install_edgesep sent
        self._workdir: str | None = None

    # -- to implement
    @abstractmethod
    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = 600,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> RemoteResult:
        """Run ``argv`` on the device (each argument arrives verbatim), with ``env`` added to its environment.

        Raises:
            TransportError: the connection dropped, the command ran past ``timeout`` seconds, or (``check``) it
                exited non-zero (the message has the tail of its output).
        """

    @abstractmethod
    def put_file(self, local: Path, remote: str) -> None:
        """Copy a local file to ``remote`` (written as ``remote.part``, then renamed: never half-written)."""

    @abstractmethod
    def get_file(self, remote: str, local: Path) -> None:
        """Copy ``remote`` to ``local`` (written atomically: a temp file beside it, then renamed)."""

    @abstractmethod
    def _ops(self, op: str, arg: Any) -> Any:
        """Run one of the ``_OPS`` file operations on the device."""

    def close(self) -> None:  # noqa: B027 - a no-op by default (local); ssh overrides it
        """Release the connection (idempotent)."""

    # -- shared
    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def python_argv(self, *args: str) -> list[str]:
        """``[profile.python, *args]``: a python command line for ``run``."""
        return [self.profile.python, *args]

    def _expand(self, path: str) -> str:
        return path

    def workdir(self) -> str:
        """The device's workdir (``default_workdir``), ``~`` expanded, created if missing."""
        if self._workdir is None:
            self._workdir = str(self._ops("mkdir", self._expand(default_workdir(self.profile))))
        return self._workdir

    def sha256(self, remote: str) -> str | None:
        """The sha256 of a remote file; None when it is missing or not a regular file."""
        return self._ops("hashes", [remote])[remote]

    def free_disk_bytes(self, path: str) -> int:
        """Bytes available to the remote user on the file system holding ``path`` (or its nearest existing parent)."""
        return int(self._ops("free", path)["free"])

    def put_bundle(self, bundle_dir: Path) -> tuple[str, bool]:
        """Upload a bundle directory to ``<workdir>/bundles/<name>-<manifest sha256[:12]>``, sending only what differs.

        The local bundle is verified first. The remote copy is complete when its ``manifest.json`` and every file
        it lists match; files it does not list (stale ``.part`` files included) are removed. See the module
        docstring for the order that keeps a half-upload from ever looking complete.

        Returns:
            ``(remote bundle path, uploaded?)``; ``last_uploaded`` lists the files sent (empty when skipped).
        Raises:
            BundleError: the local bundle does not verify. DiskFullError: not enough space on the device.
            TransportError: the connection dropped (re-run: only what is missing is sent) or a file arrived
                with another sha256.
        """
        from edgesep.bundle import MANIFEST_NAME, open_bundle

        bundle_dir = Path(bundle_dir)
        if not bundle_dir.is_dir():
            raise ConfigError(f"{bundle_dir} is not a bundle directory; put_bundle uploads directories (not .tar)")
        with open_bundle(bundle_dir) as b:
            files = {f.file: (b.root / f.file, f.sha256, f.size) for f in b.manifest.files()}
            mpath = b.root / MANIFEST_NAME
            files[MANIFEST_NAME] = (mpath, sha256_file(mpath), mpath.stat().st_size)
        # keyed by name AND content: two benches of different bundles that share a name (or of one bundle before and
        # after a compile added a library) never sync into the same directory
        key = f"{bundle_dir.resolve().name}-{files[MANIFEST_NAME][1][:12]}"
        remote = posixpath.join(self.workdir(), BUNDLES_DIR, key)
        sent = self._sync(files, remote, commit=MANIFEST_NAME, what=f"bundle {bundle_dir.name}")
        return remote, bool(sent)

    def install_edgesep(self) -> str:
        """Sync the device-side ``edgesep`` package to ``<workdir>/lib/edgesep``; return the PYTHONPATH to use.

        The package is what ``devices.emulate.install_edgesep`` stages (its ``DEVICE_MODULES``, every module of
        ``edgesep.runtimes`` and the runner's modules): numpy plus a runtime is all it needs on the device.
        """
        lib = posixpath.join(self.workdir(), LIB_DIR)
        with _staged_device_package() as staged:
            files = {
                p.relative_to(staged).as_posix(): (p, sha256_file(p), p.stat().st_size)
                for p in sorted(staged.rglob("*"))
                if p.is_file() and "__pycache__" not in p.parts
            }
            self._sync(files, posixpath.join(lib, "edgesep"), commit=None, what="the edgesep device package")
        return lib

    def _sync(
        self, files: Mapping[str, tuple[Path, str, int]], remote_dir: str, *, commit: str | None, what: str
    ) -> list[str]:
        """Make ``remote_dir`` hold exactly ``files`` ({rel: (local, sha256, size)}); ``commit`` is written last."""
        have, free = self._ops("batch", [("scan", remote_dir), ("free", remote_dir)])
        differ = [rel for rel, (_, sha, _) in files.items() if have.get(rel) != sha]
        extra = sorted(set(have) - set(files))
        self.last_uploaded = []
        if not differ and not extra:
            self.log(f"{what}: the device copy at {remote_dir} is up to date ({len(files)} files); nothing sent")
            return []
        need = sum(files[rel][2] for rel in differ)
        if need + DISK_MARGIN_BYTES > free["free"]:
            raise DiskFullError(
                f"{self.profile.id}: {free['path']} has {_mb(free['free'])} free, {what} needs {_mb(need)} "
                f"(+ {_mb(DISK_MARGIN_BYTES)} margin): free space on the device, or set `workdir` in "
                f"{self.profile.source or 'the profile'} to a larger disk"
            )
        # a changed remote copy is no longer complete: drop its commit file before touching anything else
        first = [commit] if commit and commit in have and commit in differ else []
        stale = [posixpath.join(remote_dir, rel) for rel in [*first, *extra]]
        order = [rel for rel in differ if rel != commit] + ([commit] if commit in differ else [])
        parents = sorted({posixpath.dirname(posixpath.join(remote_dir, rel)) for rel in order} | {remote_dir})
        self._ops("batch", [("remove", stale), ("mkdir", parents)])
        body = [rel for rel in order if rel != commit]
        for rel in body:
            self.put_file(files[rel][0], posixpath.join(remote_dir, rel))
            self.last_uploaded.append(rel)
        # re-hash what arrived before the commit file makes the copy look complete
        got = self._ops("hashes", [posixpath.join(remote_dir, rel) for rel in body]) if body else {}
        bad = [rel for rel in body if got[posixpath.join(remote_dir, rel)] != files[rel][1]]
        if bad:
            raise TransportError(f"{what}: {', '.join(bad)} arrived on {self.profile.id} with another sha256; {_RERUN}")
        if commit in order:
            self.put_file(files[commit][0], posixpath.join(remote_dir, commit))
            self.last_uploaded.append(commit)
        self.log(
            f"{what}: sent {len(order)} of {len(files)} files ({_mb(need)}) to {self.profile.id}:{remote_dir}"
            + (f", removed {len(extra)} stale" if extra else "")
        )
        return order


# ------------------------------------------------------------------------------------------------------------ local


class LocalTransport(Transport):
    """This machine (``subprocess``), or python inside an emulated arm64 root (``profile.emulated``).

    Commands run in the workdir (``workdir()``), so the caller's current directory never shadows modules.
    In an emulated root only python runs (``run`` needs ``argv[0] == profile.python``: qemu-user cannot exec other
    aarch64 programs without binfmt_misc), remote paths are paths inside the root, and file operations happen on
    the host side of the root directly.
    """

    def __init__(self, profile: DeviceProfile, *, log: Log | None = None):
        if profile.transport != "local":
            raise ConfigError(f"profile {profile.id!r} has transport {profile.transport!r}, not 'local'")
        super().__init__(profile, log=log)
        self.root = profile.root_path()
        if self.root is not None and not (self.root / "usr/bin/qemu-aarch64-static").is_file():
            raise TransportError(
                f"{profile.id}: the emulated root {self.root} is missing or incomplete: build it with "
                f"`edgesep device emulate arm64 --root {self.root}`"
            )

    def python_argv(self, *args: str) -> list[str]:
        return [self._python(), *args]

    def _python(self) -> str:
        if self.root is None and self.profile.python in ("python3", "python"):
            return sys.executable  # the host profile: the interpreter edgesep runs in
        return self.profile.python

    def _expand(self, path: str) -> str:
        if self.root is not None:
            p = PurePosixPath(path.replace("~", "/root", 1) if path.startswith("~") else path)
            if not p.is_absolute() or ".." in p.parts:
                raise ConfigError(f"{self.profile.id}: {path!r} must be an absolute path inside the emulated root")
            return str(p)
        return os.path.abspath(os.path.expanduser(path))

    def _host(self, remote: str) -> Path:
        """The host path of a remote path (inside the root for an emulated profile)."""
        p = self._expand(remote)
        return Path(p) if self.root is None else self.root / p.lstrip("/")

    def _ops(self, op: str, arg: Any) -> Any:
        if self.root is None:
            return _LOCAL_OPS[f"op_{op}"](arg)
        if op == "batch":
            return [self._ops(o, a) for o, a in arg]
        # map every path into the root, run the op on the host side, map paths in the answer back
        if op in ("hashes", "remove") or (op == "mkdir" and not isinstance(arg, str)):
            res = _LOCAL_OPS[f"op_{op}"]([str(self._host(p)) for p in arg])
            return {p: res[str(self._host(p))] for p in arg} if op == "hashes" else res
        res = _LOCAL_OPS[f"op_{op}"](str(self._host(arg)))
        if op == "mkdir":
            return self._expand(arg)
        if op == "free":
            res["path"] = "/" + str(Path(res["path"]).relative_to(self.root)).lstrip(".")
        return res

    def put_file(self, local: Path, remote: str) -> None:
        dst = self._host(remote)
        dst.parent.mkdir(parents=True, exist_ok=True)
        part = dst.with_name(dst.name + _PART)
        shutil.copyfile(local, part)
        os.replace(part, dst)

    def get_file(self, remote: str, local: Path) -> None:
        src = self._host(remote)
        if not src.is_file():
            raise TransportError(f"{self.profile.id}: {remote} does not exist on the device")
        _atomic_copy_into(local, lambda f: f.write(src.read_bytes()))

    def install_edgesep(self) -> str:
        if self.root is None:
            return super().install_edgesep()
        from edgesep.devices.emulate import install_edgesep

        lib = posixpath.join(self.workdir(), LIB_DIR)
        install_edgesep(self.root, prefix=lib)
        return lib

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = 600,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> RemoteResult:
        argv = [str(a) for a in argv]
        if not argv:
            raise ConfigError("run needs a command (argv is empty)")
        if self.root is not None:
            return self._run_in_root(argv, timeout, env, check)
        if argv[0] in ("python3", "python") or argv[0] == self.profile.python:
            argv = [self._python(), *argv[1:]]
        try:
            # in the workdir: the caller's current directory must not shadow the device package (python -c puts
            # the cwd first on sys.path)
            r = subprocess.run(argv, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                               errors="replace", timeout=timeout, start_new_session=True,
                               cwd=self.workdir())  # fmt: skip
        except subprocess.TimeoutExpired as e:
            raise TransportError(f"{self.profile.id}: `{shlex.join(argv)[:200]}` ran past {timeout} s") from e
        except OSError as e:
            raise TransportError(
                f"{self.profile.id}: cannot run {argv[0]!r} ({e}); install it or fix `python` in the profile"
            ) from e
        return _checked(self.profile.id, RemoteResult(argv, r.returncode, r.stdout, r.stderr), check)

    def _run_in_root(
        self, argv: list[str], timeout: float | None, env: Mapping[str, str] | None, check: bool
    ) -> RemoteResult:
        from edgesep.devices.emulate import EmulatorError, run_in_root

        if argv[0] not in (self.profile.python, "python3", "python"):
            raise ConfigError(
                f"{self.profile.id} is an emulated root: only python runs there (qemu-user cannot exec {argv[0]!r} "
                f"without binfmt_misc); pass transport.python_argv(...)"
            )
        try:
            r = run_in_root(self.root, argv[1:], env=env, timeout=timeout, check=False)
        except EmulatorError as e:
            raise TransportError(f"{self.profile.id}: {e}") from e
        return _checked(self.profile.id, RemoteResult(argv, r.returncode, r.stdout, r.stderr), check)


def _checked(where: str, r: RemoteResult, check: bool) -> RemoteResult:
    if check and r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        what = "was killed by a signal" if r.returncode < 0 else f"exited with {r.returncode}"
        raise TransportError(f"{where}: `{shlex.join(r.argv)[:200]}` {what}\n{tail}")
    return r


def _atomic_copy_into(local: Path, write: Callable[[Any], None]) -> None:
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".tmp", dir=local.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, local)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -------------------------------------------------------------------------------------------------------------- ssh


def _host_key_name(address: str, port: int) -> str:
    """How known_hosts names a host: ``addr`` on port 22, ``[addr]:port`` otherwise."""
    return address if port == 22 else f"[{address}]:{port}"


class SshTransport(Transport):
    """A device over ssh (paramiko): commands on an exec channel, files over SFTP. See the module docstring.

    Args:
        profile: a profile with ``transport = "ssh"``.
        trust_new_host: accept an unknown host key, print its fingerprint and append it to the profile's
            ``known_hosts`` (a changed key is refused regardless).
        log: one line of text at a time (default: stderr).
    Raises:
        HostKeyError: unknown (without ``trust_new_host``) or changed host key.
        TransportError: refused, unreachable, timed out, or authentication failed.
        ConfigError: the profile's key file does not exist.
    """

    def __init__(self, profile: DeviceProfile, *, trust_new_host: bool = False, log: Log | None = None):
        if profile.transport != "ssh":
            raise ConfigError(f"profile {profile.id!r} has transport {profile.transport!r}, not 'ssh'")
        super().__init__(profile, log=log)
        self.address = str(profile.address)
        self.port = int(profile.port or 22)
        self.user = str(profile.user)
        self.where = f"{self.user}@{self.address}:{self.port}"
        self.known_hosts = Path(str(profile.known_hosts)).expanduser()
        self.connect_timeout = float(profile.connect_timeout or DEFAULT_CONNECT_TIMEOUT)
        self._lock = threading.Lock()
        self._sftp: Any = None
        self._client = self._connect(trust_new_host)
        self._home: str | None = None

    # -- connection
    def _connect(self, trust_new_host: bool) -> Any:
        try:
            import paramiko
        except ImportError as e:  # pragma: no cover - paramiko is a dependency of the host extra
            raise TransportError("the ssh transport needs paramiko: pip install paramiko") from e
        client = paramiko.SSHClient()
        for system in (Path("~/.ssh/known_hosts").expanduser(), Path("/etc/ssh/ssh_known_hosts")):
            if system.is_file() and system != self.known_hosts:
                with contextlib.suppress(OSError, paramiko.SSHException):
                    client.load_system_host_keys(str(system))
        if self.known_hosts.is_file():
            try:
                client.load_host_keys(str(self.known_hosts))
            except (OSError, paramiko.SSHException) as e:
                raise ConfigError(f"{self.known_hosts} (known_hosts of {self.profile.id}) cannot be read: {e}") from e
        client.set_missing_host_key_policy(_NewHostPolicy(self, trust_new_host))
        key = None
        if self.profile.key:
            key = str(Path(self.profile.key).expanduser())
            if not Path(key).is_file():
                raise ConfigError(
                    f"{self.profile.id}: key file {key} does not exist; create one with `ssh-keygen -t ed25519 -f "
                    f"{key}` and `ssh-copy-id -i {key}.pub {self.user}@{self.address}`, or remove `key` to use "
                    "ssh-agent"
                )
        t = self.connect_timeout
        try:
            client.connect(
                self.address, port=self.port, username=self.user, key_filename=key, allow_agent=True,
                look_for_keys=False, timeout=t, banner_timeout=t, auth_timeout=t, channel_timeout=t,
            )  # fmt: skip
        except HostKeyError:
            client.close()
            raise
        except paramiko.BadHostKeyException as e:
            client.close()
            name = _host_key_name(self.address, self.port)
            raise HostKeyError(
                f"the host key of {name} CHANGED: the device offers {e.key.get_name()} {fingerprint(e.key)}, but "
                f"known_hosts has {fingerprint(e.expected_key)}. Refused (it may be an attack). If the device was "
                f"reinstalled, remove the old key with `ssh-keygen -R '{name}' -f {self.known_hosts}` and connect "
                "again with --trust-new-host",
                host=name, fingerprint=fingerprint(e.key), changed=True,
            ) from e  # fmt: skip
        except paramiko.PasswordRequiredException as e:
            client.close()
            raise TransportError(
                f"{self.profile.id}: the key {key} is encrypted: load it into ssh-agent (`ssh-add {key}`) and remove "
                "`key` from the profile, or use an unencrypted key for this device"
            ) from e
        except paramiko.AuthenticationException as e:
            client.close()
            how = f"the key {key}" if key else "the keys in ssh-agent"
            raise TransportError(
                f"authentication to {self.where} failed with {how} (passwords are never used): add the public key "
                f"to ~/.ssh/authorized_keys on the device, e.g. `ssh-copy-id -i {key or '~/.ssh/id_ed25519'}.pub "
                f"-p {self.port} {self.user}@{self.address}`"
            ) from e
        except TimeoutError as e:
            client.close()
            raise TransportError(
                f"connecting to {self.where} timed out after {t:g} s: check that the device is on and reachable "
                "(address, port, network), or raise `connect_timeout` in the profile"
            ) from e
        except (OSError, paramiko.SSHException, EOFError) as e:
            client.close()
            raise TransportError(
                f"cannot connect to {self.where} ({type(e).__name__}: {str(e)[:200]}): check that the device is on, "
                "that sshd runs there and that address/port in the profile are right"
            ) from e
        return client

    def _transport(self) -> Any:
        t = self._client.get_transport() if self._client is not None else None
        if t is None or not t.is_active():
            raise TransportError(f"the connection to {self.address} is closed; {_RERUN}")
        return t

    def _dropped(self, what: str) -> TransportError:
        return TransportError(f"connection to {self.address} dropped while running {what[:120]}; {_RERUN}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._sftp is not None:
                self._sftp.close()
        with contextlib.suppress(Exception):
            if self._client is not None:
                self._client.close()
        self._sftp = None
        self._client = None

    # -- commands
    def _command(self, argv: Sequence[str], env: Mapping[str, str] | None) -> str:
        words = [str(a) for a in argv]
        if env:  # `env K=V cmd`: sshd's AcceptEnv usually drops environment requests, a command line always works
            words = ["env", *(f"{k}={v}" for k, v in env.items()), *words]
        return " ".join(shlex.quote(w) for w in words)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = 600,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> RemoteResult:
        argv = [str(a) for a in argv]
        if not argv:
            raise ConfigError("run needs a command (argv is empty)")
        for k in env or {}:
            if not k.isidentifier():
                raise ConfigError(f"environment variable name {k!r} is not valid")
        shown = shlex.join(argv)
        transport = self._transport()
        try:
            chan = transport.open_session(timeout=self.connect_timeout)
            chan.exec_command(self._command(argv, env))
            chan.shutdown_write()
        except Exception as e:  # paramiko raises SSHException, OSError, EOFError
            if not transport.is_active():
                raise self._dropped(f"`{shown}`") from e
            raise TransportError(f"{self.address}: cannot start `{shown[:200]}` ({type(e).__name__}: {e})") from e
        out, err = bytearray(), bytearray()
        deadline = None if timeout is None else time.monotonic() + timeout
        chan.settimeout(0.2)
        exited_at = None
        try:
            while True:
                progressed = False
                while chan.recv_ready():
                    out += chan.recv(1 << 16)
                    progressed = True
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(1 << 16)
                    progressed = True
                if chan.closed or (chan.status_event.is_set() and chan.eof_received):
                    break
                if chan.status_event.is_set():  # exited; output may still be in flight until EOF (a background
                    exited_at = exited_at or time.monotonic()  # child holding stdout would delay EOF forever)
                    if time.monotonic() - exited_at > _EOF_GRACE_S:
                        break
                if not transport.is_active():
                    raise self._dropped(f"`{shown}`")
                if deadline is not None and time.monotonic() > deadline:
                    chan.close()  # the remote process gets SIGPIPE on its next write; sshd closes its pipes
                    raise TransportError(
                        f"{self.address}: `{shown[:200]}` ran past {timeout:g} s; it was cut off (raise the timeout "
                        "if it needs longer)"
                    )
                if not progressed:
                    chan.status_event.wait(0.05)
            # drain what arrived with the exit status / EOF
            while chan.recv_ready():
                out += chan.recv(1 << 16)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(1 << 16)
            if not transport.is_active() and chan.exit_status == -1:
                raise self._dropped(f"`{shown}`")
            code = chan.exit_status if chan.status_event.is_set() else -1
        except (OSError, EOFError) as e:
            if not transport.is_active():
                raise self._dropped(f"`{shown}`") from e
            raise TransportError(f"{self.address}: reading the output of `{shown[:200]}` failed ({e})") from e
        finally:
            chan.close()
        r = RemoteResult(argv, int(code), out.decode(errors="replace"), err.decode(errors="replace"))
        return _checked(f"{self.profile.id} ({self.address})", r, check)

    def _ops(self, op: str, arg: Any) -> Any:
        r = self.run(self.python_argv("-c", _OPS, op, json.dumps(arg)), timeout=600, check=False)
        if r.returncode != 0:
            if r.returncode == 127 or "not found" in r.stderr:
                raise TransportError(
                    f"{self.profile.id}: python {self.profile.python!r} is not installed on {self.address}: "
                    "install it (`sudo apt-get install -y python3`) or set `python` in the profile"
                )
            tail = "\n".join(r.stderr.strip().splitlines()[-5:])
            raise TransportError(f"{self.profile.id}: file operation {op!r} failed on {self.address}:\n{tail}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    # -- files
    def _sftp_client(self) -> Any:
        if self._sftp is None:
            try:
                self._sftp = self._client.open_sftp()
                self._sftp.get_channel().settimeout(max(self.connect_timeout, 60.0))
            except Exception as e:
                if not self._transport_active():
                    raise self._dropped("SFTP") from e
                raise TransportError(
                    f"{self.address}: SFTP is not available ({e}); enable it in the device's sshd_config "
                    "(`Subsystem sftp internal-sftp`)"
                ) from e
        return self._sftp

    def _transport_active(self) -> bool:
        t = self._client.get_transport() if self._client is not None else None
        return t is not None and t.is_active()

    def _expand(self, path: str) -> str:
        if path == "~" or path.startswith("~/"):
            if self._home is None:
                self._home = self._sftp_client().normalize(".")
            return self._home + path[1:]
        return path

    def put_file(self, local: Path, remote: str) -> None:
        remote = self._expand(remote)
        part = remote + _PART
        sftp = self._sftp_client()
        try:
            sftp.put(str(local), part, confirm=True)
            sftp.posix_rename(part, remote)
        except Exception as e:  # paramiko raises SSHException, OSError, EOFError
            if not self._transport_active():
                raise self._dropped(f"the upload of {Path(local).name}") from e
            raise TransportError(
                f"{self.profile.id}: uploading {Path(local).name} to {remote} failed ({type(e).__name__}: {e}); "
                "check free space and permissions on the device"
            ) from e

    def get_file(self, remote: str, local: Path) -> None:
        remote = self._expand(remote)
        sftp = self._sftp_client()
        try:
            _atomic_copy_into(local, lambda f: sftp.getfo(remote, f))
        except FileNotFoundError as e:
            raise TransportError(f"{self.profile.id}: {remote} does not exist on the device") from e
        except Exception as e:  # paramiko raises SSHException, OSError, EOFError
            if not self._transport_active():
                raise self._dropped(f"the download of {remote}") from e
            raise TransportError(f"{self.profile.id}: downloading {remote} failed ({type(e).__name__}: {e})") from e


class _NewHostPolicy:
    """paramiko's missing-host-key policy: refuse (``HostKeyError`` with the fingerprint) or trust-and-record."""

    def __init__(self, owner: SshTransport, trust: bool):
        self.owner, self.trust = owner, trust

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        fp = fingerprint(key)
        o = self.owner
        if not self.trust:
            raise HostKeyError(
                f"the host key of {hostname} is not in {o.known_hosts} (nor the system's known_hosts): refused. "
                f"The device offers {key.get_name()} {fp}; if that matches the device's own "
                "(`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on it), re-run with --trust-new-host",
                host=hostname, fingerprint=fp,
            )  # fmt: skip
        o.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with open(o.known_hosts, "a", encoding="utf-8") as f:
            os.chmod(o.known_hosts, 0o600)
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        o.log(f"trusting the new host key of {hostname}: {key.get_name()} {fp} (recorded in {o.known_hosts})")


# ---------------------------------------------------------------------------------------------------------- tvm-rpc


class TvmRpcTransport:
    """A TVM RPC server on the device, directly (``address:port``) or through a tracker (``tracker_key``).

    Not a shell: it uploads TVM libraries and runs them (``engine``). The server executes whatever it is sent:
    run it on a trusted network only. A context manager.
    """

    def __init__(self, profile: DeviceProfile, *, log: Log | None = None, session_timeout: float = 0):
        if profile.transport != "tvm-rpc":
            raise ConfigError(f"profile {profile.id!r} has transport {profile.transport!r}, not 'tvm-rpc'")
        self.profile = profile
        self.log = log or _stderr_log
        self.session_timeout = session_timeout
        self.connect_timeout = float(profile.connect_timeout or DEFAULT_CONNECT_TIMEOUT)
        self._session: Any = None
        self._tracker: Any = None

    @property
    def where(self) -> str:
        if self.profile.tracker_key:
            return f"tracker {self._tracker_addr()[0]}:{self._tracker_addr()[1]} key {self.profile.tracker_key!r}"
        return f"{self.profile.address}:{self.profile.port}"

    def _tracker_addr(self) -> tuple[str, int]:
        return (self.profile.address or "127.0.0.1", int(self.profile.port or 9190))

    def connect(self) -> Any:
        """The ``tvm.rpc`` session (opened on first use).

        Raises:
            BackendMissingError: TVM is not installed here. TransportError: no server (or no free device with the
                key on the tracker), with how to start one.
        """
        if self._session is not None:
            return self._session
        from edgesep.runtimes.tvm import _import_tvm

        _import_tvm()
        from tvm import rpc

        p = self.profile
        if p.tracker_key:
            host, port = self._tracker_addr()
            self._probe(host, port, "an RPC tracker", f"python -m tvm.exec.rpc_tracker --host {host} --port {port}")
            # a server registers with its tracker a moment after it starts listening: wait for the key up to the
            # connect timeout before calling it missing
            import time

            deadline = time.monotonic() + self.connect_timeout
            while True:
                try:
                    if self._tracker is None:
                        self._tracker = rpc.connect_tracker(host, port)
                    summary = self._tracker.summary()
                except Exception as e:
                    raise TransportError(f"{host}:{port} is not a TVM RPC tracker ({type(e).__name__}: {e})") from e
                keys = summary.get("queue_info", {})
                if p.tracker_key in keys or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            if p.tracker_key not in keys:
                raise TransportError(
                    f"no device with key {p.tracker_key!r} is registered at the tracker {host}:{port} (keys: "
                    f"{', '.join(sorted(keys)) or 'none'}): on the device run `python -m tvm.exec.rpc_server "
                    f"--tracker {host}:{port} --key {p.tracker_key}`"
                )
            try:
                self._session = self._tracker.request(p.tracker_key, session_timeout=self.session_timeout, max_retry=2)
            except Exception as e:
                raise TransportError(f"the tracker {host}:{port} gave no session for {p.tracker_key!r}: {e}") from e
        else:
            host, port = str(p.address), int(p.port or 9090)
            cmd = f"python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}"
            self._probe(host, port, "a TVM RPC server", cmd)
            try:
                self._session = rpc.connect(host, port, session_timeout=self.session_timeout)
            except Exception as e:
                raise TransportError(
                    f"cannot open a TVM RPC session at {host}:{port} ({type(e).__name__}: {str(e)[:200]}); "
                    f"on the device run `{cmd}`"
                ) from e
        return self._session

    def _probe(self, host: str, port: int, what: str, cmd: str) -> None:
        """Fail fast (TVM's own clients retry for a minute) when nothing listens at host:port."""
        try:
            with socket.create_connection((host, port), timeout=self.connect_timeout):
                pass
        except OSError as e:
            raise TransportError(
                f"cannot reach {what} at {host}:{port} ({e.strerror or e}): on the device run `{cmd}` "
                "(on a trusted network only: it runs whatever it is sent)"
            ) from e

    def upload(self, lib: str | os.PathLike[str]) -> str:
        """Upload a library; returns its remote name (content-addressed, so a stale upload is never picked up)."""
        path = Path(lib)
        if not path.is_file():
            raise ConfigError(f"{path} is not a file; pass the path of a compiled TVM library")
        name = f"edgesep-{sha256_file(path)[:16]}{path.suffix or '.so'}"
        try:
            self.connect().upload(str(path), target=name)
        except TransportError:
            raise
        except Exception as e:
            raise TransportError(f"uploading {path.name} to {self.where} failed ({type(e).__name__}: {e})") from e
        return name

    def load_module(self, name: str) -> Any:
        """Load an uploaded library on the device."""
        try:
            return self.connect().load_module(name)
        except Exception as e:
            raise TransportError(
                f"the device at {self.where} cannot load {name} ({type(e).__name__}: {str(e)[:300]}); is the library "
                "built for its architecture (e.g. `edgesep compile B --backend tvm --target rpi4`)?"
            ) from e

    def engine(self, lib_path: str | os.PathLike[str], *, precision: str = "fp32", target: str = "") -> RpcEngine:
        """Upload and load a library built by ``compile_tvm``; returns an engine running it on the device."""
        from tvm import relax

        from edgesep.runtimes.tvm import _io_shapes, _VmRunner

        name = self.upload(lib_path)
        rlib = self.load_module(name)
        sess = self.connect()
        dev = sess.cpu()
        vm = relax.VirtualMachine(rlib, dev)
        shapes = _io_shapes(vm)
        if shapes is None:
            raise ConfigError(f"{Path(lib_path).name} carries no I/O shapes; build it with `edgesep compile`")
        in_shape, out_shape = shapes
        runner = _VmRunner(vm, in_shape, out_shape[-1], dev)
        return RpcEngine(self, vm, dev, runner, in_shape, out_shape, name, precision, target)

    def close(self) -> None:
        """Drop the session (the server ends it when the socket closes) and the tracker connection."""
        self._session = None
        if self._tracker is not None:
            with contextlib.suppress(Exception):
                self._tracker.close()
            self._tracker = None

    def __enter__(self) -> TvmRpcTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RpcEngine:
    """A TVM library loaded on an RPC device. ``run(x)``: float32 NCHW pixels -> logits (N, classes), any N
    (chunks of the library's static batch); ``time_batch1``: ``time_evaluator`` on the device (no network time)."""

    transport: TvmRpcTransport
    vm: Any
    dev: Any
    runner: Any
    input_shape: list[int]
    output_shape: list[int]
    remote_name: str
    precision: str = "fp32"
    target: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def run(self, x: Any) -> Any:
        from edgesep.runtimes.tvm import _check_batch

        x = _check_batch(x, self.input_shape)
        with self._lock:
            try:
                return self.runner(x)
            except Exception as e:
                raise TransportError(
                    f"running {self.remote_name} at {self.transport.where} failed ({type(e).__name__}: "
                    f"{str(e)[:200]}); {_RERUN}"
                ) from e

    def time_batch1(self, number: int = 10, repeat: int = 3) -> list[float]:
        """``repeat`` samples (ms), each the mean of ``number`` calls of ``main`` on one batch-1 input."""
        import numpy as np
        import tvm

        if number < 1 or repeat < 1:
            raise ConfigError(f"number and repeat must be >= 1, got {number} and {repeat}")
        if self.input_shape[0] != 1:
            raise ConfigError(
                f"{self.remote_name} is built for batch {self.input_shape[0]}; batch-1 timing needs a batch-1 build "
                "(`edgesep compile B --backend tvm --batch 1`)"
            )
        x = tvm.runtime.tensor(np.zeros(self.input_shape, np.float32), self.dev)
        with self._lock:
            res = self.vm.time_evaluator("main", self.dev, number=number, repeat=repeat)(x)
        return [float(r) * 1e3 for r in res.results]

    def info(self) -> dict[str, Any]:
        from edgesep.runtimes.tvm import TvmRuntime

        return {
            "backend": "tvm",
            "transport": "tvm-rpc",
            "server": self.transport.where,
            "version": TvmRuntime.version(),
            "version_note": "the host's TVM (the RPC server does not report its own)",
            "precision": self.precision,
            "target": self.target,
            "batch": self.input_shape[0],
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "library": self.remote_name,
        }

    def close(self) -> None:
        self.runner = self.vm = None


# ------------------------------------------------------------------------------------------------------------ open


def open_transport(
    profile: DeviceProfile, *, trust_new_host: bool = False, log: Log | None = None
) -> Transport | TvmRpcTransport:
    """The transport for a profile: ``LocalTransport``, ``SshTransport`` (connected) or ``TvmRpcTransport``
    (connects on first use).

    Raises:
        HostKeyError, TransportError: see ``SshTransport``. ConfigError: a profile the transport cannot use.
    """
    if profile.transport == "local":
        return LocalTransport(profile, log=log)
    if profile.transport == "ssh":
        return SshTransport(profile, trust_new_host=trust_new_host, log=log)
    if profile.transport == "tvm-rpc":
        return TvmRpcTransport(profile, log=log)
    raise ConfigError(f"profile {profile.id!r}: unknown transport {profile.transport!r}")
