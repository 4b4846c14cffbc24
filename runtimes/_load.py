"""The API an IoT app embeds: ``load(bundle)`` picks an artifact, verifies it and returns a ``Session``.

numpy and the chosen backend only: this module imports neither torch, typer nor onnx (a test proves it), so it
runs on a device that has numpy and one runtime.

Nothing is hidden. The session runs exactly what the manifest describes: inputs are float32 NCHW pixels in [0, 1]
of the manifest's per-sample shape (``Session.input_spec``); normalization is inside the graph; nothing is
resized, cast, clipped or normalized on the way. A batch that is not float32, has the wrong shape or leaves
[0, 1] is refused with a typed error that says what to do. ``Session.run`` returns the artifact's float32 logits
(``Session.predict``: their argmax, as indices into ``Session.classes``).

Verification: ``verify=True`` (the default) checks every file of the bundle against its sha256 before anything
runs (``Bundle.verify``). Independently of ``verify``, the selected artifact is read once and hash-checked on the
bytes actually read; a backend that accepts bytes (ONNX Runtime) loads those very bytes, so the file cannot be
swapped between the check and the load.

Which artifact runs (``select_artifact``), in order:

1. ``artifact_id=``: that artifact; any other filter given must agree with it.
2. Filters. ``backend`` (one of ``list_backends()``) keeps the artifact kinds that backend runs
   (``ARTIFACT_KINDS``: onnxruntime runs ``onnx``; tvm ``tvm-lib``; tensorrt ``trt-onnx`` and ``onnx``).
   ``precision`` keeps that precision. ``target`` keeps artifacts built for that target plus portable ones
   (target ``"any"``); ``target=None`` means *this machine*: ``"host"`` and ``"any"`` artifacts only, so a library
   cross-compiled for ``rpi4`` is never picked by accident (pass ``target="rpi4"`` on the Pi).
3. The recorded winner. An artifact whose ``extra["preferred_for"]`` (``PREFERRED_KEY``; a list of target names)
   holds the requested target (``"host"`` when ``target=None``) is taken, if it passed the filters. The stage
   that measures backends on a target (compile / benchmark) writes this field; until one does, no bundle has it
   and rule 4 decides.
4. Otherwise the default order: backend onnxruntime, then tvm, then tensorrt (``BACKEND_ORDER``: ONNX Runtime
   first because TVM's unscheduled builds are measured 65-410x slower on CPUs); within a backend its artifact
   kinds in ``ARTIFACT_KINDS`` order; precision fp32, then fp16, then int8 (``PRECISION_ORDER``: never a lossy
   artifact unless asked or recorded as the winner); an artifact built for the exact target before a portable
   one. With no filters this is the fp32 ONNX on ONNX Runtime.

No match is a ``BundleLookupError`` listing every artifact of the bundle; two artifacts that tie under these rules
are one too, asking for ``artifact_id=``. ``Session.info()["selected_because"]`` says which rule chose.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesep.bundle import PRECISIONS, Artifact, Bundle, TensorSpec, open_bundle
from edgesep.errors import (
    BackendMissingError,
    BundleLookupError,
    ConfigError,
    IntegrityError,
    ShapeMismatchError,
    UnknownNameError,
    UnsafePathError,
)
from edgesep.runtimes._base import ARTIFACT_KINDS, Runtime, get_backend, list_backends

__all__ = [
    "BACKEND_ORDER",
    "HOST_TARGET",
    "PRECISION_ORDER",
    "PREFERRED_KEY",
    "Selection",
    "Session",
    "load",
    "select_artifact",
]

BACKEND_ORDER: tuple[str, ...] = ("onnxruntime", "tvm", "tensorrt")
PRECISION_ORDER: tuple[str, ...] = ("fp32", "fp16", "int8")
PREFERRED_KEY = "preferred_for"  # Artifact.extra[PREFERRED_KEY]: targets for which this artifact measured best
HOST_TARGET = "host"  # what target=None means: this machine
PORTABLE_TARGET = "any"
_INSTALL = {
    "onnxruntime": "Install it: pip install onnxruntime",
    "tvm": "Install it: pip install 'edgesep[tvm]' (Apache TVM, apache-tvm on PyPI)",
    "tensorrt": "TensorRT comes with JetPack on a Jetson (never pip-install it there)",
}


@dataclass(frozen=True)
class Selection:
    """The artifact ``select_artifact`` chose, the backend that runs it and the rule that chose it."""

    artifact: Artifact
    backend: str
    reason: str


def _describe(a: Artifact) -> str:
    return f"{a.id} (kind={a.kind}, precision={a.precision}, target={a.target}, file={a.file})"


def _listing(bundle: Bundle) -> str:
    return "; ".join(_describe(a) for a in bundle.manifest.artifacts) or "no artifacts"


def _preferred_for(a: Artifact) -> list[str]:
    v = a.extra.get(PREFERRED_KEY)
    if isinstance(v, str):
        return [v]
    return [t for t in v if isinstance(t, str)] if isinstance(v, list) else []


def _backend_for(a: Artifact, backends: tuple[str, ...]) -> str | None:
    """The first of ``backends`` that runs this artifact's kind."""
    return next((b for b in backends if a.kind in ARTIFACT_KINDS.get(b, ())), None)


