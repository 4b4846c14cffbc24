"""INT8 post-training quantization of an ONNX file with ONNX Runtime (QDQ), behind an accuracy gate.

``quantize_onnx`` runs ``quant_pre_process`` (shape inference, basic optimization) and ``quantize_static`` (QDQ
format, int8 activations and weights, per-channel weight scales), then measures top-1 accuracy of the fp32 and the
int8 file with ONNX Runtime on a clean set and on adversarial sets crafted on the float model (transferred), and
writes the int8 file only when the drops stay within the limits. Per weighted layer (MatMul / Gemm / Conv) it
reports the SQNR of the layer's output (float model vs QDQ model) and of its weight; ``auto_exclude`` keeps the
lowest-SQNR layers in fp32, one at a time, until the gate passes.

onnx, onnxruntime and numpy only (no torch).

What ONNX Runtime (1.32) does on this project's graphs, and how this module deals with it:

- Calibration batches. MinMax reduces each batch to a (min, max) pair, so any batch sizes work. Entropy and
  Percentile keep every batch's tensors and ``np.asarray`` the list: a shorter last batch raises "inhomogeneous
  shape". Calibration is therefore fed in equal batches: the largest divisor of N not above ``calib_batch`` for a
  symbolic batch axis (kept as ``"batch"`` through pre-processing and quantization), or the model's static batch
  with the last batch filled up with the first samples.
- Entropy through ``quantize_static`` is MinMax in disguise: it builds the histogram calibrator with 128 bins and
  128 quantized bins, which leaves the KL search a single candidate, the full range (the scales came out
  bit-identical to MinMax), and it passes no option to change that. This module runs ORT's calibrator itself
  (``create_calibrator``, 512 bins for Entropy) and hands the ranges to ``quantize_static`` through its calibration
  cache (``calibration_cache_path``), once per call: auto-exclusion re-quantizes without re-calibrating.
- Tensor names in the QDQ model. ORT keeps node names, not always tensor names. An activation X feeding quantized
  consumers becomes ``X -> QuantizeLinear -> X_QuantizeLinear_Output -> DequantizeLinear ->
  X_DequantizeLinear_Output`` and X is still the producer's float output. A graph output Y is renamed: the producer
  writes ``Y_QuantizeLinear_Input`` and the DequantizeLinear writes Y. A Relu after a quantized Gemm / MatMul is
  folded into the output quantization (zero point at the bottom of the int8 range clips at 0) and removed: the
  Gemm then writes the Relu's output name. So the QDQ model's ``relu`` is the *pre*-activation Gemm output while
  the float model's ``relu`` is post-Relu, and the float Gemm output ``linear`` does not exist in the QDQ model:
  matching tensors by name compares different things. SQNR therefore matches **nodes by name** and compares
  ``node.output[0]`` in both models: the layer's output computed from quantized inputs and weights, before the
  output's own quantization (which shows up at the next layer's input). Both models run with ORT's graph
  optimizations off (as ORT's own ``qdq_loss_debug`` does), so the QDQ model runs as float fake-quant and the
  exposed tensors are not fused away. Unnamed or duplicate node names are made unique after pre-processing.
- Per-channel weight scales land on the output axis: ``MatMul(x, W)`` with W (n, m) on the right (the project's
  Kronecker lowering) -> DequantizeLinear ``axis=1``, m scales; ``Gemm`` with ``transB=1`` (W (m, n), dense
  ``nn.Linear``) -> ``axis=0``, m scales.
- The quantizer stamps the model with every ORT opset domain (``com.microsoft``, ``ai.onnx.ml``, ...); the written
  file keeps only the domains its nodes use, and is checked for standard ops only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import inspect
import io
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    create_calibrator,
    quant_pre_process,
    quantize_static,
    save_tensors_data,
)

from edgesep._config import SerializableConfig, register_config
from edgesep._io import atomic_write_bytes, jsonable, sha256_file
from edgesep.errors import AccuracyGateError, ConfigError, ShapeMismatchError
from edgesep.export import _graph

__all__ = [
    "QUANT_METHODS",
    "WEIGHTED_OPS",
    "GateRow",
    "LayerQuant",
    "QuantConfig",
    "QuantReport",
    "layer_sqnr",
    "quantize_onnx",
    "sqnr_db",
    "weighted_nodes",
]

log = logging.getLogger(__name__)

QUANT_METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")
WEIGHTED_OPS: tuple[str, ...] = ("Conv", "Gemm", "MatMul")
_CALIBRATION = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
_DROP_TOL = 1e-9  # drops are differences of fractions * 100: do not fail a gate on float round-off


# ----------------------------------------------------------------------------------------------------------------
# config and report


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _positive_int(v: object, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


@register_config
@dataclasses.dataclass(frozen=True)
class QuantConfig(SerializableConfig):
    """How ``quantize_onnx`` quantizes and gates; written into the report, loads back with ``config_from_dict``.

    Attributes:
        method: calibration method, one of ``QUANT_METHODS`` (ORT's MinMax, Entropy, Percentile).
        per_channel: per-channel weight scales (on the output axis) instead of one scale per tensor.
        exclude: fnmatch patterns over node names and op types; matching nodes stay fp32.
        auto_exclude: when the gate fails, keep the lowest-SQNR weighted layers in fp32 one at a time.
        max_drop: largest allowed clean top-1 drop, percentage points (a negative value can never pass).
        max_robust_drop: largest allowed top-1 drop on each adversarial set, percentage points.
        calib_batch: upper bound of the calibration batch size.
        sqnr_samples: calibration samples (the first ones) on which per-layer SQNR is measured.
        batch_size: inputs per ONNX Runtime run when evaluating.
    """

    method: str = "minmax"
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    auto_exclude: bool = False
    max_drop: float = 1.0
    max_robust_drop: float = 2.0
    calib_batch: int = 64
    sqnr_samples: int = 256
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ConfigError(f"unknown quantization method {self.method!r}; pick one of {list(QUANT_METHODS)}")
        exclude = (self.exclude,) if isinstance(self.exclude, str) else self.exclude
        if not isinstance(exclude, Iterable) or not all(isinstance(p, str) and p for p in exclude):
            raise ConfigError(f"exclude must be a list of non-empty name patterns, got {self.exclude!r}")
        object.__setattr__(self, "exclude", tuple(exclude))
        for name in ("per_channel", "auto_exclude"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("max_drop", "max_robust_drop"):
            v = getattr(self, name)
            if not _is_number(v) or math.isnan(v):
                raise ConfigError(f"{name} must be a number of percentage points, got {v!r}")
            object.__setattr__(self, name, float(v))
        for name in ("calib_batch", "sqnr_samples", "batch_size"):
            object.__setattr__(self, name, _positive_int(getattr(self, name), name))


@dataclasses.dataclass(frozen=True)
class GateRow:
    """One gate check: top-1 accuracy of fp32 and int8 on one evaluation set.

    Attributes:
        metric: ``"clean"`` or ``"robust[<set name>]"``.
        n: examples.
        fp32, int8: top-1 accuracy in [0, 1] (on the adversarial inputs for a robust row).
        agreement: fraction of examples where fp32 and int8 predict the same class.
        drop_pp: ``100 * (fp32 - int8)``, percentage points.
        limit_pp: the largest allowed drop.
        ok: ``drop_pp <= limit_pp``.
    """

    metric: str
    n: int
    fp32: float
    int8: float
    agreement: float
    drop_pp: float
    limit_pp: float
    ok: bool


@dataclasses.dataclass(frozen=True)
class LayerQuant:
    """One weighted node (MatMul / Gemm / Conv with a stored weight) and how quantization treated it.

    Attributes:
        node: node name (as in the pre-processed model, which keeps the exporter's names).
        op_type: MatMul, Gemm or Conv.
        weight: name of the float weight initializer; weight_shape: its shape.
        quantized: the weight reaches the node through a DequantizeLinear in the written model.
        weight_axis: per-channel axis of that DequantizeLinear; None for per-tensor scales or a float weight.
        weight_scales: number of weight scales (0 for a float weight).
        weight_sqnr_db: SQNR of the dequantized weight against the float one; None for a float weight.
        sqnr_db: SQNR of the node's output, float model vs the written model (None: no noise at all).
        sensitivity_db: the same with every layer quantized (only ``exclude`` honoured): the ranking that
            auto-exclusion follows, lowest first.
    """

    node: str
    op_type: str
    weight: str
    weight_shape: list[int]
    quantized: bool
    weight_axis: int | None
    weight_scales: int
    weight_sqnr_db: float | None
    sqnr_db: float | None
    sensitivity_db: float | None


def _fmt_db(v: float | None) -> str:
    if v is None:
        return "-"
    return "inf" if v == math.inf else f"{v:.1f}"


def _layer_state(layer: LayerQuant, kept: set[str], excluded: set[str]) -> str:
    if layer.quantized:
        return "yes"
    return "fp32 (auto)" if layer.node in kept else ("fp32 (excl)" if layer.node in excluded else "fp32")


def _text_table(rows: list[list[str]]) -> list[str]:
    """Aligned lines: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells))
    return lines


