"""Typed user-facing errors. Each message says what went wrong and what to do about it.

The CLI prints these without a traceback and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "AccuracyGateError",
    "BackendMissingError",
    "BundleContentError",
    "BundleError",
    "BundleLookupError",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "EdgesepError",
    "IntegrityError",
    "ManifestError",
    "ParityError",
    "SchemaVersionError",
    "ShapeMismatchError",
    "UnknownNameError",
    "UnsafePathError",
]


class EdgesepError(Exception):
    """Base class of every error a user can cause and fix."""


class UnknownNameError(EdgesepError, KeyError):
    """A name (model, dataset, attack, ...) that is not registered."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DatasetError(EdgesepError):
    """A dataset file that is missing, malformed or inconsistent."""


class ShapeMismatchError(EdgesepError, ValueError):
    """Shapes that do not fit together (factor shapes vs input shape, weights vs layer)."""


class ConfigError(EdgesepError, ValueError):
    """An invalid option or combination of options."""


class CheckpointError(EdgesepError):
    """A run directory or checkpoint that cannot be loaded."""


class BundleError(EdgesepError):
    """A bundle that cannot be opened, verified or written; the base class of every bundle error."""


class ManifestError(BundleError, ValueError):
    """A manifest.json that is not JSON, not an object, or has a missing, unknown or wrongly typed field."""


class SchemaVersionError(BundleError):
    """A bundle written with a manifest schema version this edgesep cannot read."""

    def __init__(self, found: object, supported: Iterable[int], source: str = "manifest"):
        self.found, self.supported = found, tuple(supported)
        super().__init__(
            f"{source}: bundle schema_version {found!r} is not supported; this edgesep reads schema versions "
            f"{list(self.supported)}. Upgrade edgesep, or re-export the bundle with this version"
        )


class IntegrityError(BundleError):
    """A bundle file that is missing, not listed in the manifest, or whose size or sha256 differs from it."""

    def __init__(self, file: str, reason: str | None = None, *, expected: str | None = None, actual: str | None = None):
        self.file, self.expected, self.actual = file, expected, actual
        if reason is None:
            reason = (
                f"sha256 is {actual} but the manifest expects {expected}: the file was modified or corrupted. "
                "Fetch an intact copy of the bundle or re-export it"
            )
        super().__init__(f"{file}: {reason}")


class UnsafePathError(BundleError):
    """A path that is absolute, leaves the bundle, or is (or goes through) a symlink, link or special file."""


class BundleContentError(BundleError, ValueError):
    """A file whose hash matches but whose content is unusable (an ONNX that does not parse, a wrong dtype)."""


class BundleLookupError(BundleError, LookupError):
    """No artifact, eval set or report matches a selection, or more than one artifact does."""


class AccuracyGateError(EdgesepError):
    """A compressed (e.g. INT8) model that loses more top-1 accuracy than its gate allows.

    Args:
        metric: what was measured, e.g. ``"clean"`` or ``"robust[fgsm]"``.
        before: top-1 accuracy of the reference (fp32) model, in [0, 1].
        after: top-1 accuracy of the compressed model, in [0, 1].
        limit: the largest allowed drop, in percentage points.
        note: extra context for the message (e.g. what auto-exclusion already tried).
        auto_excluded: auto-exclusion already ran, so the message does not suggest it again.
    """

    def __init__(
        self, metric: str, before: float, after: float, limit: float, *, note: str = "", auto_excluded: bool = False
    ):
        self.metric, self.before, self.after, self.limit = str(metric), float(before), float(after), float(limit)
        self.drop = 100.0 * (self.before - self.after)  # percentage points
        self.note = note
        self.report: object | None = None  # the raiser may attach its full report (e.g. a QuantReport)
        tries = [] if auto_excluded else ["--auto-exclude (keep the most sensitive layers in fp32)"]
        tries += ["another --method (minmax, entropy, percentile)", "more --calib samples"]
        super().__init__(
            f"accuracy gate failed on {self.metric}: top-1 {100 * self.before:.2f}% -> {100 * self.after:.2f}%, a drop "
            f"of {self.drop:.2f} percentage points over the limit of {self.limit:.2f}. "
            + (f"{note}. " if note else "")
            + f"Try {', '.join(tries[:-1])} or {tries[-1]}"
        )


class ParityError(EdgesepError):
    """An exported model whose outputs differ from the torch model's beyond the tolerance.

    Args:
        what: the file or artifact checked, e.g. ``"model.onnx"``.
        n: inputs compared.
        max_rel_err: largest absolute error over the largest absolute torch output.
        top1_agreement: fraction of inputs with the same top-1 class, in [0, 1].
        rtol: the tolerance on ``max_rel_err``.
    """

    def __init__(self, what: str, n: int, max_rel_err: float, top1_agreement: float, rtol: float):
        self.what, self.n = str(what), int(n)
        self.max_rel_err, self.top1_agreement, self.rtol = float(max_rel_err), float(top1_agreement), float(rtol)
        super().__init__(
            f"{self.what} does not match the torch model on {self.n} images: max relative error "
            f"{self.max_rel_err:.3g} (limit {self.rtol:.0e}), top-1 agreement {100 * self.top1_agreement:.2f}% "
            "(must be 100%). Re-export at another --opset, or report the model: an op is lowered incorrectly"
        )


class BackendMissingError(EdgesepError, ImportError):
    """A backend's runtime package (onnxruntime, Apache TVM, TensorRT) is not installed on this machine."""
