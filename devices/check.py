"""``edgesep device check PROFILE``: can this device run this bundle, and if not, what exactly to install or do.

``check_device`` connects through the profile's transport and runs one small standard-library probe with the
profile's python (machine, python version, and for each module it needs: imported? version?). Each check is a dict
``{"name", "ok", "detail", "fix"}`` (``fix`` is the exact command or edit when ``ok`` is False, else ""); checks
that cannot apply to a transport are ``ok`` with ``"skipped": True`` and say why. The checks, in order:

- ``reachable``: the connection (ssh: host key, auth; emulated: the root exists; tvm-rpc: a session).
- ``architecture``: ``platform.machine()`` on the device vs the profile's ``arch`` (``arm64`` counts as ``aarch64``).
- ``python``: the profile's python runs, and its version satisfies ``versions.python`` (default ``>=3.10``, what
  edgesep's device side needs).
- ``numpy``: importable (the device side is numpy + one runtime).
- ``runtime:<name>``: the profile's runtime, and every other runtime named in ``versions``, imports, and its
  version satisfies the profile's specifier (PEP 440: ``">=1.18"``, ``"10.3.*"``; a bare version means ``==``).
- ``bundle`` (with a bundle): it verifies here, and holds an artifact for the profile's runtime and target
  (``onnx`` for onnxruntime, ``tvm-lib`` built for the profile's ``target`` for tvm, ``trt-onnx`` for tensorrt);
  otherwise the fix is the ``edgesep compile`` command that adds it.
- ``disk``: free space in the device's workdir vs the bundle's size plus ``DISK_MARGIN_BYTES``.

Version specifiers are compared with ``packaging`` when it is importable (it runs on the host), else with a small
comparator that handles ``==, !=, >=, <=, >, <, ~=``, ``.*`` wildcards, pre- (a/b/rc) and post-releases.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgesep.devices._profiles import DeviceProfile, load_profile
from edgesep.devices.transports import (
    DISK_MARGIN_BYTES,
    HostKeyError,
    Transport,
    TransportError,
    TvmRpcTransport,
    default_workdir,
    open_transport,
)
from edgesep.errors import BundleError, EdgesepError

__all__ = ["MIN_PYTHON", "RUNTIME_ARTIFACT_KINDS", "RUNTIME_MODULES", "check_device", "version_satisfies"]

MIN_PYTHON = ">=3.10"  # edgesep's requires-python: the device side needs it too
RUNTIME_MODULES = {"onnxruntime": "onnxruntime", "tvm": "tvm", "tensorrt": "tensorrt"}
RUNTIME_ARTIFACT_KINDS = {"onnxruntime": "onnx", "tvm": "tvm-lib", "tensorrt": "trt-onnx"}
_PIP_NAMES = {"onnxruntime": "onnxruntime", "tvm": "apache-tvm", "numpy": "numpy"}
_ARCH_ALIASES = {"arm64": "aarch64", "armv8": "aarch64", "amd64": "x86_64", "x64": "x86_64"}

_PROBE = r"""
import importlib, json, platform, sys
out = {"machine": platform.machine(), "python": platform.python_version(), "executable": sys.executable,
       "modules": {}}
for name in sys.argv[1:]:
    try:
        m = importlib.import_module(name)
        v = getattr(m, "__version__", None)
        if v is None:
            import importlib.metadata as md
            v = md.version({"tvm": "apache-tvm"}.get(name, name))
        out["modules"][name] = {"ok": True, "version": str(v)}
    except Exception as e:
        out["modules"][name] = {"ok": False, "error": (type(e).__name__ + ": " + str(e))[:300]}
print(json.dumps(out))
"""


# ------------------------------------------------------------------------------------------------------ versions


def _norm_spec(spec: str) -> str:
    """``"10.3.*"`` -> ``"==10.3.*"`` (a bare version pins it); whitespace removed."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    return ",".join(p if p[0] in "<>=!~" else f"=={p}" for p in parts)


