"""torch -> ONNX export: the Kronecker lowering, graph checks, parity with ONNX Runtime and the reference evaluator."""

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
from onnx.reference import ReferenceEvaluator  # noqa: E402
from torch import nn  # noqa: E402

from edgesep.errors import ConfigError, ShapeMismatchError  # noqa: E402
from edgesep.export import (  # noqa: E402
    GraphCheckError,
    check_no_redensify,
    check_standard_ops,
    export_onnx,
    input_shapes,
    kron_linear_onnx,
    largest_initializer,
    op_census,
    parity,
    simplify,
)
from edgesep.layers.kron import KronLinear, kron_linear_reference  # noqa: E402

# torch.export's pytree code warns about its own deprecated LeafSpec on every export
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

RTOL = 1e-4
N_PARITY = 1000


# ----------------------------------------------------------------------------------------------------------------
# test models: KronLinear layers with d = 1, 2, 3, with and without bias, on un-flattened inputs


class Net28(nn.Module):
    """(1, 28, 28) pixels -> normalize -> Kron d=3 (bias) -> Kron d=2 (no bias) -> dense classifier."""

    input_shape = (1, 28, 28)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.1307]).reshape(1, 1, 1))
        self.register_buffer("std", torch.tensor([0.3081]).reshape(1, 1, 1))
        self.k1 = KronLinear((1, 28, 28), (1, 16, 16), bias=True)
        self.k2 = KronLinear((16, 16), (8, 8), bias=False)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = (x - self.mean) / self.std  # normalization is part of the graph: inputs are pixels in [0, 1]
        y = torch.relu(self.k1(x))  # (B, 1, 28, 28) -> (B, 1, 16, 16)
        y = torch.relu(self.k2(y.reshape(y.shape[0], 16, 16)))  # (B, 1, 16, 16) -> (B, 16, 16) -> (B, 8, 8)
        return self.fc(y.flatten(1))  # (B, 8, 8) -> (B, 64) -> (B, 10)


