"""The ONNX Runtime backend: runs an ONNX artifact (fp32, fp16 or INT8 QDQ) with ``onnxruntime.InferenceSession``.

numpy and onnxruntime only. ``onnxruntime`` is imported when a session is made (or ``available`` / ``version``
is asked), so importing this module works without it and ``get_backend("onnxruntime")`` always succeeds; making a
session without onnxruntime raises ``BackendMissingError`` naming the package to install.

Choices:

- **Providers**: ``CPUExecutionProvider`` by default; ``providers=[...]`` asks for others (e.g.
  ``["CUDAExecutionProvider", "CPUExecutionProvider"]``). A provider this onnxruntime build does not have is a
  ``ConfigError`` listing the ones it has, never a silent fallback; ``info()["providers"]`` says what the session
  really uses.
- **Threads**: ``threads`` sets ``intra_op_num_threads`` (``None``: ONNX Runtime's default, one per physical core);
  ``inter_op_num_threads`` is 1 (the graphs here are chains: parallel branches would only add spinning threads).
- **Input checks** (before ONNX Runtime sees the batch, so the error says what to do): float32, 4 dims, and each
  static per-sample dim of the model's input equal to the batch's. A model whose input is float16 gets the batch
  cast to float16 (the interface is float32 in, float32 out).
- **Static batch** (a model exported with ``batch=B``): the batch is run in chunks of B; the last chunk is padded
  with zeros and the padding's outputs dropped, so any N works. Samples never interact in these models, so the
  padding cannot change the real samples' outputs.
- **Outputs**: the model's first output (or ``output_name``), returned as a C-contiguous float32 array.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgesep.errors import BackendMissingError, BundleContentError, ConfigError, ShapeMismatchError
from edgesep.runtimes._base import Runtime, register_backend

__all__ = ["DEFAULT_PROVIDERS", "OnnxRuntime"]

DEFAULT_PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)
_INSTALL = "pip install onnxruntime (or onnxruntime-gpu for CUDA), or install edgesep[export]"
_INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _ort() -> Any:
    """The onnxruntime module, or BackendMissingError saying how to install it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendMissingError(f"the onnxruntime backend needs the onnxruntime package: {_INSTALL}") from e
    return onnxruntime


