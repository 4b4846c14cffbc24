"""Offline deployability checks: TensorRT 10.x operator matrix + Q/DQ rules, TVM Relax import dry run, bundles.

Real models (``kron_mlp``, ``mlp``, ``cnn_small``, untrained: the checks look at graphs, not accuracy) exported with
``export_onnx`` and quantized two ways: with ``quantize_onnx`` (ONNX Runtime's defaults: asymmetric activations,
INT32 biases) and with ONNX Runtime's ``quantize_static`` set up the way TensorRT needs (symmetric activations, float
biases). Hand-built graphs (``onnx.helper``) give each rule a minimal positive and negative case; the expected
verdicts come from the TensorRT 10.x matrix, not from the checker's own tables.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgesep.errors import BundleLookupError, ConfigError  # noqa: E402
from edgesep.export import (  # noqa: E402
    TRT_VERSIONS,
    BackendMissingError,
    CheckReport,
    check_bundle,
    check_tensorrt,
    check_tvm,
    op_census,
    trt_op_support,
)

MODELS = ("kron_mlp", "mlp", "cnn_small")
WEIGHTED = ("Conv", "Gemm", "MatMul")

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


def _has_tvm() -> bool:
    try:
        import tvm  # noqa: F401
    except ImportError:
        return False
    return True


needs_tvm = [pytest.mark.tvm, pytest.mark.skipif(not _has_tvm(), reason="apache-tvm is not installed")]


# ----------------------------------------------------------------------------------------------------------------
# fixtures: the project's own models, fp32 and int8


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> dict[str, Path]:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxsim")
    from edgesep.export import export_onnx
    from edgesep.models import create_model

    root = tmp_path_factory.mktemp("fp32")
    paths = {}
    for name in MODELS:
        torch.manual_seed(0)
        model = create_model(name, in_shape=[1, 8, 8], num_classes=10)
        paths[name] = root / f"{name}.onnx"
        export_onnx(model, (1, 8, 8), paths[name])
    return paths


@pytest.fixture(scope="module")
def calib() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((64, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, 64)


@pytest.fixture(scope="module")
def int8_ort(fp32, calib, tmp_path_factory) -> dict[str, Path]:
    """ONNX Runtime's static QDQ quantization with its defaults (asymmetric activations, INT32 biases)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, x: np.ndarray):
            self.batches = iter([{"input": x[i : i + 16]} for i in range(0, len(x), 16)])

        def get_next(self):
            return next(self.batches, None)

    root = tmp_path_factory.mktemp("int8ort")
    out = {}
    for name in MODELS:
        out[name] = root / f"{name}.int8.onnx"
        quantize_static(str(fp32[name]), str(out[name]), Reader(calib[0]), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def int8_trt(fp32, calib, tmp_path_factory) -> dict[str, Path]:
    """``quantize_onnx`` (the project's quantizer: symmetric int8, float biases); the gate is irrelevant here."""
    from edgesep.export import quantize_onnx

    x, y = calib
    root = tmp_path_factory.mktemp("int8")
    out = {}
    for name in MODELS:
        out[name] = root / f"{name}.int8.onnx"
        quantize_onnx(fp32[name], out[name], calib_x=x, eval_clean=(x, y), max_drop=100, max_robust_drop=100)
    return out


def _codes(report: CheckReport, severity: str) -> set[str]:
    return {i.code for i in report.issues if i.severity == severity}


def _flagged(report: CheckReport, severity: str = "error") -> dict[str, set[str]]:
    """``{node name: {codes}}`` of the issues with this severity."""
    out: dict[str, set[str]] = {}
    for i in report.issues:
        if i.severity == severity:
            out.setdefault(i.node, set()).add(i.code)
    return out


# ----------------------------------------------------------------------------------------------------------------
# TensorRT on the project's models


@pytest.mark.parametrize("name", MODELS)
def test_exported_fp32_models_pass_tensorrt(fp32, name) -> None:
    r = check_tensorrt(fp32[name])
    assert r.ok and not r.warnings, r.lines()
    assert r.target == "tensorrt" and r.version == "10.3"
    assert r.census == op_census(fp32[name])
    # symbolic batch: the note about an optimization profile; no Q/DQ: the note about a float engine
    assert {"dynamic-shape", "precision"} <= _codes(r, "info")
    json.loads(json.dumps(r.to_dict()))  # strict JSON


@pytest.mark.parametrize("name", MODELS)
def test_quantize_onnx_int8_models_pass_with_no_placement_warning(int8_trt, name) -> None:
    """quantize_onnx's symmetric QDQ, per-channel weight scales on the output axis: what TensorRT builds INT8
    kernels from."""
    r = check_tensorrt(int8_trt[name])
    assert r.ok and not r.warnings, r.lines()
    model = onnx.load(int8_trt[name])
    producers = {o: n for n in model.graph.node for o in n.output}
    weighted = [n for n in model.graph.node if n.op_type in WEIGHTED]
    assert weighted and all(producers[i].op_type == "DequantizeLinear" for n in weighted for i in n.input[:2])


@pytest.mark.parametrize("name", MODELS)
def test_ort_default_int8_fails_tensorrt_on_zero_points_and_int32_biases(int8_ort, name) -> None:
    """What ORT's defaults write (the reason quantize_onnx does not use them) does not build on TensorRT:
    asymmetric activation zero points and INT32 bias DequantizeLinear nodes. Every error is one of those two, on
    exactly those nodes."""
    model = onnx.load(int8_ort[name])
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nonzero_zp = {
        n.name
        for n in model.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and np.any(inits[n.input[2]] != 0)
    }
    int32_dq = {
        n.name
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int32
    }
    assert nonzero_zp and int32_dq  # the premise: ORT 1.32's defaults
    r = check_tensorrt(int8_ort[name])
    flagged = _flagged(r)
    assert not r.ok
    assert set(flagged) == nonzero_zp | int32_dq
    assert {n for n, c in flagged.items() if "qdq-zero-point" in c} == nonzero_zp
    assert {n for n, c in flagged.items() if "qdq-dtype" in c} == int32_dq
    assert not any(i.code == "qdq-placement" for i in r.issues), r.lines()  # weights on the right axis


# ----------------------------------------------------------------------------------------------------------------
# hand-built graphs: one rule each


def _model(nodes, inputs, outputs, inits=(), opset=18, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(inits))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets)


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _t(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def test_op_missing_from_the_matrix_is_an_error_with_its_node() -> None:
    """MatMulInteger is "N" in the matrix (QOperator-format quantization); TensorRT needs QDQ instead."""
    m = _model(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"], name="mmi")],
        [_vi("a", TensorProto.INT8, [2, 4]), _vi("b", TensorProto.INT8, [4, 3])],
        [_vi("y", TensorProto.INT32, [2, 3])],
    )
    r = check_tensorrt(m)
    assert not r.ok and _flagged(r)["mmi"] == {"unsupported-op"}
    assert _flagged(r)[""] == {"io-dtype"}  # INT8 graph inputs: not a TensorRT binding type either
    assert "QDQ" in next(i for i in r.errors if i.node == "mmi").message
    assert trt_op_support("MatMulInteger")["supported"] is False


def test_op_added_in_a_later_10x_depends_on_the_version() -> None:
    """DeformConv: "Added support for DeformConv operation" in the TensorRT 10.1 changelog."""
    m = _model(
        [helper.make_node("DeformConv", ["x", "w", "off"], ["y"], name="dcn", kernel_shape=[3, 3])],
        [_vi("x", TensorProto.FLOAT, [1, 2, 5, 5]), _vi("off", TensorProto.FLOAT, [1, 18, 3, 3])],
        [_vi("y", TensorProto.FLOAT, [1, 4, 3, 3])],
        [_t("w", np.ones((4, 2, 3, 3), np.float32))],
        opset=19,
    )
    old, new = check_tensorrt(m, trt_version="10.0"), check_tensorrt(m, trt_version="10.3")
    assert _flagged(old) == {"dcn": {"unsupported-op"}} and "10.1" in old.errors[0].message
    assert new.ok, new.lines()
    assert trt_op_support("DeformConv", "10.0") is None


def test_float64_tensor_is_an_error_on_each_node_that_computes_in_it() -> None:
    m = _model(
        [
            helper.make_node("Cast", ["x"], ["x64"], name="to64", to=TensorProto.DOUBLE),
            helper.make_node("Mul", ["x64", "k"], ["y64"], name="mul64"),
            helper.make_node("Cast", ["y64"], ["y"], name="to32", to=TensorProto.FLOAT),
        ],
        [_vi("x", TensorProto.FLOAT, [1, 4])],
        [_vi("y", TensorProto.FLOAT, [1, 4])],
        [_t("k", np.full((1, 4), 2.0))],  # float64 initializer
    )
    r = check_tensorrt(m)
    flagged = _flagged(r)
    assert {"to64", "mul64", "to32"} <= set(flagged)
    assert all("float64" in i.message for i in r.errors if i.node in ("to64", "mul64"))


def test_custom_domain_node_is_an_error() -> None:
    m = _model(
        [helper.make_node("kron_linear", ["x"], ["y"], name="kron0", domain="edgesep")],
        [_vi("x", TensorProto.FLOAT, [1, 4])],
        [_vi("y", TensorProto.FLOAT, [1, 4])],
        extra_opsets=[("edgesep", 1)],
    )
    r = check_tensorrt(m)
    assert "custom-domain" in _flagged(r).get("kron0", set())
    assert next(i for i in r.errors if i.node == "kron0").op_type == "edgesep::kron_linear"


def _qdq_matmul(axis: int, n_scales: int, zero_point: int = 0, act_zero_point: int = 0) -> onnx.ModelProto:
    """x (2, 4) @ W (4, 3) with Q/DQ on the activation and a per-channel DQ on the int8 weight."""
    w = np.arange(12, dtype=np.int8).reshape(4, 3)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dq_w", axis=axis),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"),
    ]
    inits = [
        _t("xs", np.float32(0.02)),
        _t("xz", np.int8(act_zero_point)),
        _t("wq", w),
        _t("ws", np.full(n_scales, 0.01, np.float32)),
        _t("wz", np.full(n_scales, zero_point, np.int8)),
    ]
    x, y = _vi("x", TensorProto.FLOAT, ["batch", 4]), _vi("y", TensorProto.FLOAT, ["batch", 3])
    return _model(nodes, [x], [y], inits)