class Net3x8(nn.Module):
    """(3, 8, 8) -> Kron d=3 (no bias) -> (2, 4, 4) -> Kron d=2 (bias) -> 20 logits; no dense layer."""

    input_shape = (3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([KronLinear((3, 8, 8), (2, 4, 4), bias=False), KronLinear((8, 4), (4, 5))])

    def forward(self, x):
        y = torch.relu(self.blocks[0](x))  # (B, 3, 8, 8) -> (B, 2, 4, 4)
        y = self.blocks[1](y.reshape(y.shape[0], 8, 4))  # (B, 2, 4, 4) -> (B, 8, 4) -> (B, 4, 5)
        return y.flatten(1)  # (B, 4, 5) -> (B, 20)


class Net1(nn.Module):
    """(64,) -> Kron d=1 (no bias) -> Kron d=1 (bias) -> 10 logits: the one-factor case is a plain MatMul."""

    input_shape = (64,)

    def __init__(self) -> None:
        super().__init__()
        self.k1 = KronLinear((64,), (32,), bias=False)
        self.k2 = KronLinear((32,), (10,), bias=True)

    def forward(self, x):
        return self.k2(torch.relu(self.k1(x)))


MODELS = {"net28": Net28, "net3x8": Net3x8, "net1": Net1}


def _make(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]()


def _inputs(shape, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)  # pixels in [0, 1]


def _torch_out(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def _kron_layers(model: nn.Module) -> dict[str, KronLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, KronLinear)}


def _max_param(model: nn.Module) -> int:
    return max(t.numel() for t in [*model.parameters(), *model.buffers()])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export on demand, once per (model, opset, batch) in this module: get(name, opset=18, batch=None)."""
    root = tmp_path_factory.mktemp("onnx")
    cache: dict = {}

    def get(name: str, opset: int = 18, batch: int | None = None):
        key = (name, opset, batch)
        if key not in cache:
            model = _make(name)
            path = root / f"{name}-{opset}-{batch}.onnx"
            cache[key] = (model, export_onnx(model, model.input_shape, path, opset=opset, batch=batch), path)
        return cache[key]

    return get


# ----------------------------------------------------------------------------------------------------------------
# the lowering on its own (no exporter): eager onnxscript vs the torch reference


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3),
    batch=st.integers(1, 3),
)
def test_lowering_function_matches_reference(shapes, batch) -> None:
    """kron_linear_onnx, run eagerly by onnxscript, computes kron_linear_reference for d = 1, 2, 3."""
    rng = np.random.default_rng(len(shapes) * 10 + batch)
    factors = [rng.standard_normal((m, n)).astype(np.float32) for m, n in shapes]
    x = rng.standard_normal((batch, *(n for _, n in shapes))).astype(np.float32)
    y = kron_linear_onnx(x, factors)
    y = np.asarray(getattr(y, "value", y))
    ref = kron_linear_reference(torch.from_numpy(x), [torch.from_numpy(u) for u in factors]).numpy()
    assert y.shape == ref.shape == (batch, *(m for m, _ in shapes))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# graph structure


@pytest.mark.parametrize("name", list(MODELS))
def test_graph_has_only_standard_ops(exported, name) -> None:
    _, report, path = exported(name)
    m = onnx.load(path)
    check_standard_ops(m)
    assert not m.functions
    for node in m.graph.node:
        assert node.domain in ("", "ai.onnx"), node
        assert onnx.defs.has(node.op_type), node.op_type
    assert "edgesep" not in json.dumps(report.census_after)
    assert set(report.census_after) <= {"MatMul", "Transpose", "Add", "Relu", "Reshape", "Gemm", "Sub", "Div"}


@pytest.mark.parametrize("name", list(MODELS))
def test_matmul_right_inputs_are_transposed_factors(exported, name) -> None:
    """Every MatMul multiplies by an initializer on the right, and those are exactly the factors U_kᵀ (n_k, m_k)."""
    model, report, path = exported(name)
    m = onnx.load(path)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    rights = [n.input[1] for n in m.graph.node if n.op_type == "MatMul"]
    assert rights and all(r in inits for r in rights), "a MatMul's right operand is not an initializer"
    weights = [inits[r] for r in rights]
    for path_, layer in _kron_layers(model).items():
        expected = [[n, m_] for m_, n in reversed(list(zip(layer.out_shape, layer.in_shape, strict=True)))]
        assert report.kron_layers[path_]["matmul_weights"] == expected  # last factor first, each (n_k, m_k)
        for u in layer.factors:
            ut = u.detach().numpy().T
            assert any(w.shape == ut.shape and np.array_equal(w, ut) for w in weights), f"{path_}: no U_kᵀ"


@pytest.mark.parametrize("name", list(MODELS))
def test_no_initializer_larger_than_the_largest_parameter(exported, name) -> None:
    """The graph does not re-densify: no stored tensor beats the model's own largest factor / bias / dense layer."""
    model, report, path = exported(name)
    bound = _max_param(model)
    _, largest = largest_initializer(path)
    assert largest <= bound and report.largest_initializer_elems == largest
    dense = min(layer.in_features * layer.out_features for layer in _kron_layers(model).values())
    assert largest < dense or name == "net1"  # d = 1: the "factor" is the dense weight itself
    check_no_redensify(path, bound)
    with pytest.raises(GraphCheckError, match="re-densified"):
        check_no_redensify(path, largest - 1)


def test_check_no_redensify_catches_a_dense_kron_weight() -> None:
    """A graph holding kron(U_1, U_2) as one initializer fails the check with the model's bound."""
    layer = KronLinear((16, 16), (8, 8), bias=False)
    w = layer.to_dense().detach().numpy().T  # (256, 64): the re-densified weight
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "dense",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 256])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 64])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    assert largest_initializer(model) == ("w", 256 * 64)
    with pytest.raises(GraphCheckError, match=r"w \(16384 elements\)"):
        check_no_redensify(model, _max_param(layer))


def test_per_layer_op_counts(exported) -> None:
    """d MatMuls and d axis rotations per KronLinear, plus the bias Add."""
    _, r28, _ = exported("net28")
    assert r28.kron_layers["k1"]["ops"] == {"Add": 1, "MatMul": 3, "Transpose": 3}
    assert r28.kron_layers["k2"]["ops"] == {"MatMul": 2, "Transpose": 2}
    _, r3, _ = exported("net3x8")
    assert r3.kron_layers["blocks.0"]["ops"] == {"MatMul": 3, "Transpose": 3}
    assert r3.kron_layers["blocks.1"]["ops"] == {"Add": 1, "MatMul": 2, "Transpose": 2}
    _, r1, _ = exported("net1")
    assert r1.kron_layers["k1"]["ops"] == {"MatMul": 1}  # d = 1: no rotation
    assert r1.kron_layers["k2"]["ops"] == {"Add": 1, "MatMul": 1}


