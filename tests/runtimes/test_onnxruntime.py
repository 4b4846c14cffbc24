"""The ONNX Runtime backend: outputs vs an independent InferenceSession, batch handling, input checks, info.

A tiny ``kron_mlp`` run on digits is exported twice per module: with a symbolic batch axis and with a static batch
of 8. Independent references: the test's own ``onnxruntime.InferenceSession`` on the same file, and small graphs
built here with ``onnx.helper`` (a float16 input, an all-ones model).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from edgesep.bundle import open_bundle  # noqa: E402
from edgesep.errors import BackendMissingError, BundleContentError, ConfigError, ShapeMismatchError  # noqa: E402
from edgesep.export import export_run  # noqa: E402
from edgesep.runtimes import get_backend, list_backends, load  # noqa: E402
from edgesep.runtimes.onnxruntime import OnnxRuntime  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

STATIC_BATCH = 8


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_run) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtimes_ort")
    run = tiny_run()
    out = {"dynamic": root / "dyn.bundle", "static": root / "static.bundle"}
    export_run(run, out["dynamic"], eval_sets="clean:100", log=_quiet, progress=False)
    export_run(run, out["static"], eval_sets="clean:100", batch=STATIC_BATCH, log=_quiet, progress=False)
    return out


@pytest.fixture(scope="module")
def x(bundles) -> np.ndarray:
    with open_bundle(bundles["dynamic"]) as b:
        return b.load_eval_set("clean")[0]  # (100, 1, 8, 8)


def _independent(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def test_registered_and_reports_its_version():
    assert "onnxruntime" in list_backends()
    assert get_backend("onnxruntime") is OnnxRuntime
    assert OnnxRuntime.available() and OnnxRuntime.version() == ort.__version__


@pytest.mark.parametrize("n", [1, 7, 64])
def test_outputs_identical_to_an_independent_inference_session(bundles, x, n):
    path = bundles["dynamic"] / "model.onnx"
    rt = OnnxRuntime(path, precision="fp32")
    out = rt.run(x[:n])
    assert out.dtype == np.float32 and out.shape == (n, 10) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, _independent(path, x[:n]))


@pytest.mark.parametrize("n", [0, 1, 7, 8, 13, 64, 100])
def test_static_batch_is_chunked_and_padded(bundles, x, n):
    rt = OnnxRuntime(bundles["static"] / "model.onnx", precision="fp32", threads=1)
    assert rt.static_batch == STATIC_BATCH and rt.info()["static_batch"] == STATIC_BATCH
    out = rt.run(x[:n])
    assert out.shape == (n, 10) and out.dtype == np.float32
    # reference: the static model fed exactly its batch size, by the test (padding with copies, not zeros)
    idx = np.resize(np.arange(max(n, 1)), -(-max(n, 1) // STATIC_BATCH) * STATIC_BATCH)
    ref = np.concatenate(
        [
            _independent(bundles["static"] / "model.onnx", x[idx[i : i + STATIC_BATCH]])
            for i in range(0, len(idx), STATIC_BATCH)
        ]
    )[:n]
    np.testing.assert_array_equal(out, ref)
    # and the same numbers as the symbolic-batch export of the same run
    np.testing.assert_allclose(out, _independent(bundles["dynamic"] / "model.onnx", x[:n]), rtol=1e-5, atol=1e-5)


def test_static_batch_through_load(bundles, x):
    with load(bundles["static"]) as s:
        assert s.input_spec.shape[0] == STATIC_BATCH
        assert s.predict(x[:13]).shape == (13,)


@pytest.mark.parametrize(
    ("make", "err", "needle"),
    [
        (lambda x: x.astype(np.float64), ConfigError, r"float32.*astype"),
        (lambda x: (x * 16).astype(np.int64), ConfigError, "/ 255"),
        (lambda x: list(x), ConfigError, "numpy array"),
        (lambda x: x[0], ShapeMismatchError, r"3 dims.*x\[None\]"),
        (lambda x: x.reshape(len(x), 64), ShapeMismatchError, "2 dims"),
        (lambda x: x[:, :, :, :4], ShapeMismatchError, r"axes \[3\]"),
        (lambda x: np.concatenate([x, x], axis=1), ShapeMismatchError, r"axes \[1\]"),
    ],
)
def test_bad_inputs_are_typed_errors_that_say_what_to_do(bundles, x, make, err, needle):
    rt = OnnxRuntime(bundles["dynamic"] / "model.onnx", precision="fp32")
    with pytest.raises(err, match=needle):
        rt.run(make(x[:3]))


def test_non_contiguous_input_is_fine(bundles, x):
    rt = OnnxRuntime(bundles["dynamic"] / "model.onnx", precision="fp32")
    xf = np.asfortranarray(x[:5])
    np.testing.assert_array_equal(rt.run(xf), rt.run(np.ascontiguousarray(x[:5])))


def test_info_threads_and_providers(bundles):
    rt = OnnxRuntime(bundles["dynamic"] / "model.onnx", precision="int8", target="rpi4", threads=2)
    info = rt.info()
    assert {k: info[k] for k in ("backend", "version", "precision", "target", "threads", "providers")} == {
        "backend": "onnxruntime",
        "version": ort.__version__,
        "precision": "int8",
        "target": "rpi4",
        "threads": 2,
        "providers": ["CPUExecutionProvider"],
    }
    assert rt._sess.get_session_options().intra_op_num_threads == 2
    assert info["input"] == {"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"}


def test_option_errors(bundles, tmp_path):
    path = bundles["dynamic"] / "model.onnx"
    with pytest.raises(ConfigError, match=r"NoSuchExecutionProvider.*CPUExecutionProvider"):
        OnnxRuntime(path, precision="fp32", providers=["NoSuchExecutionProvider"])
    with pytest.raises(ConfigError, match="threads"):
        OnnxRuntime(path, precision="fp32", threads=0)
    with pytest.raises(ConfigError, match="unknown option"):
        OnnxRuntime(path, precision="fp32", intra_threads=2)
    with pytest.raises(ConfigError, match=r"inputs \['input'\]"):
        OnnxRuntime(path, precision="fp32", input_name="pixels")
    with pytest.raises(ConfigError, match="outputs"):
        OnnxRuntime(path, precision="fp32", output_name="probs")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf")
    with pytest.raises(BundleContentError, match="cannot load"):
        OnnxRuntime(junk, precision="fp32")
    rt = OnnxRuntime(path, precision="fp32")
    rt.close()
    with pytest.raises(ConfigError, match="closed"):
        rt.run(np.zeros((1, 1, 8, 8), np.float32))


def test_loads_from_bytes(bundles, x):
    path = bundles["dynamic"] / "model.onnx"
    rt = OnnxRuntime("in-memory.onnx", precision="fp32", model_bytes=path.read_bytes())
    np.testing.assert_array_equal(rt.run(x[:4]), _independent(path, x[:4]))


def test_float16_model_input_is_cast(tmp_path):
    # Flatten of a float16 input: the output is the input, rounded to float16 and back
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["logits"])],
        "fp16",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT16, ["batch", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", 4])],
    )
    path = tmp_path / "fp16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    x = np.random.default_rng(0).random((3, 1, 2, 2), dtype=np.float32)
    out = OnnxRuntime(path, precision="fp16").run(x)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x.reshape(3, 4).astype(np.float16).astype(np.float32))


def test_without_onnxruntime_the_backend_says_what_to_install(bundles):
    code = textwrap.dedent(
        f"""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "onnxruntime":
                    raise ImportError("onnxruntime is blocked in this test")
        sys.meta_path.insert(0, _Block())
        from edgesep.errors import BackendMissingError
        from edgesep.runtimes import get_backend, load
        cls = get_backend("onnxruntime")
        assert not cls.available() and cls.version() is None
        for make in (lambda: cls("model.onnx", precision="fp32"), lambda: load({str(bundles["dynamic"])!r})):
            try:
                make()
            except BackendMissingError as e:
                assert "pip install onnxruntime" in str(e), e
                print(type(e).__name__)
            else:
                raise SystemExit("no BackendMissingError")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [BackendMissingError.__name__] * 2