_VERSION_RE = re.compile(
    r"v?(\d+(?:\.\d+)*)(?:[-_.]?(a|b|rc|c|alpha|beta)[-_.]?(\d*))?(?:[-_.]?(?:post|rev|r)[-_.]?(\d*))?(?:\+[a-z0-9.]+)?",
    re.IGNORECASE,
)
_PRE_PHASES = {"a": -3, "alpha": -3, "b": -2, "beta": -2, "rc": -1, "c": -1}


def _parse(v: str) -> tuple[tuple[int, ...], tuple[int, int], int]:
    """``"1.18.0rc1+cu12"`` -> (release (1, 18, 0), pre (phase, n) or (0, 0), post n or -1); local part dropped."""
    m = _VERSION_RE.fullmatch(v.strip())
    if not m:
        raise ValueError(f"not a version: {v!r}")
    rel, phase, pre_n, post = m.groups()
    pre = (_PRE_PHASES[phase.lower()], int(pre_n or 0)) if phase else (0, 0)
    return tuple(int(x) for x in rel.split(".")), pre, (-1 if post is None else int(post or 0))


def _pad(a: tuple[int, ...], n: int) -> tuple[int, ...]:
    return a + (0,) * (n - len(a))


def _key(p: tuple[tuple[int, ...], tuple[int, int], int], n: int) -> tuple[Any, ...]:
    return (_pad(p[0], n), p[1], p[2])


def _fallback_satisfies(version: str, spec: str) -> bool:
    """A small PEP 440 subset: ``==, !=, >=, <=, >, <, ~=``, ``==X.Y.*``, pre (a/b/rc) and post releases."""
    v = _parse(version)
    for clause in _norm_spec(spec).split(","):
        m = re.fullmatch(r"(~=|==|!=|>=|<=|>|<)\s*(.+)", clause)
        if not m:
            raise ValueError(f"invalid version specifier {clause!r}")
        op, rhs = m.groups()
        if rhs.endswith(".*"):
            if op not in ("==", "!="):
                raise ValueError(f"invalid version specifier {clause!r}: '.*' only with == or !=")
            prefix = _parse(rhs[:-2])[0]
            match = _pad(v[0], len(prefix))[: len(prefix)] == prefix
            ok = match if op == "==" else not match
        else:
            r = _parse(rhs)
            n = max(len(v[0]), len(r[0]))
            kv, kr = _key(v, n), _key(r, n)
            same_release = kv[0] == kr[0]
            if op == "~=":
                if len(r[0]) < 2:
                    raise ValueError(f"invalid version specifier {clause!r}: ~= needs at least X.Y")
                ok = kv >= kr and _pad(v[0], len(r[0]))[: len(r[0]) - 1] == r[0][:-1]
            elif op == ">":  # PEP 440: not a post-release of the given version (unless it is one itself)
                ok = kv > kr and not (same_release and r[2] < 0 and v[2] >= 0 and kv[1] == kr[1])
            elif op == "<":  # PEP 440: not a pre-release of the given version (unless it is one itself)
                ok = kv < kr and not (same_release and r[1] == (0, 0) and v[1] != (0, 0))
            else:
                ok = {"==": kv == kr, "!=": kv != kr, ">=": kv >= kr, "<=": kv <= kr}[op]
        if not ok:
            return False
    return True


def version_satisfies(version: str, spec: str) -> bool:
    """Whether ``version`` satisfies a PEP 440 specifier (``">=1.18"``, ``"10.3.*"``, ``">=1.16,<2"``).

    Pre- and post-releases count (a device's ``1.18.0rc1`` or ``0.27.0.post1`` is judged by its number).

    Raises:
        ValueError: an invalid specifier or version.
    """
    norm = _norm_spec(spec)
    try:
        from packaging.specifiers import InvalidSpecifier, SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return _fallback_satisfies(version, norm)
    try:
        return SpecifierSet(norm).contains(Version(version), prereleases=True)
    except (InvalidSpecifier, InvalidVersion) as e:
        raise ValueError(str(e)) from e


# --------------------------------------------------------------------------------------------------------- checks


def _check(name: str, ok: bool, detail: str, fix: str = "", **extra: Any) -> dict[str, Any]:
    return {"name": name, "ok": bool(ok), "detail": detail, "fix": "" if ok else fix, **extra}