def select_artifact(
    bundle: Bundle,
    backend: str | None = None,
    target: str | None = None,
    precision: str | None = None,
    *,
    artifact_id: str | None = None,
) -> Selection:
    """Pick the artifact ``load`` runs (rules in the module docstring).

    Args:
        bundle: an open bundle.
        backend: ``onnxruntime``, ``tvm`` or ``tensorrt``; None for any.
        target: a target name (``host``, ``rpi4``, ...); None for this machine (``host`` and ``any``).
        precision: ``fp32``, ``fp16`` or ``int8``; None for any.
        artifact_id: one artifact by id.
    Returns:
        The Selection (artifact, backend, reason).
    Raises:
        UnknownNameError: an unknown backend or precision.
        ConfigError: a target that is not a non-empty string.
        BundleLookupError: nothing matches, or two artifacts tie; the message lists the bundle's artifacts.
    """
    if backend is not None and backend not in list_backends():
        raise UnknownNameError("backend", backend, list_backends())
    if precision is not None and precision not in PRECISIONS:
        raise UnknownNameError("precision", precision, PRECISIONS)
    if target is not None and (not isinstance(target, str) or not target):
        raise ConfigError(f"target must be a non-empty target name such as 'host' or 'rpi4', got {target!r}")
    known = list_backends()
    default_order = (*(b for b in BACKEND_ORDER if b in known), *(b for b in known if b not in BACKEND_ORDER))
    backends = (backend,) if backend is not None else default_order
    want = target if target is not None else HOST_TARGET
    asked = {"backend": backend, "target": target, "precision": precision}
    asked_s = ", ".join(f"{k}={v!r}" for k, v in asked.items() if v is not None) or "no filters"

    def target_ok(a: Artifact) -> bool:
        return a.target in (want, PORTABLE_TARGET)

    if artifact_id is not None:
        a = bundle.artifact(id=artifact_id)  # BundleLookupError listing the artifacts
        runner = _backend_for(a, backends)
        wrong = [
            what
            for what, bad in (
                (f"backend {backend!r} does not run kind {a.kind!r}", runner is None),
                (f"its precision is {a.precision!r}", precision is not None and a.precision != precision),
                (f"its target is {a.target!r}", target is not None and not target_ok(a)),
            )
            if bad
        ]
        if wrong or runner is None:
            raise BundleLookupError(
                f"artifact {artifact_id!r} does not match {asked_s}: {'; '.join(wrong)}. Drop the conflicting "
                f"filter; bundle {bundle.name!r} has: {_listing(bundle)}"
            )
        return Selection(a, runner, f"artifact_id={artifact_id!r}")

    cands = [
        (a, b)
        for a in bundle.manifest.artifacts
        if (b := _backend_for(a, backends)) is not None
        and target_ok(a)
        and (precision is None or a.precision == precision)
    ]
    if not cands:
        hint = ""
        if target is None and any(a.target not in (HOST_TARGET, PORTABLE_TARGET) for a in bundle.manifest.artifacts):
            hint = " (target=None means this machine: pass target= to run an artifact built for another target)"
        raise BundleLookupError(
            f"no artifact in bundle {bundle.name!r} matches {asked_s}{hint}; it has: {_listing(bundle)}. "
            "Choose from those, or compile the missing artifact into the bundle (edgesep compile)"
        )

    winners = [(a, b) for a, b in cands if want in _preferred_for(a)]
    pool = winners or cands

    def rank(ab: tuple[Artifact, str]) -> tuple[int, int, int, int]:
        a, b = ab
        return (
            backends.index(b),
            ARTIFACT_KINDS[b].index(a.kind),
            PRECISION_ORDER.index(a.precision) if a.precision in PRECISION_ORDER else len(PRECISION_ORDER),
            0 if a.target == want else 1,
        )

    pool.sort(key=rank)
    best = [ab for ab in pool if rank(ab) == rank(pool[0])]
    if len(best) > 1:
        raise BundleLookupError(
            f"{len(best)} artifacts of bundle {bundle.name!r} tie for {asked_s}: "
            f"{'; '.join(_describe(a) for a, _ in best)}; pass artifact_id= to choose one"
        )
    a, b = best[0]
    if winners:
        reason = f"recorded winner for target {want!r} (artifact extra[{PREFERRED_KEY!r}])"
        why = a.extra.get("preferred_reason")  # written with the measurement by edgesep.runtimes.tvm_tune
        if isinstance(why, str) and why:
            reason += f": {why}"
    else:
        reason = (
            f"default order among {len(cands)} match(es) for {asked_s}: backend {' > '.join(backends)}, precision "
            f"{' > '.join(PRECISION_ORDER)}, exact target before 'any' (no recorded winner for {want!r})"
        )
    return Selection(a, b, reason)