def test_non_zero_zero_point_is_an_error_on_the_q_and_dq_nodes() -> None:
    r = check_tensorrt(_qdq_matmul(axis=1, n_scales=3, act_zero_point=5))
    assert _flagged(r) == {"q_x": {"qdq-zero-point"}, "dq_x": {"qdq-zero-point"}}
    r = check_tensorrt(_qdq_matmul(axis=1, n_scales=3, zero_point=2))
    assert _flagged(r) == {"dq_w": {"qdq-zero-point"}}


def test_weight_scales_on_the_output_axis_pass_and_on_the_input_axis_warn() -> None:
    """MatMul(x, W) with W (n=4, m=3) on the right: per-channel scales belong on axis 1 (the m outputs)."""
    good = check_tensorrt(_qdq_matmul(axis=1, n_scales=3))
    assert good.ok and not good.warnings, good.lines()
    bad = check_tensorrt(_qdq_matmul(axis=0, n_scales=4))
    assert bad.ok  # it builds ...
    assert _flagged(bad, "warning") == {"mm": {"qdq-placement"}}  # ... but not with INT8 kernels
    assert "axis 0" in bad.warnings[0].message and "output-channel axis 1" in bad.warnings[0].message


@pytest.mark.parametrize(
    ("op", "attrs", "w_shape", "good_axis"),
    [("Gemm", {"transB": 1}, (3, 4), 0), ("Gemm", {"transB": 0}, (4, 3), 1), ("Conv", {}, (3, 4, 1, 1), 0)],
)
def test_expected_weight_axis_for_gemm_and_conv(op, attrs, w_shape, good_axis) -> None:
    x_shape = [2, 4] if op == "Gemm" else [2, 4, 5, 5]
    y_shape = [2, 3] if op == "Gemm" else [2, 3, 5, 5]
    results = {}
    for axis in (0, 1):
        n = w_shape[axis]
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "xs"], ["xq"], name="q_x"),
            helper.make_node("DequantizeLinear", ["xq", "xs"], ["xd"], name="dq_x"),
            helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], name="dq_w", axis=axis),
            helper.make_node(op, ["xd", "wd"], ["y"], name="layer", **attrs),
        ]
        inits = [_t("xs", np.float32(0.02)), _t("wq", np.ones(w_shape, np.int8))]
        inits.append(_t("ws", np.full(n, 0.01, np.float32)))
        m = _model(nodes, [_vi("x", TensorProto.FLOAT, x_shape)], [_vi("y", TensorProto.FLOAT, y_shape)], inits)
        results[axis] = check_tensorrt(m)
    assert not results[good_axis].warnings and results[good_axis].ok, results[good_axis].lines()
    assert _flagged(results[1 - good_axis], "warning") == {"layer": {"qdq-placement"}}


