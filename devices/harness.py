"""The host harness behind ``edgesep bench``: deploy a bundle to a device, run the on-device runner, collect results.

For each artifact that the device can run (or the one ``artifact_id`` names):

1. open the transport of the device's profile (``local`` — in-process python or the emulated arm64 root —,
   ``ssh`` or ``tvm-rpc``);
2. copy the device-side edgesep (numpy + runtimes + the runner) and the bundle to the device; the bundle upload is
   skipped file by file when the device's copy already has the same sha256;
3. run ``python -m edgesep.devices.runner BUNDLE --artifact ID --out RESULT`` there (for ``tvm-rpc`` the runner runs
   on the host and drives the library on the device through the RPC session: the measurements are the device's);
4. fetch the result file into ``out/`` as ``<bundle>__<artifact>__<device>.json`` — also when the runner stopped
   early, so an interrupted benchmark keeps what it measured (status ``partial``).

A result that is already complete in ``out/`` for the same artifact sha256, device and settings is kept and not
re-measured (``force=True`` re-measures): re-running an interrupted ``edgesep bench`` resumes where it stopped.

Which artifacts run (``select``):

- ``"winner"`` (the default): what an app would deploy there. Among the artifacts built for the device's target
  (or portable, target ``any``) whose backend is installed on the device (probed once per run), one per precision:
  the **recorded winner** for the target (``extra["preferred_for"]``, written with its measurement by
  ``edgesep compile --tune-trials``; the same rule ``edgesep.runtimes.load`` follows), else the profile's runtime
  first, then ``BACKEND_ORDER`` (ONNX Runtime, TVM, TensorRT), an artifact built for the exact target before a
  portable one. Every choice is logged with its reason and stored in the result (``artifact.selected_because``).
- ``"all"``: every such artifact (to compare runtimes and precisions side by side, as ``edgesep demo`` does).
"""

from __future__ import annotations

import contextlib
import json
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgesep.bundle import Artifact, Bundle, open_bundle
from edgesep.devices._profiles import DeviceProfile, load_profile
from edgesep.devices._result import RESULT_KIND, load_result
from edgesep.errors import BundleLookupError, ConfigError, EdgesepError
from edgesep.runtimes._base import ARTIFACT_KINDS

__all__ = ["SELECT_MODES", "BenchError", "BenchOptions", "bench", "device_artifacts", "result_name", "summarize"]

_BACKENDS = ("onnxruntime", "tvm", "tensorrt")
SELECT_MODES = ("winner", "all")
_PROBE = (
    "import importlib.util as u, importlib.metadata as md, json, platform, sys\n"
    "def v(*names):\n"
    "    for n in names:\n"
    "        try:\n"
    "            return md.version(n)\n"
    "        except Exception:\n"
    "            pass\n"
    "b = [m for m in ('onnxruntime', 'tvm', 'tensorrt') if u.find_spec(m)]\n"
    "dist = {'onnxruntime': ('onnxruntime', 'onnxruntime-gpu'), 'tvm': ('apache-tvm', 'tvm'), "
    "'tensorrt': ('tensorrt',)}\n"
    "print(json.dumps({'machine': platform.machine(), 'python': sys.version.split()[0], 'backends': b, "
    "'versions': {m: v(*dist[m]) for m in b}, 'numpy': bool(u.find_spec('numpy'))}))"
)


class BenchError(EdgesepError):
    """A benchmark that could not run on the device (the runner failed, the device lacks a runtime, ...)."""


@dataclass(frozen=True)
class BenchOptions:
    """The runner's settings (``python -m edgesep.devices.runner --help`` documents each)."""

    min_runs: int = 1000
    min_seconds: float = 30.0
    warmup: int = 20
    throughput_batch: int = 64
    throughput_seconds: float = 5.0
    square_queries: int = 0
    square_n: int = 100
    square_eps: float | None = None
    max_eval: int | None = None
    threads: int | None = None
    seed: int = 0

    def argv(self) -> list[str]:
        a = ["--min-runs", str(self.min_runs), "--min-seconds", str(self.min_seconds), "--warmup", str(self.warmup),
             "--throughput-batch", str(self.throughput_batch), "--throughput-seconds", str(self.throughput_seconds),
             "--seed", str(self.seed)]  # fmt: skip
        if self.square_queries:
            a += ["--square-queries", str(self.square_queries), "--square-n", str(self.square_n)]
            if self.square_eps is not None:
                a += ["--square-eps", str(self.square_eps)]
        if self.max_eval is not None:
            a += ["--max-eval", str(self.max_eval)]
        if self.threads is not None:
            a += ["--threads", str(self.threads)]
        return a

    def timeout_s(self, emulated: bool) -> float:
        """A generous wall-clock limit for one runner invocation (qemu runs ~35x slower than native)."""
        base = 300 + 3 * (self.min_seconds + self.throughput_seconds) + 0.5 * self.square_queries
        return base * (20 if emulated else 1)


