"""INT8 quantization (ORT static, QDQ) behind an accuracy gate: methods, QDQ placement, exclusion, gate, SQNR.

Real models: ``mlp`` (dense, Gemm) and ``kron_mlp`` (Kronecker, MatMuls with the weight on the right) trained for
a few seconds on digits and exported with ``export_onnx``. Independent references: ONNX Runtime run by the test
itself for logits, the onnx reference evaluator for per-layer tensors, numpy for SQNR.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxsim")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from edgesep._config import config_from_dict  # noqa: E402
from edgesep._io import sha256_file  # noqa: E402
from edgesep.data import load_dataset  # noqa: E402
from edgesep.errors import AccuracyGateError, ConfigError, ShapeMismatchError  # noqa: E402
from edgesep.export import (  # noqa: E402
    QuantReport,
    check_standard_ops,
    export_onnx,
    input_shapes,
    layer_sqnr,
    op_census,
    quantize_onnx,
    sqnr_db,
    weighted_nodes,
)
from edgesep.export._quantize import _calib_batches  # noqa: E402
from edgesep.models import create_model  # noqa: E402

# torch.export's pytree code warns about its own deprecated LeafSpec on every export
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

MODELS = ("mlp", "kron_mlp")
N_CALIB = 256


# ----------------------------------------------------------------------------------------------------------------
# fixtures: two small trained models, exported once per module


def _train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 5) -> None:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits) -> dict[str, torch.nn.Module]:
    """mlp and kron_mlp trained ~1 s each on digits (one thread: reproducible)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = {}
        for name in MODELS:
            torch.manual_seed(0)
            models[name] = create_model(name, in_shape=[1, 8, 8], num_classes=10, mean=digits.mean, std=digits.std)
            _train(models[name], digits.x_train, digits.y_train)
    finally:
        torch.set_num_threads(threads)
    return models


@pytest.fixture(scope="module")
def fp32(trained, tmp_path_factory) -> dict[str, Path]:
    """``{name: exported fp32 .onnx}`` (symbolic batch)."""
    root = tmp_path_factory.mktemp("fp32")
    paths = {name: root / f"{name}.onnx" for name in MODELS}
    for name in MODELS:
        export_onnx(trained[name], (1, 8, 8), paths[name])
    return paths


def _quantize(fp32_path: Path, out: Path, digits, **kw) -> QuantReport:
    kw.setdefault("calib_x", digits.x_train[:N_CALIB])
    kw.setdefault("eval_clean", (digits.x_test, digits.y_test))
    return quantize_onnx(fp32_path, out, **kw)


@pytest.fixture(scope="module")
def int8(fp32, digits, tmp_path_factory) -> dict[str, tuple[QuantReport, Path]]:
    """Default quantization (minmax, per-channel) of both models, generous gate."""
    root = tmp_path_factory.mktemp("int8")
    out = {}
    for name in MODELS:
        path = root / f"{name}.int8.onnx"
        out[name] = (_quantize(fp32[name], path, digits, max_drop=5.0, max_robust_drop=5.0), path)
    return out


def _noisy(x: np.ndarray, eps: float, seed: int = 0) -> np.ndarray:
    """Stand-in for a transferred attack: x + eps * sign(noise), clipped to [0, 1]."""
    noise = np.random.default_rng(seed).standard_normal(x.shape)
    return np.clip(x + eps * np.sign(noise), 0.0, 1.0).astype(np.float32)


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _weight_dq(model: onnx.ModelProto, node_name: str) -> onnx.NodeProto | None:
    """The DequantizeLinear that feeds a weighted node's weight input, or None if the weight is float."""
    node = next(n for n in model.graph.node if n.name == node_name)
    inits = {i.name for i in model.graph.initializer}
    weight_input = node.input[1] if node.input[0] not in inits or node.op_type != "MatMul" else node.input[0]
    return next((n for n in model.graph.node if weight_input in n.output and n.op_type == "DequantizeLinear"), None)