def _skipped(name: str, why: str) -> dict[str, Any]:
    return _check(name, True, f"skipped: {why}", skipped=True)


def _norm_arch(machine: str) -> str:
    m = machine.strip().lower()
    return _ARCH_ALIASES.get(m, m)


def _source(profile: DeviceProfile) -> str:
    return profile.source or f"the profile {profile.id!r}"


def _install_fix(profile: DeviceProfile, module: str, spec: str | None, python: str) -> str:
    if profile.emulated:
        return f"rebuild the emulated root (it pins its wheels): `edgesep device emulate arm64 --root {profile.root}`"
    if module == "tensorrt":
        return (
            "TensorRT ships with JetPack: `sudo apt-get install -y nvidia-jetpack` (python bindings: "
            "python3-libnvinfer); never pip-install it on a Jetson"
        )
    req = _PIP_NAMES.get(module, module) + (_norm_spec(spec) if spec else "")
    return f"{python} -m pip install --upgrade {shlex.quote(req)}"


def _bundle_check(profile: DeviceProfile, bundle: Path) -> tuple[dict[str, Any], int]:
    """The bundle check and the bytes the bundle occupies (0 when it cannot be opened)."""
    from edgesep.bundle import MANIFEST_NAME, open_bundle

    try:
        b = open_bundle(bundle)
    except BundleError as e:
        return _check("bundle", False, str(e), f"fetch an intact copy of {bundle} or re-export it"), 0
    with b:
        size = sum(f.size for f in b.manifest.files()) + (b.root / MANIFEST_NAME).stat().st_size
        kind = RUNTIME_ARTIFACT_KINDS[profile.runtime]
        arts = [a for a in b.manifest.artifacts if a.kind == kind]
        have = ", ".join(f"{a.id} ({a.kind}, {a.target})" for a in b.manifest.artifacts) or "none"
        if profile.runtime == "tvm":
            arts = [a for a in arts if _tvm_target_matches(profile, a)]
            target = profile.target
            target_arg = target if isinstance(target, str) else json.dumps(target, separators=(",", ":"))
            fix = f"edgesep compile {shlex.quote(str(bundle))} --backend tvm --target {shlex.quote(str(target_arg))}"
            want = f"tvm-lib built for target {target_arg}"
        elif profile.runtime == "tensorrt":
            fix = f"edgesep compile {shlex.quote(str(bundle))} --backend tensorrt"
            want = "trt-onnx artifact (TensorRT builds its engine on the device from it)"
        else:
            fix = f"re-export the bundle: `edgesep export RUN --out {shlex.quote(str(bundle))}`"
            want = "onnx artifact"
        if not arts:
            return _check("bundle", False, f"{bundle.name} has no {want} for {profile.id} (it has: {have})", fix), size
        wrong = [a for a in arts if a.extra.get("arch") and _norm_arch(str(a.extra["arch"])) != profile.arch]
        if wrong and len(wrong) == len(arts):
            a = wrong[0]
            return _check(
                "bundle", False, f"{a.id} is a library for {a.extra['arch']}, {profile.id} is {profile.arch}", fix
            ), size
        names = ", ".join(f"{a.id} ({a.file}, {a.size / 1e6:.2f} MB)" for a in arts)
        return _check("bundle", True, f"{b.name}: verified, {size / 1e6:.2f} MB; runs {names}"), size


def _tvm_target_matches(profile: DeviceProfile, art: Any) -> bool:
    target = profile.target
    if isinstance(target, dict):
        return art.extra.get("target") == target
    if art.target == target:
        return True
    return art.target == re.sub(r"[^A-Za-z0-9_.-]+", "-", str(target)).strip("-.")  # a TVM tag's artifact name