def _target_name(profile: DeviceProfile) -> str:
    t = profile.target
    return t if isinstance(t, str) else profile.id


def result_name(bundle_name: str, artifact_id: str, device_id: str) -> str:
    """The result file's name in the output folder."""
    return f"{bundle_name}__{artifact_id}__{device_id}.json"


def _backend_for(a: Artifact, available: Sequence[str], preferred: str) -> str | None:
    order = [preferred, *[b for b in _BACKENDS if b != preferred]]
    return next((b for b in order if b in available and a.kind in ARTIFACT_KINDS.get(b, ())), None)


def device_artifacts(
    bundle: Bundle,
    profile: DeviceProfile,
    available: Sequence[str],
    artifact_id: str | None = None,
    select: str = "winner",
) -> list[tuple[Artifact, str, str]]:
    """(artifact, backend, why) triples to run on this device: the named one, the winner per precision, or all.

    ``select`` is ``"winner"`` or ``"all"`` (see the module docstring); ``artifact_id`` overrides it.

    Raises:
        ConfigError: an unknown ``select``.
        BundleLookupError: the named artifact is not in the bundle, or nothing in the bundle runs on this device.
    """
    if select not in SELECT_MODES:
        raise ConfigError(f"select must be one of {', '.join(SELECT_MODES)}, got {select!r}")
    tname = _target_name(profile)
    if artifact_id is not None:
        a = bundle.artifact(id=artifact_id)
        b = _backend_for(a, available, profile.runtime)
        if b is None:
            raise BenchError(
                f"artifact {a.id} (kind {a.kind}) needs a backend that {profile.id} lacks (it has "
                f"{list(available) or 'none'}); install one there, or pick another artifact"
            )
        return [(a, b, f"asked for (--artifact {a.id})")]
    pairs = []
    for a in bundle.manifest.artifacts:
        if a.target not in ("any", tname):
            continue
        b = _backend_for(a, available, profile.runtime)
        if b is not None:
            pairs.append((a, b))
    if not pairs:
        listing = "; ".join(f"{a.id} (kind={a.kind}, target={a.target})" for a in bundle.manifest.artifacts)
        raise BundleLookupError(
            f"nothing in bundle {bundle.name!r} runs on {profile.id} (target {tname}, backends "
            f"{list(available) or 'none'}); it has: {listing}. Compile for it: `edgesep compile BUNDLE --backend tvm "
            f"--target {tname}`, or install a runtime on the device"
        )
    if select == "all":
        return [(a, b, f"--all: every artifact that runs on {profile.id} (target {tname})") for a, b in pairs]
    return _winners(pairs, profile, tname)


def _winners(pairs: list[tuple[Artifact, str]], profile: DeviceProfile, tname: str) -> list[tuple[Artifact, str, str]]:
    """Per precision, the artifact an app deploys on this device, with the reason (module docstring)."""
    from edgesep.runtimes._load import BACKEND_ORDER, PRECISION_ORDER, _preferred_for

    order = [profile.runtime, *(b for b in (*BACKEND_ORDER, *_BACKENDS) if b != profile.runtime)]
    def prank(p: str) -> int:
        return PRECISION_ORDER.index(p) if p in PRECISION_ORDER else len(PRECISION_ORDER)

    precisions = sorted({a.precision for a, _ in pairs}, key=prank)
    out = []
    for prec in precisions:
        cands = [(a, b) for a, b in pairs if a.precision == prec]
        won = [(a, b) for a, b in cands if tname in _preferred_for(a)]
        pool = won or cands

        def rank(ab: tuple[Artifact, str]) -> tuple[int, int, int]:
            a, b = ab
            kinds = ARTIFACT_KINDS.get(b, ())
            return (order.index(b) if b in order else len(order), kinds.index(a.kind) if a.kind in kinds else 99,
                    0 if a.target == tname else 1)  # fmt: skip

        a, b = min(pool, key=rank)
        others = [x.id for x, _ in cands if x.id != a.id]
        if won:
            why = f"recorded winner for target {tname!r}"
            measured = a.extra.get("preferred_reason")
            if isinstance(measured, str) and measured:
                why += f": {measured}"
        else:
            rest = " > ".join(b for b in BACKEND_ORDER if b != profile.runtime)
            why = (f"no recorded winner for target {tname!r} ({prec}): the profile's runtime {profile.runtime} "
                   f"first, then {rest}; measure and record one with "
                   f"`edgesep compile BUNDLE --backend tvm --target {tname} --tune-trials N`")  # fmt: skip
        if others:
            why += f"; not run: {', '.join(others)} (pass --all to compare them)"
        out.append((a, b, why))
    return out