# ----------------------------------------------------------------------------------------------------------------
# quantization per method


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
@pytest.mark.parametrize("name", MODELS)
def test_quantize_each_method(fp32, digits, tmp_path, name, method):
    out = tmp_path / "m.int8.onnx"
    x_adv = _noisy(digits.x_test, 0.1)
    # 250 calibration samples: not a multiple of the batch, which ORT's histogram calibrators cannot take ragged
    report = _quantize(
        fp32[name],
        out,
        digits,
        calib_x=digits.x_train[:250],
        eval_adv=[("noise", x_adv, digits.y_test)],
        method=method,
        max_drop=5.0,
        max_robust_drop=5.0,
    )
    assert report.passed and report.written and out.is_file()
    assert report.calib_n == 250 and report.calib_batch == 50
    assert report.sha256_int8 == sha256_file(out) and report.size_int8 == out.stat().st_size
    assert [r.metric for r in report.gate] == ["clean", "robust[noise]"]

    census = op_census(out)
    assert census.get("QuantizeLinear", 0) > 0 and census.get("DequantizeLinear", 0) >= len(report.layers)
    check_standard_ops(out)  # no com.microsoft ops for int8
    assert {o.domain for o in onnx.load(str(out)).opset_import} == {""}  # ORT's extra domains stripped
    assert input_shapes(out)["input"][0] == "batch"  # the symbolic batch survives pre-processing and QDQ

    ref, got = _logits(fp32[name], digits.x_test), _logits(out, digits.x_test)
    agreement = float(np.mean(ref.argmax(1) == got.argmax(1)))
    assert agreement >= 0.97
    assert agreement == pytest.approx(report.gate[0].agreement)
    # close-ish: relative RMS error under 10% (logit SQNR > 20 dB; entropy clips the largest logits)
    assert np.linalg.norm(ref - got) <= 0.1 * np.linalg.norm(ref)
    acc = float(np.mean(got.argmax(1) == digits.y_test))
    assert report.gate[0].int8 == pytest.approx(acc)
    assert report.gate[0].drop_pp == pytest.approx(100 * (report.gate[0].fp32 - acc))

    d = report.to_dict()
    json.dumps(d, allow_nan=False)  # strict JSON
    assert d["method"] == method and d["per_channel"] is True
    assert config_from_dict(d["config"]) == report.config
    assert all(L["sqnr_db"] is not None and L["sqnr_db"] > 15 for L in d["layers"])
    text = report.table()
    assert method in text and all(L.node in text for L in report.layers) and "PASSED" in text


def test_sizes(int8):
    mlp, _ = int8["mlp"]
    assert mlp.size_int8 < 0.35 * mlp.size_fp32  # dense weights dominate: ~4x smaller
    kron, _ = int8["kron_mlp"]
    assert kron.size_int8 < kron.size_fp32  # tiny factors: the QDQ scaffolding is most of the file


# ----------------------------------------------------------------------------------------------------------------
# QDQ placement: per-channel weight scales on the output axis


def test_matmul_weight_scales_on_axis_1(int8, fp32):
    """kron_mlp: MatMul(x, W) with W (n, m) on the right -> the weight's DequantizeLinear has axis=1, m scales."""
    report, path = int8["kron_mlp"]
    q = onnx.load(str(path))
    inits = {i.name: i for i in q.graph.initializer}
    matmuls = [w for w in weighted_nodes(fp32["kron_mlp"]) if w[1] == "MatMul"]
    assert len(matmuls) == 6
    by_node = {L.node: L for L in report.layers}
    for node, _, _ in matmuls:
        dq = _weight_dq(q, node)
        assert dq is not None
        m = int(inits[dq.input[0]].dims[1])
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        scales = numpy_helper.to_array(inits[dq.input[1]])
        assert axis == 1 and scales.shape == (m,)
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8
        assert (by_node[node].weight_axis, by_node[node].weight_scales) == (1, m)


def test_gemm_weight_scales_on_output_axis(int8):
    """mlp: Gemm with transB=1 stores W as (out, in): the output axis is 0."""
    report, path = int8["mlp"]
    q = onnx.load(str(path))
    inits = {i.name: i for i in q.graph.initializer}
    for layer in report.layers:
        dq = _weight_dq(q, layer.node)
        out_features = int(inits[dq.input[0]].dims[0])
        assert next(a.i for a in dq.attribute if a.name == "axis") == 0
        assert numpy_helper.to_array(inits[dq.input[1]]).shape == (out_features,)
        assert (layer.weight_axis, layer.weight_scales) == (0, out_features)