def test_factor_weights_are_named_after_their_parameters(exported) -> None:
    _, _, path = exported("net28")
    m = onnx.load(path)
    rights = [n.input[1] for n in m.graph.node if n.op_type == "MatMul"]
    assert rights == ["k1.factors.2.T", "k1.factors.1.T", "k1.factors.0.T", "k2.factors.1.T", "k2.factors.0.T"]


def test_layer_called_twice_shares_its_factor_weights(tmp_path) -> None:
    """Weight sharing: the second call reuses Transpose(U_k) (no duplicate initializer, no clashing names)."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = KronLinear((4, 4), (4, 4))

        def forward(self, x):
            return self.k(torch.relu(self.k(x))).flatten(1)  # (B, 4, 4) -> (B, 4, 4) -> (B, 4, 4) -> (B, 16)

    torch.manual_seed(0)
    model = Twice()
    report = export_onnx(model, (4, 4), tmp_path / "m.onnx")
    assert report.kron_layers["k"]["ops"] == {"Add": 2, "MatMul": 4, "Transpose": 4}
    names = sorted(i.name for i in onnx.load(report.path).graph.initializer if i.name.startswith("k."))
    assert names == ["k.bias", "k.factors.0.T", "k.factors.1.T"]
    assert parity(model, report.path, _inputs((4, 4), 100))["ok"]


def test_simplify_keeps_the_small_matmuls_and_the_symbolic_batch(exported) -> None:
    model, report, path = exported("net28")
    n_matmul = sum(layer.d for layer in _kron_layers(model).values())
    # the raw export: every factor still behind a Transpose (folded to an initializer by simplification)
    assert report.census_before["MatMul"] == n_matmul
    assert report.census_before["Transpose"] == 2 * n_matmul
    assert report.census_after["MatMul"] == n_matmul and report.census_after["Transpose"] == n_matmul
    simplified, before, after = simplify(path)  # idempotent on the written file
    assert before == after == report.census_after
    assert input_shapes(simplified) == {"input": ["batch", 1, 28, 28]}
    assert op_census(simplified)["MatMul"] == n_matmul


# ----------------------------------------------------------------------------------------------------------------
# numerics


@pytest.mark.parametrize("name", list(MODELS))
def test_parity_onnxruntime_1000_inputs(exported, name) -> None:
    model, _, path = exported(name)
    r = parity(model, path, _inputs(model.input_shape, N_PARITY), rtol=RTOL)
    assert r["n"] == N_PARITY
    assert r["max_rel_err"] <= RTOL, r
    assert r["top1_agreement"] == 1.0, r
    assert r["ok"]


@pytest.mark.parametrize("name", list(MODELS))
def test_reference_evaluator_is_an_independent_oracle(exported, name) -> None:
    model, _, path = exported(name)
    x = _inputs(model.input_shape, 4, seed=1)
    (got,) = ReferenceEvaluator(str(path)).run(None, {"input": x})
    ref = _torch_out(model, x)
    assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max()
    assert np.array_equal(got.argmax(1), ref.argmax(1))


def test_dynamic_batch_runs_at_1_7_64(exported) -> None:
    model, report, path = exported("net28")
    assert report.dynamic_batch and report.input_shape == ["batch", 1, 28, 28]
    assert report.output_shape == ["batch", 10]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 7, 64):
        x = _inputs((1, 28, 28), b, seed=b)
        (y,) = session.run(None, {"input": x})
        ref = _torch_out(model, x)
        assert y.shape == (b, 10)
        assert np.abs(y - ref).max() <= RTOL * np.abs(ref).max()


def test_static_batch(exported) -> None:
    model, report, path = exported("net28", batch=4)
    assert not report.dynamic_batch
    assert input_shapes(path) == {"input": [4, 1, 28, 28]}
    r = parity(model, path, _inputs((1, 28, 28), 10), rtol=RTOL)  # runs in chunks of 4, the last one padded
    assert r["ok"] and r["n"] == 10, r
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match=r"(?i)dimension"):
        session.run(None, {"input": _inputs((1, 28, 28), 5)})


@pytest.mark.parametrize("opset", [17, 18, 20])
def test_opsets_export_and_pass_parity(exported, opset) -> None:
    model, report, path = exported("net28", opset=opset)
    m = onnx.load(path)
    assert {o.domain: o.version for o in m.opset_import}[""] == opset == report.opset
    assert report.kron_layers["k1"]["ops"]["MatMul"] == 3
    r = parity(model, path, _inputs((1, 28, 28), N_PARITY, seed=opset), rtol=RTOL)
    assert r["ok"], r


@pytest.mark.parametrize("opset", [11, 16, 19, 21, "18", True])
def test_unsupported_opset_is_a_config_error(tmp_path, opset) -> None:
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(_make("net1"), (64,), tmp_path / "m.onnx", opset=opset)
    assert not list(tmp_path.iterdir())


def test_opset_the_converter_cannot_reach_is_a_config_error(tmp_path) -> None:
    """onnx's version converter has no Pad 18 -> 17 adapter: a typed error, not a file stamped with another opset."""

    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = KronLinear((4, 6), (2, 3))

        def forward(self, x):
            return self.k(nn.functional.pad(x, (1, 1)))  # (B, 4, 4) -> (B, 4, 6) -> (B, 2, 3)

    with pytest.raises(ConfigError, match="opset 17"):
        export_onnx(Padded(), (4, 4), tmp_path / "m.onnx", opset=17)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"input_shape": ()}, ConfigError),
        ({"input_shape": (0, 8)}, ConfigError),
        ({"input_shape": "64"}, ConfigError),
        ({"batch": 0}, ConfigError),
        ({"batch": 2.5}, ConfigError),
        ({"input_shape": (63,)}, ShapeMismatchError),
        ({"input_shape": (1, 64)}, ShapeMismatchError),
    ],
)
def test_bad_arguments_are_typed_errors(tmp_path, kwargs, error) -> None:
    args = {"input_shape": (64,), **kwargs}
    with pytest.raises(error):
        export_onnx(_make("net1"), args.pop("input_shape"), tmp_path / "m.onnx", **args)
    assert not list(tmp_path.iterdir())