@dataclasses.dataclass(frozen=True)
class QuantReport:
    """What ``quantize_onnx`` did and measured.

    Attributes:
        fp32_path, out_path: the float input and the int8 output (written only when ``passed``).
        written: the int8 file was written.
        config: the options (a ``QuantConfig``).
        input_name: the graph input fed.
        calib_n, calib_batch: calibration samples and the batch size they were fed in.
        sqnr_n: samples the per-layer SQNR was measured on.
        excluded: nodes kept fp32 by ``config.exclude`` (resolved patterns), in graph order.
        kept_fp32: nodes kept fp32 by auto-exclusion, in the order they were excluded (lowest SQNR first).
        layers: one ``LayerQuant`` per weighted node, in graph order.
        gate: one ``GateRow`` per evaluation set: clean first, then each adversarial set.
        size_fp32, size_int8: file sizes in bytes (size_int8 of the last candidate when nothing was written).
        sha256_fp32: of the fp32 file (never modified); sha256_int8: of the written file, or None.
        census_int8: ``{op_type: count}`` of the int8 graph.
        attempts: quantizations run (1 + layers auto-excluded).
        passed: every gate row is ok.
        seconds: wall time of ``preprocess``, ``calibrate``, ``quantize`` (all attempts), ``evaluate``, ``sqnr``,
            ``total``.
    """

    fp32_path: str
    out_path: str
    written: bool
    config: QuantConfig
    input_name: str
    calib_n: int
    calib_batch: int
    sqnr_n: int
    excluded: list[str]
    kept_fp32: list[str]
    layers: list[LayerQuant]
    gate: list[GateRow]
    size_fp32: int
    size_int8: int
    sha256_fp32: str
    sha256_int8: str | None
    census_int8: dict[str, int]
    attempts: int
    passed: bool
    seconds: dict[str, float]

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def per_channel(self) -> bool:
        return self.config.per_channel

    @property
    def compression(self) -> float:
        """size_fp32 / size_int8."""
        return self.size_fp32 / self.size_int8 if self.size_int8 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (strict JSON: an SQNR without noise is None); ``config`` as ``{"_type", ...}``."""
        d = jsonable(self)
        d["method"], d["per_channel"] = self.method, self.per_channel
        return d

    def rows(self) -> dict[str, list[list[str]]]:
        """The two tables as text cells, each a header row then one row per item: ``{"gate", "layers"}``."""
        gate = [["metric", "n", "fp32 %", "int8 %", "agree %", "drop pp", "limit pp", "ok"]]
        for r in self.gate:
            cells = [100 * r.fp32, 100 * r.int8, 100 * r.agreement, r.drop_pp, r.limit_pp]
            gate.append([r.metric, str(r.n), *(f"{c:.2f}" for c in cells), "yes" if r.ok else "NO"])
        layers = [["layer", "op", "weight", "int8", "axis", "scales", "weight dB", "SQNR dB", "all-int8 dB"]]
        kept, excl = set(self.kept_fp32), set(self.excluded)
        for L in self.layers:
            layers.append(
                [
                    L.node,
                    L.op_type,
                    "x".join(map(str, L.weight_shape)),
                    _layer_state(L, kept, excl),
                    "-" if L.weight_axis is None else str(L.weight_axis),
                    str(L.weight_scales),
                    _fmt_db(L.weight_sqnr_db),
                    _fmt_db(L.sqnr_db),
                    _fmt_db(L.sensitivity_db),
                ]
            )
        return {"gate": gate, "layers": layers}

    def table(self) -> str:
        """A plain-text summary: a header line, the accuracy gate, the per-layer table."""
        status = "PASSED" if self.passed else "FAILED"
        head = (
            f"INT8 QDQ ({self.method}, {'per-channel' if self.per_channel else 'per-tensor'} weights), calib "
            f"{self.calib_n} in batches of {self.calib_batch}: gate {status} after {self.attempts} attempt(s); "
            f"{self.size_fp32:,} -> {self.size_int8:,} bytes ({self.compression:.2f}x)"
        )
        rows = self.rows()
        return "\n".join([head, "", *_text_table(rows["gate"]), "", *_text_table(rows["layers"])])


# ----------------------------------------------------------------------------------------------------------------
# graph helpers


def _as_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))


def weighted_nodes(model: onnx.ModelProto | str | os.PathLike) -> list[tuple[str, str, str]]:
    """The weighted nodes of a graph: MatMul / Gemm / Conv whose weight is an initializer.

    Returns:
        ``[(node name, op_type, weight initializer name)]`` in graph order; the weight is input 1 (input 0 for a
        MatMul that holds its weight on the left). A MatMul of two activations (attention) is not listed.
    """
    m = _as_model(model)
    inits = {i.name for i in m.graph.initializer}
    out: list[tuple[str, str, str]] = []
    for node in m.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        if node.input[1] in inits:
            out.append((node.name, node.op_type, node.input[1]))
        elif node.op_type == "MatMul" and node.input[0] in inits:
            out.append((node.name, node.op_type, node.input[0]))
    return out


def _name_nodes(model: onnx.ModelProto) -> bool:
    """Give every node a unique non-empty name (exclusion and SQNR match nodes by name); True if any changed."""
    seen: set[str] = set()
    changed = False
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        base, k = name, 1
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        if name != node.name:
            node.name, changed = name, True
        seen.add(name)
    return changed


def _single_input(model: onnx.ModelProto) -> tuple[str, list[int | str | None]]:
    shapes = _graph.input_shapes(model)
    if len(shapes) != 1:
        raise ConfigError(f"quantize_onnx needs a model with exactly one input, this one has {sorted(shapes)}")
    return next(iter(shapes.items()))


def _matches(node: onnx.NodeProto, pattern: str) -> bool:
    return fnmatch.fnmatchcase(node.name, pattern) or fnmatch.fnmatchcase(node.op_type, pattern)


def _resolve_exclude(patterns: Sequence[str], model: onnx.ModelProto) -> list[str]:
    """Node names (graph order) whose name or op type matches any fnmatch pattern; every pattern must match."""
    nodes = list(model.graph.node)
    unmatched = [p for p in patterns if not any(_matches(n, p) for n in nodes)]
    if unmatched:
        names = [n.name for n in nodes]
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ConfigError(
            f"exclude pattern(s) {unmatched} match no node name or op type. Node names: {shown}; op types: "
            f"{sorted({n.op_type for n in nodes})}. Patterns are fnmatch-style, e.g. 'node_MatMul_*' or 'Gemm'"
        )
    return [n.name for n in nodes if any(_matches(n, p) for p in patterns)]


def _strip_unused_opsets(model: onnx.ModelProto) -> None:
    """Drop opset imports no node uses (ORT's quantizer stamps every ORT domain on the model)."""
    # op_census keys ops outside the default domain "domain::op_type" (subgraphs included)
    used = {""} | {k.split("::")[0] for k in _graph.op_census(model) if "::" in k} | {f.domain for f in model.functions}
    keep = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def _with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> bytes:
    """A serialized copy of ``model`` with the tensors ``names`` added as graph outputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.value_info, *m.graph.input, *m.graph.output]}
    present = {o.name for o in m.graph.output}
    for name in dict.fromkeys(names):
        if name not in present:
            m.graph.output.append(
                onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None)
            )
    return m.SerializeToString()


def _session(model: str | os.PathLike | bytes, *, optimize: bool = True) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT warns about unused initializers on every QDQ model
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------------------------------
# data


def _as_batch(x: Any, what: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim < 2 or len(x) == 0:
        raise ShapeMismatchError(f"{what} must be a non-empty batch (N, *input_shape), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ConfigError(f"{what} holds NaN or infinite values")
    return x


def _as_labels(y: Any, n: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise ShapeMismatchError(f"{what} must be {n} integer labels (one per input), got {y.dtype} {y.shape}")
    return y.astype(np.int64)


def _check_fits(x: np.ndarray, shape: Sequence[int | str | None], input_name: str, what: str) -> None:
    if len(shape) != x.ndim or any(isinstance(d, int) and d != s for d, s in zip(shape[1:], x.shape[1:], strict=True)):
        raise ShapeMismatchError(
            f"{what} of shape {x.shape} does not fit the model input {input_name!r} of shape {list(shape)}"
        )


def _fixed_batches(x: np.ndarray, b: int) -> list[np.ndarray]:
    """Batches of exactly b, the last one filled up with the first samples (a static-batch model)."""
    out = []
    for i in range(0, len(x), b):
        chunk = x[i : i + b]
        if len(chunk) < b:
            chunk = np.concatenate([chunk, np.resize(x, (b - len(chunk), *x.shape[1:]))])
        out.append(chunk)
    return out


def _calib_batches(x: np.ndarray, static: int | None, want: int) -> list[np.ndarray]:
    """Equal-sized calibration batches (ORT's histogram calibrators cannot take a shorter last batch)."""
    if static is not None:
        return _fixed_batches(x, static)
    n = len(x)
    b = max(d for d in range(1, min(want, n) + 1) if n % d == 0)
    return [x[i : i + b] for i in range(0, n, b)]


class _BatchReader(CalibrationDataReader):
    """Feeds precomputed batches to ORT's calibrator."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]):
        self.input_name, self.batches, self.i = input_name, list(batches), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.input_name: self.batches[self.i - 1]}

    def __len__(self) -> int:
        return len(self.batches)


def _run_batches(
    session: ort.InferenceSession, x: np.ndarray, batch_size: int
) -> Iterator[tuple[int, list[np.ndarray]]]:
    """Yield (number of real rows, outputs) per batch; a static-batch model gets full batches (padded with zeros)."""
    inp = session.get_inputs()[0]
    static = inp.shape[0] if isinstance(inp.shape[0], int) else None
    step = static or batch_size
    for i in range(0, len(x), step):
        chunk = x[i : i + step]
        n = len(chunk)
        if static is not None and n < static:
            chunk = np.concatenate([chunk, np.zeros((static - n, *chunk.shape[1:]), np.float32)])
        yield n, session.run(None, {inp.name: chunk})


def _predict(session: ort.InferenceSession, x: np.ndarray, batch_size: int) -> np.ndarray:
    preds = [out[0][:n].reshape(n, -1).argmax(1) for n, out in _run_batches(session, x, batch_size)]
    return np.concatenate(preds)


# ----------------------------------------------------------------------------------------------------------------
# SQNR


def sqnr_db(reference: Any, test: Any) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum(ref^2) / sum((ref - test)^2))`` in dB (float64 sums).

    Returns:
        inf when the two are identical; -inf when the reference is all zeros and the test is not.
    Raises:
        ShapeMismatchError: the shapes differ.
    """
    ref = np.asarray(reference, dtype=np.float64)
    tst = np.asarray(test, dtype=np.float64)
    if ref.shape != tst.shape:
        raise ShapeMismatchError(f"SQNR of tensors of different shapes {ref.shape} and {tst.shape}")
    return _db(float(np.sum(ref * ref)), float(np.sum((ref - tst) ** 2)))


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def layer_sqnr(
    float_model: onnx.ModelProto | str | os.PathLike,
    qdq_model: onnx.ModelProto | str | os.PathLike,
    x: np.ndarray,
    *,
    nodes: Sequence[str] | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """SQNR (dB) of each node's output, float model vs QDQ model, over the inputs x.

    Nodes are matched by name and ``node.output[0]`` is compared in both models (see the module docstring: tensor
    names are not stable across ORT's quantizer). Both models run in ONNX Runtime with graph optimizations off, on
    in-memory copies with those tensors added as graph outputs. Signal and noise powers are summed over all
    batches, so the result equals ``sqnr_db`` of the concatenated tensors.

    Args:
        float_model, qdq_model: ModelProtos or paths; the QDQ model quantized from the float one.
        x: inputs (N, *input_shape).
        nodes: node names; default every weighted node of the float model (``weighted_nodes``).
        batch_size: inputs per run (a static-batch model gets its own batch, filled up with the first samples).
    Returns:
        ``{node name: SQNR dB}`` in the order of ``nodes`` (inf: no noise).
    Raises:
        ConfigError: a node missing from either model.
    """
    fm, qm = _as_model(float_model), _as_model(qdq_model)
    x = _as_batch(x, "x")
    f_nodes = {n.name: n for n in fm.graph.node}
    q_nodes = {n.name: n for n in qm.graph.node}
    names = [w[0] for w in weighted_nodes(fm)] if nodes is None else list(nodes)
    missing = [n for n in names if n not in f_nodes or n not in q_nodes]
    if missing:
        raise ConfigError(f"nodes {missing} are not in both models; float model nodes: {list(f_nodes)[:8]} ...")
    if not names:
        return {}
    f_out = [f_nodes[n].output[0] for n in names]
    q_out = [q_nodes[n].output[0] for n in names]
    f_sess = _session(_with_outputs(fm, f_out), optimize=False)
    q_sess = _session(_with_outputs(qm, q_out), optimize=False)
    static = f_sess.get_inputs()[0].shape[0]
    if isinstance(static, int):
        batches = _fixed_batches(x, static)
    else:
        step = _positive_int(batch_size, "batch_size")
        batches = [x[i : i + step] for i in range(0, len(x), step)]
    f_in, q_in = f_sess.get_inputs()[0].name, q_sess.get_inputs()[0].name
    signal = np.zeros(len(names))
    noise = np.zeros(len(names))
    for chunk in batches:
        f_vals = f_sess.run(f_out, {f_in: chunk})
        q_vals = q_sess.run(q_out, {q_in: chunk})
        for k, (a, b) in enumerate(zip(f_vals, q_vals, strict=True)):
            if a.shape != b.shape:
                raise ShapeMismatchError(f"node {names[k]!r}: float output {a.shape} vs QDQ output {b.shape}")
            a64 = a.astype(np.float64)
            signal[k] += float(np.sum(a64 * a64))
            noise[k] += float(np.sum((a64 - b) ** 2))
    return {n: _db(s, e) for n, s, e in zip(names, signal, noise, strict=True)}


def _dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    zp = np.zeros_like(scale, dtype=np.float64) if zero_point is None else zero_point.astype(np.float64)
    q64 = q.astype(np.float64)
    if scale.ndim == 0:  # per-tensor
        return (q64 - zp) * scale.astype(np.float64)
    shape = [1] * q.ndim
    shape[axis] = -1
    return (q64 - zp.reshape(shape)) * scale.astype(np.float64).reshape(shape)


def _weight_info(
    float_model: onnx.ModelProto, qdq_model: onnx.ModelProto, node: str, weight: str
) -> tuple[bool, int | None, int, float | None]:
    """(quantized, per-channel axis, number of scales, weight SQNR) of one weighted node in the QDQ model."""
    f_node = next(n for n in float_model.graph.node if n.name == node)
    q_node = next((n for n in qdq_model.graph.node if n.name == node), None)
    if q_node is None:
        return False, None, 0, None
    tensor = q_node.input[list(f_node.input).index(weight)]
    producer = next((n for n in qdq_model.graph.node if tensor in n.output), None)
    inits = {i.name: i for i in qdq_model.graph.initializer}
    if producer is None or producer.op_type != "DequantizeLinear" or producer.input[0] not in inits:
        return False, None, 0, None
    q = numpy_helper.to_array(inits[producer.input[0]])
    scale = numpy_helper.to_array(inits[producer.input[1]])
    zp = numpy_helper.to_array(inits[producer.input[2]]) if len(producer.input) > 2 and producer.input[2] else None
    axis = next((a.i for a in producer.attribute if a.name == "axis"), 1)  # ONNX's default axis is 1
    axis = axis % q.ndim if q.ndim else 0
    w = numpy_helper.to_array(next(i for i in float_model.graph.initializer if i.name == weight))
    per_channel = scale.ndim == 1  # a 1-D scale is per-axis, even of length 1 (a (1, 1) Kronecker factor)
    return True, (axis if per_channel else None), int(scale.size), sqnr_db(w, _dequantize(q, scale, zp, axis))


# ----------------------------------------------------------------------------------------------------------------
# quantize


@dataclasses.dataclass(frozen=True)
class _EvalSet:
    metric: str
    x: np.ndarray
    y: np.ndarray
    limit: float


def _eval_sets(eval_clean: Any, eval_adv: Any, config: QuantConfig) -> list[_EvalSet]:
    if not isinstance(eval_clean, (tuple, list)) or len(eval_clean) != 2:
        raise ConfigError("eval_clean must be a pair (x, y) of inputs and integer labels")
    x = _as_batch(eval_clean[0], "eval_clean x")
    sets = [_EvalSet("clean", x, _as_labels(eval_clean[1], len(x), "eval_clean y"), config.max_drop)]
    seen: set[str] = set()
    for item in eval_adv or ():
        if not isinstance(item, (tuple, list)) or len(item) != 3 or not isinstance(item[0], str) or not item[0]:
            raise ConfigError("each eval_adv entry must be a triple (name, x_adv, y) with a non-empty name")
        name = item[0]
        if name in seen:
            raise ConfigError(f"eval_adv names must be unique, {name!r} appears twice")
        seen.add(name)
        xa = _as_batch(item[1], f"eval_adv[{name!r}] x")
        sets.append(
            _EvalSet(
                f"robust[{name}]", xa, _as_labels(item[2], len(xa), f"eval_adv[{name!r}] y"), config.max_robust_drop
            )
        )
    return sets


def _preprocess(fp32_path: Path, dst: Path) -> onnx.ModelProto:
    """quant_pre_process (symbolic + ONNX shape inference, ORT basic optimizations) into dst; unique node names."""
    with contextlib.redirect_stdout(io.StringIO()):
        quant_pre_process(os.fspath(fp32_path), os.fspath(dst))
    model = onnx.load(os.fspath(dst))
    if _name_nodes(model):
        onnx.save(model, os.fspath(dst))
    return model


# Histogram settings per method. quantize_static builds the Entropy calibrator with ORT's defaults, 128 bins and
# 128 quantized bins: then the KL search has a single candidate, the whole range, and "entropy" gives exactly the
# MinMax scales (checked on ORT 1.32). So this module runs ORT's calibrator itself, with 512 bins for Entropy
# (2048 costs ~9 s of pure-Python KL search on a 19-tensor graph, 512 ~1.4 s), and hands the ranges to
# quantize_static through its calibration cache. Percentile keeps ORT's defaults (2048 bins, 99.999, symmetric).
_CALIB_OPTIONS: dict[str, dict[str, Any]] = {
    "minmax": {},
    "entropy": {"num_bins": 512, "num_quantized_bins": 128},
    "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": True},
}


def _calibrate(pre: Path, reader: _BatchReader, method: str, cache: Path) -> None:
    """Run ORT's calibrator for ``method`` on the pre-processed model and save the tensor ranges to ``cache``."""
    augmented = cache.with_name("augmented.onnx")
    calibrator = create_calibrator(
        pre,
        None,  # every float tensor, as quantize_static's own calibration does
        augmented_model_path=os.fspath(augmented),
        calibrate_method=_CALIBRATION[method],
        extra_options=dict(_CALIB_OPTIONS[method]),
    )
    # the histogram calibrators print their progress on stdout; a library call stays quiet
    with contextlib.redirect_stdout(io.StringIO()):
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    save_tensors_data(ranges, cache)
    augmented.unlink(missing_ok=True)


_HAS_CALIB_CACHE = "calibration_cache_path" in inspect.signature(quantize_static).parameters


_TRT_COMPATIBLE = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}


def _quantize_static(pre: Path, dst: Path, config: QuantConfig, exclude: Sequence[str], cache: Path) -> onnx.ModelProto:
    """ORT's quantize_static (QDQ, int8 / int8) with the calibrated ranges in ``cache``; returns the tidied model."""
    if not _HAS_CALIB_CACHE:
        raise ConfigError(
            f"onnxruntime {ort.__version__} has no calibration_cache_path in quantize_static; upgrade onnxruntime "
            "(1.32 is tested) to quantize with edgesep"
        )
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            os.fspath(pre),
            os.fspath(dst),
            None,  # ranges come from the cache
            quant_format=QuantFormat.QDQ,
            per_channel=config.per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=_CALIBRATION[config.method],
            nodes_to_exclude=list(exclude),
            calibration_cache_path=os.fspath(cache),
            # TensorRT builds INT8 kernels only from symmetric Q/DQ (zero point 0) and rejects INT32 bias
            # DequantizeLinear nodes: keep biases float (the int8 GEMM/conv adds them in its epilogue)
            extra_options=dict(_TRT_COMPATIBLE),
        )
    model = onnx.load(os.fspath(dst))
    _strip_unused_opsets(model)
    onnx.save(model, os.fspath(dst))
    return model