def test_per_tensor_weights_have_lower_weight_sqnr(fp32, digits, int8, tmp_path):
    per_tensor = _quantize(fp32["kron_mlp"], tmp_path / "pt.onnx", digits, per_channel=False, max_drop=5.0)
    per_channel = {L.node: L for L in int8["kron_mlp"][0].layers}
    for layer in per_tensor.layers:
        assert layer.weight_axis is None and layer.weight_scales == 1
        assert layer.weight_sqnr_db <= per_channel[layer.node].weight_sqnr_db + 1e-6


# ----------------------------------------------------------------------------------------------------------------
# exclusion


def test_exclude_patterns_keep_nodes_float(fp32, digits, tmp_path):
    out = tmp_path / "ex.onnx"
    report = _quantize(fp32["kron_mlp"], out, digits, exclude=["node_MatMul_1*", "Gemm"], max_drop=5.0)
    expected = ["node_MatMul_10", "node_MatMul_13", "node_MatMul_16", "node_linear"]
    assert report.excluded == expected
    q, f = onnx.load(str(out)), onnx.load(str(fp32["kron_mlp"]))
    f_inits = {i.name: numpy_helper.to_array(i) for i in f.graph.initializer}
    q_inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    for node, _, weight in weighted_nodes(f):
        if node in expected:
            assert _weight_dq(q, node) is None
            np.testing.assert_array_equal(q_inits[weight], f_inits[weight])  # the float weight, untouched
        else:
            assert _weight_dq(q, node) is not None
    assert {L.node for L in report.layers if not L.quantized} == set(expected)
    assert all(L.weight_sqnr_db is None for L in report.layers if not L.quantized)


def test_unknown_exclude_pattern_lists_node_names(fp32, digits, tmp_path):
    out = tmp_path / "ex.onnx"
    with pytest.raises(ConfigError, match=r"nope\*.*node_sub"):
        _quantize(fp32["mlp"], out, digits, exclude=["Gemm", "nope*"])
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# the accuracy gate


def test_gate_failure_writes_nothing(fp32, digits, tmp_path):
    before = sha256_file(fp32["mlp"])
    out = tmp_path / "out" / "g.onnx"
    with pytest.raises(AccuracyGateError, match="--auto-exclude") as e:
        _quantize(fp32["mlp"], out, digits, max_drop=-1.0)  # no drop can be <= -1 pp
    assert e.value.metric == "clean" and e.value.limit == -1.0
    report = e.value.report
    assert isinstance(report, QuantReport) and not report.passed and not report.written
    assert report.sha256_int8 is None
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))
    assert sha256_file(fp32["mlp"]) == before

    stale = tmp_path / "stale.onnx"  # a file already there is neither replaced nor removed
    stale.write_bytes(b"previous")
    with pytest.raises(AccuracyGateError):
        _quantize(fp32["mlp"], stale, digits, max_drop=-1.0)
    assert stale.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["stale.onnx"]


def test_robust_gate_names_the_failing_set(fp32, digits, tmp_path):
    before = sha256_file(fp32["kron_mlp"])
    out = tmp_path / "g.onnx"
    adv = [("a", _noisy(digits.x_test, 0.05, 1), digits.y_test), ("b", _noisy(digits.x_test, 0.1, 2), digits.y_test)]
    with pytest.raises(AccuracyGateError) as e:
        _quantize(fp32["kron_mlp"], out, digits, eval_adv=adv, max_drop=100.0, max_robust_drop=-1.0)
    assert e.value.metric.startswith("robust[")
    rows = {r.metric: r for r in e.value.report.gate}
    assert rows["clean"].ok and not rows["robust[a]"].ok and not rows["robust[b]"].ok
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert sha256_file(fp32["kron_mlp"]) == before