def test_report_is_json_ready_and_matches_the_file(exported) -> None:
    import hashlib

    _, report, path = exported("net3x8")
    d = json.loads(json.dumps(report.to_dict()))
    assert d == report.to_dict()
    assert d["path"] == str(path) and Path(d["path"]).is_file()
    assert d["file_size"] == path.stat().st_size
    assert d["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert d["num_initializers"] == len(onnx.load(path).graph.initializer)
    assert d["census_after"] == op_census(path)
    assert not list(path.parent.glob(".*.tmp")), "temp file left behind"


def test_export_restores_training_mode_and_leaves_the_global_rng_alone(tmp_path) -> None:
    model = _make("net3x8").train()
    state = torch.get_rng_state()
    export_onnx(model, model.input_shape, tmp_path / "m.onnx")
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------------------------------------------
# the model registry


def _registry():
    try:
        from edgesep.models import create_model
    except ImportError as e:  # being written in parallel; the tests above cover the exporter on their own
        pytest.skip(f"edgesep.models is not importable yet: {e}")
    return create_model


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("mlp", {"in_shape": (1, 8, 8)}),
        ("mlp", {"in_shape": (1, 28, 28)}),
        ("kron_mlp", {"in_shape": (1, 8, 8)}),
        ("kron_mlp", {"in_shape": (1, 28, 28)}),
        ("cnn_small", {"in_shape": (1, 28, 28), "head": "kron"}),
    ],
    ids=["mlp-digits", "mlp-mnist", "kron_mlp-digits", "kron_mlp-mnist", "cnn_small-kron"],
)
def test_registry_models_export_and_pass_parity(tmp_path, name, kwargs) -> None:
    create_model = _registry()
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    shape = tuple(kwargs["in_shape"])
    report = export_onnx(model, shape, tmp_path / f"{name}.onnx")
    check_standard_ops(report.path)
    check_no_redensify(report.path, _max_param(model))
    layers = _kron_layers(model)
    assert set(report.kron_layers) == set(layers)
    for path_, layer in layers.items():
        assert report.kron_layers[path_]["ops"]["MatMul"] == layer.d
    assert report.census_after.get("MatMul", 0) >= sum(layer.d for layer in layers.values())
    r = parity(model, report.path, _inputs(shape, N_PARITY), rtol=RTOL)
    assert r["ok"], r
    assert math.isfinite(r["max_abs_err"])
