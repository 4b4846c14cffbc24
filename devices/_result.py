"""The result file: one schema-versioned JSON per (bundle artifact, device) run.

The on-device runner writes it, the host harness collects it, ``edgesep report`` reads any number of them.
Standard library only (no numpy): the report and the harness read results where no runtime is installed.

Schema version 1 (``RESULT_SCHEMA_VERSION``); every key below is present (``None`` where not measured)::

    {
      "schema_version": 1,
      "kind": "edgesep-result",
      "status": "complete" | "partial" | "failed",
      "partial_reason": null | "why the run stopped early (interrupted, timeout, an error's one line)",
      "created": "2026-11-22T22:30:00Z",           # UTC, when the run started
      "finished": null | "2026-11-22T22:31:10Z",   # when the file was last written
      "stages_done": ["verify", "numerics", "clean", "adversarial", "square", "latency", "throughput"],
      "bundle": {"name": str, "manifest_sha256": str, "model": str | null, "layers": str | null,
                 "params": int | null, "macs": int | null},
      "artifact": {"id": str, "file": str, "kind": "onnx|tvm-lib|trt-onnx", "precision": "fp32|fp16|int8",
                   "target": str, "sha256": str, "backend": "onnxruntime|tvm|tensorrt", "selected_because": str},
      "device": {"profile": str | null, "arch": str, "emulated": bool, "transport": "local|ssh|tvm-rpc"},
      "environment": {"hostname", "os", "kernel", "machine", "python", "numpy", "cpu_model", "cores",
                      "governor", "clocks_mhz", "temperature_c", "jetson_power_mode", "runtime",
                      "runtime_versions": {name: version}, "threads"},    # unreadable fields are null
      "accuracy": {
        "clean": null | {"eval_set": str, "n": int, "correct": int, "accuracy": float},
        "adversarial": [ {"eval_set": str, "mode": "transferred", "attack": str, "norm": str, "eps": float,
                          "steps": int | null, "crafted_on": str, "n": int, "correct": int, "accuracy": float} ],
        "query": [ {"mode": "query-only", "attack": "square", "norm": "linf", "eps": float, "queries": int,
                    "eval_set": str, "n": int, "correct": int, "accuracy": float, "clean_accuracy": float,
                    "mean_queries": float, "seed": int} ]
      },
      "numerics": null | {"reference": "torch-fp32", "n": int, "max_abs": float, "max_rel": float,
                          "top1_agreement": float},
      "latency": null | {"batch": 1, "warmup": int, "n": int, "min_runs": int, "min_seconds": float,
                         "raw_ms": [float, ...], "p50": float, "p90": float, "p99": float, "mean": float,
                         "std": float, "min": float, "max": float},
      "throughput": null | {"batch": int, "n_batches": int, "seconds": float, "samples_per_s": float},
      "notes": [str, ...]                           # e.g. "emulated: latency is meaningless"
    }

``numerics`` compares the engine with the bundle's reference logits (the float torch model's, which the export
held ONNX Runtime fp32 to within 1e-4 of). Accuracy modes: ``transferred`` = adversarial examples crafted
white-box on the float model (host, at export) and replayed on the engine; ``query-only`` = a Square attack run
against the engine itself on the device.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgesep.errors import ConfigError, SchemaVersionError

__all__ = [
    "RESULT_KIND",
    "RESULT_SCHEMA_VERSION",
    "STAGES",
    "STATUSES",
    "ResultError",
    "latency_summary",
    "load_result",
    "load_results",
    "new_result",
    "validate_result",
]

RESULT_SCHEMA_VERSION = 1
RESULT_KIND = "edgesep-result"
STATUSES: tuple[str, ...] = ("complete", "partial", "failed")
STAGES: tuple[str, ...] = ("verify", "numerics", "clean", "adversarial", "square", "latency", "throughput")
_TOP = (
    "schema_version", "kind", "status", "partial_reason", "created", "finished", "stages_done", "bundle",
    "artifact", "device", "environment", "accuracy", "numerics", "latency", "throughput", "notes",
)  # fmt: skip
_ARTIFACT = ("id", "file", "kind", "precision", "target", "sha256", "backend", "selected_because")
_LATENCY = ("batch", "warmup", "n", "min_runs", "min_seconds", "raw_ms", "p50", "p90", "p99", "mean", "std", "min",
            "max")  # fmt: skip


class ResultError(ConfigError):
    """A result file that is not a valid edgesep result (not JSON, wrong kind, a missing or mistyped field)."""


def new_result(
    *,
    bundle: Mapping[str, Any],
    artifact: Mapping[str, Any],
    device: Mapping[str, Any],
    environment: Mapping[str, Any] | None = None,
    created: str,
) -> dict[str, Any]:
    """An empty result (status ``partial``, nothing measured yet) that the runner fills stage by stage."""
    return {
        "schema_version": RESULT_SCHEMA_VERSION,
        "kind": RESULT_KIND,
        "status": "partial",
        "partial_reason": "running",
        "created": created,
        "finished": None,
        "stages_done": [],
        "bundle": dict(bundle),
        "artifact": dict(artifact),
        "device": dict(device),
        "environment": dict(environment or {}),
        "accuracy": {"clean": None, "adversarial": [], "query": []},
        "numerics": None,
        "latency": None,
        "throughput": None,
        "notes": [],
    }


def _percentile(sorted_ms: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method) of an ascending list."""
    if not sorted_ms:
        raise ValueError("no samples")
    pos = (len(sorted_ms) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return float(sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo))