@register_backend
class OnnxRuntime(Runtime):
    """An ONNX model loaded into an ONNX Runtime ``InferenceSession``.

    Args:
        path: the ``.onnx`` file (its external data, if any, beside it).
        precision: ``fp32``, ``fp16`` or ``int8`` (what the artifact is; reported by ``info()``).
        target: the artifact's target (``"any"`` for portable ONNX; reported by ``info()``).
        threads: ``intra_op_num_threads``; None for ONNX Runtime's default.
        input_name: the model input to feed.
        providers: execution providers in priority order (default ``("CPUExecutionProvider",)``).
        output_name: the output to return (default: the model's first output).
        model_bytes: the model itself, already hash-checked by the caller; ``path`` is then only reported. Loading
            from the verified bytes leaves no window between the hash check and the read.
    Raises:
        BackendMissingError: onnxruntime is not installed.
        ConfigError: bad threads / providers, or a model without ``input_name`` / ``output_name``, or with an input
            that is not float32 / float16.
        BundleContentError: the file is not a model ONNX Runtime can load.
    """

    name: ClassVar[str] = "onnxruntime"
    accepts_model_bytes: ClassVar[bool] = True  # edgesep.runtimes.load hands over the verified bytes

    @classmethod
    def available(cls) -> bool:
        """Whether onnxruntime can be imported here."""
        try:
            _ort()
        except BackendMissingError:
            return False
        return True

    @classmethod
    def version(cls) -> str | None:
        """onnxruntime's version, or None when it is not installed."""
        try:
            return str(_ort().__version__)
        except BackendMissingError:
            return None

    def __init__(
        self,
        path: str | Path,
        *,
        precision: str,
        target: str = "any",
        threads: int | None = None,
        input_name: str = "input",
        providers: Sequence[str] | None = None,
        output_name: str | None = None,
        model_bytes: bytes | None = None,
        **options: Any,
    ):
        ort = _ort()
        if options:
            raise ConfigError(
                f"unknown option(s) {sorted(options)} for the onnxruntime backend; it takes threads, providers, "
                "output_name"
            )
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"threads must be an integer >= 1 or None (ONNX Runtime's default), got {threads!r}")
        if isinstance(providers, str):
            providers = [providers]
        providers = list(DEFAULT_PROVIDERS if providers is None else providers)
        have = ort.get_available_providers()
        missing = [p for p in providers if p not in have]
        if not providers or missing:
            raise ConfigError(
                f"execution provider(s) {missing or providers} not available in this onnxruntime "
                f"{ort.__version__}; it has {have}. Pick from those, or install the onnxruntime build that ships "
                "the provider (e.g. onnxruntime-gpu for CUDAExecutionProvider)"
            )
        self.path = Path(path)
        self.precision, self.target, self.threads = precision, target, threads

        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only: ORT's warnings (e.g. unused initializers) are not the user's
        so.inter_op_num_threads = 1
        if threads is not None:
            so.intra_op_num_threads = threads
        try:
            model = model_bytes if model_bytes is not None else os.fspath(self.path)
            self._sess = ort.InferenceSession(model, sess_options=so, providers=providers)
        except Exception as e:  # ORT raises its own pybind exception types (Fail, InvalidGraph, NoSuchFile, ...)
            raise BundleContentError(
                f"{self.path}: ONNX Runtime {ort.__version__} cannot load this model ({type(e).__name__}: "
                f"{str(e).strip()[:300]}); re-export it, or upgrade onnxruntime if the model needs a newer opset"
            ) from e

        inputs = {i.name: i for i in self._sess.get_inputs()}
        if input_name not in inputs:
            raise ConfigError(f"{self.path} has inputs {sorted(inputs)}, not {input_name!r}; pass input_name=")
        inp = inputs[input_name]
        if inp.type not in _INPUT_TYPES:
            raise ConfigError(f"{self.path}: input {input_name!r} is {inp.type}; this backend feeds float32/float16")
        outputs = [o.name for o in self._sess.get_outputs()]
        if output_name is not None and output_name not in outputs:
            raise ConfigError(f"{self.path} has outputs {outputs}, not {output_name!r}; pass output_name=")
        self.input_name = input_name
        self.output_name = output_name if output_name is not None else outputs[0]
        self._input_dtype = _INPUT_TYPES[inp.type]
        self.input_shape: tuple[int | str | None, ...] = tuple(inp.shape)
        b = self.input_shape[0] if self.input_shape else None
        self.static_batch: int | None = b if isinstance(b, int) and b > 0 else None

    def _check(self, x: object) -> np.ndarray:
        """The batch, checked against the model's input (dtype, rank, static per-sample dims)."""
        if not isinstance(x, np.ndarray):
            raise ConfigError(
                f"expected a numpy array (N, C, H, W) float32 in [0, 1], got {type(x).__name__}; "
                "use np.asarray(x, dtype=np.float32)"
            )
        if x.dtype != np.float32:
            raise ConfigError(
                f"input dtype is {x.dtype}; the model takes float32 pixels in [0, 1]: use x.astype(np.float32)"
                + (" / 255" if np.issubdtype(x.dtype, np.integer) else "")
            )
        want = self.input_shape
        if x.ndim != len(want):
            hint = " (a single image? add the batch axis: x[None])" if x.ndim == len(want) - 1 else ""
            raise ShapeMismatchError(
                f"input has shape {list(x.shape)} ({x.ndim} dims); the model takes {len(want)} dims "
                f"{list(want)} (N, C, H, W){hint}"
            )
        bad = [i for i in range(1, x.ndim) if isinstance(want[i], int) and want[i] != x.shape[i]]
        if bad:
            raise ShapeMismatchError(
                f"input has shape {list(x.shape)}; the model takes {list(want)}: per-sample dims "
                f"{[list(want)[i] for i in bad]} at axes {bad} differ. Resize / convert the images to the bundle's "
                "input spec (Session.input_spec)"
            )
        return np.ascontiguousarray(x, dtype=self._input_dtype)

    def _session(self) -> Any:
        if self._sess is None:
            raise ConfigError(f"the onnxruntime session for {self.path} is closed; load the artifact again")
        return self._sess

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._session().run([self.output_name], {self.input_name: x})[0]

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch.

        Args:
            x: float32 (N, C, H, W) in [0, 1]; any N, also with a static-batch model.
        Returns:
            float32 (N, classes), C-contiguous.
        Raises:
            ConfigError: ``x`` is not a float32 numpy array.
            ShapeMismatchError: ``x`` has the wrong rank or per-sample shape.
        """
        x = self._check(x)
        b = self.static_batch
        if b is None or len(x) == b:
            out = self._run(x)
        else:
            n = len(x)
            pad = -n % b if n else b  # an empty batch still runs one (all-padding) batch, for the output shape
            if pad:
                x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), dtype=x.dtype)])
            out = np.concatenate([self._run(x[i : i + b]) for i in range(0, len(x), b)])[:n]
        return np.ascontiguousarray(out, dtype=np.float32)

    def info(self) -> dict[str, Any]:
        """backend, version, precision, target, threads (None: ORT's default), providers, file, input, batch."""
        return {
            "backend": self.name,
            "version": self.version(),
            "precision": self.precision,
            "target": self.target,
            "threads": self.threads,
            "providers": [] if self._sess is None else list(self._sess.get_providers()),
            "file": os.fspath(self.path),
            "input": {
                "name": self.input_name,
                "shape": list(self.input_shape),
                "dtype": np.dtype(self._input_dtype).name,
            },
            "output": self.output_name,
            "static_batch": self.static_batch,
        }

    def close(self) -> None:
        """Drop the InferenceSession (its memory is freed when nothing else refers to it)."""
        self._sess = None  # type: ignore[assignment]