def test_auto_exclude_passes_where_full_int8_fails(fp32, digits, tmp_path):
    """A gate just below the measured drop of full INT8 fails; auto-exclusion keeps the worst layers fp32 and passes.

    The eval set is labelled with the fp32 model's own predictions on noisy inputs, so fp32 scores 100% and the
    int8 drop is exactly its disagreement with fp32 (> 0 on borderline inputs).
    """
    x = _noisy(np.concatenate([digits.x_train, digits.x_test]), 0.25, 3)
    y = _logits(fp32["mlp"], x).argmax(1)
    full = _quantize(fp32["mlp"], tmp_path / "full.onnx", digits, eval_clean=(x, y), max_drop=100.0)
    drop = full.gate[0].drop_pp
    assert full.gate[0].fp32 == 1.0 and drop > 0
    limit = drop - 0.01

    out = tmp_path / "auto.onnx"
    with pytest.raises(AccuracyGateError):
        _quantize(fp32["mlp"], out, digits, eval_clean=(x, y), max_drop=limit)
    report = _quantize(fp32["mlp"], out, digits, eval_clean=(x, y), max_drop=limit, auto_exclude=True)
    assert report.passed and out.is_file() and report.gate[0].drop_pp <= limit
    ranking = sorted(full.layers, key=lambda L: L.sqnr_db)  # lowest SQNR first
    k = len(report.kept_fp32)
    assert k >= 1 and report.kept_fp32 == [L.node for L in ranking[:k]]
    assert report.attempts == 1 + k
    q = onnx.load(str(out))
    for layer in report.layers:
        assert (_weight_dq(q, layer.node) is None) == (layer.node in report.kept_fp32)
        assert layer.quantized == (layer.node not in report.kept_fp32)
        assert layer.sensitivity_db == pytest.approx(
            full.layers[[L.node for L in full.layers].index(layer.node)].sqnr_db
        )
    assert "fp32 (auto)" in report.table()


def test_auto_exclude_gives_up_after_every_weighted_layer(fp32, digits, tmp_path):
    out = tmp_path / "a.onnx"
    with pytest.raises(AccuracyGateError, match="kept 3 of 3") as e:
        _quantize(fp32["mlp"], out, digits, max_drop=-1.0, auto_exclude=True)
    assert "--auto-exclude" not in str(e.value)  # already tried: not suggested again
    assert sorted(e.value.report.kept_fp32) == sorted(w[0] for w in weighted_nodes(fp32["mlp"]))
    assert e.value.report.attempts == 4 and not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# per-layer SQNR


def _numpy_sqnr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(10 * np.log10(np.sum(a**2) / np.sum((a - b) ** 2)))


@pytest.mark.parametrize("name", MODELS)
def test_layer_sqnr_matches_reference_evaluator(int8, fp32, digits, name):
    """Per node, by node name: node.output[0] in the float and the QDQ model, run by onnx's reference evaluator."""
    report, path = int8[name]
    x = digits.x_train[: report.sqnr_n]
    f_model, q_model = onnx.load(str(fp32[name])), onnx.load(str(path))
    # the reference evaluator (onnx 1.23) implements DequantizeLinear from opset 19 only; 18 -> 19 changes nothing
    # for int8 QDQ, Gemm / MatMul / Transpose / Reshape
    for o in q_model.opset_import:
        if o.domain == "":
            o.version = max(o.version, 19)
    f_vals = ReferenceEvaluator(f_model).run(None, {"input": x}, intermediate=True)
    q_vals = ReferenceEvaluator(q_model).run(None, {"input": x}, intermediate=True)
    f_nodes = {n.name: n for n in f_model.graph.node}
    q_nodes = {n.name: n for n in q_model.graph.node}
    for layer in report.layers:
        ref = _numpy_sqnr(f_vals[f_nodes[layer.node].output[0]], q_vals[q_nodes[layer.node].output[0]])
        assert math.isfinite(layer.sqnr_db) and layer.sqnr_db > 15
        assert layer.sqnr_db == pytest.approx(ref, abs=0.01), layer.node