def _check_versions(profile: DeviceProfile, backends: set[str], found: dict[str, str | None]) -> None:
    """The device's runtime versions against the profile's ``versions`` specifiers (before anything runs)."""
    from edgesep.devices.check import version_satisfies

    for b in sorted(backends):
        spec = profile.versions.get(b)
        have = found.get(b)
        if not spec or not have:
            continue
        try:
            ok = version_satisfies(have, spec)
        except ValueError:
            continue  # an unparsable device version: `edgesep device check` reports it
        if not ok:
            raise BenchError(
                f"{profile.id} has {b} {have}, but its profile expects {spec}; install a matching {b} there "
                f"(see `edgesep device check {profile.id}`) or change the profile's [versions]"
            )


def _reusable(path: Path, artifact: Artifact, profile: DeviceProfile, options: BenchOptions) -> bool:
    if not path.is_file():
        return False
    try:
        r = load_result(path)
    except EdgesepError:
        return False
    return (
        r["status"] == "complete"
        and r["artifact"].get("sha256") == artifact.sha256
        and r["device"].get("profile") == profile.id
        and r.get("settings") == asdict(options)
    )


def _stamp(path: Path, options: BenchOptions, why: str | None = None) -> None:
    """Record the harness settings (so a complete result is reused only for the same) and why the harness ran this
    artifact (``artifact.selected_because``) in the fetched result."""
    from edgesep._io import atomic_write_json

    with contextlib.suppress(OSError, json.JSONDecodeError):
        r = json.loads(path.read_text())
        if isinstance(r, dict) and r.get("kind") == RESULT_KIND:
            r["settings"] = asdict(options)
            if why and isinstance(r.get("artifact"), dict):
                r["artifact"]["selected_because"] = why
            atomic_write_json(path, r)


def _run_rpc(bundle_path: Path, bundle: Bundle, art: Artifact, transport: Any, out_file: Path,
             options: BenchOptions, profile: DeviceProfile, log: Callable[[str], None]) -> None:  # fmt: skip
    """tvm-rpc: the runner runs here and drives the library on the device through the RPC session."""
    from edgesep.devices.runner import run_benchmark

    if art.kind != "tvm-lib":
        raise BenchError(f"{profile.id} is reached over tvm-rpc, which runs TVM libraries only; {art.id} is {art.kind}")
    engine = transport.engine(bundle.path_of(art))
    run_benchmark(
        bundle_path, out_file, artifact_id=art.id, engine=engine, log=log,
        device={"profile": profile.id, "arch": profile.arch, "emulated": profile.emulated, "transport": "tvm-rpc"},
        **_runner_kwargs(options),
    )  # fmt: skip


def _runner_kwargs(o: BenchOptions) -> dict[str, Any]:
    return {"min_runs": o.min_runs, "min_seconds": o.min_seconds, "warmup": o.warmup,
            "throughput_batch": o.throughput_batch, "throughput_seconds": o.throughput_seconds,
            "square_queries": o.square_queries, "square_n": o.square_n, "square_eps": o.square_eps,
            "max_eval": o.max_eval, "threads": o.threads, "seed": o.seed}  # fmt: skip