def test_weighted_op_without_qdq_in_an_int8_model_warns_it_runs_in_float() -> None:
    m = _qdq_matmul(axis=1, n_scales=3)
    m.graph.node.append(helper.make_node("MatMul", ["y", "w2"], ["z"], name="mm_float"))
    m.graph.initializer.append(_t("w2", np.ones((3, 2), np.float32)))
    m.graph.output[0].CopyFrom(_vi("z", TensorProto.FLOAT, ["batch", 2]))
    r = check_tensorrt(m)
    assert r.ok and _flagged(r, "warning") == {"mm_float": {"qdq-placement"}}


def test_int8_and_uint8_outside_qdq_are_errors() -> None:
    m = _model(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
            helper.make_node("Relu", ["xq"], ["r"], name="relu_on_int8"),
            helper.make_node("DequantizeLinear", ["r", "s", "z"], ["y"], name="dq"),
        ],
        [_vi("x", TensorProto.FLOAT, [1, 4])],
        [_vi("y", TensorProto.FLOAT, [1, 4])],
        [_t("s", np.float32(0.1)), _t("z", np.int8(0))],
    )
    r = check_tensorrt(m)
    assert _flagged(r) == {"relu_on_int8": {"dtype"}} and "quantized type" in r.errors[0].message
    uint8 = _model(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
            helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"], name="dq"),
        ],
        [_vi("x", TensorProto.FLOAT, [1, 4])],
        [_vi("y", TensorProto.FLOAT, [1, 4])],
        [_t("s", np.float32(0.1)), _t("z", np.uint8(0))],
    )
    assert _flagged(check_tensorrt(uint8)) == {"q": {"qdq-dtype"}, "dq": {"qdq-dtype"}}