def check_device(
    profile: DeviceProfile | str,
    bundle: str | Path | None = None,
    trust_new_host: bool = False,
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Check that a device can run a bundle: reachability, architecture, python, numpy, runtimes, bundle, disk.

    Args:
        profile: a profile, or its id / TOML path.
        bundle: a bundle directory to check against (its artifacts and size), or None.
        trust_new_host: ssh: accept an unknown host key (printing and recording its fingerprint).
        log: where ssh prints a newly trusted host key (default stderr).
    Returns:
        ``{"profile", "source", "transport", "ok", "checks": [{"name", "ok", "detail", "fix"}, ...], "probe"}``;
        ``ok`` is True when every check is. Device faults are failed checks, never exceptions.
    Raises:
        UnknownNameError, ConfigError: an unknown or invalid profile (user errors: the CLI exits 2).
    """
    if not isinstance(profile, DeviceProfile):
        profile = load_profile(profile)
    checks: list[dict[str, Any]] = []
    probe: dict[str, Any] | None = None
    bundle_check, bundle_size = (None, 0) if bundle is None else _bundle_check(profile, Path(bundle))

    try:
        transport = open_transport(profile, trust_new_host=trust_new_host, log=log)
        if isinstance(transport, TvmRpcTransport):
            transport.connect()
    except HostKeyError as e:
        fix = (
            f"compare {e.fingerprint} with the device's own key, then re-run with --trust-new-host"
            if not e.changed
            else f"if the device was reinstalled: ssh-keygen -R {shlex.quote(e.host)} -f {profile.known_hosts}"
        )
        checks.append(_check("reachable", False, str(e), fix))
        transport = None
    except EdgesepError as e:
        msg = str(e)  # messages say "what went wrong; what to do": the second half is the fix when there is one
        fix = msg.split("; ", 1)[1] if "; " in msg and not isinstance(e, TransportError) else _reach_fix(profile)
        checks.append(_check("reachable", False, msg, fix))
        transport = None

    if transport is not None:
        with transport:
            checks.append(_check("reachable", True, _where(profile)))
            if isinstance(transport, TvmRpcTransport):
                checks += _rpc_checks(profile)
            else:
                probe, more = _device_checks(profile, transport, bundle_size)
                checks += more
    if bundle_check is not None:
        checks.insert(len(checks) - (1 if checks and checks[-1]["name"] == "disk" else 0), bundle_check)
    return {
        "profile": profile.id,
        "source": profile.source,
        "transport": profile.transport + (" (emulated)" if profile.emulated else ""),
        "bundle": None if bundle is None else str(bundle),
        "ok": all(c["ok"] for c in checks),
        "checks": checks,
        "probe": probe,
    }


def _where(profile: DeviceProfile) -> str:
    if profile.transport == "ssh":
        return f"ssh {profile.user}@{profile.address}:{profile.port or 22} (key auth, host key known)"
    if profile.transport == "tvm-rpc":
        if profile.tracker_key:
            return f"TVM RPC tracker {profile.address or '127.0.0.1'}:{profile.port or 9190}, key {profile.tracker_key}"
        return f"TVM RPC server {profile.address}:{profile.port}"
    return f"emulated root {profile.root_path()}" if profile.emulated else "this machine"


def _reach_fix(profile: DeviceProfile) -> str:
    if profile.emulated:
        return f"edgesep device emulate arm64 --root {profile.root_path()}"
    if profile.transport == "ssh":
        return (
            f"check that {profile.address} is on and runs sshd (`ssh -p {profile.port or 22} "
            f"{profile.user}@{profile.address} true`), and the address/port/key in {_source(profile)}"
        )
    if profile.transport == "tvm-rpc":
        if profile.tracker_key:
            return f"on the device: python -m tvm.exec.rpc_server --tracker HOST:PORT --key {profile.tracker_key}"
        return f"on the device: python -m tvm.exec.rpc_server --host 0.0.0.0 --port {profile.port}"
    return "see the error"


def _rpc_checks(profile: DeviceProfile) -> list[dict[str, Any]]:
    why = "a TVM RPC server runs libraries only (no python on the device side)"
    return [
        _skipped("architecture", f"{why}; the library's ELF architecture is checked when it loads"),
        _skipped("python", why),
        _skipped("numpy", "numpy runs on the host with tvm-rpc"),
        _check("runtime:tvm", True, "the RPC server is TVM (it answered); its version is not reported over RPC"),
        _skipped("disk", "libraries go to the RPC server's temporary directory"),
    ]


def _device_checks(
    profile: DeviceProfile, t: Transport, bundle_size: int
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    checks: list[dict[str, Any]] = []
    python = t.python_argv()[0]
    runtimes = [profile.runtime, *sorted(k for k in profile.versions if k not in (profile.runtime, "python"))]
    modules = ["numpy", *(RUNTIME_MODULES[r] for r in runtimes)]
    try:
        r = t.run(t.python_argv("-c", _PROBE, *modules), timeout=600, check=False)
        probe = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else None
    except (TransportError, ValueError) as e:
        r, probe = None, None
        err = str(e)
    else:
        err = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
    if probe is None:
        fix = f"install python3 on the device (`sudo apt-get install -y python3`) or set `python` in {_source(profile)}"
        checks.append(_check("python", False, f"{python!r} does not run on {profile.id}: {err}", fix))
        return None, checks

    machine = _norm_arch(probe["machine"])
    checks.append(_check(
        "architecture", machine == profile.arch,
        f"device is {probe['machine']}, profile says {profile.arch}",
        f"this device is {machine}: set arch = {json.dumps(machine)} in {_source(profile)}, or point the profile "
        f"at a {profile.arch} device (libraries built for {profile.arch} will not load here)",
    ))  # fmt: skip

    spec = profile.versions.get("python", MIN_PYTHON)
    checks.append(_version_check(profile, "python", probe["python"], spec, (
        f"install Python {_norm_spec(spec)} on the device (Debian bookworm / Raspberry Pi OS ship 3.11) and set "
        f"`python` in {_source(profile)}"
    )))  # fmt: skip

    np_ = probe["modules"].get("numpy", {})
    checks.append(_check(
        "numpy", np_.get("ok", False),
        f"numpy {np_['version']}" if np_.get("ok") else f"numpy does not import: {np_.get('error')}",
        _install_fix(profile, "numpy", None, python),
    ))  # fmt: skip

    for rt in runtimes:
        mod = probe["modules"].get(RUNTIME_MODULES[rt], {})
        spec = profile.versions.get(rt)
        fix = _install_fix(profile, rt, spec, python)
        role = "the profile's runtime" if rt == profile.runtime else "listed in versions"
        if not mod.get("ok"):
            checks.append(_check(f"runtime:{rt}", False, f"{rt} ({role}) does not import: {mod.get('error')}", fix))
        elif spec is None:
            checks.append(_check(f"runtime:{rt}", True, f"{rt} {mod['version']} ({role}; no version required)"))
        else:
            checks.append(_version_check(profile, f"runtime:{rt}", mod["version"], spec, fix, label=f"{rt} ({role})"))

    try:
        path = t._expand(default_workdir(profile))
        free = t.free_disk_bytes(path)
    except EdgesepError as e:
        checks.append(_check("disk", False, f"cannot read free space: {e}", "check the workdir in the profile"))
        return probe, checks
    need = bundle_size + DISK_MARGIN_BYTES
    what = f"the bundle ({bundle_size / 1e6:.1f} MB) + {DISK_MARGIN_BYTES / 1e6:.0f} MB margin"
    checks.append(_check(
        "disk", free >= need,
        f"{free / 1e6:,.0f} MB free in {path}; needs {need / 1e6:,.1f} MB ({what if bundle_size else 'margin only'})",
        f"free at least {(need - free) / 1e6:,.1f} MB in {path} on the device, or set `workdir` in "
        f"{_source(profile)} to a larger disk",
    ))  # fmt: skip
    return probe, checks


def _version_check(
    profile: DeviceProfile, name: str, version: str, spec: str, fix: str, *, label: str | None = None
) -> dict[str, Any]:
    label = label or name
    try:
        ok = version_satisfies(version, spec)
    except ValueError as e:
        return _check(name, False, f"versions.{name.split(':')[-1]} = {spec!r} is not a valid specifier ({e})",
                      f'fix it in {_source(profile)}: e.g. ">=1.18" or "10.3.*"')  # fmt: skip
    return _check(name, ok, f"{label} {version} {'satisfies' if ok else 'does not satisfy'} {_norm_spec(spec)}", fix)