def _gate(
    sets: list[_EvalSet], fp32_preds: dict[str, np.ndarray], session: ort.InferenceSession, batch_size: int
) -> list[GateRow]:
    rows = []
    for s in sets:
        p32, p8 = fp32_preds[s.metric], _predict(session, s.x, batch_size)
        a32, a8 = float(np.mean(p32 == s.y)), float(np.mean(p8 == s.y))
        drop = 100.0 * (a32 - a8)
        rows.append(
            GateRow(s.metric, len(s.y), a32, a8, float(np.mean(p32 == p8)), drop, s.limit, drop <= s.limit + _DROP_TOL)
        )
    return rows


def quantize_onnx(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    calib_x: np.ndarray,
    eval_clean: tuple[np.ndarray, np.ndarray],
    eval_adv: Sequence[tuple[str, np.ndarray, np.ndarray]] = (),
    method: str = "minmax",
    exclude: Sequence[str] = (),
    auto_exclude: bool = False,
    max_drop: float = 1.0,
    max_robust_drop: float = 2.0,
    per_channel: bool = True,
    calib_batch: int = 64,
    sqnr_samples: int = 256,
    batch_size: int = 256,
) -> QuantReport:
    """Quantize an fp32 ONNX file to INT8 (ORT static quantization, QDQ) and write it only if the accuracy gate passes.

    Steps: ``quant_pre_process`` into a temp file; ``quantize_static`` with QDQ format, QInt8 activations and
    weights, per-channel weight scales and the chosen calibration; top-1 accuracy of fp32 and int8 (ONNX Runtime,
    CPU, default graph optimizations, i.e. the int8 kernels) on ``eval_clean`` and each adversarial set; per-layer
    SQNR on the first ``sqnr_samples`` calibration inputs. If a drop exceeds its limit and ``auto_exclude`` is set,
    the weighted layers are kept fp32 one at a time, lowest SQNR first, re-quantizing each time (calibration is
    reused), until the gate passes or every weighted layer is fp32. The int8 file is written atomically only when
    the gate passes; the fp32 file is only read.

    Args:
        fp32_path: the float ONNX file (e.g. from ``export_onnx``), one input.
        out_path: the int8 file to write (not the fp32 file).
        calib_x: calibration inputs (N, *input_shape), float32 pixels in [0, 1] like the model's input.
        eval_clean: (x, y) for the clean gate.
        eval_adv: (name, x_adv, y) per adversarial set crafted on the float model (transferred to int8); its row
            is top-1 accuracy on x_adv.
        method: calibration, ``"minmax"``, ``"entropy"`` or ``"percentile"``.
        exclude: fnmatch patterns over node names and op types (``"node_MatMul_1*"``, ``"Gemm"``) of nodes to keep
            fp32; names are those of the pre-processed model, which keeps the exporter's node names.
        auto_exclude: on a failed gate, keep the most sensitive weighted layers fp32 (see above).
        max_drop: largest allowed clean top-1 drop, percentage points.
        max_robust_drop: largest allowed drop on each adversarial set, percentage points.
        per_channel: per-channel weight scales (output axis); False for one scale per weight tensor.
        calib_batch: upper bound of the calibration batch (the largest divisor of N not above it is used).
        sqnr_samples: calibration inputs used for per-layer SQNR.
        batch_size: inputs per run when evaluating.
    Returns:
        A ``QuantReport`` (``passed`` and ``written`` true).
    Raises:
        ConfigError: bad options, a missing fp32 file, ``out_path`` equal to it, or exclude patterns that match
            nothing.
        ShapeMismatchError: inputs or labels that do not fit the model.
        AccuracyGateError: the gate failed (after auto-exclusion, if enabled); nothing was written (a file already
            at ``out_path`` is left as it was); the full report is in its ``report`` attribute.
        GraphCheckError: the quantized graph fails onnx's checker or holds non-standard ops.
    """
    t_start = time.perf_counter()
    seconds = {"preprocess": 0.0, "calibrate": 0.0, "quantize": 0.0, "evaluate": 0.0, "sqnr": 0.0}
    config = QuantConfig(
        method=method,
        per_channel=per_channel,
        exclude=tuple(exclude) if not isinstance(exclude, str) else (exclude,),
        auto_exclude=auto_exclude,
        max_drop=max_drop,
        max_robust_drop=max_robust_drop,
        calib_batch=calib_batch,
        sqnr_samples=sqnr_samples,
        batch_size=batch_size,
    )
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not fp32_path.is_file():
        raise ConfigError(f"fp32 model {os.fspath(fp32_path)!r} not found; export it first (edgesep export)")
    if out_path.exists() and out_path.resolve() == fp32_path.resolve():
        raise ConfigError(f"out_path {os.fspath(out_path)!r} is the fp32 model itself; write the int8 model elsewhere")
    calib = _as_batch(calib_x, "calib_x")
    sets = _eval_sets(eval_clean, eval_adv, config)
    sha_fp32, size_fp32 = sha256_file(fp32_path), fp32_path.stat().st_size

    with tempfile.TemporaryDirectory(prefix="edgesep-quant-") as tmp_dir:
        tmp = Path(tmp_dir)
        t = time.perf_counter()
        pre_path = tmp / "fp32.pre.onnx"
        pre = _preprocess(fp32_path, pre_path)
        seconds["preprocess"] += time.perf_counter() - t

        input_name, in_shape = _single_input(pre)
        _check_fits(calib, in_shape, input_name, "calib_x")
        for s in sets:
            _check_fits(s.x, in_shape, input_name, f"{s.metric} x")
        static = in_shape[0] if isinstance(in_shape[0], int) else None
        weighted = weighted_nodes(pre)
        excluded = _resolve_exclude(config.exclude, pre)
        batches = _calib_batches(calib, static, config.calib_batch)
        sqnr_x = calib[: config.sqnr_samples]
        cache = tmp / "calibration.json"
        t = time.perf_counter()
        _calibrate(pre_path, _BatchReader(input_name, batches), config.method, cache)
        seconds["calibrate"] += time.perf_counter() - t

        t = time.perf_counter()
        fp32_session = _session(fp32_path)
        fp32_preds = {s.metric: _predict(fp32_session, s.x, config.batch_size) for s in sets}
        seconds["evaluate"] += time.perf_counter() - t

        def attempt(k: int, nodes_fp32: list[str]) -> tuple[Path, onnx.ModelProto, list[GateRow]]:
            t0 = time.perf_counter()
            path = tmp / f"int8.{k}.onnx"
            model = _quantize_static(pre_path, path, config, nodes_fp32, cache)
            t1 = time.perf_counter()
            rows = _gate(sets, fp32_preds, _session(path), config.batch_size)
            seconds["quantize"] += t1 - t0
            seconds["evaluate"] += time.perf_counter() - t1
            drops = ", ".join(f"{r.metric} drop {r.drop_pp:.2f} pp" for r in rows)
            log.info("int8 attempt %d (%d nodes kept fp32): %s", k, len(nodes_fp32), drops)
            return path, model, rows

        q_path, q_model, rows = attempt(0, excluded)
        t = time.perf_counter()
        sensitivity = layer_sqnr(pre, q_model, sqnr_x, nodes=[w[0] for w in weighted], batch_size=config.calib_batch)
        seconds["sqnr"] += time.perf_counter() - t

        kept: list[str] = []
        # lowest SQNR first; ties (and a noiseless inf) in graph order
        order = {w[0]: i for i, w in enumerate(weighted)}
        candidates = sorted((w[0] for w in weighted if w[0] not in excluded), key=lambda n: (sensitivity[n], order[n]))
        if config.auto_exclude and not all(r.ok for r in rows):
            for node in candidates:
                kept.append(node)
                q_path, q_model, rows = attempt(len(kept), excluded + kept)
                if all(r.ok for r in rows):
                    break

        t = time.perf_counter()
        final_sqnr = sensitivity
        if kept:
            final_sqnr = layer_sqnr(pre, q_model, sqnr_x, nodes=[w[0] for w in weighted], batch_size=config.calib_batch)
        seconds["sqnr"] += time.perf_counter() - t
        layers = []
        inits = {i.name: i for i in pre.graph.initializer}
        for node, op_type, weight in weighted:
            quantized, axis, n_scales, w_sqnr = _weight_info(pre, q_model, node, weight)
            layers.append(
                LayerQuant(
                    node=node,
                    op_type=op_type,
                    weight=weight,
                    weight_shape=[int(d) for d in inits[weight].dims],
                    quantized=quantized,
                    weight_axis=axis,
                    weight_scales=n_scales,
                    weight_sqnr_db=w_sqnr,
                    sqnr_db=final_sqnr[node],
                    sensitivity_db=sensitivity[node],
                )
            )
        passed = all(r.ok for r in rows)
        sha_int8 = sha256_file(q_path) if passed else None
        if passed:
            _graph.check_standard_ops(q_model)
            _graph.check_model(q_path)
            atomic_write_bytes(out_path, q_path.read_bytes())
        seconds["total"] = time.perf_counter() - t_start
        report = QuantReport(
            fp32_path=os.fspath(fp32_path),
            out_path=os.fspath(out_path),
            written=passed,
            config=config,
            input_name=input_name,
            calib_n=len(calib),
            calib_batch=len(batches[0]),
            sqnr_n=len(sqnr_x),
            excluded=excluded,
            kept_fp32=kept,
            layers=layers,
            gate=rows,
            size_fp32=size_fp32,
            size_int8=q_path.stat().st_size,
            sha256_fp32=sha_fp32,
            sha256_int8=sha_int8,
            census_int8=_graph.op_census(q_model),
            attempts=1 + len(kept),
            passed=passed,
            seconds={k: round(v, 4) for k, v in seconds.items()},
        )
    if not passed:
        worst = max((r for r in rows if not r.ok), key=lambda r: r.drop_pp - r.limit_pp)
        note = ""
        if config.auto_exclude:
            note = f"auto-exclusion kept {len(kept)} of {len(candidates)} weighted layers in fp32 and it still failed"
        err = AccuracyGateError(
            worst.metric, worst.fp32, worst.int8, worst.limit_pp, note=note, auto_excluded=config.auto_exclude
        )
        err.report = report
        raise err
    return report
