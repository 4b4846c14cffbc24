"""Parity across backends: an artifact's outputs vs the ONNX Runtime fp32 reference on the bundle's eval data.

numpy and onnxruntime only (the reference runs on ONNX Runtime), so the check runs on the device, beside the
artifact it checks.

The rule (issue 4, section 5), in ``PARITY_THRESHOLDS``:

- **fp32**: max relative error <= 1e-4 and top-1 agreement 100%, against the ONNX Runtime fp32 run of the
  bundle's fp32 ONNX artifact on the same inputs; and, when the bundle has ``reference.npz``, the same against the
  torch fp32 logits stored there (the export already held ONNX Runtime to that bound, so any fp32 backend must
  meet it too).
- **fp16, int8**: top-1 agreement >= 99% with the ONNX Runtime fp32 reference. The errors are measured and
  recorded, not judged: a quantized model's logits are expected to move.

Definitions: max abs error = max |out - ref| over every logit; max relative error = max abs error / max |ref|
(relative to the largest reference logit, so near-zero logits do not blow it up; the same definition as the
export's torch parity); top-1 agreement = the fraction of inputs whose argmax is the same. Eval sets are the
bundle's (clean and adversarial; adversarial inputs sit near decision boundaries, which is where low-precision
engines disagree first).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgesep._io import jsonable
from edgesep.bundle import Bundle, open_bundle
from edgesep.errors import BundleLookupError, ConfigError, ShapeMismatchError
from edgesep.runtimes._base import Runtime
from edgesep.runtimes._load import Session, load

__all__ = ["PARITY_THRESHOLDS", "compare_logits", "parity", "parity_ok"]

# precision -> limits; None: measured and recorded, not judged
PARITY_THRESHOLDS: dict[str, dict[str, float | None]] = {
    "fp32": {"max_rel_err": 1e-4, "top1_agreement": 1.0},
    "fp16": {"max_rel_err": None, "top1_agreement": 0.99},
    "int8": {"max_rel_err": None, "top1_agreement": 0.99},
}


def compare_logits(out: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Errors and top-1 agreement of ``out`` against ``ref``.

    Args:
        out: logits (N, K) of the artifact under test.
        ref: reference logits (N, K).
    Returns:
        ``{n, max_abs_err, max_rel_err, top1_agreement, nonfinite}`` (nonfinite: non-finite values in ``out``;
        with any, both errors are inf).
    Raises:
        ShapeMismatchError: the shapes differ.
    """
    out, ref = np.asarray(out), np.asarray(ref)
    if out.shape != ref.shape or out.ndim != 2:
        raise ShapeMismatchError(
            f"outputs of shape {list(out.shape)} cannot be compared with reference logits of shape {list(ref.shape)}; "
            "the artifact does not belong to this bundle"
        )
    n = int(out.shape[0])
    nonfinite = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
    if n == 0:
        return {"n": 0, "max_abs_err": 0.0, "max_rel_err": 0.0, "top1_agreement": 1.0, "nonfinite": 0}
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    max_abs = float("inf") if nonfinite else float(diff.max())
    scale = float(np.abs(ref).max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    agree = float(np.mean(out.argmax(axis=1) == ref.argmax(axis=1)))
    return {"n": n, "max_abs_err": max_abs, "max_rel_err": max_rel, "top1_agreement": agree, "nonfinite": nonfinite}


def parity_ok(precision: str, max_rel_err: float, top1_agreement: float) -> tuple[bool, list[str]]:
    """Judge measured numbers by ``PARITY_THRESHOLDS``.

    Args:
        precision: ``fp32``, ``fp16`` or ``int8``.
        max_rel_err: max abs error over max |reference|.
        top1_agreement: in [0, 1].
    Returns:
        ``(ok, failures)``: failures say which limit was exceeded, by how much.
    Raises:
        ConfigError: an unknown precision.
    """
    if precision not in PARITY_THRESHOLDS:
        raise ConfigError(f"no parity rule for precision {precision!r}; known: {sorted(PARITY_THRESHOLDS)}")
    limits = PARITY_THRESHOLDS[precision]
    failures = []
    rel_lim, agree_lim = limits["max_rel_err"], limits["top1_agreement"]
    # `not (a <= b)` rather than `a > b`: NaN fails
    if rel_lim is not None and not (max_rel_err <= rel_lim):
        failures.append(f"max relative error {max_rel_err:.3g} > {rel_lim:g}")
    if agree_lim is not None and not (top1_agreement >= agree_lim):
        failures.append(f"top-1 agreement {100 * top1_agreement:.2f}% < {100 * agree_lim:g}%")
    return not failures, failures


def _precision_of(candidate: Session | Runtime) -> str:
    if isinstance(candidate, Session):
        return candidate.artifact.precision
    p = getattr(candidate, "precision", None) or candidate.info().get("precision")
    if not isinstance(p, str):
        raise ConfigError(f"{type(candidate).__name__} reports no precision; pass precision=")
    return p


def parity(
    session_or_runtime: Session | Runtime,
    bundle: Bundle | str | os.PathLike | None = None,
    *,
    eval_set: str | Sequence[str] = "clean",
    n: int | None = None,
    precision: str | None = None,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Compare an artifact's outputs with the ONNX Runtime fp32 reference on a bundle's eval data.

    Args:
        session_or_runtime: a Session from ``load``, or any Runtime (e.g. a TVM or TensorRT runtime made by hand).
        bundle: the bundle whose eval data and fp32 ONNX reference to use; default: the Session's bundle.
        eval_set: an eval set id (``"clean"``, ``"pgd-linf-0.1-40"``, ...), several ids (concatenated), or ``"all"``.
        n: use the first n inputs (default: all).
        precision: judge as this precision (default: the artifact's).
        threads: intra-op threads of the reference ONNX Runtime session.
    Returns:
        JSON-ready dict: ``artifact`` {id, sha256, kind, precision, target} (None for a bare Runtime), ``backend``,
        ``precision``, ``eval_sets``, ``n``, ``max_abs_err``, ``max_rel_err``, ``top1_agreement``, ``nonfinite``,
        ``accuracy`` and ``accuracy_reference`` (top-1 vs the labels), ``reference`` {artifact, sha256, backend,
        version}, ``torch`` {n, max_abs_err, max_rel_err, top1_agreement, nonfinite, ok} (vs ``reference.npz``;
        ``ok`` is None unless fp32; None when the bundle has no reference), ``thresholds``, ``ok`` and
        ``failures`` (why not ok). Non-finite numbers become None.
    Raises:
        ConfigError: no bundle for a bare Runtime, a bad ``n`` or precision.
        BundleLookupError: an unknown eval set, or a bundle without an fp32 ONNX artifact.
        BundleError: the bundle does not verify.
        BackendMissingError: onnxruntime (the reference) is not installed.
    """
    is_session = isinstance(session_or_runtime, Session)
    if bundle is None:
        if not is_session:
            raise ConfigError("parity of a bare Runtime needs the bundle whose eval data to use: pass bundle=")
        bundle = session_or_runtime.bundle  # type: ignore[union-attr]
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"n must be an integer >= 1 or None (all inputs), got {n!r}")
    prec = precision or _precision_of(session_or_runtime)
    if prec not in PARITY_THRESHOLDS:
        raise ConfigError(f"no parity rule for precision {prec!r}; known: {sorted(PARITY_THRESHOLDS)}")

    owned = not isinstance(bundle, Bundle)
    b = open_bundle(bundle) if owned else bundle
    try:
        if eval_set == "all":
            ids = [e.id for e in b.manifest.eval_sets]
        else:
            ids = [eval_set] if isinstance(eval_set, str) else list(eval_set)
        if not ids:
            raise BundleLookupError(f"bundle {b.name!r} has no eval sets to compare on; re-export it with some")
        xs, ys = zip(*(b.load_eval_set(i) for i in ids), strict=True)
        x, y = np.concatenate(xs), np.concatenate(ys)
        if n is not None:
            x, y = x[:n], y[:n]

        try:
            ref_art = b.artifact(kind="onnx", precision="fp32", target="any")
        except BundleLookupError as e:
            raise BundleLookupError(f"parity needs the bundle's fp32 ONNX artifact as the reference: {e}") from e
        # the bundle was verified when opened (or by the caller's load); the artifact's bytes are hash-checked again
        with load(b, artifact_id=ref_art.id, backend="onnxruntime", threads=threads, verify=False) as ref_sess:
            ref = ref_sess.run(x)
            ref_info = ref_sess.info()
            out = session_or_runtime.run(x)
            m = compare_logits(out, ref)
            torch_cmp = None
            if b.manifest.reference is not None:
                x_t, logits_t = b.load_reference()
                t = compare_logits(session_or_runtime.run(x_t), logits_t)
                t_ok, _ = parity_ok("fp32", t["max_rel_err"], t["top1_agreement"])
                torch_cmp = {**t, "ok": t_ok if prec == "fp32" else None}  # judged for fp32 artifacts only
    finally:
        if owned:
            b.close()

    ok, failures = parity_ok(prec, m["max_rel_err"], m["top1_agreement"])
    if torch_cmp is not None and torch_cmp["ok"] is False:
        ok = False
        failures.append(
            f"vs the torch reference logits: max relative error {torch_cmp['max_rel_err']:.3g}, top-1 agreement "
            f"{100 * torch_cmp['top1_agreement']:.2f}%"
        )
    if is_session:
        a = session_or_runtime.artifact  # type: ignore[union-attr]
        artifact = {"id": a.id, "sha256": a.sha256, "kind": a.kind, "precision": a.precision, "target": a.target}
        backend = session_or_runtime.backend  # type: ignore[union-attr]
    else:
        artifact, backend = None, session_or_runtime.info().get("backend")
    return jsonable(
        {
            "artifact": artifact,
            "backend": backend,
            "precision": prec,
            "eval_sets": ids,
            **m,
            "accuracy": float(np.mean(out.argmax(axis=1) == y)) if len(y) else None,
            "accuracy_reference": float(np.mean(ref.argmax(axis=1) == y)) if len(y) else None,
            "reference": {
                "artifact": ref_art.id,
                "sha256": ref_art.sha256,
                "backend": "onnxruntime",
                "version": ref_info.get("version"),
            },
            "torch": torch_cmp,
            "thresholds": dict(PARITY_THRESHOLDS[prec]),
            "ok": ok,
            "failures": failures,
        }
    )