def test_sqnr_lower_for_4bit_weights(int8, fp32, digits, tmp_path):
    """The same graph with 4-bit weights (ORT, com.microsoft Q/DQ) has a lower SQNR at every weighted layer."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self, x: np.ndarray):
            self.batches = iter(np.split(x, 4))

        def get_next(self):
            return {"input": b} if (b := next(self.batches, None)) is not None else None

    report, path = int8["kron_mlp"]
    pre, w4 = tmp_path / "pre.onnx", tmp_path / "w4.onnx"
    quant_pre_process(str(fp32["kron_mlp"]), str(pre))
    quantize_static(
        str(pre),
        str(w4),
        Reader(digits.x_train[:N_CALIB]),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt4,
    )
    x = digits.x_train[: report.sqnr_n]
    s8 = layer_sqnr(fp32["kron_mlp"], path, x)
    s4 = layer_sqnr(fp32["kron_mlp"], w4, x)
    assert list(s8) == [L.node for L in report.layers]
    for layer in report.layers:
        assert s8[layer.node] == pytest.approx(layer.sqnr_db, abs=1e-6)  # the report's own numbers
        assert math.isfinite(s4[layer.node]) and s4[layer.node] < s8[layer.node] - 3, layer.node


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 200).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3), st.floats(1e-4, 1.0))
    )
)
def test_sqnr_db_properties(args):
    n, seed, scale, noise = args
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n) + 0.1
    b = a + noise * rng.standard_normal(n)
    expected = 10 * np.log10(np.sum(a**2) / np.sum((a - b) ** 2))
    assert sqnr_db(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert sqnr_db(scale * a, scale * b) == pytest.approx(sqnr_db(a, b), abs=1e-6)  # scale invariant
    assert sqnr_db(a, a) == math.inf


def test_sqnr_db_shape_mismatch():
    with pytest.raises(ShapeMismatchError):
        sqnr_db(np.zeros(3), np.zeros(4))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 128), st.one_of(st.none(), st.integers(1, 16)))
def test_calibration_batches_are_equal_sized(n, want, static):
    x = np.arange(n, dtype=np.float32).reshape(n, 1)
    batches = _calib_batches(x, static, want)
    sizes = {len(b) for b in batches}
    assert len(sizes) == 1  # ORT's histogram calibrators np.asarray the list of batches
    if static is None:
        assert sizes.pop() <= want and np.array_equal(np.concatenate(batches), x)
    else:
        assert sizes.pop() == static and np.array_equal(np.concatenate(batches)[:n], x)


# ----------------------------------------------------------------------------------------------------------------
# options and inputs


def test_static_batch_model(trained, digits, tmp_path):
    """A static-batch export: calibration and evaluation run in that batch (padded / filled up)."""
    path = tmp_path / "static.onnx"
    export_onnx(trained["mlp"], (1, 8, 8), path, batch=8)
    report = _quantize(path, tmp_path / "static.int8.onnx", digits, calib_x=digits.x_train[:100], max_drop=5.0)
    assert report.passed and report.calib_batch == 8 and report.gate[0].n == len(digits.y_test)
    assert input_shapes(tmp_path / "static.int8.onnx")["input"][0] == 8


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "kl"}, ConfigError, "minmax"),
        ({"calib_batch": 0}, ConfigError, "calib_batch"),
        ({"max_drop": float("nan")}, ConfigError, "max_drop"),
        ({"exclude": [""]}, ConfigError, "exclude"),
        ({"calib_x": np.zeros((4, 1, 7, 7), np.float32)}, ShapeMismatchError, "calib_x"),
        ({"eval_clean": (np.zeros((3, 1, 8, 8), np.float32), np.zeros(2, np.int64))}, ShapeMismatchError, "labels"),
        ({"eval_adv": [("a", np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.int64))] * 2}, ConfigError, "unique"),
    ],
)
def test_bad_options(fp32, digits, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        _quantize(fp32["mlp"], tmp_path / "x.onnx", digits, **kwargs)
    assert not (tmp_path / "x.onnx").exists()


def test_refuses_to_overwrite_the_fp32_file(fp32, digits):
    before = sha256_file(fp32["mlp"])
    with pytest.raises(ConfigError, match="fp32 model itself"):
        _quantize(fp32["mlp"], fp32["mlp"], digits)
    assert sha256_file(fp32["mlp"]) == before