def latency_summary(raw_ms: Iterable[float]) -> dict[str, float | int]:
    """``{"n", "p50", "p90", "p99", "mean", "std", "min", "max"}`` of latency samples in ms (std: population)."""
    xs = [float(v) for v in raw_ms]
    if not xs:
        raise ConfigError("no latency samples to summarize")
    s = sorted(xs)
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((v - mean) ** 2 for v in xs) / len(xs))
    return {"n": len(xs), "p50": _percentile(s, 50), "p90": _percentile(s, 90), "p99": _percentile(s, 99),
            "mean": mean, "std": std, "min": s[0], "max": s[-1]}  # fmt: skip


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise ResultError(f"{where}: {what}; re-run `edgesep bench` (or the runner) to write a valid result")


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def validate_result(obj: object, source: str = "result") -> dict[str, Any]:
    """Check a result's structure (keys, types, ranges); return it. Raises ResultError / SchemaVersionError."""
    _need(isinstance(obj, dict), source, "not a JSON object")
    assert isinstance(obj, dict)
    _need(obj.get("kind") == RESULT_KIND, source, f"kind is {obj.get('kind')!r}, not {RESULT_KIND!r}")
    if obj.get("schema_version") != RESULT_SCHEMA_VERSION:
        raise SchemaVersionError(obj.get("schema_version"), [RESULT_SCHEMA_VERSION], source)
    missing = [k for k in _TOP if k not in obj]
    _need(not missing, source, f"missing field(s) {missing}")
    _need(obj["status"] in STATUSES, source, f"status {obj['status']!r} is not one of {list(STATUSES)}")
    _need(isinstance(obj["stages_done"], list) and all(s in STAGES for s in obj["stages_done"]), source,
          f"stages_done must be a list of {list(STAGES)}")  # fmt: skip
    art = obj["artifact"]
    _need(isinstance(art, dict) and all(k in art for k in _ARTIFACT), source, f"artifact needs {list(_ARTIFACT)}")
    acc = obj["accuracy"]
    _need(isinstance(acc, dict) and {"clean", "adversarial", "query"} <= set(acc), source,
          "accuracy needs clean, adversarial and query")  # fmt: skip
    entries = ([acc["clean"]] if acc["clean"] is not None else []) + list(acc["adversarial"]) + list(acc["query"])
    for i, e in enumerate(entries):
        _need(isinstance(e, dict) and _is_num(e.get("accuracy")) and 0.0 <= e["accuracy"] <= 1.0, source,
              f"accuracy entry {i} needs an accuracy in [0, 1]")  # fmt: skip
        _need(isinstance(e.get("n"), int) and e["n"] >= 0, source, f"accuracy entry {i} needs a count n")
    for e in acc["adversarial"] + acc["query"]:
        _need(_is_num(e.get("eps")) and e["eps"] >= 0, source, "every attack entry needs eps >= 0")
    lat = obj["latency"]
    if lat is not None:
        _need(isinstance(lat, dict) and all(k in lat for k in _LATENCY), source, f"latency needs {list(_LATENCY)}")
        _need(isinstance(lat["raw_ms"], list) and len(lat["raw_ms"]) == lat["n"], source,
              "latency.raw_ms must hold n samples")  # fmt: skip
    if obj["status"] == "complete":
        _need(obj["partial_reason"] is None, source, "a complete result has partial_reason null")
    else:
        _need(isinstance(obj["partial_reason"], str), source, "a partial or failed result says why (partial_reason)")
    return obj


def load_result(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate one result file."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except FileNotFoundError:
        raise ResultError(f"{p}: no such result file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultError(f"{p}: not a readable JSON result ({e}); re-run the benchmark that wrote it") from None
    return validate_result(obj, str(p))


def load_results(paths: Iterable[str | os.PathLike]) -> list[tuple[Path, dict[str, Any]]]:
    """Results from files and directories (``*.json`` directly inside, and ``*/result.json`` one level down).

    JSON files that are not edgesep results (``kind`` differs) are skipped; invalid result files raise.
    """
    out: list[tuple[Path, dict[str, Any]]] = []
    for given in paths:
        p = Path(given)
        if p.is_dir():
            files = sorted({*p.glob("*.json"), *p.glob("*/*.json")})
        elif p.is_file():
            files = [p]
        else:
            raise ResultError(f"{p}: no such file or directory; pass result files or the folder `edgesep bench` wrote")
        for f in files:
            try:
                head = json.loads(f.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                if p.is_file():
                    raise
                continue
            if isinstance(head, dict) and head.get("kind") == RESULT_KIND:
                out.append((f, validate_result(head, str(f))))
            elif p.is_file():
                kind = head.get("kind") if isinstance(head, dict) else None
                raise ResultError(f"{f}: not an edgesep result (kind {kind!r}); pass a file `edgesep bench` wrote")
    return out