def _read_checked(path: Path, artifact: Artifact) -> bytes:
    """The artifact's bytes, read once without following links, with the sha256 checked on those bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError as e:
        raise IntegrityError(artifact.file, "is missing from the bundle; fetch a complete copy or re-export it") from e
    except OSError as e:  # ELOOP: a symlink
        raise UnsafePathError(f"{artifact.file} cannot be opened safely ({e})") from e
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    actual = hashlib.sha256(data).hexdigest()
    if actual != artifact.sha256:
        raise IntegrityError(artifact.file, expected=artifact.sha256, actual=actual)
    return data


class Session:
    """A bundle artifact loaded into a runtime: float32 NCHW pixels in [0, 1] -> float32 logits.

    Made by ``load``; a context manager (leaving it closes the runtime and, when ``load`` opened the bundle, the
    bundle: a bundle extracted from a tar is deleted).

    Attributes:
        bundle: the open Bundle (eval sets, reference outputs, manifest).
        artifact: the manifest entry of the artifact that runs (id, file, kind, precision, target, sha256).
        backend: the backend's name.
        runtime: the backend's Runtime.
    """

    def __init__(
        self,
        bundle: Bundle,
        artifact: Artifact,
        runtime: Runtime,
        *,
        backend: str,
        reason: str = "",
        owns_bundle: bool = False,
    ):
        self.bundle, self.artifact, self.runtime, self.backend = bundle, artifact, runtime, backend
        self.reason = reason
        self._owns_bundle = owns_bundle
        self._closed = False
        # looked up once: run() is on the hot path of a batch-1 app
        self._sample_shape = tuple(int(d) for d in bundle.manifest.input.shape[1:])  # schema 1: ints
        self._range = bundle.manifest.input.range
        self._n_classes = len(bundle.manifest.classes)

    def __repr__(self) -> str:
        return (
            f"Session(bundle={self.bundle.name!r}, artifact={self.artifact.id!r}, backend={self.backend!r}, "
            f"input={list(self.input_spec.shape)})"
        )

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names; ``predict`` returns indices into this tuple."""
        return self.bundle.manifest.classes

    @property
    def input_spec(self) -> TensorSpec:
        """The manifest's input: name, shape (e.g. ``["batch", 1, 8, 8]``), dtype float32, range (0.0, 1.0)."""
        return self.bundle.manifest.input

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one input image."""
        return self._sample_shape

    def _check(self, x: object) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise ConfigError(
                f"expected a numpy array (N, C, H, W) float32 in [0, 1], got {type(x).__name__}; "
                "use np.asarray(x, dtype=np.float32)"
            )
        if x.dtype != np.float32:
            hint = " / 255 for 8-bit pixels" if np.issubdtype(x.dtype, np.integer) else ""
            raise ConfigError(
                f"input dtype is {x.dtype}; the bundle takes float32 in [0, 1]: x.astype(np.float32){hint}"
            )
        if x.ndim != 4 or x.shape[1:] != self._sample_shape:
            hint = " (one image? add the batch axis: x[None])" if x.shape == self._sample_shape else ""
            raise ShapeMismatchError(
                f"input has shape {list(x.shape)}; bundle {self.bundle.name!r} takes {list(self.input_spec.shape)} "
                f"(N, C, H, W){hint}. Convert images to C={self.sample_shape[0]} channels and resize to "
                f"{self.sample_shape[1]}x{self.sample_shape[2]}"
            )
        rng = self._range
        if x.size and rng is not None:
            lo, hi = float(x.min()), float(x.max())  # NaN propagates, and fails the test below
            if not (rng[0] <= lo and hi <= rng[1]):
                raise ConfigError(
                    f"input values span [{lo:g}, {hi:g}]; the bundle takes pixels in {list(rng)} (normalization "
                    "is inside the graph): scale 8-bit images by 1/255 and do not normalize"
                )
        return x

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch.

        Args:
            x: float32 (N, C, H, W) in [0, 1] with (C, H, W) = ``sample_shape``; any N.
        Returns:
            float32 (N, len(classes)).
        Raises:
            ConfigError: not a float32 numpy array, values outside [0, 1] (or NaN), or a closed session.
            ShapeMismatchError: the wrong rank or per-sample shape, or logits of the wrong shape from the artifact.
        """
        if self._closed:
            raise ConfigError(f"{self!r} is closed; load the bundle again")
        out = self.runtime.run(self._check(x))
        if out.shape != (len(x), self._n_classes):
            raise ShapeMismatchError(
                f"artifact {self.artifact.id} returned logits of shape {list(out.shape)} for {len(x)} inputs; the "
                f"bundle declares {len(self.classes)} classes. The artifact does not belong to this bundle: re-export"
            )
        return out

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Top-1 class indices (int64, (N,)) into ``classes``; same checks as ``run``."""
        return self.run(x).argmax(axis=1).astype(np.int64)

    def info(self) -> dict[str, Any]:
        """The runtime's info (backend, version, precision, target, threads, ...) plus bundle and artifact."""
        return {
            **self.runtime.info(),
            "bundle": self.bundle.name,
            "bundle_path": os.fspath(self.bundle.root),
            "artifact": self.artifact.id,
            "artifact_file": self.artifact.file,
            "artifact_kind": self.artifact.kind,
            "sha256": self.artifact.sha256,
            "selected_because": self.reason,
        }

    def close(self) -> None:
        """Release the runtime; a bundle that ``load`` opened from a tar is removed."""
        if self._closed:
            return
        self._closed = True
        self.runtime.close()
        if self._owns_bundle:
            self.bundle.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(
    bundle: Bundle | str | os.PathLike,
    backend: str | None = None,
    target: str | None = None,
    precision: str | None = None,
    *,
    artifact_id: str | None = None,
    threads: int | None = None,
    verify: bool = True,
    options: Mapping[str, Any] | None = None,
) -> Session:
    """Open a bundle, pick and verify an artifact, and load it into its backend.

    Args:
        bundle: a bundle directory, a ``.tar`` of one, or an open Bundle.
        backend: ``onnxruntime``, ``tvm`` or ``tensorrt``; None: see the selection rules (module docstring).
        target: the target the code runs on (``host``, ``rpi4``, ...); None: this machine (``host``/``any``).
        precision: ``fp32``, ``fp16`` or ``int8``; None: the recorded winner, else fp32 first.
        artifact_id: run exactly this artifact (e.g. ``"onnx-int8-any"``).
        threads: the backend's intra-op threads; None for its default.
        verify: check every file's sha256 first (the chosen artifact's hash is checked on the bytes read either way).
        options: backend-specific options, e.g. ``{"providers": ["CUDAExecutionProvider"]}`` for onnxruntime.
    Returns:
        The Session.
    Raises:
        BundleError: the bundle cannot be opened or does not verify (IntegrityError for a modified file).
        UnknownNameError, ConfigError, BundleLookupError: see ``select_artifact``; bad threads or options.
        BackendMissingError: the chosen backend's package is not installed (the message says what to install).
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be an integer >= 1 or None (the backend's default), got {threads!r}")
    owned = not isinstance(bundle, Bundle)
    b = open_bundle(bundle, verify=verify) if owned else bundle
    try:
        if not owned and verify:
            b.verify()
        sel = select_artifact(b, backend, target, precision, artifact_id=artifact_id)
        cls = get_backend(sel.backend)
        if not cls.available():
            other = ""
            if backend is None and sel.backend != "onnxruntime":
                other = "; or pass backend='onnxruntime' to run the portable ONNX, if the bundle has one"
            raise BackendMissingError(
                f"artifact {sel.artifact.id} needs the {sel.backend} backend, which is not installed here "
                f"(selected: {sel.reason}). {_INSTALL.get(sel.backend, 'Install it')}{other}"
            )
        path = b.path_of(sel.artifact)
        opts = dict(options or {})
        data = _read_checked(path, sel.artifact)  # hash-checked on the bytes read, with or without verify
        if getattr(cls, "accepts_model_bytes", False) and not sel.artifact.external_data:
            opts["model_bytes"] = data
        runtime = cls(
            path,
            precision=sel.artifact.precision,
            target=sel.artifact.target,
            threads=threads,
            input_name=b.manifest.input.name,
            **opts,
        )
    except BaseException:
        if owned:
            b.close()
        raise
    return Session(b, sel.artifact, runtime, backend=sel.backend, reason=sel.reason, owns_bundle=owned)
