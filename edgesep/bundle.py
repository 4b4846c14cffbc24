"""Bundles: the one directory (``NAME.bundle/``, optionally a ``.tar`` of it) that travels from export to device.

A bundle holds the compiled artifacts, the evaluation sets and the reference outputs of one model, described by
``manifest.json``. Everything after export reads and writes bundles only, so each stage can run on another
machine. The manifest is the commit point: files are written first (atomically), then the manifest that lists
them, so an interrupted write leaves a bundle that fails verification loudly instead of one that is silently
wrong.

Reading is numpy-only (a device has neither torch nor onnx): this module imports neither. ``onnx`` is imported
lazily, and only by the optional deep check (``Bundle.verify(deep_onnx=True)``).

Reading refuses, with a typed ``BundleError``: a file whose sha256 or size differs from the manifest, a missing
or unlisted file, a manifest path that is absolute or leaves the bundle, any symlink or special file anywhere in
the bundle (even one pointing inside: links make "inside" depend on the machine), an unknown schema version and a
malformed manifest. The manifest itself is not signed: verification proves a bundle is self-consistent, not who
wrote it; fetch bundles over an authenticated channel.

Schema (version 1), beyond the design card: every file entry also has ``size``; an ONNX artifact whose weights
live in external data files lists them in ``external_data`` [{file, sha256, size}] so that they are hashed like
everything else; ``reports`` maps a name to {file, sha256, size} rather than to a bare file name, for the same
reason; ``reference`` is {file, sha256, size, n}.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import os
import re
import shutil
import stat
import tarfile
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edgesep import __version__
from edgesep._io import atomic_write_bytes, sha256_file
from edgesep.errors import (
    BundleContentError,
    BundleError,
    BundleLookupError,
    ConfigError,
    IntegrityError,
    ManifestError,
    SchemaVersionError,
    ShapeMismatchError,
    UnsafePathError,
)

__all__ = [
    "ARTIFACT_KINDS",
    "EVAL_KINDS",
    "MANIFEST_NAME",
    "PRECISIONS",
    "READABLE_SCHEMA_VERSIONS",
    "SCHEMA_VERSION",
    "Artifact",
    "Bundle",
    "EvalSet",
    "FileRef",
    "Manifest",
    "Reference",
    "TensorSpec",
    "create_bundle",
    "open_bundle",
    "open_bundle_for_writing",
    "pack",
]

SCHEMA_VERSION = 1
READABLE_SCHEMA_VERSIONS: tuple[int, ...] = (1,)
MANIFEST_NAME = "manifest.json"
ARTIFACT_KINDS = ("onnx", "tvm-lib", "trt-onnx")
ONNX_KINDS = ("onnx", "trt-onnx")  # artifacts that are ONNX files (the deep check parses them)
PRECISIONS = ("fp32", "fp16", "int8")
EVAL_KINDS = ("clean", "adversarial")
PREPROCESSING = {"normalization": "inside_graph", "layout": "NCHW"}
INPUT_RANGE = (0.0, 1.0)  # inputs are pixels in [0, 1]; normalization is inside the graph
REFERENCE_FILE = "reference.npz"

# Bounds on untrusted input, so that a hostile manifest or tar cannot exhaust memory or disk.
MAX_MANIFEST_BYTES = 16 << 20
MAX_TAR_BYTES = 8 << 30
MAX_TAR_MEMBERS = 100_000

_SHA256 = re.compile(r"[0-9a-f]{64}")
_REPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# --------------------------------------------------------------------------------------------------------------
# Field validation. Each helper names the offending field (``artifacts[2].sha256``) so a broken manifest can be
# fixed without reading this code.


def _type_name(v: object) -> str:
    return "null" if v is None else type(v).__name__


def _obj(v: object, where: str, required: Sequence[str], optional: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ManifestError(f"{where} must be a JSON object, got {_type_name(v)}")
    missing = [k for k in required if k not in v]
    if missing:
        raise ManifestError(f"{where}: missing required field(s) {missing}")
    unknown = sorted(str(k) for k in set(v) - set(required) - set(optional))
    if unknown:
        # unknown fields are refused, not ignored: a new field means a new schema version
        raise ManifestError(f"{where}: unknown field(s) {unknown}; known: {sorted([*required, *optional])}")
    return v


def _str(v: object, where: str, choices: Sequence[str] | None = None) -> str:
    if not isinstance(v, str) or not v:
        raise ManifestError(f"{where} must be a non-empty string, got {_type_name(v)} {v!r:.80}")
    if choices is not None and v not in choices:
        raise ManifestError(f"{where} is {v!r}; expected one of {list(choices)}")
    return v


def _opt_str(v: object, where: str) -> str | None:
    return None if v is None else _str(v, where)


def _int(v: object, where: str, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ManifestError(f"{where} must be an integer >= {minimum}, got {_type_name(v)} {v!r:.80}")
    return v


def _num(v: object, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ManifestError(f"{where} must be a finite number, got {_type_name(v)} {v!r:.80}")
    return float(v)


def _sha(v: object, where: str) -> str:
    if not isinstance(v, str) or not _SHA256.fullmatch(v):
        raise ManifestError(f"{where} must be a sha256 as 64 lowercase hex digits, got {v!r:.80}")
    return v


def _json_dict(v: object, where: str) -> dict[str, Any]:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise ManifestError(f"{where} must be a JSON object with string keys, got {_type_name(v)}")
    return json.loads(_dumps(v, where))  # a deep copy that is also proof the value is plain JSON


def _dumps(obj: object, where: str, indent: int | None = None) -> str:
    try:
        # allow_nan=False: NaN / Infinity are not JSON, and other readers would refuse the file
        return json.dumps(obj, indent=indent, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ManifestError(f"{where} is not plain JSON (dict/list/str/number/bool/null, finite numbers): {e}") from e


def _rel_path(v: object, where: str) -> str:
    """A bundle-relative POSIX path in normal form; refuses absolute paths, ``..``, backslashes and NUL."""
    if not isinstance(v, str) or not v:
        raise ManifestError(f"{where} must be a non-empty relative path, got {_type_name(v)} {v!r:.80}")
    p = PurePosixPath(v)
    if (
        p.is_absolute()
        or "\\" in v  # a Windows separator would resolve differently on another machine
        or "\0" in v
        or any(part in ("..", ".") for part in v.split("/"))
        or p.as_posix() != v  # "a//b", "a/", "./a": one file, one spelling
        or v == MANIFEST_NAME
    ):
        raise UnsafePathError(
            f"{where} is {v!r}: bundle files must be relative paths inside the bundle, in normal form, without "
            f"'..', and other than {MANIFEST_NAME}; the bundle may have been tampered with"
        )
    return v


def _parse_created(v: object, where: str) -> str:
    s = _str(v, where)
    try:
        # Python 3.10's fromisoformat does not accept the "Z" suffix
        t = _dt.datetime.fromisoformat(s[:-1] + "+00:00" if s.endswith("Z") else s)
    except ValueError:
        t = None
    if t is None or t.utcoffset() != _dt.timedelta(0):
        raise ManifestError(f"{where} must be an ISO 8601 UTC time such as 2024-05-01T12:00:00Z, got {s!r:.80}")
    return s


def _now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------------------------
# Schema


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (ints, or a string for a symbolic dim such as ``"batch"``), dtype and value range of a tensor."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    range: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.range is not None:
            d["range"] = list(self.range)
        return d

    @classmethod
    def from_dict(cls, d: object, where: str = "tensor", *, is_input: bool = False) -> TensorSpec:
        """Validate and build; an input must declare ``range`` [0, 1] (normalization is inside the graph).

        Raises:
            ManifestError: naming the field.
        """
        d = _obj(d, where, ["name", "shape", "dtype", "range"] if is_input else ["name", "shape", "dtype"], ["range"])
        shape = d["shape"]
        if not isinstance(shape, list) or not shape:
            raise ManifestError(f"{where}.shape must be a non-empty list, got {_type_name(shape)}")
        dims: list[int | str] = []
        for i, dim in enumerate(shape):
            dims.append(
                _str(dim, f"{where}.shape[{i}]") if isinstance(dim, str) else _int(dim, f"{where}.shape[{i}]", 1)
            )
        rng = d.get("range")
        if rng is not None:
            if not isinstance(rng, list) or len(rng) != 2:
                raise ManifestError(f"{where}.range must be a list [low, high], got {rng!r:.80}")
            rng = (_num(rng[0], f"{where}.range[0]"), _num(rng[1], f"{where}.range[1]"))
        if is_input:
            if rng != INPUT_RANGE:
                raise ManifestError(
                    f"{where}.range is {rng}; schema {SCHEMA_VERSION} inputs are pixels in {list(INPUT_RANGE)} "
                    "(normalization belongs inside the graph)"
                )
            if len(dims) != 4:
                raise ManifestError(f"{where}.shape {dims} must have 4 dims (layout NCHW)")
        return cls(
            name=_str(d["name"], f"{where}.name"),
            shape=tuple(dims),
            dtype=_str(d["dtype"], f"{where}.dtype", ["float32"]),
            range=rng,
        )


@dataclass(frozen=True)
class FileRef:
    """A file in the bundle with its expected sha256 and size (reports, ONNX external data)."""

    file: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, d: object, where: str = "file") -> FileRef:
        d = _obj(d, where, ["file", "sha256", "size"])
        return cls(
            _rel_path(d["file"], f"{where}.file"),
            _sha(d["sha256"], f"{where}.sha256"),
            _int(d["size"], f"{where}.size"),
        )


@dataclass(frozen=True)
class Artifact:
    """A compiled model: ONNX (fp32 / int8 QDQ), a TVM library for a target, or the ONNX TensorRT builds from.

    ``id`` is unique in a bundle (by default ``kind-precision-target``); ``extra`` is free-form JSON for the
    producing tool (e.g. TVM target string, quantization settings).
    """

    id: str
    file: str
    kind: str
    precision: str
    target: str
    sha256: str
    size: int
    extra: dict[str, Any] = field(default_factory=dict)
    external_data: tuple[FileRef, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "file": self.file,
            "kind": self.kind,
            "precision": self.precision,
            "target": self.target,
            "sha256": self.sha256,
            "size": self.size,
            "extra": json.loads(json.dumps(self.extra)),
        }
        if self.external_data:
            d["external_data"] = [r.to_dict() for r in self.external_data]
        return d

    @classmethod
    def from_dict(cls, d: object, where: str = "artifact") -> Artifact:
        d = _obj(d, where, ["id", "file", "kind", "precision", "target", "sha256", "size", "extra"], ["external_data"])
        ext = d.get("external_data", [])
        if not isinstance(ext, list):
            raise ManifestError(f"{where}.external_data must be a list, got {_type_name(ext)}")
        return cls(
            id=_str(d["id"], f"{where}.id"),
            file=_rel_path(d["file"], f"{where}.file"),
            kind=_str(d["kind"], f"{where}.kind", ARTIFACT_KINDS),
            precision=_str(d["precision"], f"{where}.precision", PRECISIONS),
            target=_str(d["target"], f"{where}.target"),
            sha256=_sha(d["sha256"], f"{where}.sha256"),
            size=_int(d["size"], f"{where}.size"),
            extra=_json_dict(d["extra"], f"{where}.extra"),
            external_data=tuple(FileRef.from_dict(r, f"{where}.external_data[{i}]") for i, r in enumerate(ext)),
        )


@dataclass(frozen=True)
class EvalSet:
    """An evaluation set ``.npz`` (keys ``x`` float32 NCHW in [0, 1], ``y`` int64 labels): clean or adversarial.

    For an adversarial set, ``attack``/``norm``/``eps`` (and ``steps`` for iterative attacks) say how it was made
    and ``crafted_on`` on which model (e.g. ``"torch-fp32"``), which separates white-box from transferred results.
    """

    id: str
    file: str
    kind: str
    n: int
    sha256: str
    size: int
    attack: str | None = None
    norm: str | None = None
    eps: float | None = None
    steps: int | None = None
    crafted_on: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "file": self.file,
            "kind": self.kind,
            "attack": self.attack,
            "norm": self.norm,
            "eps": self.eps,
            "steps": self.steps,
            "crafted_on": self.crafted_on,
            "n": self.n,
            "sha256": self.sha256,
            "size": self.size,
        }

    @classmethod
    def from_dict(cls, d: object, where: str = "eval set") -> EvalSet:
        keys = ["id", "file", "kind", "attack", "norm", "eps", "steps", "crafted_on", "n", "sha256", "size"]
        d = _obj(d, where, keys)
        e = cls(
            id=_str(d["id"], f"{where}.id"),
            file=_rel_path(d["file"], f"{where}.file"),
            kind=_str(d["kind"], f"{where}.kind", EVAL_KINDS),
            attack=_opt_str(d["attack"], f"{where}.attack"),
            norm=_opt_str(d["norm"], f"{where}.norm"),
            eps=None if d["eps"] is None else _num(d["eps"], f"{where}.eps"),
            steps=None if d["steps"] is None else _int(d["steps"], f"{where}.steps"),
            crafted_on=_opt_str(d["crafted_on"], f"{where}.crafted_on"),
            n=_int(d["n"], f"{where}.n", 1),
            sha256=_sha(d["sha256"], f"{where}.sha256"),
            size=_int(d["size"], f"{where}.size"),
        )
        # an adversarial accuracy is meaningless without the threat model; a clean one must not claim one
        if e.kind == "adversarial" and None in (e.attack, e.norm, e.eps):
            raise ManifestError(f"{where}: an adversarial eval set needs attack, norm and eps")
        if e.kind == "clean" and (e.attack, e.norm, e.eps, e.steps) != (None, None, None, None):
            raise ManifestError(f"{where}: a clean eval set has attack, norm, eps and steps null")
        if e.eps is not None and e.eps < 0:
            raise ManifestError(f"{where}.eps must be >= 0, got {e.eps}")
        return e


@dataclass(frozen=True)
class Reference:
    """Reference inputs and fp32 outputs (``reference.npz``: ``x``, ``logits``) for on-device numeric checks."""

    file: str
    sha256: str
    size: int
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "size": self.size, "n": self.n}

    @classmethod
    def from_dict(cls, d: object, where: str = "reference") -> Reference:
        d = _obj(d, where, ["file", "sha256", "size", "n"])
        return cls(
            file=_rel_path(d["file"], f"{where}.file"),
            sha256=_sha(d["sha256"], f"{where}.sha256"),
            size=_int(d["size"], f"{where}.size"),
            n=_int(d["n"], f"{where}.n", 1),
        )


_MANIFEST_KEYS = [
    "schema_version", "name", "edgesep_version", "created", "input", "output", "classes", "preprocessing",
    "artifacts", "eval_sets", "reference", "provenance", "reports",
]  # fmt: skip


@dataclass(frozen=True)
class Manifest:
    """The parsed, validated ``manifest.json`` of a bundle."""

    name: str
    input: TensorSpec
    output: TensorSpec
    classes: tuple[str, ...]
    provenance: dict[str, Any]
    schema_version: int = SCHEMA_VERSION
    edgesep_version: str = __version__
    created: str = field(default_factory=_now_utc)
    preprocessing: dict[str, str] = field(default_factory=lambda: dict(PREPROCESSING))
    artifacts: tuple[Artifact, ...] = ()
    eval_sets: tuple[EvalSet, ...] = ()
    reference: Reference | None = None
    reports: dict[str, FileRef] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "edgesep_version": self.edgesep_version,
            "created": self.created,
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "classes": list(self.classes),
            "preprocessing": dict(self.preprocessing),
            "artifacts": [a.to_dict() for a in self.artifacts],
            "eval_sets": [e.to_dict() for e in self.eval_sets],
            "reference": None if self.reference is None else self.reference.to_dict(),
            "provenance": json.loads(json.dumps(self.provenance)),
            "reports": {k: r.to_dict() for k, r in self.reports.items()},
        }

    @classmethod
    def from_dict(cls, d: object, source: str = "manifest") -> Manifest:
        """Validate a decoded manifest and build it.

        Args:
            d: the decoded JSON.
            source: prefixed to every error (the manifest's path).
        Raises:
            SchemaVersionError: for a schema version this edgesep does not read (checked before anything else,
                so a newer manifest is reported as newer, not as malformed).
            UnsafePathError: for a file entry that is absolute or contains ``..``.
            ManifestError: for anything else, naming the field.
        """
        if not isinstance(d, dict):
            raise ManifestError(f"{source} must hold a JSON object, got {_type_name(d)}")
        if "schema_version" not in d:
            raise ManifestError(f"{source}: missing required field 'schema_version'; this is not a bundle manifest")
        version = d["schema_version"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise ManifestError(
                f"{source}.schema_version must be an integer, got {_type_name(version)} {version!r:.80}"
            )
        if version not in READABLE_SCHEMA_VERSIONS:
            raise SchemaVersionError(version, READABLE_SCHEMA_VERSIONS, source)
        _obj(d, source, _MANIFEST_KEYS)

        classes = d["classes"]
        if not isinstance(classes, list) or not classes:
            raise ManifestError(f"{source}.classes must be a non-empty list of names, got {_type_name(classes)}")
        prep = _json_dict(d["preprocessing"], f"{source}.preprocessing")
        if prep != PREPROCESSING:
            raise ManifestError(f"{source}.preprocessing is {prep}; schema {SCHEMA_VERSION} requires {PREPROCESSING}")
        for key in ("artifacts", "eval_sets"):
            if not isinstance(d[key], list):
                raise ManifestError(f"{source}.{key} must be a list, got {_type_name(d[key])}")
        reports = d["reports"]
        if not isinstance(reports, dict):
            raise ManifestError(f"{source}.reports must be an object {{name: {{file, sha256, size}}}}")
        for name in reports:
            if not _REPORT_NAME.fullmatch(name):
                raise ManifestError(f"{source}.reports: invalid report name {name!r:.80}")

        m = cls(
            schema_version=version,
            name=_str(d["name"], f"{source}.name"),
            edgesep_version=_str(d["edgesep_version"], f"{source}.edgesep_version"),
            created=_parse_created(d["created"], f"{source}.created"),
            input=TensorSpec.from_dict(d["input"], f"{source}.input", is_input=True),
            output=TensorSpec.from_dict(d["output"], f"{source}.output"),
            classes=tuple(_str(c, f"{source}.classes[{i}]") for i, c in enumerate(classes)),
            preprocessing=prep,
            artifacts=tuple(Artifact.from_dict(a, f"{source}.artifacts[{i}]") for i, a in enumerate(d["artifacts"])),
            eval_sets=tuple(EvalSet.from_dict(e, f"{source}.eval_sets[{i}]") for i, e in enumerate(d["eval_sets"])),
            reference=None if d["reference"] is None else Reference.from_dict(d["reference"], f"{source}.reference"),
            provenance=_json_dict(d["provenance"], f"{source}.provenance"),
            reports={k: FileRef.from_dict(v, f"{source}.reports.{k}") for k, v in reports.items()},
        )
        m._check_consistency(source)
        return m

    def _check_consistency(self, source: str) -> None:
        for what, ids in (("artifact", [a.id for a in self.artifacts]), ("eval set", [e.id for e in self.eval_sets])):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            if dup:
                raise ManifestError(f"{source}: duplicate {what} id(s) {dup}")
        files = [f.file for f in self.files()]
        dup = sorted({f for f in files if files.count(f) > 1})
        if dup:
            # two entries with one file cannot both hold their own content
            raise ManifestError(f"{source}: file(s) {dup} listed by more than one entry")
        last = self.output.shape[-1]
        if isinstance(last, int) and last != len(self.classes):
            raise ManifestError(
                f"{source}: output shape {list(self.output.shape)} ends in {last} but there are "
                f"{len(self.classes)} classes"
            )

    def files(self) -> list[FileRef]:
        """Every file the manifest lists (artifacts, their external data, eval sets, reference, reports)."""
        refs: list[FileRef] = []
        for a in self.artifacts:
            refs.append(FileRef(a.file, a.sha256, a.size))
            refs.extend(a.external_data)
        refs.extend(FileRef(e.file, e.sha256, e.size) for e in self.eval_sets)
        if self.reference is not None:
            refs.append(FileRef(self.reference.file, self.reference.sha256, self.reference.size))
        refs.extend(self.reports.values())
        return refs


# --------------------------------------------------------------------------------------------------------------
# Reading


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            # parsers disagree on which duplicate wins; a manifest that means two things is refused
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _loads(data: bytes, source: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ManifestError(f"{source} is not valid JSON ({e}); the bundle is damaged: re-export or re-fetch it") from e


def _read_manifest(root: Path) -> Manifest:
    mp = root / MANIFEST_NAME
    if mp.is_symlink():
        raise UnsafePathError(f"{mp} is a symlink; a bundle holds no links")
    if not mp.is_file():
        raise BundleError(f"{root} is not a bundle: it has no {MANIFEST_NAME}")
    if mp.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{mp} is larger than {MAX_MANIFEST_BYTES} bytes; refusing to parse it")
    return Manifest.from_dict(_loads(mp.read_bytes(), str(mp)), source=str(mp))


def _scan_tree(root: Path) -> set[str]:
    """Every regular file under ``root`` (bundle-relative POSIX paths); refuses symlinks and special files."""
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames) + sorted(filenames):
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                # refused even when it points inside: what a link resolves to depends on the machine it lands on
                raise UnsafePathError(f"{rel} in bundle {root} is a symlink; bundles must not contain links")
            if stat.S_ISREG(mode):
                found.add(rel)
            elif not stat.S_ISDIR(mode):
                raise UnsafePathError(f"{rel} in bundle {root} is not a regular file or directory")
    return found


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# The array checks below return (error type for a writer, message) or None. The writer raises that type (the
# caller passed bad arrays); a reader raises BundleContentError (the bundle holds bad arrays).
_Problem = tuple[type, str]


def _image_problem(x: object, spec: TensorSpec) -> _Problem | None:
    """Why ``x`` is not a batch of model inputs for ``spec`` (float32, spec's shape past the batch, in range)."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        return ConfigError, f"x must be a float32 numpy array, got {getattr(x, 'dtype', type(x).__name__)}"
    if x.ndim != len(spec.shape) or x.shape[0] < 1:
        return ShapeMismatchError, f"x has shape {x.shape}; expected {list(spec.shape)} with at least one sample"
    for want, got in zip(spec.shape[1:], x.shape[1:], strict=True):
        if isinstance(want, int) and want != got:
            return ShapeMismatchError, f"x has shape {x.shape}; the model input is {list(spec.shape)}"
    lo, hi = spec.range if spec.range is not None else INPUT_RANGE
    if not np.isfinite(x).all() or x.min() < lo or x.max() > hi:
        return ConfigError, f"x must be finite and within [{lo}, {hi}]; clip adversarial examples to the input range"
    return None


def _labels_problem(y: object, n: int, num_classes: int) -> _Problem | None:
    if not isinstance(y, np.ndarray) or y.dtype != np.int64:
        return ConfigError, f"y must be an int64 numpy array, got {getattr(y, 'dtype', type(y).__name__)}"
    if y.shape != (n,):
        return ShapeMismatchError, f"y has shape {y.shape}; expected ({n},), one label per sample"
    if y.min() < 0 or y.max() >= num_classes:
        return ConfigError, f"y holds labels outside [0, {num_classes}) (there are {num_classes} classes)"
    return None


def _logits_problem(logits: object, n: int, spec: TensorSpec) -> _Problem | None:
    if not isinstance(logits, np.ndarray) or logits.dtype != np.float32:
        return ConfigError, f"logits must be float32, got {getattr(logits, 'dtype', type(logits).__name__)}"
    want = [n, *spec.shape[1:]]
    if logits.shape[:1] != (n,) or logits.ndim != len(want):
        return ShapeMismatchError, f"logits have shape {logits.shape}; expected {want}"
    if any(isinstance(w, int) and w != g for w, g in zip(want, logits.shape, strict=True)):
        return ShapeMismatchError, f"logits have shape {logits.shape}; expected {want}"
    if not np.isfinite(logits).all():
        return ConfigError, "logits must be finite"
    return None


def _load_npz(data: bytes, keys: tuple[str, ...], source: str) -> dict[str, np.ndarray]:
    try:
        # allow_pickle=False: an object array in an .npz would execute code on load
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if sorted(z.files) != sorted(keys):
                raise BundleContentError(f"{source} holds arrays {sorted(z.files)}; expected {sorted(keys)}")
            return {k: z[k] for k in keys}
    except BundleError:
        raise
    except Exception as e:  # a damaged .npz raises zipfile, OSError, ValueError, EOFError, ...
        raise BundleContentError(f"{source} is not a readable .npz ({type(e).__name__}: {e})") from e


class Bundle:
    """An open bundle: its root directory and manifest, the readers and the writers.

    Create one with ``create_bundle`` or ``open_bundle``. A bundle opened from a ``.tar`` lives in a temporary
    directory that ``close()`` (or leaving a ``with`` block, or garbage collection) removes. Writers are not safe
    against a second process writing the same bundle at the same time.
    """

    def __init__(self, root: Path, manifest: Manifest, *, owned_dir: Path | None = None):
        self.root = root
        self.manifest = manifest
        self._finalizer = (
            weakref.finalize(self, shutil.rmtree, owned_dir, ignore_errors=True) if owned_dir is not None else None
        )

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"Bundle({str(self.root)!r}, name={m.name!r}, artifacts={[a.id for a in m.artifacts]}, "
            f"eval_sets={[e.id for e in m.eval_sets]})"
        )

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary directory of a bundle opened from a tar; a no-op for a directory bundle."""
        if self._finalizer is not None:
            self._finalizer()

    @property
    def name(self) -> str:
        return self.manifest.name

    # ---- paths and verification

    def path_of(self, entry: Artifact | EvalSet | Reference | FileRef | str) -> Path:
        """The absolute path of a listed file, checked to stay inside the bundle without passing a symlink.

        Args:
            entry: a manifest entry, or a bundle-relative path.
        Raises:
            UnsafePathError: if the path is absolute, uses ``..``, crosses a symlink or resolves outside.
        """
        rel = _rel_path(entry if isinstance(entry, str) else entry.file, "file")
        p = self.root
        for part in PurePosixPath(rel).parts:
            p = p / part
            if p.is_symlink():
                raise UnsafePathError(f"{rel}: {p.relative_to(self.root)} is a symlink; bundles must not contain links")
        if not p.resolve().is_relative_to(self.root):  # defence in depth: the checks above should make this moot
            raise UnsafePathError(f"{rel} resolves outside the bundle {self.root}")
        return p

    def verify(self, deep_onnx: bool = False) -> list[str]:
        """Check every file against the manifest: no links or special files, nothing missing or unlisted, every
        size and sha256 as recorded.

        Args:
            deep_onnx: also parse each ONNX artifact and check its external data (needs ``onnx``).
        Returns:
            The verified bundle-relative files, in manifest order.
        Raises:
            UnsafePathError, IntegrityError, BundleContentError: see the module docstring.
        """
        present = _scan_tree(self.root)
        refs = self.manifest.files()
        for ref in refs:
            path = self.path_of(ref)
            if ref.file not in present:
                raise IntegrityError(
                    ref.file, f"missing from bundle {self.root}; fetch a complete copy or re-export it"
                )
            size = path.stat().st_size
            if size != ref.size:
                raise IntegrityError(
                    ref.file, f"is {size} bytes but the manifest says {ref.size}: the file was truncated or modified"
                )
            actual = sha256_file(path)
            if actual != ref.sha256:
                raise IntegrityError(ref.file, expected=ref.sha256, actual=actual)
        unlisted = sorted(present - {r.file for r in refs} - {MANIFEST_NAME})
        if unlisted:
            # an unlisted file is unhashed; a runtime could still read it (e.g. ONNX external data), so refuse
            raise IntegrityError(
                unlisted[0],
                f"is not listed in the manifest (unlisted: {unlisted[:5]}); remove it (a leftover of an "
                "interrupted write?) or add it through the bundle writer",
            )
        if deep_onnx:
            self._verify_onnx()
        return [r.file for r in refs]

    def _read_verified(self, ref: FileRef | EvalSet | Reference) -> bytes:
        """Read a listed file once and check its hash on the bytes actually used (no check-then-read race)."""
        path = self.path_of(ref)
        try:
            # O_NOFOLLOW: a link swapped in after path_of's check is refused, not followed
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError as e:
            raise IntegrityError(ref.file, f"missing from bundle {self.root}") from e
        except OSError as e:  # ELOOP: the file is a symlink
            raise UnsafePathError(f"{ref.file} in bundle {self.root} cannot be opened safely ({e})") from e
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        actual = _sha256_bytes(data)
        if actual != ref.sha256:
            raise IntegrityError(ref.file, expected=ref.sha256, actual=actual)
        return data

    def _verify_onnx(self) -> None:
        try:
            import onnx
        except ImportError as e:
            raise BundleError(
                "verify(deep_onnx=True) needs the onnx package: install edgesep[export], or verify without "
                "deep_onnx (the sha256 checks need numpy only)"
            ) from e
        for art in self.manifest.artifacts:
            if art.kind not in ONNX_KINDS:
                continue
            data = self._read_verified(art)
            try:
                # from bytes: onnx.load(path) would also follow external data references before we vet them
                model = onnx.load_model_from_string(data)
            except Exception as e:  # protobuf DecodeError, RuntimeWarning-as-error, ...: all mean "not ONNX"
                raise BundleContentError(
                    f"{art.file} (artifact {art.id}) is not a parsable ONNX model ({type(e).__name__}: {e}); "
                    "re-export it"
                ) from e
            self._check_onnx_model(onnx, model, art)

    def _check_onnx_model(self, onnx: Any, model: Any, art: Artifact) -> None:
        where = f"{art.file} (artifact {art.id})"
        graph = model.graph
        inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
        outputs = {o.name for o in graph.output}
        if model.ir_version < 1 or not model.HasField("graph") or not outputs:
            raise BundleContentError(f"{where} parses but holds no ONNX graph with outputs; re-export it")
        if self.manifest.input.name not in inputs or self.manifest.output.name not in outputs:
            raise BundleContentError(
                f"{where} has inputs {sorted(inputs)[:8]} and outputs {sorted(outputs)[:8]}; the manifest "
                f"declares input {self.manifest.input.name!r} and output {self.manifest.output.name!r}"
            )
        model_dir = PurePosixPath(art.file).parent
        listed = {r.file: r for r in art.external_data}
        for tensor in _onnx_tensors(model):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            location = info.get("location")
            try:
                loc = _rel_path(location, "location")
            except ManifestError as e:
                raise BundleContentError(f"{where}: tensor {tensor.name!r} is external without a location") from e
            except UnsafePathError as e:
                raise UnsafePathError(
                    f"{where}: tensor {tensor.name!r} has external data at {location!r:.120}; external data must be "
                    "a relative path inside the bundle, without '..'"
                ) from e
            rel = (model_dir / loc).as_posix()  # ONNX resolves locations against the model file's directory
            path = self.path_of(rel)  # refuses symlinks on the way and anything resolving outside
            if not path.is_file():
                raise IntegrityError(rel, f"external data of tensor {tensor.name!r} in {where} is missing")
            if rel not in listed:
                raise IntegrityError(
                    rel,
                    f"external data of tensor {tensor.name!r} in {where} is not listed in the artifact's "
                    "external_data, so it is not hashed; add it with add_artifact(..., external_data=...)",
                )
            try:
                offset = int(info.get("offset", "0"))
                length = int(info["length"]) if "length" in info else None
            except ValueError as e:
                raise BundleContentError(f"{where}: tensor {tensor.name!r} has a non-integer offset/length") from e
            end = offset + (length or 0)
            if offset < 0 or (length is not None and length < 0) or end > listed[rel].size:
                raise BundleContentError(
                    f"{where}: tensor {tensor.name!r} reads bytes [{offset}, {end}) of {rel}, which has "
                    f"{listed[rel].size} bytes"
                )

    # ---- selection and loading

    def artifact(
        self,
        id: str | None = None,
        kind: str | None = None,
        precision: str | None = None,
        target: str | None = None,
    ) -> Artifact:
        """The one artifact matching every given criterion (exact matches; ``target="any"`` is a value too).

        Raises:
            BundleLookupError: if none or several match, listing the bundle's artifacts.
        """
        crit = {"id": id, "kind": kind, "precision": precision, "target": target}
        crit = {k: v for k, v in crit.items() if v is not None}
        found = [a for a in self.manifest.artifacts if all(getattr(a, k) == v for k, v in crit.items())]
        if len(found) == 1:
            return found[0]
        listing = "; ".join(
            f"{a.id} (kind={a.kind}, precision={a.precision}, target={a.target}, file={a.file})"
            for a in self.manifest.artifacts
        )
        problem = "no artifact matches" if not found else f"{len(found)} artifacts match"
        raise BundleLookupError(
            f"{problem} {crit or 'any'} in bundle {self.name!r}; it has: {listing or 'no artifacts'}"
            + ("; narrow the selection with id=, kind=, precision= or target=" if found else "")
        )

    def eval_set(self, id: str) -> EvalSet:
        """The eval set entry with this id.

        Raises:
            BundleLookupError: listing the ids there are.
        """
        for e in self.manifest.eval_sets:
            if e.id == id:
                return e
        raise BundleLookupError(
            f"no eval set {id!r} in bundle {self.name!r}; it has: {[e.id for e in self.manifest.eval_sets]}"
        )

    def load_eval_set(self, id: str) -> tuple[np.ndarray, np.ndarray]:
        """Load an eval set, hash-checked on the bytes read, with dtype, shape, range and label checks.

        Returns:
            ``(x, y)``: float32 ``(n, C, H, W)`` in [0, 1] and int64 ``(n,)`` labels.
        Raises:
            BundleLookupError, IntegrityError, BundleContentError.
        """
        entry = self.eval_set(id)
        arrays = _load_npz(self._read_verified(entry), ("x", "y"), entry.file)
        x, y = arrays["x"], arrays["y"]
        problem = _image_problem(x, self.manifest.input) or _labels_problem(y, x.shape[0], len(self.manifest.classes))
        if problem is None and x.shape[0] != entry.n:
            problem = ShapeMismatchError, f"holds {x.shape[0]} samples; the manifest says {entry.n}"
        if problem:
            raise BundleContentError(f"{entry.file} (eval set {id}): {problem[1]}")
        return x, y

    def load_reference(self) -> tuple[np.ndarray, np.ndarray]:
        """Load the reference inputs and their fp32 outputs, hash-checked and validated.

        Returns:
            ``(x, logits)``.
        Raises:
            BundleLookupError: if the bundle has no reference; IntegrityError, BundleContentError.
        """
        ref = self.manifest.reference
        if ref is None:
            raise BundleLookupError(f"bundle {self.name!r} has no reference outputs; add them with set_reference")
        arrays = _load_npz(self._read_verified(ref), ("x", "logits"), ref.file)
        x, logits = arrays["x"], arrays["logits"]
        problem = _image_problem(x, self.manifest.input) or _logits_problem(logits, x.shape[0], self.manifest.output)
        if problem is None and x.shape[0] != ref.n:
            problem = ShapeMismatchError, f"holds {x.shape[0]} samples; the manifest says {ref.n}"
        if problem:
            raise BundleContentError(f"{ref.file} (reference): {problem[1]}")
        return x, logits

    def load_report(self, name: str) -> Any:
        """Load a JSON report added with ``add_report``, hash-checked.

        Raises:
            BundleLookupError, IntegrityError, BundleContentError.
        """
        ref = self.manifest.reports.get(name)
        if ref is None:
            raise BundleLookupError(
                f"no report {name!r} in bundle {self.name!r}; it has: {sorted(self.manifest.reports)}"
            )
        try:
            return _loads(self._read_verified(ref), ref.file)
        except ManifestError as e:
            raise BundleContentError(str(e)) from e

    # ---- writing

    def _store(self, src: str | os.PathLike | bytes, rel: str) -> FileRef:
        """Copy ``src`` into the bundle at ``rel`` atomically; returns its FileRef (sha256, size)."""
        rel = _rel_path(rel, "file")
        dst = self.path_of(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        self.path_of(rel)  # again: a directory just created cannot be a link, one that existed was checked above
        if isinstance(src, (bytes, bytearray, memoryview)):
            data = bytes(src)
            atomic_write_bytes(dst, data)
            return FileRef(rel, _sha256_bytes(data), len(data))
        src = _check_source(src)
        # streamed, so a large artifact is not held in memory twice; same temp-file-then-rename as _io
        h, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
                    size += len(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return FileRef(rel, h.hexdigest(), size)

    def _check_free(self, files: Sequence[str], replacing: Sequence[FileRef]) -> None:
        """Refuse to write over a file that another manifest entry (not being replaced) owns."""
        taken = {r.file for r in self.manifest.files()} - {r.file for r in replacing}
        for f in files:
            _rel_path(f, "file")
            if f in taken:
                raise ConfigError(f"{f} already belongs to another entry of bundle {self.name!r}; choose another file")

    def _commit(self, manifest: Manifest, dropped: Sequence[FileRef]) -> None:
        """Write the manifest (the commit point), then delete files no entry lists any more."""
        manifest._check_consistency(str(self.root / MANIFEST_NAME))
        _write_manifest(self.root, manifest)
        self.manifest = manifest
        still = {r.file for r in manifest.files()}
        for ref in dropped:
            if ref.file not in still:
                self.path_of(ref).unlink(missing_ok=True)

    def add_artifact(
        self,
        src: str | os.PathLike | bytes,
        file: str,
        kind: str,
        precision: str,
        target: str = "any",
        extra: Mapping[str, Any] | None = None,
        *,
        id: str | None = None,
        external_data: Mapping[str, str | os.PathLike | bytes] | None = None,
    ) -> Artifact:
        """Copy an artifact into the bundle, hash it and record it; an entry with the same id or file is replaced.

        Args:
            src: the artifact's path or bytes.
            file: where it goes, relative to the bundle (e.g. ``model.int8.onnx``, ``model.rpi4.so``).
            kind: one of ``ARTIFACT_KINDS``.
            precision: one of ``PRECISIONS``.
            target: the device or TVM target it was built for; ``"any"`` for a portable ONNX.
            extra: free-form JSON for the producing tool.
            id: defaults to ``"{kind}-{precision}-{target}"``.
            external_data: ONNX external data files, ``{bundle-relative file: path or bytes}``; they are hashed
                and the deep check requires every external location to be one of them.
        Returns:
            The recorded Artifact.
        Raises:
            ConfigError: for an unknown kind or precision, non-JSON extra, or a file owned by another entry.
            UnsafePathError: for a file outside the bundle.
        """
        if kind not in ARTIFACT_KINDS:
            raise ConfigError(f"artifact kind {kind!r} is not one of {list(ARTIFACT_KINDS)}")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
        art_id = id if id is not None else f"{kind}-{precision}-{target}"
        for what, v in (("target", target), ("id", art_id)):
            if not isinstance(v, str) or not v:
                raise ConfigError(f"artifact {what} must be a non-empty string, got {v!r:.80}")
        try:
            extra_d = _json_dict(dict(extra or {}), "extra")
        except ManifestError as e:
            raise ConfigError(str(e)) from e
        ext = dict(external_data or {})
        if file in ext:
            raise ConfigError(f"{file} is both the artifact and one of its external data files")
        old = [a for a in self.manifest.artifacts if a.id == art_id or a.file == file]
        dropped = [r for a in old for r in (FileRef(a.file, a.sha256, a.size), *a.external_data)]
        self._check_free([file, *ext], dropped)
        for s in [src, *ext.values()]:  # before writing anything, so a bad source leaves no stray file
            _check_source(s)
        refs = [self._store(s, f) for f, s in ext.items()]
        ref = self._store(src, file)
        art = Artifact.from_dict(
            {
                "id": art_id,
                "file": ref.file,
                "kind": kind,
                "precision": precision,
                "target": target,
                "sha256": ref.sha256,
                "size": ref.size,
                "extra": extra_d,
                "external_data": [r.to_dict() for r in refs],
            }
        )
        self._commit(replace(self.manifest, artifacts=_replaced(self.manifest.artifacts, old, art)), dropped)
        return art

    def set_artifact_extra(self, id: str, extra: Mapping[str, Any]) -> Artifact:
        """Replace one artifact's ``extra`` (e.g. the recorded winner); its file and hash are untouched.

        Raises:
            BundleLookupError: no artifact has that id. ConfigError: ``extra`` is not plain JSON.
        """
        old = self.artifact(id=id)
        try:
            new = replace(old, extra=_json_dict(dict(extra), "extra"))
        except ManifestError as e:
            raise ConfigError(str(e)) from e
        arts = tuple(new if a.id == id else a for a in self.manifest.artifacts)
        self._commit(replace(self.manifest, artifacts=arts), [])
        return new

    def add_eval_set(
        self,
        file: str,
        x: np.ndarray,
        y: np.ndarray,
        *,
        kind: str,
        attack: str | None = None,
        norm: str | None = None,
        eps: float | None = None,
        steps: int | None = None,
        crafted_on: str | None = None,
        id: str | None = None,
    ) -> EvalSet:
        """Store an eval set as ``.npz`` (keys ``x``, ``y``) and record it; same id or file replaces the entry.

        Args:
            file: bundle-relative, by convention ``eval/<id>.npz``.
            x: float32 ``(n, C, H, W)`` matching the input shape, values in [0, 1].
            y: int64 ``(n,)`` labels in ``[0, len(classes))``.
            kind: ``"clean"`` or ``"adversarial"`` (which needs attack, norm and eps).
            id: defaults to the file's stem.
        Raises:
            ConfigError: for a wrong dtype, values out of range, or metadata inconsistent with ``kind``.
            ShapeMismatchError: for shapes that do not fit the model input or each other.
        """
        problem = _image_problem(x, self.manifest.input)
        if problem is None:
            problem = _labels_problem(y, x.shape[0], len(self.manifest.classes))
        if problem:
            raise problem[0](f"eval set {file}: {problem[1]}")
        set_id = id if id is not None else PurePosixPath(_rel_path(file, "file")).stem
        old = [e for e in self.manifest.eval_sets if e.id == set_id or e.file == file]
        dropped = [FileRef(e.file, e.sha256, e.size) for e in old]
        self._check_free([file], dropped)
        meta = {
            "id": set_id,
            "file": file,
            "kind": kind,
            "attack": attack,
            "norm": norm,
            "eps": None if eps is None else float(eps),
            "steps": steps,
            "crafted_on": crafted_on,
            "n": int(x.shape[0]),
            "sha256": "0" * 64,
            "size": 0,
        }
        try:
            EvalSet.from_dict(meta, "eval set")  # validate the metadata before writing anything
        except ManifestError as e:
            raise ConfigError(str(e)) from e
        buf = io.BytesIO()
        np.savez(buf, x=x, y=y)
        ref = self._store(buf.getvalue(), file)
        entry = EvalSet.from_dict({**meta, "sha256": ref.sha256, "size": ref.size})
        self._commit(replace(self.manifest, eval_sets=_replaced(self.manifest.eval_sets, old, entry)), dropped)
        return entry

    def set_reference(self, x: np.ndarray, y_logits: np.ndarray) -> Reference:
        """Store reference inputs and the fp32 model's outputs on them (``reference.npz``: ``x``, ``logits``).

        Raises:
            ConfigError, ShapeMismatchError: for inputs or logits that do not fit the manifest's specs.
        """
        problem = _image_problem(x, self.manifest.input)
        if problem is None:
            problem = _logits_problem(y_logits, x.shape[0], self.manifest.output)
        if problem:
            raise problem[0](f"reference: {problem[1]}")
        old = self.manifest.reference
        dropped = [] if old is None else [FileRef(old.file, old.sha256, old.size)]
        self._check_free([REFERENCE_FILE], dropped)
        buf = io.BytesIO()
        np.savez(buf, x=x, logits=y_logits)
        ref = self._store(buf.getvalue(), REFERENCE_FILE)
        entry = Reference(ref.file, ref.sha256, ref.size, int(x.shape[0]))
        self._commit(replace(self.manifest, reference=entry), dropped)
        return entry

    def add_report(self, name: str, obj: Any) -> FileRef:
        """Store a JSON report (e.g. the quantization report) as ``reports/<name>.json``; replaces one of that name.

        Raises:
            ConfigError: for a name that is not ``[A-Za-z0-9][A-Za-z0-9_.-]*`` or an object that is not JSON.
        """
        if not isinstance(name, str) or not _REPORT_NAME.fullmatch(name):
            raise ConfigError(f"report name {name!r} must match [A-Za-z0-9][A-Za-z0-9_.-]*")
        try:
            text = _dumps(obj, f"report {name!r}", indent=2)
        except ManifestError as e:
            raise ConfigError(str(e)) from e
        old = self.manifest.reports.get(name)
        dropped = [] if old is None else [old]
        file = f"reports/{name}.json"
        self._check_free([file], dropped)
        ref = self._store((text + "\n").encode(), file)
        self._commit(replace(self.manifest, reports={**self.manifest.reports, name: ref}), dropped)
        return ref


def _check_source(src: object) -> Path | None:
    """A source of bundle content must be bytes or the path of a regular file."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return None
    if not isinstance(src, (str, os.PathLike)) or not Path(src).is_file():
        raise ConfigError(f"{src!r:.120} is not a file; pass the path of the file to add, or its bytes")
    return Path(src)


def _replaced(entries: tuple[Any, ...], old: Sequence[Any], new: Any) -> tuple[Any, ...]:
    """``entries`` with ``old`` removed and ``new`` in the place of the first of them (else appended)."""
    out, placed = [], False
    for e in entries:
        if e in old:
            if not placed:
                out.append(new)
                placed = True
        else:
            out.append(e)
    return tuple(out) if placed else (*out, new)


def _onnx_tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of a model: initializers, sparse initializers, attribute tensors, subgraphs, functions."""

    def of_graph(g: Any) -> Iterator[Any]:
        yield from g.initializer
        for s in g.sparse_initializer:
            yield s.values
            yield s.indices
        for n in g.node:
            yield from of_node(n)

    def of_node(n: Any) -> Iterator[Any]:
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for s in [a.sparse_tensor] if a.HasField("sparse_tensor") else []:
                yield s.values
                yield s.indices
            for s in a.sparse_tensors:
                yield s.values
                yield s.indices
            if a.HasField("g"):
                yield from of_graph(a.g)  # protobuf caps nesting depth on parse, so this recursion is bounded
            for g in a.graphs:
                yield from of_graph(g)

    yield from of_graph(model.graph)
    for f in model.functions:
        for n in f.node:
            yield from of_node(n)


def _write_manifest(root: Path, manifest: Manifest) -> None:
    text = _dumps(manifest.to_dict(), "manifest", indent=2)
    atomic_write_bytes(root / MANIFEST_NAME, (text + "\n").encode())


# --------------------------------------------------------------------------------------------------------------
# Entry points


def _as_spec(spec: TensorSpec | Mapping[str, Any], where: str, *, is_input: bool) -> TensorSpec:
    if isinstance(spec, TensorSpec):
        spec = spec.to_dict()
    d = {"dtype": "float32", **({"range": list(INPUT_RANGE)} if is_input else {}), **dict(spec)}
    if isinstance(d.get("shape"), tuple):
        d["shape"] = list(d["shape"])
    if isinstance(d.get("range"), tuple):
        d["range"] = list(d["range"])
    return TensorSpec.from_dict(d, where, is_input=is_input)


def create_bundle(
    path: str | os.PathLike,
    *,
    name: str,
    input_spec: TensorSpec | Mapping[str, Any],
    output_spec: TensorSpec | Mapping[str, Any],
    classes: Sequence[str],
    provenance: Mapping[str, Any],
    overwrite: bool = False,
) -> Bundle:
    """Create an empty bundle directory with its manifest.

    Args:
        path: the directory, by convention ``NAME.bundle``.
        name: the model's name.
        input_spec: ``{name, shape}`` (``dtype`` float32 and ``range`` [0, 1] are filled in), e.g.
            ``{"name": "input", "shape": ["batch", 1, 8, 8]}``.
        output_spec: ``{name, shape}``, e.g. ``{"name": "logits", "shape": ["batch", 10]}``.
        classes: class names, as many as the output's last dim.
        provenance: JSON: model, model_kwargs, layers, params, macs, training config, checkpoint sha256, ...
        overwrite: replace an existing bundle at ``path``. Only a directory holding a ``manifest.json`` is ever
            deleted; any other non-empty directory is refused, so a wrong path cannot wipe unrelated files.
    Returns:
        The open, writable Bundle.
    Raises:
        BundleError: if ``path`` is a file, a symlink, or a non-empty directory that may not be replaced.
        ManifestError: for invalid specs, classes or provenance (naming the field).
    """
    p = Path(path)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise BundleError(f"{p} exists and is not a directory; choose another bundle path")
    if p.is_dir() and any(p.iterdir()):
        if not overwrite:
            raise BundleError(f"{p} exists and is not empty; pass overwrite=True to replace the bundle there")
        if not (p / MANIFEST_NAME).is_file():
            raise BundleError(
                f"{p} is not empty and holds no {MANIFEST_NAME}; refusing to delete it, remove it yourself"
            )
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.from_dict(
        {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "edgesep_version": __version__,
            "created": _now_utc(),
            "input": _as_spec(input_spec, "input_spec", is_input=True).to_dict(),
            "output": _as_spec(output_spec, "output_spec", is_input=False).to_dict(),
            "classes": list(classes),
            "preprocessing": dict(PREPROCESSING),
            "artifacts": [],
            "eval_sets": [],
            "reference": None,
            "provenance": dict(provenance),
            "reports": {},
        },
        source="create_bundle",
    )
    _write_manifest(p, manifest)
    return Bundle(p.resolve(), manifest)


def open_bundle_for_writing(path: str | os.PathLike, action: str, *, deep_onnx: bool = False) -> Bundle:
    """Open (and verify) a bundle *directory* that ``action`` will add files to.

    Raises:
        BundleError: the path is a ``.tar`` (extract it first) or does not exist (export one first).
    """
    p = Path(path)
    if not p.is_dir():
        raise BundleError(
            f"{p} is not a bundle directory; {action} writes into the bundle, so extract a .tar first"
            if p.is_file()
            else f"{p} does not exist; create it with `edgesep export RUN --out {p}`"
        )
    bundle = open_bundle(p, verify=False)
    bundle.verify(deep_onnx=deep_onnx)
    return bundle


def open_bundle(
    path: str | os.PathLike, *, verify: bool = True, extract_dir: str | os.PathLike | None = None
) -> Bundle:
    """Open a bundle directory, or a ``.tar`` of one (extracted safely into a fresh temporary directory).

    Args:
        path: a bundle directory or a tar file (plain or compressed).
        verify: check every file's hash (``Bundle.verify()``); turn off only for a bundle verified moments ago.
        extract_dir: where a tar is extracted (a fresh subdirectory is made there and kept, e.g. a cache);
            by default a temporary directory that ``Bundle.close()`` removes.
    Returns:
        The Bundle.
    Raises:
        BundleError: (and its subclasses) for anything unsafe, damaged or missing; see the module docstring.
    """
    p = Path(path)
    owned = tmp = None
    if p.is_dir():
        root = p.resolve(strict=True)
    elif p.is_file():
        root, tmp = _extract_tar(p, None if extract_dir is None else Path(extract_dir))
        owned = tmp if extract_dir is None else None
    else:
        raise BundleError(f"{p} does not exist; expected a bundle directory or a .tar of one")
    try:
        bundle = Bundle(root, _read_manifest(root), owned_dir=owned)
        if verify:
            bundle.verify()
    except BaseException:
        if tmp is not None:  # a refused tar leaves nothing behind, in a caller's cache either
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return bundle


def _check_members(members: list[tarfile.TarInfo], source: Path) -> None:
    """Refuse the whole archive before extracting anything if one member is unsafe."""
    if len(members) > MAX_TAR_MEMBERS:
        raise BundleError(f"{source} has {len(members)} members, more than {MAX_TAR_MEMBERS}; not a bundle")
    seen: set[str] = set()
    total = 0
    for m in members:
        name = m.name
        parts = [q for q in name.split("/") if q not in ("", ".")]
        if name.startswith("/") or "\\" in name or "\0" in name or ".." in parts or (parts and ":" in parts[0]):
            raise UnsafePathError(f"{source}: member {name!r} is an absolute path or leaves the archive; refusing it")
        if not (m.isfile() or m.isdir()):
            kind = "a symlink" if m.issym() else "a hard link" if m.islnk() else "a device or special file"
            raise UnsafePathError(f"{source}: member {name!r} is {kind}; bundles hold regular files only")
        key = "/".join(parts)
        if key in seen and not m.isdir():
            raise UnsafePathError(f"{source}: member {name!r} appears twice; the later one would replace the first")
        seen.add(key)
        total += m.size
        if total > MAX_TAR_BYTES:
            raise BundleError(f"{source} expands to more than {MAX_TAR_BYTES} bytes; refusing to extract it")


def _extract_tar(path: Path, extract_dir: Path | None) -> tuple[Path, Path]:
    """Extract a bundle tar into a fresh directory. Returns (bundle root, the directory made)."""
    if not hasattr(tarfile, "data_filter"):
        raise BundleError("safe tar extraction needs Python >= 3.10.12 or >= 3.11.4 (tarfile filters); upgrade")
    try:
        tf = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by the `with tf` below; opening is what may fail
    except (tarfile.TarError, OSError) as e:
        raise BundleError(f"{path} is neither a bundle directory nor a readable tar ({e})") from e
    with tf:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BundleError(f"{path} is a damaged tar ({e}); fetch it again") from e
        _check_members(members, path)
        if extract_dir is not None:
            extract_dir.mkdir(parents=True, exist_ok=True)
        dest = Path(tempfile.mkdtemp(prefix="edgesep-bundle-", dir=extract_dir)).resolve()
        try:
            # the "data" filter is a second line of defence behind _check_members: no links out, no devices,
            # no absolute paths, no setuid bits
            tf.extractall(dest, members=members, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            shutil.rmtree(dest, ignore_errors=True)
            err = UnsafePathError if isinstance(e, tarfile.FilterError) else BundleError
            raise err(f"{path}: extraction failed ({e})") from e
    if (dest / MANIFEST_NAME).is_file():
        return dest, dest
    tops = list(dest.iterdir())
    if len(tops) == 1 and tops[0].is_dir() and (tops[0] / MANIFEST_NAME).is_file():
        return tops[0], dest
    shutil.rmtree(dest, ignore_errors=True)
    raise BundleError(f"{path} does not hold a bundle: expected {MANIFEST_NAME} at its top or in its one directory")


def pack(bundle: Bundle | str | os.PathLike, tar_path: str | os.PathLike | None = None) -> Path:
    """Verify a bundle and write it as an uncompressed tar with one top directory (the bundle's name).

    The tar is reproducible: members are sorted, with mtime 0, owner root and modes 644 / 755.

    Args:
        bundle: an open Bundle or a bundle directory.
        tar_path: defaults to ``<bundle dir>.tar`` beside the directory.
    Returns:
        The tar's path (written atomically).
    Raises:
        BundleError: if the bundle does not verify, or ``tar_path`` is inside the bundle.
    """
    if not isinstance(bundle, Bundle):
        with open_bundle(bundle, verify=False) as b:
            return pack(b, tar_path)
    b = bundle
    files = b.verify()
    # the manifest that was just verified against the files, not whatever manifest.json holds by now
    manifest_bytes = (_dumps(b.manifest.to_dict(), "manifest", indent=2) + "\n").encode()
    out = Path(tar_path) if tar_path is not None else b.root.with_name(b.root.name + ".tar")
    out = out.resolve()
    if out.is_relative_to(b.root):
        raise BundleError(f"{out} is inside the bundle {b.root}; write the tar elsewhere")
    top = b.root.name
    dirs = sorted({p.as_posix() for f in files for p in PurePosixPath(f).parents if p.as_posix() != "."})
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
                for d in ["", *dirs]:
                    info = tarfile.TarInfo(f"{top}/{d}".rstrip("/"))
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                    tf.addfile(info)
                info = tarfile.TarInfo(f"{top}/{MANIFEST_NAME}")
                info.size, info.mode, info.mtime = len(manifest_bytes), 0o644, 0
                tf.addfile(info, io.BytesIO(manifest_bytes))
                for rel in sorted(files):
                    path = b.path_of(rel)
                    info = tarfile.TarInfo(f"{top}/{rel}")
                    info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
                    with open(path, "rb") as src:
                        tf.addfile(info, src)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