def _tail(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


def bench(
    bundle_path: str | Path,
    device: str | DeviceProfile,
    out_dir: str | Path,
    *,
    artifact_id: str | None = None,
    select: str = "winner",
    options: BenchOptions | None = None,
    trust_new_host: bool = False,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Run the bundle's artifacts on a device; returns the result files written into ``out_dir``.

    ``select``: ``"winner"`` (per precision, the artifact an app deploys there; the default) or ``"all"``;
    ``artifact_id`` runs that one artifact.

    Raises:
        ConfigError / UnknownNameError: a bad profile. BundleError: a bad bundle. BundleLookupError: no artifact to
        run. TransportError: the device cannot be reached or dropped the connection (re-run to resume).
        BenchError: the runner failed on the device (its partial result, if any, is still fetched).
    """
    from edgesep.devices.transports import TvmRpcTransport, open_transport

    log = log or (lambda line: print(line, file=sys.stderr))
    options = options or BenchOptions()
    profile = device if isinstance(device, DeviceProfile) else load_profile(device)
    bundle_path = Path(bundle_path)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; pass a folder for the result files")
    bundle = open_bundle(bundle_path, verify=True)
    written: list[Path] = []
    failures: list[str] = []
    with bundle, open_transport(profile, trust_new_host=trust_new_host, log=log) as transport:
        rpc = isinstance(transport, TvmRpcTransport)
        if rpc:
            available = ["tvm"]
        else:
            probe = json.loads(transport.run(transport.python_argv("-c", _PROBE), timeout=300).stdout.strip()
                               .splitlines()[-1])  # fmt: skip
            if not probe["numpy"]:
                raise BenchError(f"{profile.id} has no numpy for {profile.python}; install it there: pip install numpy")
            available = probe["backends"]
            if probe["machine"] not in (profile.arch, "arm64" if profile.arch == "aarch64" else profile.arch):
                raise BenchError(
                    f"{profile.id} reports machine {probe['machine']!r} but its profile says arch {profile.arch!r}; "
                    f"fix the profile's arch (or the address), see `edgesep device check {profile.id}`"
                )
        pairs = device_artifacts(bundle, profile, available, artifact_id, select)
        for art, _, why in pairs:
            log(f"{art.id} on {profile.id}: selected because {why}")
        if not rpc:
            _check_versions(profile, {b for _, b, _ in pairs}, probe.get("versions", {}))
        out_dir.mkdir(parents=True, exist_ok=True)
        remote_bundle = pythonpath = None
        for art, backend, why in pairs:
            dest = out_dir / result_name(bundle.name, art.id, profile.id)
            if not force and _reusable(dest, art, profile, options):
                log(f"{art.id} on {profile.id}: complete result already in {dest} (same artifact and settings); kept")
                written.append(dest)
                continue
            log(f"{art.id} on {profile.id} ({backend}): running")
            if rpc:
                try:
                    _run_rpc(bundle_path, bundle, art, transport, dest, options, profile, log)
                finally:
                    if dest.is_file():
                        _stamp(dest, options, why)
                        written.append(dest)
                continue
            if remote_bundle is None:
                pythonpath = transport.install_edgesep()
                remote_bundle, uploaded = transport.put_bundle(Path(bundle.root))
                log(f"bundle on {profile.id}: {remote_bundle} ({'uploaded' if uploaded else 'unchanged, not re-sent'})")
            # one name per run: concurrent benches of the same bundle on one device never share a result file
            remote_out = f"{transport.workdir()}/results/{uuid.uuid4().hex[:12]}-{dest.name}"
            argv = transport.python_argv(
                "-m", "edgesep.devices.runner", remote_bundle, "--artifact", art.id, "--backend", backend,
                "--out", remote_out, "--profile-id", profile.id, "--transport", profile.transport,
                "--emulated" if profile.emulated else "--no-emulated", *options.argv(),
            )  # fmt: skip
            r = transport.run(argv, timeout=options.timeout_s(profile.emulated), env={"PYTHONPATH": pythonpath},
                              check=False)  # fmt: skip
            fetched = False
            if transport.sha256(remote_out) is not None:
                transport.get_file(remote_out, dest)
                _stamp(dest, options, why)
                written.append(dest)
                fetched = True
            if r.returncode != 0:
                where = f"; its partial result is in {dest}" if fetched else ""
                failures.append(
                    f"{art.id}: the runner exited with {r.returncode}: {_tail(r.stderr or r.stdout)}{where}"
                )
                log(f"{art.id} on {profile.id}: FAILED ({failures[-1]})")
            else:
                log(f"{art.id} on {profile.id}: done -> {dest}")
    if failures:
        raise BenchError(f"{len(failures)} of {len(pairs)} run(s) failed on {profile.id}: " + "; ".join(failures))
    return written


def summarize(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """One row per result file for the terminal table: artifact, backend, accuracies, numerics, latency."""
    rows = []
    for p in paths:
        r = load_result(p)
        acc = r["accuracy"]
        lat = r["latency"] or {}
        adv = acc["adversarial"][0] if acc["adversarial"] else None
        sq = acc["query"][0] if acc["query"] else None
        rows.append({
            "file": str(p), "status": r["status"], "bundle": r["bundle"].get("name"), "artifact": r["artifact"]["id"],
            "backend": r["artifact"]["backend"], "precision": r["artifact"]["precision"],
            "selected_because": r["artifact"].get("selected_because"), "device": r["device"].get("profile"),
            "emulated": r["device"].get("emulated", False),
            "clean": acc["clean"]["accuracy"] if acc["clean"] else None,
            "transferred": adv["accuracy"] if adv else None,
            "transferred_attack": f"{adv['attack']} {adv['norm']} eps={adv['eps']:g}" if adv else None,
            "square": sq["accuracy"] if sq else None,
            "square_attack": f"square {sq['norm']} eps={sq['eps']:g} q={sq['queries']}" if sq else None,
            "top1_agreement": (r["numerics"] or {}).get("top1_agreement"),
            "p50_ms": lat.get("p50"), "p99_ms": lat.get("p99"),
            "throughput": (r["throughput"] or {}).get("samples_per_s"),
        })  # fmt: skip
    return rows