def test_matrix_restrictions_resize_and_pooling() -> None:
    """Resize supports nearest / linear only; pooling is 2D or 3D only (operators.md restrictions)."""
    resize = _model(
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="cubic")],
        [_vi("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [_vi("y", TensorProto.FLOAT, [1, 1, 8, 8])],
        [_t("scales", np.array([1, 1, 2, 2], np.float32))],
    )
    assert _flagged(check_tensorrt(resize)) == {"up": {"restriction"}}
    resize.graph.node[0].attribute[0].CopyFrom(helper.make_attribute("mode", "linear"))
    assert check_tensorrt(resize).ok
    pool1d = _model(
        [helper.make_node("MaxPool", ["x"], ["y"], name="pool1d", kernel_shape=[2], strides=[2])],
        [_vi("x", TensorProto.FLOAT, [1, 2, 8])],
        [_vi("y", TensorProto.FLOAT, [1, 2, 4])],
    )
    assert _flagged(check_tensorrt(pool1d)) == {"pool1d": {"restriction"}}


def test_versions_and_unknown_version() -> None:
    assert TRT_VERSIONS[0] == "10.x" and "10.3" in TRT_VERSIONS
    m = _qdq_matmul(axis=1, n_scales=3)
    assert check_tensorrt(m, trt_version="10.3.0").version == "10.3"
    assert check_tensorrt(m, trt_version="10.x").version == "10.x"
    with pytest.raises(ConfigError, match=r"8\.6.*known versions: 10\.x, 10\.0"):
        check_tensorrt(m, trt_version="8.6")


def test_strict_shape_inference_failure_is_reported() -> None:
    m = _model(
        [helper.make_node("MatMul", ["a", "b"], ["y"], name="mm_bad")],
        [_vi("a", TensorProto.FLOAT, [2, 4]), _vi("b", TensorProto.FLOAT, [5, 3])],
        [_vi("y", TensorProto.FLOAT, [2, 3])],
    )
    r = check_tensorrt(m)
    assert "shape-inference" in _codes(r, "error")


# ----------------------------------------------------------------------------------------------------------------
# TVM


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.tvm
@pytest.mark.skipif(not _has_tvm(), reason="apache-tvm is not installed")
def test_tvm_dry_run_passes_on_our_models(fp32, int8_ort, name) -> None:
    r32 = check_tvm(fp32[name])
    assert r32.ok and not r32.warnings, r32.lines()
    assert r32.options["compiled"] and r32.options["input_shapes"] == {"input": [1, 1, 8, 8]}
    assert "unscheduled" in _codes(r32, "info") and "qdq-fake-quant" not in _codes(r32, "info")
    r8 = check_tvm(int8_ort[name])
    assert r8.ok, r8.lines()
    assert {"unscheduled", "qdq-fake-quant"} <= _codes(r8, "info")


def _bogus() -> onnx.ModelProto:
    return _model(
        [
            helper.make_node("Relu", ["x"], ["a"], name="relu"),
            helper.make_node("NotAnOp", ["a"], ["y"], name="bogus"),
        ],
        [_vi("x", TensorProto.FLOAT, ["batch", 4])],
        [_vi("y", TensorProto.FLOAT, ["batch", 4])],
    )


@pytest.mark.tvm
@pytest.mark.skipif(not _has_tvm(), reason="apache-tvm is not installed")
def test_tvm_reports_a_bogus_op_with_its_node() -> None:
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    # what the frontend itself does: one OpNotImplemented naming the op types, not the nodes
    with pytest.warns(UserWarning), pytest.raises(tvm.error.OpNotImplemented, match="NotAnOp"):
        from_onnx(_bogus(), shape_dict={"x": [1, 4]})
    r = check_tvm(_bogus())
    assert not r.ok and _flagged(r) == {"bogus": {"unsupported-op"}}
    assert r.options["input_shapes"] == {"x": [1, 4]}  # batch fixed to 1


def test_tvm_missing_raises_a_typed_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tvm", None)  # `import tvm` raises ImportError
    with pytest.raises(BackendMissingError, match=r"pip install 'edgesep\[tvm\]'"):
        check_tvm(_bogus())


# ----------------------------------------------------------------------------------------------------------------
# bundles


@pytest.fixture(scope="module")
def bundle(fp32, int8_trt, tmp_path_factory) -> Path:
    from edgesep.bundle import create_bundle

    path = tmp_path_factory.mktemp("bundles") / "mlp.bundle"
    b = create_bundle(
        path,
        name="mlp",
        input_spec={"name": "input", "shape": ["batch", 1, 8, 8]},
        output_spec={"name": "logits", "shape": ["batch", 10]},
        classes=[str(i) for i in range(10)],
        provenance={"model": "mlp"},
    )
    b.add_artifact(fp32["mlp"], "model.onnx", "onnx", "fp32")
    b.add_artifact(int8_trt["mlp"], "model.int8.onnx", "onnx", "int8")
    return path


def test_check_bundle_tensorrt_checks_every_onnx_artifact(bundle) -> None:
    reports = check_bundle(bundle, "tensorrt")
    assert [r.artifact for r in reports] == ["onnx-fp32-any", "onnx-int8-any"]
    assert [r.model for r in reports] == ["model.onnx", "model.int8.onnx"]
    assert all(r.ok and r.version == "10.3" for r in reports), [r.lines() for r in reports]
    one = check_bundle(bundle, "tensorrt", artifact_id="onnx-int8-any", trt_version="10.x")
    assert len(one) == 1 and one[0].version == "10.x"
    with pytest.raises(BundleLookupError):
        check_bundle(bundle, "tensorrt", artifact_id="nope")
    with pytest.raises(ConfigError, match="unknown check target"):
        check_bundle(bundle, "coreml")


@pytest.mark.tvm
@pytest.mark.skipif(not _has_tvm(), reason="apache-tvm is not installed")
def test_check_bundle_tvm(bundle) -> None:
    reports = check_bundle(bundle, "tvm", artifact_id="onnx-fp32-any")
    assert len(reports) == 1 and reports[0].ok and reports[0].target == "tvm"
