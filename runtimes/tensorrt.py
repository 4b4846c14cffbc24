"""TensorRT (Jetson): the TensorRT-ready ONNX and build config (host), engines built and cached on the device.

Two halves, split by where they run:

- **Host** (no TensorRT, no GPU): ``prepare_tensorrt(bundle)`` takes the bundle's fp32 ONNX (for an fp32 or fp16
  engine) or its INT8 QDQ ONNX (for an int8 engine), fixes the batch dim when the batch is static, runs the offline
  checker ``edgesep.export._check.check_tensorrt`` on exactly the bytes it writes and refuses a model with errors
  (``TensorRtCheckError``, every error with its node), then adds the artifact ``model.trt.<precision>.onnx`` (kind
  ``trt-onnx``, target ``jetson``) whose ``extra.build_config`` is a plain-JSON build config: precision, builder
  flags, the input's optimization profile (min/opt/max shapes; all equal when the batch is static), workspace,
  the TensorRT version it was checked against and the input/output names. ``extra`` also holds equivalent
  ``polygraphy run`` and ``trtexec`` command lines.
- **Device** (TensorRT from JetPack, ``polygraphy`` for CUDA memory): ``build_engine(onnx, build_config, cache_dir)``
  parses the ONNX with ``trt.OnnxParser`` (parser errors -> ``TensorRtBuildError`` with every message), sets the
  flags (INT8 for QDQ models: explicit quantization needs no calibrator; FP16; TF32 cleared for fp32 so that fp32
  means fp32), the workspace pool and the profile, builds with ``builder.build_serialized_network`` and writes the
  plan atomically into ``<cache_dir>/<key>.plan`` with ``<key>.json`` metadata, where ``key =
  engine_cache_key(onnx sha256, TensorRT version, GPU, build config)``; a plan whose key (and sha256) matches is
  reused. ``TensorRtRuntime`` (backend ``"tensorrt"``) builds or loads the engine and runs batches with
  ``execute_async_v3``, chunked to the profile's max batch (and padded up to its min).

The device work dir layout is ``<workdir>/engines/<key>.plan`` + ``<key>.json`` (``engine_cache_dir(workdir)``);
without a workdir, ``~/.cache/edgesep/engines``.

TensorRT and CUDA are imported lazily, only by the device half: ``import edgesep.runtimes.tensorrt`` needs numpy
(and ``prepare_tensorrt`` needs ``onnx``, the ``edgesep[export]`` extra). TensorRT cannot be installed on an x86 CI
machine (and must never be pip-installed on the Jetson): there ``TensorRtRuntime.available()`` is False and
constructing one raises ``BackendMissingError(TENSORRT_MISSING)``.

What the device code relies on (TensorRT 10.x Python API, the JetPack 6 version is 10.3):

- ``trt.Builder(logger)``, ``builder.create_network(0)`` — "EXPLICIT_BATCH: [DEPRECATED] Ignored because networks are
  always 'explicit batch' in TensorRT 10.0" (TensorRT Python API, ``NetworkDefinitionCreationFlag``).
- ``trt.OnnxParser(network, logger)``, ``parser.parse_from_file(path)`` (resolves external data next to the file),
  ``parser.num_errors``, ``parser.get_error(i)`` (``IParserError``: ``desc()``, ``node_name()``,
  ``node_operator()``, TensorRT 10.x C++ API members list).
- ``builder.create_builder_config()``, ``config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, bytes)``,
  ``config.set_flag(trt.BuilderFlag.FP16 | INT8)``, ``config.clear_flag(trt.BuilderFlag.TF32)`` — "TF32 ... Enabled
  by default" (``BuilderFlag``), ``builder.create_optimization_profile()``, ``profile.set_shape(name, min, opt,
  max)``, ``config.add_optimization_profile(profile)``, ``builder.build_serialized_network(network, config)``
  (``None`` on failure).
- INT8 from QDQ: "When TensorRT detects Q/DQ layers in a network, it builds an engine using explicit quantization
  processing logic" (TensorRT guide, Explicit Quantization); the calibrator API is "Deprecated in TensorRT 10.1.
  Superseded by explicit quantization". For the weakly typed network built here the INT8 flag is set, as
  ``trtexec --int8`` and ``polygraphy run --int8`` do.
- ``trt.Runtime(logger).deserialize_cuda_engine(plan)``, ``engine.num_io_tensors``, ``engine.get_tensor_name(i)``,
  ``engine.get_tensor_mode(name)``, ``engine.get_tensor_dtype(name)``, ``trt.nptype``,
  ``engine.create_execution_context()``, ``context.set_input_shape``, ``context.get_tensor_shape``,
  ``context.set_tensor_address``, ``context.execute_async_v3(stream)`` — the same calls polygraphy 0.53's
  ``TrtRunner`` makes.
- CUDA memory and streams: ``polygraphy.cuda`` (``DeviceArray``, ``Stream``; a ctypes wrapper of ``libcudart``, no
  pycuda or cuda-python needed); the GPU's name and compute capability through the same ``libcudart``
  (``cudaGetDeviceProperties``, ``cudaDeviceGetAttribute``).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgesep import __version__
from edgesep._io import atomic_write_bytes, sha256_file
from edgesep.errors import (
    BackendMissingError,
    BundleLookupError,
    ConfigError,
    EdgesepError,
    ShapeMismatchError,
)
from edgesep.runtimes._base import Runtime, register_backend

if TYPE_CHECKING:
    from edgesep.bundle import Artifact
    from edgesep.export._check import CheckReport, Issue

__all__ = [
    "BUILD_CONFIG_SCHEMA",
    "DEFAULT_PROFILE",
    "DEFAULT_TRT_VERSION",
    "DEFAULT_WORKSPACE_MB",
    "POLYGRAPHY_MISSING",
    "TENSORRT_MISSING",
    "TRT_PRECISIONS",
    "TRT_TARGET",
    "TensorRtBuildError",
    "TensorRtCheckError",
    "TensorRtRuntime",
    "build_engine",
    "default_cache_dir",
    "engine_cache_dir",
    "engine_cache_key",
    "engine_paths",
    "gpu_identity",
    "make_build_config",
    "prepare_tensorrt",
    "validate_build_config",
]

TRT_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
TRT_TARGET = "jetson"
TRT_KIND = "trt-onnx"
DEFAULT_TRT_VERSION = "10.3"  # JetPack 6.0 / 6.1 ship TensorRT 10.3 (the checker's default too)
DEFAULT_WORKSPACE_MB = 512
# (min, opt, max) batch of the optimization profile for a model exported with a symbolic batch dim. opt=1: an edge
# app classifies one image at a time, and TensorRT tunes its kernels for the opt shape; max=64 bounds evaluation
# chunks (run() splits larger batches).
DEFAULT_PROFILE: tuple[int, int, int] = (1, 1, 64)
BUILD_CONFIG_SCHEMA = 1
_KEY_SCHEMA = 1
_FLAGS = ("FP16", "INT8")  # builder flags a build config may set
_CLEARABLE = ("TF32",)  # ... and clear
_SHA256 = re.compile(r"[0-9a-f]{64}")

TENSORRT_MISSING = (
    "TensorRT is not installed here (`import tensorrt` fails). TensorRT comes with JetPack on the Jetson: use "
    "JetPack's python3-libnvinfer (`sudo apt install python3-libnvinfer`, part of nvidia-jetpack) from the system "
    "python3, or from a venv made with `python3 -m venv --system-site-packages`. Never pip-install tensorrt on the "
    "Jetson: the PyPI wheels are not JetPack's build. On a machine without TensorRT, prepare the TensorRT-ready "
    "ONNX with `prepare_tensorrt` and build the engine on the device."
)
POLYGRAPHY_MISSING = (
    "polygraphy is not installed: edgesep's TensorRT runtime moves data to and from the GPU with polygraphy.cuda "
    "(a pure-Python wrapper of libcudart). Install it next to JetPack's TensorRT: `pip install polygraphy`."
)


class TensorRtCheckError(EdgesepError, ValueError):
    """An ONNX model that the offline TensorRT check refuses (it would fail to parse or build on the device).

    Attributes:
        report: the full ``CheckReport`` (warnings and notes included).
        errors: its error ``Issue``s; each names its node.
    """

    def __init__(self, what: str, report: CheckReport):
        self.report = report
        self.errors: list[Issue] = list(report.errors)
        lines = "\n".join(f"  {issue}" for issue in self.errors)
        super().__init__(
            f"{what} would not build on TensorRT {report.version}: the offline check "
            f"(edgesep.export._check.check_tensorrt) found {len(self.errors)} error(s):\n{lines}\n"
            "Replace the unsupported ops at export or re-quantize with the TensorRT-compatible settings (`edgesep "
            'quantize`); if the device runs a newer TensorRT, check against it with trt_version="10.N"'
        )


class TensorRtBuildError(EdgesepError, RuntimeError):
    """TensorRT's ONNX parser or builder failed on the device.

    Attributes:
        errors: every message TensorRT reported (parser errors first, then the logger's errors).
    """

    def __init__(self, what: str, stage: str, errors: Sequence[str], hint: str = ""):
        self.stage = stage
        self.errors = [str(e) for e in errors]
        listed = "\n".join(f"  {e}" for e in self.errors) or "  (TensorRT reported no message; rerun with verbose=True)"
        super().__init__(f"{what}: TensorRT {stage} failed with {len(self.errors)} error(s):\n{listed}" + hint)


# ---------------------------------------------------------------------------------------------------------------
# build config (plain JSON, host and device)


def _positive_int(v: object, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 1:
        raise ConfigError(f"{what} must be a positive integer, got {v!r:.80}")
    return int(v)


def _batch_profile(batch: int | Sequence[int] | None, static_batch: int | None) -> tuple[int, int, int]:
    """(min, opt, max) batch from the user's ``batch`` and the model's static batch (None when symbolic)."""
    if batch is None:
        prof = (static_batch,) * 3 if static_batch is not None else DEFAULT_PROFILE
    elif isinstance(batch, (int, np.integer)) and not isinstance(batch, bool):
        prof = (_positive_int(batch, "batch"),) * 3
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) == 3:
        prof = tuple(_positive_int(b, f"batch[{i}]") for i, b in enumerate(batch))  # type: ignore[assignment]
        if not prof[0] <= prof[1] <= prof[2]:
            raise ConfigError(f"batch profile {list(prof)} must satisfy min <= opt <= max")
    else:
        raise ConfigError(f"batch must be None, an int (static batch) or (min, opt, max), got {batch!r:.80}")
    if static_batch is not None and prof != (static_batch,) * 3:
        raise ConfigError(
            f"the model was exported with a static batch of {static_batch}, so its engine takes batch "
            f"{static_batch} only (asked for {list(prof)}); re-export with a symbolic batch (`edgesep export` "
            "without --batch) for a profile, or pass batch=None"
        )
    return prof  # type: ignore[return-value]


def make_build_config(
    input_name: str,
    input_shape: Sequence[int | str | None],
    precision: str,
    *,
    batch: int | Sequence[int] | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    trt_version: str = DEFAULT_TRT_VERSION,
    output_name: str | None = None,
) -> dict[str, Any]:
    """The JSON build config a device builds an engine from.

    Args:
        input_name: the model's one input.
        input_shape: its shape, NCHW; the batch dim is an int (static) or a str / None (symbolic); every other dim
            must be an int.
        precision: ``"fp32"`` (TF32 cleared), ``"fp16"`` (FP16 flag) or ``"int8"`` (INT8 flag; the ONNX must be
            the QDQ model).
        batch: None (the model's static batch, else ``DEFAULT_PROFILE``), an int (a static batch), or
            ``(min, opt, max)``.
        workspace_mb: the builder's workspace memory pool limit, MiB.
        trt_version: the TensorRT version the ONNX was checked against (recorded; the device uses its own).
        output_name: the logits output (recorded for the device; None when unknown).
    Returns:
        ``{schema, precision, flags, clear_flags, input {name, shape}, output, profile {min, opt, max}, static,
        workspace_mb, trt_version}``.
    Raises:
        ConfigError: for a bad precision, batch, workspace or a non-static C/H/W dim.
    """
    if precision not in TRT_PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {list(TRT_PRECISIONS)}")
    if not isinstance(input_name, str) or not input_name:
        raise ConfigError(f"input name must be a non-empty string, got {input_name!r:.80}")
    shape = list(input_shape)
    if len(shape) < 2:
        raise ConfigError(f"input {input_name!r} has shape {shape}; expected a batch dim and at least one more dim")
    rest = []
    for i, d in enumerate(shape[1:], start=1):
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or int(d) < 1:
            raise ConfigError(
                f"input {input_name!r} dim {i} is {d!r}: only the batch dim may be dynamic for TensorRT here; "
                "export with static C/H/W"
            )
        rest.append(int(d))
    b0 = shape[0]
    static_batch = int(b0) if isinstance(b0, (int, np.integer)) and not isinstance(b0, bool) and b0 > 0 else None
    prof = _batch_profile(batch, static_batch)
    flags = {"fp32": [], "fp16": ["FP16"], "int8": ["INT8"]}[precision]
    static = prof[0] == prof[2]
    return {
        "schema": BUILD_CONFIG_SCHEMA,
        "precision": precision,
        "flags": flags,
        "clear_flags": ["TF32"] if precision == "fp32" else [],
        "input": {"name": input_name, "shape": [prof[0] if static else "batch", *rest], "dtype": "float32"},
        "output": {"name": output_name} if output_name else None,
        "profile": {"min": [prof[0], *rest], "opt": [prof[1], *rest], "max": [prof[2], *rest]},
        "static": static,
        "workspace_mb": _positive_int(workspace_mb, "workspace_mb"),
        "trt_version": str(trt_version),
    }


def validate_build_config(cfg: object) -> dict[str, Any]:
    """Check a build config (it travels in a manifest to the device) and return a plain-JSON copy.

    Raises:
        ConfigError: naming the field that is missing or wrong.
    """
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"build_config must be a JSON object, got {type(cfg).__name__}")
    try:
        c = json.loads(json.dumps(dict(cfg), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"build_config is not plain JSON: {e}") from e
    need = ["schema", "precision", "flags", "clear_flags", "input", "profile", "static", "workspace_mb", "trt_version"]
    missing = [k for k in need if k not in c]
    if missing:
        raise ConfigError(f"build_config is missing {missing}; make it with make_build_config / prepare_tensorrt")
    if c["schema"] != BUILD_CONFIG_SCHEMA:
        raise ConfigError(f"build_config schema {c['schema']!r} is not {BUILD_CONFIG_SCHEMA}; upgrade edgesep")
    if c["precision"] not in TRT_PRECISIONS:
        raise ConfigError(f"build_config.precision {c['precision']!r} is not one of {list(TRT_PRECISIONS)}")
    for key, allowed in (("flags", _FLAGS), ("clear_flags", _CLEARABLE)):
        if not isinstance(c[key], list) or any(f not in allowed for f in c[key]):
            raise ConfigError(f"build_config.{key} must be a list drawn from {list(allowed)}, got {c[key]!r:.80}")
    if c["precision"] == "int8" and "INT8" not in c["flags"]:
        raise ConfigError("build_config.precision is int8 but flags lack INT8")
    inp = c["input"]
    if not isinstance(inp, dict) or not isinstance(inp.get("name"), str) or not inp["name"]:
        raise ConfigError("build_config.input must be an object with a non-empty name")
    prof = c["profile"]
    if not isinstance(prof, dict) or set(prof) != {"min", "opt", "max"}:
        raise ConfigError("build_config.profile must be {min, opt, max}")
    shapes = []
    for k in ("min", "opt", "max"):
        s = prof[k]
        if not isinstance(s, list) or not s or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in s):
            raise ConfigError(f"build_config.profile.{k} must be a list of positive ints, got {s!r:.80}")
        shapes.append(s)
    if len({len(s) for s in shapes}) != 1 or any(a[1:] != shapes[0][1:] for a in shapes):
        raise ConfigError(f"build_config.profile shapes {shapes} may differ in the batch dim only")
    if not shapes[0][0] <= shapes[1][0] <= shapes[2][0]:
        raise ConfigError(f"build_config.profile batch {[s[0] for s in shapes]} must satisfy min <= opt <= max")
    if bool(c["static"]) != (shapes[0][0] == shapes[2][0]):
        raise ConfigError("build_config.static must be true exactly when the profile's min and max batch are equal")
    _positive_int(c["workspace_mb"], "build_config.workspace_mb")
    return c


# ---------------------------------------------------------------------------------------------------------------
# engine cache


def engine_cache_key(onnx_sha256: str, trt_version: str, gpu_name: str, build_config: Mapping[str, Any]) -> str:
    """The engine's cache key: sha256 of a canonical JSON of everything an engine depends on.

    Canonical: sorted keys, no whitespace, ASCII, no NaN; tuples and lists hash alike. A plan is valid only for the
    TensorRT version and GPU it was built with, so both are in the key.

    Args:
        onnx_sha256: sha256 of the ONNX file the engine is built from (64 lowercase hex digits).
        trt_version: the device's ``tensorrt.__version__`` (e.g. ``"10.3.0.30"``).
        gpu_name: the GPU identity (``gpu_identity()["id"]``, e.g. ``"Orin (sm_87) / NVIDIA Jetson Orin Nano ..."``).
        build_config: the build config (``make_build_config``).
    Returns:
        64 lowercase hex digits.
    Raises:
        ConfigError: for a malformed sha256, an empty version or GPU name, or a config that is not plain JSON.
    """
    if not isinstance(onnx_sha256, str) or not _SHA256.fullmatch(onnx_sha256):
        raise ConfigError(f"onnx_sha256 must be 64 lowercase hex digits, got {onnx_sha256!r:.80}")
    for what, v in (("trt_version", trt_version), ("gpu_name", gpu_name)):
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{what} must be a non-empty string, got {v!r:.80}")
    payload = {
        "key_schema": _KEY_SCHEMA,
        "onnx_sha256": onnx_sha256,
        "trt_version": trt_version,
        "gpu": gpu_name,
        "build_config": dict(build_config),
    }
    try:
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"build_config is not plain JSON: {e}") from e
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def engine_cache_dir(workdir: str | os.PathLike) -> Path:
    """``<workdir>/engines``: where a device work directory keeps its engines."""
    return Path(workdir) / "engines"


def default_cache_dir() -> Path:
    """``~/.cache/edgesep/engines``: the engine cache when no work directory is given."""
    return Path.home() / ".cache" / "edgesep" / "engines"


def engine_paths(cache_dir: str | os.PathLike, key: str) -> tuple[Path, Path]:
    """``(<cache_dir>/<key>.plan, <cache_dir>/<key>.json)``: the serialized engine and its metadata."""
    if not isinstance(key, str) or not _SHA256.fullmatch(key):
        raise ConfigError(f"engine cache key must be 64 lowercase hex digits, got {key!r:.80}")
    d = Path(cache_dir)
    return d / f"{key}.plan", d / f"{key}.json"


# ---------------------------------------------------------------------------------------------------------------
# host side: the TensorRT-ready ONNX in the bundle


def _dim(d: Any) -> int | str | None:
    if d.HasField("dim_value"):
        return int(d.dim_value)
    return d.dim_param or None


def _fix_batch(model: Any, input_name: str, batch: int) -> None:
    """Set the symbolic batch dim of the input (and of every tensor sharing its dim_param) to ``batch``."""
    inp = next(i for i in model.graph.input if i.name == input_name)
    d0 = inp.type.tensor_type.shape.dim[0]
    param = d0.dim_param if not d0.HasField("dim_value") else None
    d0.dim_value = batch  # clears dim_param (a oneof)
    if not param:
        return
    for vi in [*model.graph.output, *model.graph.value_info, *model.graph.input]:
        if not vi.type.HasField("tensor_type"):
            continue
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value") and d.dim_param == param:
                d.dim_value = batch


def _shape_text(shape: Sequence[int], sep: str) -> str:
    return sep.join(str(d) for d in shape)


def _commands(file: str, cfg: Mapping[str, Any]) -> dict[str, str]:
    """Equivalent ``polygraphy run`` (checked against the bundle's reference) and ``trtexec`` command lines."""
    name, prof = cfg["input"]["name"], cfg["profile"]
    ws = int(cfg["workspace_mb"])
    pg = [f"polygraphy run {file} --trt"]
    pg += [f"--{f.lower()}" for f in cfg["flags"]]
    pg += [f"--trt-{k}-shapes {name}:[{_shape_text(prof[k], ',')}]" for k in ("min", "opt", "max")]
    pg += [f"--pool-limit workspace:{ws}M"]
    pg += ["--load-inputs reports/polygraphy_inputs.json --load-outputs reports/polygraphy_outputs.json"]
    # tolerances vs the torch fp32 reference logits; int8 on the median error (measured with ONNX Runtime's int8 on
    # the project's models: median abs error 0.03 on logits of magnitude ~10, max 0.9)
    pg += [
        {
            "fp32": "--atol 1e-4 --rtol 1e-4",
            "fp16": "--atol 2e-2 --rtol 1e-2",
            "int8": "--check-error-stat median --atol 0.1 --rtol 0.05",
        }[cfg["precision"]]
    ]
    te = [f"/usr/src/tensorrt/bin/trtexec --onnx={file}"]
    te += [f"--{f.lower()}" for f in cfg["flags"]]
    te += ["--noTF32"] if "TF32" in cfg["clear_flags"] else []
    if not cfg["static"]:
        te += [f"--{k}Shapes={name}:{_shape_text(prof[k], 'x')}" for k in ("min", "opt", "max")]
    te += [f"--memPoolSize=workspace:{ws}M", f"--saveEngine={Path(file).stem}.plan"]
    return {"polygraphy": " ".join(pg), "trtexec": " ".join(te)}


def prepare_tensorrt(
    bundle_path: str | os.PathLike,
    *,
    precision: str = "fp16",
    batch: int | tuple[int, int, int] | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    trt_version: str = DEFAULT_TRT_VERSION,
) -> Artifact:
    """Add the TensorRT-ready ONNX and its build config to a bundle (host side; TensorRT is not needed).

    The source is the bundle's fp32 ONNX artifact (kind ``onnx``) for ``fp32`` / ``fp16``, or its INT8 QDQ ONNX for
    ``int8`` (``edgesep quantize`` makes it, symmetric and with float biases as TensorRT needs). With a static batch
    (``batch`` an int, or a model exported with one) the input's batch dim is fixed in the file, otherwise it stays
    symbolic and the build config carries the optimization profile. The file written is checked with
    ``check_tensorrt``; nothing is added when it has errors.

    Args:
        bundle_path: a bundle directory (not a tar: the artifact is written into it).
        precision: ``"fp16"`` (default), ``"int8"`` or ``"fp32"``.
        batch: None (the model's static batch, else ``DEFAULT_PROFILE`` = (1, 1, 64)), an int (static batch), or
            ``(min, opt, max)``.
        workspace_mb: the builder's workspace pool, MiB.
        trt_version: the device's TensorRT to check against: ``"10.3"`` (JetPack 6), ``"10.0"`` .. ``"10.15"``,
            ``"10.x"``.
    Returns:
        The new artifact ``model.trt.<precision>.onnx`` (kind ``trt-onnx``, target ``jetson``, id
        ``trt-onnx-<precision>-jetson``; one made earlier for the same precision is replaced). ``extra`` holds
        ``build_config``, ``from`` / ``source_sha256`` (the source artifact), ``check`` (version, counts, warnings),
        ``batch_fixed`` and ``commands`` (``polygraphy`` / ``trtexec``).
    Raises:
        ConfigError: bad precision, batch, workspace or trt_version; a model input other than the manifest's; a
            model with external data.
        BundleError: the path is not a bundle directory, or the bundle does not verify.
        BundleLookupError: no source artifact (for int8: run ``edgesep quantize`` first).
        TensorRtCheckError: the offline check found errors; its message lists each one with its node.
    """
    if precision not in TRT_PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {list(TRT_PRECISIONS)}")
    _positive_int(workspace_mb, "workspace_mb")
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - the export extra is installed wherever bundles are made
        raise BackendMissingError("prepare_tensorrt needs the onnx package: pip install 'edgesep[export]'") from e
    from edgesep.bundle import open_bundle_for_writing
    from edgesep.export._check import check_tensorrt

    path = Path(bundle_path)
    with open_bundle_for_writing(path, "prepare_tensorrt") as bundle:
        src_precision = "int8" if precision == "int8" else "fp32"
        try:
            src = bundle.artifact(kind="onnx", precision=src_precision)
        except BundleLookupError as e:
            hint = f" Quantize it first: `edgesep quantize {path}`" if precision == "int8" else " Re-export the bundle"
            raise BundleLookupError(f"{e}.{hint}") from e
        if src.external_data:
            raise ConfigError(
                f"{src.file} keeps its weights in external data files; prepare_tensorrt writes a single-file ONNX "
                "for TensorRT and supports models under 2 GB stored in one file only"
            )
        model = onnx.load_model_from_string(bundle.path_of(src).read_bytes())
        spec = bundle.manifest.input
        inits = {t.name for t in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in inits]
        if [i.name for i in inputs] != [spec.name]:
            raise ConfigError(
                f"{src.file} has inputs {[i.name for i in inputs]}; TensorRT builds here take the one input the "
                f"manifest declares, {spec.name!r}"
            )
        shape = [_dim(d) for d in inputs[0].type.tensor_type.shape.dim]
        outputs = [o.name for o in model.graph.output]
        out_name = bundle.manifest.output.name if bundle.manifest.output.name in outputs else outputs[0]
        cfg = make_build_config(
            spec.name,
            shape,
            precision,
            batch=batch,
            workspace_mb=workspace_mb,
            trt_version=trt_version,
            output_name=out_name,
        )
        batch_fixed = cfg["static"] and not isinstance(shape[0], int)
        if batch_fixed:
            _fix_batch(model, spec.name, cfg["profile"]["min"][0])
            data = model.SerializeToString()
        else:
            data = bundle.path_of(src).read_bytes()  # unchanged: the same bytes (and sha256) as the source
        file = f"model.trt.{precision}.onnx"
        report = check_tensorrt(onnx.load_model_from_string(data), trt_version=trt_version)
        if not report.ok:
            raise TensorRtCheckError(f"{file} (from {src.file}, artifact {src.id})", report)
        cfg["trt_version"] = report.version  # normalized: "10.3.0" -> "10.3"
        extra = {
            "build_config": cfg,
            "from": src.id,
            "source_sha256": src.sha256,
            "batch_fixed": bool(batch_fixed),
            "check": {
                "trt_version": report.version,
                "errors": 0,
                "warnings": [i.to_dict() for i in report.warnings],
                "notes": len(report.infos),
                "source": report.source,
            },
            "builder": "edgesep.runtimes.tensorrt.build_engine on the device (TensorRT Python API)",
            "commands": _commands(file, cfg),
        }
        with tempfile.TemporaryDirectory(prefix="edgesep-trt-") as tmp:
            tmp_file = Path(tmp) / file
            tmp_file.write_bytes(data)
            return bundle.add_artifact(tmp_file, file, TRT_KIND, precision, TRT_TARGET, extra=extra)


# ---------------------------------------------------------------------------------------------------------------
# device side: TensorRT and CUDA, imported lazily


def _import_tensorrt() -> Any:
    """``import tensorrt`` (10.x), or ``BackendMissingError(TENSORRT_MISSING)``."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a broken/stub install raising something else on import
        raise BackendMissingError(TENSORRT_MISSING) from e
    major = str(getattr(trt, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < 10:
        raise BackendMissingError(
            f"TensorRT {getattr(trt, '__version__', '?')} is installed, but edgesep needs TensorRT 10 (JetPack 6); "
            "upgrade JetPack"
        )
    return trt


def _import_cuda() -> Any:
    """``polygraphy.cuda`` (DeviceArray, Stream, wrapper), or ``BackendMissingError(POLYGRAPHY_MISSING)``."""
    try:
        from polygraphy import cuda
    except ImportError as e:
        raise BackendMissingError(POLYGRAPHY_MISSING) from e
    return cuda


_LOGGER: Any = None


def _logger(trt: Any, verbose: bool = False) -> Any:
    """One TensorRT logger per process (TensorRT keeps a pointer to it): prints warnings, collects errors."""
    global _LOGGER
    if _LOGGER is None or _LOGGER.trt is not trt:

        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.trt = trt
                self.errors: list[str] = []
                self.verbose = False
                self._errors = {trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR}
                self._shown = {trt.ILogger.Severity.WARNING, *self._errors}

            def log(self, severity: Any, msg: str) -> None:
                if severity in self._errors:
                    self.errors.append(str(msg))
                if severity in self._shown or self.verbose:
                    print(f"[TensorRT {severity.name}] {msg}", file=sys.stderr)

            @contextlib.contextmanager
            def capture(self) -> Iterator[list[str]]:
                self.errors = []
                yield self.errors

        _LOGGER = _Logger()
    _LOGGER.verbose = bool(verbose)
    return _LOGGER


def gpu_identity() -> dict[str, str]:
    """The CUDA device's name, compute capability and (on a Jetson) board, as used in the engine cache key.

    Reads ``libcudart`` through polygraphy's wrapper (``cudaGetDevice``, ``cudaGetDeviceProperties`` — the name is
    the struct's first field, ``char name[256]`` — and ``cudaDeviceGetAttribute`` 75/76 for the compute
    capability) and ``/proc/device-tree/model`` (the Jetson module, e.g. "NVIDIA Jetson Orin Nano Developer Kit").

    Returns:
        ``{"name", "compute_capability", "board", "id"}``; ``id`` (``"Orin (sm_87) / NVIDIA Jetson Orin Nano ..."``)
        goes into the key.
    Raises:
        BackendMissingError: no polygraphy.
        TensorRtBuildError: CUDA reports an error (no GPU, driver mismatch).
    """
    cudart = _import_cuda().wrapper().handle
    dev = ctypes.c_int(0)
    status = cudart.cudaGetDevice(ctypes.byref(dev))
    props = ctypes.create_string_buffer(8192)  # cudaDeviceProp is ~1 KB; extra room for newer layouts
    status = status or cudart.cudaGetDeviceProperties(props, dev)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    status = status or cudart.cudaDeviceGetAttribute(ctypes.byref(major), 75, dev)  # ComputeCapabilityMajor
    status = status or cudart.cudaDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ComputeCapabilityMinor
    if status:
        raise TensorRtBuildError("CUDA device query", "CUDA", [f"cudart error {status}"], "\nIs a GPU visible here?")
    name = props.raw[:256].split(b"\0", 1)[0].decode("utf-8", "replace").strip() or "unknown GPU"
    board = ""
    with contextlib.suppress(OSError):
        board = Path("/proc/device-tree/model").read_bytes().split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    cc = f"{major.value}.{minor.value}"
    ident = f"{name} (sm_{major.value}{minor.value})" + (f" / {board}" if board else "")
    return {"name": name, "compute_capability": cc, "board": board, "id": ident}


def _parser_errors(parser: Any) -> list[str]:
    out = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        parts = []
        for attr in ("node_name", "node_operator"):
            with contextlib.suppress(Exception):
                v = getattr(err, attr)()
                if v:
                    parts.append(f"{attr.split('_')[1]} {v}")
        desc = str(err)
        with contextlib.suppress(Exception):
            desc = err.desc() or desc
        out.append(f"{', '.join(parts)}: {desc}" if parts else desc)
    return out


def _build_plan(trt: Any, onnx_path: Path, cfg: Mapping[str, Any], verbose: bool) -> bytes:
    """Parse, configure and build; returns the serialized plan."""
    logger = _logger(trt, verbose)
    what = str(onnx_path)
    with logger.capture() as logged:
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch always; no flag needed
        parser = trt.OnnxParser(network, logger)
        ok = parser.parse_from_file(str(onnx_path))
        if not ok or parser.num_errors:
            raise TensorRtBuildError(
                what,
                "ONNX parsing",
                _parser_errors(parser) + list(logged),
                "\nRun the offline check (`edgesep check BUNDLE --for tensorrt --trt-version <device's>`) and "
                "re-export or re-quantize",
            )
        name = cfg["input"]["name"]
        inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
        if name not in inputs:
            raise ConfigError(f"{what} has inputs {sorted(inputs)}; the build config names {name!r}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg["workspace_mb"]) << 20)
        for flag in cfg["flags"]:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        for flag in cfg["clear_flags"]:
            config.clear_flag(getattr(trt.BuilderFlag, flag))
        prof = cfg["profile"]
        net_shape = [int(d) for d in inputs[name].shape]
        if any(d < 0 for d in net_shape):
            profile = builder.create_optimization_profile()
            profile.set_shape(name, prof["min"], prof["opt"], prof["max"])
            config.add_optimization_profile(profile)
        elif net_shape != prof["min"] or net_shape != prof["max"]:
            raise ConfigError(f"{what} has the static input shape {net_shape}; the build config's profile is {prof}")
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise TensorRtBuildError(what, "engine build", list(logged), "\nTry a larger workspace_mb")
        return bytes(plan)


@dataclass(frozen=True)
class _Engine:
    plan: Path
    meta: dict[str, Any]
    built: bool


def _ensure_engine(
    trt: Any, onnx_path: Path, cfg: dict[str, Any], cache_dir: Path, *, rebuild: bool, verbose: bool
) -> _Engine:
    gpu = gpu_identity()
    onnx_sha = sha256_file(onnx_path)
    key = engine_cache_key(onnx_sha, str(trt.__version__), gpu["id"], cfg)
    plan_path, meta_path = engine_paths(cache_dir, key)
    if not rebuild and plan_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("key") == key and meta.get("plan_sha256") == sha256_file(plan_path):
            return _Engine(plan_path, meta, built=False)
        # a half-written or modified cache entry: rebuild over it
    t0 = time.perf_counter()
    plan = _build_plan(trt, onnx_path, cfg, verbose)
    seconds = time.perf_counter() - t0
    atomic_write_bytes(plan_path, plan)  # the plan first, then the metadata that vouches for it
    meta = {
        "key": key,
        "onnx_sha256": onnx_sha,
        "onnx_file": str(onnx_path),
        "trt_version": str(trt.__version__),
        "gpu": gpu,
        "build_config": cfg,
        "plan_sha256": hashlib.sha256(plan).hexdigest(),
        "plan_size": len(plan),
        "build_seconds": round(seconds, 3),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "edgesep_version": __version__,
    }
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    return _Engine(plan_path, meta, built=True)


def build_engine(
    onnx_path: str | os.PathLike,
    build_config: Mapping[str, Any],
    cache_dir: str | os.PathLike,
    *,
    rebuild: bool = False,
    verbose: bool = False,
) -> Path:
    """Build (or reuse) the TensorRT engine for an ONNX file on this device; returns the plan's path.

    The plan goes to ``<cache_dir>/<key>.plan`` (written atomically) with ``<key>.json`` (key, ONNX sha256, TensorRT
    version, GPU, build config, plan sha256 and size, build seconds), ``key = engine_cache_key(sha256 of the ONNX,
    tensorrt.__version__, gpu_identity()["id"], build_config)``. A cached plan is reused when its metadata has the
    key and the plan's sha256 still matches; otherwise it is rebuilt.

    Args:
        onnx_path: the TensorRT-ready ONNX (``model.trt.<precision>.onnx`` from ``prepare_tensorrt``).
        build_config: its ``extra.build_config``.
        cache_dir: the engine directory, e.g. ``engine_cache_dir(workdir)``.
        rebuild: build even when a cached plan matches.
        verbose: print TensorRT's info and verbose messages too (warnings and errors always go to stderr).
    Raises:
        BackendMissingError: TensorRT (JetPack) or polygraphy is missing.
        ConfigError: an invalid build config, or one that does not fit the ONNX.
        TensorRtBuildError: the parser (every parser error, with node names) or the builder failed.
    """
    trt = _import_tensorrt()
    cfg = validate_build_config(build_config)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ConfigError(f"{onnx_path} is not a file")
    return _ensure_engine(trt, onnx_path, cfg, Path(cache_dir), rebuild=rebuild, verbose=verbose).plan


class _DeviceBuffers:
    """Device arrays (one per tensor name, grown as needed) and one CUDA stream, via ``polygraphy.cuda``."""

    def __init__(self) -> None:
        from polygraphy.datatype import DataType

        self._cuda = _import_cuda()
        self._dtype = DataType.from_dtype
        self.stream = self._cuda.Stream()
        self._arrays: dict[str, tuple[Any, np.dtype]] = {}

    @property
    def handle(self) -> int:
        return int(self.stream.ptr)

    def _array(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        dtype = np.dtype(dtype)
        arr, old = self._arrays.get(name, (None, None))
        if arr is None or old != dtype:
            if arr is not None:
                arr.free()
            arr = self._cuda.DeviceArray(shape=shape, dtype=self._dtype(dtype))
            self._arrays[name] = (arr, dtype)
        return arr.resize(shape)

    def upload(self, name: str, host: np.ndarray) -> int:
        arr = self._array(name, host.shape, host.dtype)
        arr.copy_from(host, self.stream)
        return int(arr.ptr)

    def allocate(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> int:
        return int(self._array(name, shape, dtype).ptr)

    def download(self, name: str, host: np.ndarray) -> np.ndarray:
        self._arrays[name][0].copy_to(host, self.stream)
        return host

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        for arr, _ in self._arrays.values():
            arr.free()
        self._arrays.clear()
        self.stream.free()


def _find_build_config(path: Path, precision: str) -> dict[str, Any] | None:
    """The build config of the bundle artifact at ``path`` (from the bundle's manifest), else a default one."""
    from edgesep.bundle import MANIFEST_NAME, open_bundle

    root = path.parent
    if not (root / MANIFEST_NAME).is_file():
        return None
    with open_bundle(root, verify=False) as bundle:  # the caller verified the artifact it passes
        for art in bundle.manifest.artifacts:
            if bundle.path_of(art).resolve() == path.resolve():
                if isinstance(art.extra.get("build_config"), dict):
                    return art.extra["build_config"]
                break
        spec = bundle.manifest.input
        return make_build_config(spec.name, list(spec.shape), precision, output_name=bundle.manifest.output.name)


@register_backend
class TensorRtRuntime(Runtime):
    """A TensorRT engine built (or loaded from the cache) on this device, run with CUDA.

    Options (keyword arguments): ``build_config`` (default: the artifact's ``extra.build_config`` from the manifest
    next to ``path``; for a plain ONNX artifact, a default profile for the manifest's input), ``workdir`` (engines go
    to ``<workdir>/engines``; default ``~/.cache/edgesep/engines``), ``rebuild`` (ignore the cache), ``verbose``.
    """

    name = "tensorrt"

    @classmethod
    def available(cls) -> bool:
        try:
            _import_tensorrt()
            _import_cuda()
        except BackendMissingError:
            return False
        return True

    @classmethod
    def version(cls) -> str | None:
        try:
            return str(_import_tensorrt().__version__)
        except BackendMissingError:
            return None

    def __init__(self, path: str | Path, *, precision: str, target: str = "any", threads: int | None = None,
                 input_name: str = "input", **options: Any):  # fmt: skip
        """Build or load the engine for the ONNX at ``path``.

        Raises:
            BackendMissingError: TensorRT (exact text ``TENSORRT_MISSING``) or polygraphy is missing.
            ConfigError: unknown options, a build config that does not match ``precision`` / ``input_name``.
            TensorRtBuildError: parsing, building or deserializing failed.
        """
        self._buffers: _DeviceBuffers | None = None
        trt = _import_tensorrt()
        _import_cuda()
        unknown = set(options) - {"build_config", "workdir", "rebuild", "verbose"}
        if unknown:
            known = "build_config, workdir, rebuild, verbose"
            raise ConfigError(f"unknown TensorRT options {sorted(unknown)}; known: {known}")
        self.trt, self.path, self.target, self.threads = trt, Path(path), target, threads
        cfg = options.get("build_config") or _find_build_config(self.path, precision)
        if cfg is None:
            raise ConfigError(
                f"no build config for {self.path}: pass build_config= (make_build_config) or use the artifact "
                "prepare_tensorrt adds to a bundle"
            )
        self.build_config = validate_build_config(cfg)
        if self.build_config["precision"] != precision:
            raise ConfigError(
                f"the build config is for {self.build_config['precision']}, the artifact is {precision}; pass the "
                "matching artifact or build config"
            )
        if self.build_config["input"]["name"] != input_name:
            raise ConfigError(f"the build config's input is {self.build_config['input']['name']!r}, not {input_name!r}")
        self.precision, self.input_name = precision, input_name
        workdir = options.get("workdir")
        self.cache_dir = engine_cache_dir(workdir) if workdir is not None else default_cache_dir()
        self._engine_rec = _ensure_engine(
            trt,
            self.path,
            self.build_config,
            self.cache_dir,
            rebuild=bool(options.get("rebuild", False)),
            verbose=bool(options.get("verbose", False)),
        )
        logger = _logger(trt, bool(options.get("verbose", False)))
        with logger.capture() as logged:
            self._runtime = trt.Runtime(logger)
            self._engine = self._runtime.deserialize_cuda_engine(self._engine_rec.plan.read_bytes())
            if self._engine is None:
                raise TensorRtBuildError(str(self._engine_rec.plan), "engine deserialization", list(logged))
            self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        ins = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if self._engine.get_tensor_mode(n) != trt.TensorIOMode.INPUT]
        if ins != [input_name] or len(outs) != 1:
            raise ConfigError(f"the engine has inputs {ins} and outputs {outs}; expected one input {input_name!r}")
        self._out = outs[0]
        self._in_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(input_name)))
        self._out_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._out)))
        prof = self.build_config["profile"]
        self.min_batch, self.max_batch = prof["min"][0], prof["max"][0]
        self._sample_shape = tuple(prof["min"][1:])
        self._buffers = _cuda_buffers()

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, classes) float32 for a float32 batch (N, C, H, W) in [0, 1], in chunks of the profile's max
        batch; a chunk smaller than its min batch (a static engine) is zero-padded and the padding dropped."""
        x = np.asarray(x)
        if x.ndim != 1 + len(self._sample_shape) or tuple(x.shape[1:]) != self._sample_shape:
            raise ShapeMismatchError(
                f"input shape {tuple(x.shape)} does not fit the engine's (N, {', '.join(map(str, self._sample_shape))})"
            )
        if not np.issubdtype(x.dtype, np.floating):
            raise ConfigError(f"input dtype {x.dtype} must be float32 (pixels in [0, 1])")
        if len(x) == 0:
            return np.empty((0, *self._out_shape(self.min_batch)[1:]), np.float32)
        chunks = []
        for i in range(0, len(x), self.max_batch):
            chunk = np.ascontiguousarray(x[i : i + self.max_batch], dtype=self._in_dtype)
            n = len(chunk)
            if n < self.min_batch:
                pad = np.zeros((self.min_batch - n, *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            chunks.append(self._run_chunk(chunk)[:n])
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def _out_shape(self, n: int) -> tuple[int, ...]:
        if not self._context.set_input_shape(self.input_name, (n, *self._sample_shape)):
            raise ShapeMismatchError(f"TensorRT refused the input shape {(n, *self._sample_shape)}")
        return tuple(int(d) for d in self._context.get_tensor_shape(self._out))

    def _run_chunk(self, chunk: np.ndarray) -> np.ndarray:
        assert self._buffers is not None
        out_shape = self._out_shape(len(chunk))
        buf = self._buffers
        self._context.set_tensor_address(self.input_name, buf.upload(self.input_name, chunk))
        self._context.set_tensor_address(self._out, buf.allocate(self._out, out_shape, self._out_dtype))
        if not self._context.execute_async_v3(buf.handle):
            raise TensorRtBuildError(str(self._engine_rec.plan), "execution (execute_async_v3)", [])
        out = buf.download(self._out, np.empty(out_shape, self._out_dtype))
        buf.synchronize()
        return out

    def info(self) -> dict[str, Any]:
        meta = self._engine_rec.meta
        gpu = meta.get("gpu", {})
        return {
            "backend": self.name,
            "version": str(self.trt.__version__),
            "precision": self.precision,
            "target": self.target,
            "threads": self.threads,
            "gpu": gpu.get("name"),
            "compute_capability": gpu.get("compute_capability"),
            "board": gpu.get("board"),
            "cache_key": meta.get("key"),
            "engine": str(self._engine_rec.plan),
            "engine_built_now": self._engine_rec.built,
            "build_seconds": meta.get("build_seconds"),
            "flags": list(self.build_config["flags"]),
            "clear_flags": list(self.build_config["clear_flags"]),
            "profile": self.build_config["profile"],
            "workspace_mb": self.build_config["workspace_mb"],
            "checked_against": self.build_config["trt_version"],
        }

    def close(self) -> None:
        if self._buffers is not None:
            self._buffers.close()
            self._buffers = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _cuda_buffers() -> _DeviceBuffers:
    """The runtime's device buffers (a seam: tests without a GPU substitute host memory here)."""
    return _DeviceBuffers()
