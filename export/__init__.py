"""edgesep.export: torch -> ONNX with the Kronecker lowering, graph checks and simplification.

``import edgesep.export`` imports neither torch nor onnx: every name below is loaded on first use (PEP 562), so
the device side can import the package and host-only names cost nothing until called.

- ``export_onnx(model, input_shape, path, opset=18, batch=None)`` -> ``ExportReport`` (torch)
- ``parity(model, onnx_path, x)``: ONNX Runtime vs torch (torch, onnxruntime)
- ``translation_table()``, ``kron_linear_onnx``, ``SUPPORTED_OPSETS``: the lowering (torch, onnxscript)
- ``op_census``, ``largest_initializer``, ``stored_tensors``, ``check_no_redensify``, ``check_standard_ops``,
  ``check_model``, ``input_shapes``, ``simplify``, ``GraphCheckError``: graph checks (onnx, onnxsim; no torch)
"""

import importlib as _importlib

_LAZY: dict[str, str] = {
    # torch -> ONNX (imports torch)
    "ExportReport": "edgesep.export._onnx",
    "export_onnx": "edgesep.export._onnx",
    "parity": "edgesep.export._onnx",
    # the lowering (imports torch, onnxscript)
    "SUPPORTED_OPSETS": "edgesep.export._lowering",
    "kron_linear_onnx": "edgesep.export._lowering",
    "translation_table": "edgesep.export._lowering",
    # graph checks (onnx / onnxsim only)
    "GraphCheckError": "edgesep.export._graph",
    "check_model": "edgesep.export._graph",
    "check_no_redensify": "edgesep.export._graph",
    "check_standard_ops": "edgesep.export._graph",
    "input_shapes": "edgesep.export._graph",
    "largest_initializer": "edgesep.export._graph",
    "op_census": "edgesep.export._graph",
    "simplify": "edgesep.export._graph",
    "stored_tensors": "edgesep.export._graph",
    # INT8 quantization behind an accuracy gate (onnx / onnxruntime only)
    "GateRow": "edgesep.export._quantize",
    "LayerQuant": "edgesep.export._quantize",
    "QUANT_METHODS": "edgesep.export._quantize",
    "QuantConfig": "edgesep.export._quantize",
    "QuantReport": "edgesep.export._quantize",
    "WEIGHTED_OPS": "edgesep.export._quantize",
    "layer_sqnr": "edgesep.export._quantize",
    "quantize_onnx": "edgesep.export._quantize",
    "sqnr_db": "edgesep.export._quantize",
    "weighted_nodes": "edgesep.export._quantize",
    # run directory -> bundle, INT8 into a bundle, bundle summary (torch / onnx imported inside the functions)
    "DEFAULT_EVAL_N": "edgesep.export._pipeline",
    "EVAL_SETS_SYNTAX": "edgesep.export._pipeline",
    "EvalSetSpec": "edgesep.export._pipeline",
    "PARITY_N": "edgesep.export._pipeline",
    "PARITY_RTOL": "edgesep.export._pipeline",
    "export_run": "edgesep.export._pipeline",
    "inspect_bundle": "edgesep.export._pipeline",
    "parse_eval_sets": "edgesep.export._pipeline",
    "quantize_bundle": "edgesep.export._pipeline",
    # offline deployability checks for TensorRT / TVM (onnx; TVM imported by check_tvm only)
    "BackendMissingError": "edgesep.export._check",
    "CheckReport": "edgesep.export._check",
    "Issue": "edgesep.export._check",
    "TRT_VERSIONS": "edgesep.export._check",
    "check_bundle": "edgesep.export._check",
    "check_tensorrt": "edgesep.export._check",
    "check_tvm": "edgesep.export._check",
    "trt_op_support": "edgesep.export._check",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgesep.export' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*(k for k in globals() if not k.startswith("_")), *__all__})
