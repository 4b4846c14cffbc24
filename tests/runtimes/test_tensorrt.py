"""TensorRT: the TensorRT-ready ONNX and build config (host), the engine cache key, the missing-backend error, the
device-side orchestration against a fake TensorRT, and — on a Jetson — real engines.

Three groups:

- **Host** (run everywhere): ``prepare_tensorrt`` on a real tiny bundle (kron_mlp trained 2 epochs on digits,
  exported, quantized with ``max_drop=100``), checked with independent tools: the bundle's own deep verification,
  ``check_tensorrt`` on the written file, ONNX Runtime on it against the bundle's torch reference logits, and
  polygraphy's own ``--gen-script`` for the documented ``polygraphy run`` command. The cache key, and the error
  when TensorRT is missing.
- **Fake TensorRT** (run everywhere): ``build_engine`` / ``TensorRtRuntime`` with ``tensorrt`` and the CUDA layer
  replaced by fakes that implement the calls the module makes (the "engine" runs the ONNX with ONNX Runtime). This
  checks the orchestration — flags, profile, workspace, cache reuse and invalidation, parser errors, chunking and
  padding — never TensorRT itself.
- **Device** (``-m tensorrt``, skipped unless ``import tensorrt`` works, i.e. on a Jetson with JetPack): real
  engine builds for fp32 / fp16 / int8, cache reuse, and parity with the bundle's reference within each precision's
  tolerance. Set ``EDGESEP_TRT_BUNDLE`` to a bundle made on a host when the device has no torch (see README,
  "TensorRT (Jetson)").
"""

from __future__ import annotations

import enum
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

import edgesep.runtimes.tensorrt as trtmod
from edgesep.errors import BackendMissingError, BundleError, BundleLookupError, ConfigError, ShapeMismatchError
from edgesep.runtimes import get_backend
from edgesep.runtimes.tensorrt import (
    DEFAULT_PROFILE,
    TENSORRT_MISSING,
    TensorRtBuildError,
    TensorRtCheckError,
    TensorRtRuntime,
    build_engine,
    engine_cache_dir,
    engine_cache_key,
    engine_paths,
    make_build_config,
    prepare_tensorrt,
    validate_build_config,
)

REPO = Path(__file__).resolve().parents[2]
TRT_SKIP_REASON = "TensorRT comes with JetPack on the Jetson; it cannot be installed on this x86 CI machine"
# torch.export's pytree code warns about its own deprecated LeafSpec on every export
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

try:
    import tensorrt  # noqa: F401

    HAVE_TRT = True
except Exception:
    HAVE_TRT = False


def _quiet(_: str) -> None:
    pass


# ----------------------------------------------------------------------------------------------------------------
# bundles: a real tiny one (torch), and hand-made ones (onnx only)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, tiny_run) -> Path:
    """kron_mlp, 2 epochs on digits, exported (symbolic batch, clean:200) and quantized (gate off)."""
    for mod in ("torch", "onnx", "onnxruntime", "onnxscript", "onnxsim"):
        pytest.importorskip(mod)
    from edgesep.export import export_run, quantize_bundle

    root = tmp_path_factory.mktemp("trt")
    run = tiny_run()
    out = root / "kron.bundle"
    export_run(run, out, eval_sets="clean:200", log=_quiet, progress=False)
    quantize_bundle(out, calib=256, max_drop=100, log=_quiet)
    return out


@pytest.fixture
def bundle(bundle_dir, tmp_path) -> Path:
    """A private copy, for tests that write into it."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "kron.bundle"))


def _tiny_model(op: str | None, batch: int | str):
    """input (B,1,8,8) -> [op] -> ... -> logits (B,10); ``op="Det"`` puts an op TensorRT lacks in node det_node."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])
    if op == "Det":
        w = numpy_helper.from_array(rng.standard_normal((1, 10)).astype(np.float32), "w")
        nodes = [
            helper.make_node("Det", ["input"], ["d"], name="det_node"),
            helper.make_node("MatMul", ["d", "w"], ["logits"], name="mm"),
        ]
    else:
        w = numpy_helper.from_array(rng.standard_normal((64, 10)).astype(np.float32), "w")
        nodes = [
            helper.make_node("Flatten", ["input"], ["f"], name="flat", axis=1),
            helper.make_node("MatMul", ["f", "w"], ["logits"], name="mm"),
        ]
    graph = helper.make_graph(nodes, "tiny", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def _tiny_bundle(path: Path, op: str | None = None, batch: int | str = "batch") -> Path:
    from edgesep.bundle import create_bundle

    model = _tiny_model(op, batch)
    b = create_bundle(
        path,
        name=path.stem,
        input_spec={"name": "input", "shape": [batch, 1, 8, 8]},
        output_spec={"name": "logits", "shape": [batch, 10]},
        classes=[str(i) for i in range(10)],
        provenance={"model": "tiny"},
    )
    b.add_artifact(model.SerializeToString(), "model.onnx", "onnx", "fp32")
    return path


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# ----------------------------------------------------------------------------------------------------------------
# host: prepare_tensorrt


def test_prepare_fp16_artifact_config_and_check(bundle):
    from edgesep.bundle import open_bundle
    from edgesep.export._check import check_tensorrt

    art = prepare_tensorrt(bundle, precision="fp16")
    assert (art.id, art.file, art.kind, art.precision, art.target) == (
        "trt-onnx-fp16-jetson",
        "model.trt.fp16.onnx",
        "trt-onnx",
        "fp16",
        "jetson",
    )
    with open_bundle(bundle, verify=False) as b:
        b.verify(deep_onnx=True)  # hashes, and the ONNX parses with the manifest's input/output names
        src = b.artifact(kind="onnx", precision="fp32")
        assert b.artifact(kind="trt-onnx", precision="fp16") == art
        path = b.path_of(art)
        x, logits = b.load_reference()
    assert check_tensorrt(path).ok
    cfg = art.extra["build_config"]
    assert validate_build_config(cfg) == cfg
    assert cfg["precision"] == "fp16" and cfg["flags"] == ["FP16"] and cfg["clear_flags"] == []
    assert cfg["input"]["name"] == "input" and cfg["output"] == {"name": "logits"}
    assert cfg["profile"] == {"min": [1, 1, 8, 8], "opt": [1, 1, 8, 8], "max": [64, 1, 8, 8]}
    assert DEFAULT_PROFILE == (1, 1, 64) and cfg["static"] is False
    assert cfg["workspace_mb"] == 512 and cfg["trt_version"] == "10.3"
    json.dumps(cfg, allow_nan=False)  # plain JSON
    # symbolic batch: the file is the fp32 source, byte for byte
    assert art.sha256 == src.sha256 and art.extra["from"] == src.id and art.extra["batch_fixed"] is False
    assert art.extra["check"]["errors"] == 0 and art.extra["check"]["trt_version"] == "10.3"
    np.testing.assert_allclose(_ort(path, x), logits, rtol=1e-4, atol=1e-4)


def test_prepare_int8_takes_the_qdq_model(bundle):
    from edgesep.bundle import open_bundle
    from edgesep.export import op_census
    from edgesep.export._check import check_tensorrt

    onnx = pytest.importorskip("onnx")
    art = prepare_tensorrt(bundle, precision="int8", trt_version="10.3.0")
    with open_bundle(bundle) as b:
        src = b.artifact(kind="onnx", precision="int8")
        path = b.path_of(art)
    assert art.file == "model.trt.int8.onnx" and art.sha256 == src.sha256 and art.extra["from"] == src.id
    census = op_census(onnx.load(path))
    assert census.get("QuantizeLinear", 0) > 0 and census.get("DequantizeLinear", 0) > 0
    report = check_tensorrt(path)
    assert report.ok and not [i for i in report.issues if i.code.startswith("qdq")]
    cfg = art.extra["build_config"]
    assert cfg["flags"] == ["INT8"] and cfg["precision"] == "int8"
    assert cfg["trt_version"] == "10.3"  # normalized from "10.3.0"


def test_prepare_fp32_clears_tf32_and_both_artifacts_coexist(bundle):
    from edgesep.bundle import open_bundle

    a32 = prepare_tensorrt(bundle, precision="fp32", workspace_mb=256)
    a16 = prepare_tensorrt(bundle, precision="fp16")
    assert a32.extra["build_config"]["clear_flags"] == ["TF32"] and a32.extra["build_config"]["flags"] == []
    assert a32.extra["build_config"]["workspace_mb"] == 256
    assert "--noTF32" in a32.extra["commands"]["trtexec"]
    again = prepare_tensorrt(bundle, precision="fp16")  # replaces, does not duplicate
    assert again == a16
    with open_bundle(bundle) as b:
        ids = [a.id for a in b.manifest.artifacts]
    assert ids.count("trt-onnx-fp16-jetson") == 1 and "trt-onnx-fp32-jetson" in ids


def test_prepare_static_batch_fixes_the_file(bundle):
    from edgesep.bundle import open_bundle
    from edgesep.export import input_shapes

    onnx = pytest.importorskip("onnx")
    art = prepare_tensorrt(bundle, precision="fp16", batch=16)
    cfg = art.extra["build_config"]
    assert cfg["static"] is True and cfg["input"]["shape"] == [16, 1, 8, 8]
    assert cfg["profile"] == {k: [16, 1, 8, 8] for k in ("min", "opt", "max")}
    assert art.extra["batch_fixed"] is True
    with open_bundle(bundle) as b:
        path = b.path_of(art)
        x, logits = b.load_reference()  # 16 reference images
        assert art.sha256 != b.artifact(kind="onnx", precision="fp32").sha256
    model = onnx.load(path)
    assert input_shapes(model) == {"input": [16, 1, 8, 8]}
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [16, 10]
    np.testing.assert_allclose(_ort(path, x), logits, rtol=1e-4, atol=1e-4)
    assert "minShapes" not in art.extra["commands"]["trtexec"]


def test_prepare_custom_profile(bundle):
    art = prepare_tensorrt(bundle, precision="int8", batch=(2, 8, 32))
    cfg = art.extra["build_config"]
    assert cfg["profile"] == {"min": [2, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [32, 1, 8, 8]}
    assert cfg["static"] is False and cfg["input"]["shape"] == ["batch", 1, 8, 8]
    cmd = art.extra["commands"]["trtexec"]
    assert "--minShapes=input:2x1x8x8" in cmd and "--optShapes=input:8x1x8x8" in cmd
    assert "--maxShapes=input:32x1x8x8" in cmd and "--int8" in cmd


@pytest.mark.parametrize("batch", [(8, 4, 16), (0, 1, 2), 0, -3, "16", (1, 2), True, 1.5])
def test_prepare_refuses_bad_batch(tmp_path, batch):
    path = _tiny_bundle(tmp_path / "tiny.bundle")
    with pytest.raises(ConfigError):
        prepare_tensorrt(path, batch=batch)


def test_prepare_refuses_bad_options(tmp_path):
    path = _tiny_bundle(tmp_path / "tiny.bundle")
    with pytest.raises(ConfigError, match="precision"):
        prepare_tensorrt(path, precision="bf16")
    with pytest.raises(ConfigError, match="workspace_mb"):
        prepare_tensorrt(path, workspace_mb=0)
    with pytest.raises(ConfigError, match=r"10\.3"):
        prepare_tensorrt(path, trt_version="8.6")
    with pytest.raises(BundleError, match="does not exist"):
        prepare_tensorrt(tmp_path / "nope.bundle")
    (tmp_path / "x.tar").write_bytes(b"")
    with pytest.raises(BundleError, match="extract"):
        prepare_tensorrt(tmp_path / "x.tar")


def test_prepare_int8_without_quantized_model(tmp_path):
    path = _tiny_bundle(tmp_path / "tiny.bundle")
    with pytest.raises(BundleLookupError, match="edgesep quantize"):
        prepare_tensorrt(path, precision="int8")


def test_prepare_static_model(tmp_path):
    path = _tiny_bundle(tmp_path / "static.bundle", batch=4)
    art = prepare_tensorrt(path)  # batch=None: the model's own static batch
    assert art.extra["build_config"]["profile"]["max"] == [4, 1, 8, 8] and art.extra["batch_fixed"] is False
    with pytest.raises(ConfigError, match="static batch of 4"):
        prepare_tensorrt(path, batch=(1, 4, 8))
    with pytest.raises(ConfigError, match="static batch of 4"):
        prepare_tensorrt(path, batch=8)


def test_prepare_refuses_an_unsupported_op_naming_the_node(tmp_path):
    from edgesep.bundle import open_bundle

    path = _tiny_bundle(tmp_path / "det.bundle", op="Det")
    before = (path / "manifest.json").read_bytes()
    with pytest.raises(TensorRtCheckError) as info:
        prepare_tensorrt(path, precision="fp16")
    err = info.value
    assert "det_node (Det)" in str(err) and "TensorRT 10.3" in str(err)
    assert [(i.node, i.op_type, i.code) for i in err.errors] == [("det_node", "Det", "unsupported-op")]
    assert not err.report.ok
    # nothing was written: same manifest, no stray file
    assert (path / "manifest.json").read_bytes() == before
    with open_bundle(path) as b:
        assert [a.id for a in b.manifest.artifacts] == ["onnx-fp32-any"]


def test_prepare_refuses_ort_default_int8(bundle, tmp_path):
    """ONNX Runtime's default QDQ (asymmetric activations, INT32 biases) is refused, every error listed."""
    pytest.importorskip("onnxruntime")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edgesep.bundle import open_bundle

    class Reader(CalibrationDataReader):
        def __init__(self, x: np.ndarray):
            self.it = iter([{"input": x}])

        def get_next(self):
            return next(self.it, None)

    with open_bundle(bundle) as b:
        fp32 = b.path_of(b.artifact(kind="onnx", precision="fp32"))
        x, _ = b.load_reference()
        out = tmp_path / "ort.int8.onnx"
        quantize_static(str(fp32), str(out), Reader(x), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)  # fmt: skip
        b.add_artifact(out, "model.int8.onnx", "onnx", "int8")
    with pytest.raises(TensorRtCheckError) as info:
        prepare_tensorrt(bundle, precision="int8")
    codes = {i.code for i in info.value.errors}
    assert "qdq-zero-point" in codes and len(info.value.errors) >= 2
    assert all(i.node and str(i).split(":")[0].strip() in str(info.value) for i in info.value.errors)


def test_polygraphy_command_is_valid(bundle, tmp_path):
    """The documented ``polygraphy run`` command parses, and what it would run has the build config's profile."""
    exe = shutil.which("polygraphy") or str(Path(sys.executable).parent / "polygraphy")
    if not Path(exe).is_file():
        pytest.skip("polygraphy is not installed")
    assert (bundle / "reports" / "polygraphy_inputs.json").is_file()
    art = prepare_tensorrt(bundle, precision="int8")
    cmd = art.extra["commands"]["polygraphy"]
    assert cmd.startswith(
        "polygraphy run model.trt.int8.onnx --trt --int8 --trt-min-shapes input:[1,1,8,8] --trt-opt-shapes "
        "input:[1,1,8,8] --trt-max-shapes input:[64,1,8,8] --pool-limit workspace:512M --load-inputs "
        "reports/polygraphy_inputs.json --load-outputs reports/polygraphy_outputs.json"
    )
    readme = (  # the short form in the README: polygraphy takes the profile from the loaded inputs
        "polygraphy run model.trt.int8.onnx --trt --int8 --load-inputs reports/polygraphy_inputs.json "
        "--load-outputs reports/polygraphy_outputs.json"
    )
    profile = "Profile().add('input', min=[1, 1, 8, 8], opt=[1, 1, 8, 8], max=[64, 1, 8, 8])"
    for command, expected in ((cmd, [profile, "536870912", "check_error_stat={'': 'median'}"]), (readme, [])):
        script = tmp_path / "gen.py"
        args = [exe, *shlex.split(command)[1:], "--gen-script", str(script)]
        done = subprocess.run(args, cwd=bundle, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        text = script.read_text()
        assert "int8=True" in text and "TrtRunner" in text and "NetworkFromOnnxPath" in text
        assert "reports/polygraphy_inputs.json" in text and "reports/polygraphy_outputs.json" in text
        assert all(e in text for e in expected), text


# ----------------------------------------------------------------------------------------------------------------
# the cache key and layout

SHA = "ab" * 32
GOLDEN = "24abed856c65195e77325a491cb05753cc9b3d38f1bfaf40428013d65e0878cf"


def _cfg(**over):
    cfg = make_build_config("input", ["batch", 1, 8, 8], "int8")
    cfg.update(over)
    return cfg


def test_cache_key_is_stable():
    k = engine_cache_key(SHA, "10.3.0.30", "Orin (sm_87)", _cfg())
    assert len(k) == 64 and int(k, 16) >= 0
    assert engine_cache_key(SHA, "10.3.0.30", "Orin (sm_87)", _cfg()) == k
    reordered = dict(reversed(list(_cfg().items())))
    assert engine_cache_key(SHA, "10.3.0.30", "Orin (sm_87)", reordered) == k
    # ... across processes (no hash randomization, no dict-order dependence)
    code = (
        "from edgesep.runtimes.tensorrt import engine_cache_key, make_build_config;"
        f"print(engine_cache_key({SHA!r}, '10.3.0.30', 'Orin (sm_87)', make_build_config('input', ['batch', 1, 8, 8], "
        "'int8')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})  # fmt: skip
    assert out.stdout.strip() == k
    # ... and across edgesep versions: a golden value (change it only with a cache-format change)
    assert k == GOLDEN


@pytest.mark.parametrize(
    "change",
    [
        {"onnx_sha256": "cd" * 32},
        {"trt_version": "10.3.0.31"},
        {"gpu_name": "Orin (sm_87) / NVIDIA Jetson AGX Orin"},
        {"build_config": _cfg(precision="fp16", flags=["FP16"])},
        {"build_config": _cfg(flags=["INT8", "FP16"])},
        {"build_config": _cfg(workspace_mb=1024)},
        {"build_config": _cfg(profile={"min": [1, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [64, 1, 8, 8]})},
        {"build_config": _cfg(trt_version="10.x")},
        {"build_config": _cfg(input={"name": "x", "shape": ["batch", 1, 8, 8], "dtype": "float32"})},
    ],
)
def test_cache_key_changes_with_each_input(change):
    base = {"onnx_sha256": SHA, "trt_version": "10.3.0.30", "gpu_name": "Orin (sm_87)", "build_config": _cfg()}
    assert engine_cache_key(**{**base, **change}) != engine_cache_key(**base)


@pytest.mark.parametrize("bad", [{"onnx_sha256": "AB" * 32}, {"onnx_sha256": "ab"}, {"trt_version": ""},
                                 {"gpu_name": " "}, {"build_config": {"x": float("nan")}}])  # fmt: skip
def test_cache_key_refuses_bad_input(bad):
    base = {"onnx_sha256": SHA, "trt_version": "10.3.0.30", "gpu_name": "Orin (sm_87)", "build_config": _cfg()}
    with pytest.raises(ConfigError):
        engine_cache_key(**{**base, **bad})


def test_cache_layout(tmp_path):
    key = engine_cache_key(SHA, "10.3.0.30", "Orin (sm_87)", _cfg())
    plan, meta = engine_paths(engine_cache_dir(tmp_path / "work"), key)
    assert plan == tmp_path / "work" / "engines" / f"{key}.plan"
    assert meta == tmp_path / "work" / "engines" / f"{key}.json"
    assert trtmod.default_cache_dir() == Path.home() / ".cache" / "edgesep" / "engines"
    with pytest.raises(ConfigError):
        engine_paths(tmp_path, "../x")


@pytest.mark.parametrize(
    "bad",
    [
        {"precision": "bf16"},
        {"flags": ["STRICT_TYPES"]},
        {"flags": []},  # int8 without INT8
        {"clear_flags": ["FP16"]},
        {"profile": {"min": [8, 1, 8, 8], "opt": [1, 1, 8, 8], "max": [64, 1, 8, 8]}},
        {"profile": {"min": [1, 1, 8, 8], "opt": [1, 1, 8, 8], "max": [64, 3, 8, 8]}},
        {"static": True},
        {"workspace_mb": 0},
        {"schema": 2},
        {"input": {}},
    ],
)
def test_validate_build_config_refuses(bad):
    with pytest.raises(ConfigError):
        validate_build_config(_cfg(**bad))
    cfg = _cfg()
    del cfg["profile"]
    with pytest.raises(ConfigError, match="missing"):
        validate_build_config(cfg)


def test_make_build_config_refuses_dynamic_spatial_dims():
    with pytest.raises(ConfigError, match="dim 2"):
        make_build_config("input", ["batch", 1, "h", 8], "fp16")


# ----------------------------------------------------------------------------------------------------------------
# TensorRT missing (this machine)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_backend_missing_here():
    cls = get_backend("tensorrt")
    assert cls is TensorRtRuntime and cls.name == "tensorrt"
    assert cls.available() is False and cls.version() is None
    with pytest.raises(BackendMissingError) as info:
        cls("model.trt.fp16.onnx", precision="fp16")
    assert str(info.value) == TENSORRT_MISSING
    for phrase in ("comes with JetPack", "python3-libnvinfer", "Never pip-install tensorrt on the Jetson"):
        assert phrase in TENSORRT_MISSING
    with pytest.raises(BackendMissingError, match="comes with JetPack"):
        build_engine("model.trt.fp16.onnx", _cfg(), "engines")


def test_import_needs_no_tensorrt_onnx_or_torch():
    """The module (and the backend lookup) import numpy + edgesep only: the device side."""
    code = (
        "import sys\n"
        "import edgesep.runtimes.tensorrt as t\n"
        "from edgesep.runtimes import get_backend\n"
        "get_backend('tensorrt').available()\n"
        "bad = sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt', 'typer') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------------------------------------------
# a fake TensorRT: the device-side orchestration without a GPU


class FakeTrt:
    """The part of the ``tensorrt`` 10.x module that ``edgesep.runtimes.tensorrt`` uses; engines run ONNX Runtime."""

    __version__ = "10.3.0.30"
    UNSUPPORTED = frozenset({"Det"})

    class ILogger:
        class Severity(enum.Enum):
            INTERNAL_ERROR = 0
            ERROR = 1
            WARNING = 2
            INFO = 3
            VERBOSE = 4

        def __init__(self) -> None:
            pass

    class BuilderFlag(enum.Enum):
        FP16 = 0
        INT8 = 1
        TF32 = 6

    class MemoryPoolType(enum.Enum):
        WORKSPACE = 0

    class TensorIOMode(enum.Enum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    class DataType(enum.Enum):
        FLOAT = 0

    def __init__(self) -> None:
        self.builds: list[dict] = []
        self.executions: list[tuple[int, ...]] = []
        fake = self

        class Tensor:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            def __init__(self):
                self.inputs = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class ParserError:
            def __init__(self, node, op):
                self._node, self._op = node, op

            def node_name(self):
                return self._node

            def node_operator(self):
                return self._op

            def desc(self):
                return f"No importer registered for op: {self._op}"

        class OnnxParser:
            def __init__(self, network, logger):
                self.network, self.errors = network, []

            @property
            def num_errors(self):
                return len(self.errors)

            def get_error(self, i):
                return self.errors[i]

            def parse_from_file(self, path):
                import onnx

                model = onnx.load(path)
                self.errors = [
                    ParserError(n.name, n.op_type) for n in model.graph.node if n.op_type in fake.UNSUPPORTED
                ]
                inits = {t.name for t in model.graph.initializer}
                for i in model.graph.input:
                    if i.name not in inits:
                        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim]
                        self.network.inputs.append(Tensor(i.name, dims))
                self.network.path = path
                return not self.errors

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, mn, opt, mx):
                self.shapes[name] = (list(mn), list(opt), list(mx))

        class Config:
            def __init__(self):
                self.flags, self.cleared, self.pools, self.profiles = set(), set(), {}, []

            def set_memory_pool_limit(self, pool, size):
                self.pools[pool] = size

            def set_flag(self, flag):
                assert isinstance(flag, FakeTrt.BuilderFlag)
                self.flags.add(flag.name)

            def clear_flag(self, flag):
                self.cleared.add(flag.name)

            def add_optimization_profile(self, p):
                self.profiles.append(p)

        class Builder:
            def __init__(self, logger):
                assert isinstance(logger, FakeTrt.ILogger)

            def create_network(self, flags):
                assert flags == 0  # TensorRT 10: explicit batch only
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                name = network.inputs[0].name
                prof = config.profiles[0].shapes[name] if config.profiles else None
                rec = {
                    "path": network.path,
                    "flags": sorted(config.flags),
                    "cleared": sorted(config.cleared),
                    "workspace": config.pools[FakeTrt.MemoryPoolType.WORKSPACE],
                    "profile": prof,
                    "static": network.inputs[0].shape,
                }
                fake.builds.append(rec)
                return b"FAKEPLAN" + json.dumps(rec).encode()

        class Context:
            def __init__(self, engine):
                self.engine, self.shape, self.addr = engine, None, {}

            def set_input_shape(self, name, shape):
                lo, hi = self.engine.batch_range
                if name != self.engine.input or not lo <= shape[0] <= hi:
                    return False
                self.shape = tuple(shape)
                return True

            def get_tensor_shape(self, name):
                assert name == self.engine.output
                return (self.shape[0], 10)

            def set_tensor_address(self, name, ptr):
                self.addr[name] = ptr

            def execute_async_v3(self, stream):
                assert isinstance(stream, int)
                x = FakeBuffers.MEMORY[self.addr[self.engine.input]]
                assert x.shape == self.shape
                fake.executions.append(x.shape)
                FakeBuffers.MEMORY[self.addr[self.engine.output]][...] = _ort(Path(self.engine.rec["path"]), x)
                return True

        class Engine:
            def __init__(self, rec):
                self.rec, self.input, self.output = rec, "input", "logits"
                self.batch_range = (
                    (rec["profile"][0][0], rec["profile"][2][0]) if rec["profile"] else (rec["static"][0],) * 2
                )
                self.num_io_tensors = 2

            def get_tensor_name(self, i):
                return [self.input, self.output][i]

            def get_tensor_mode(self, name):
                return FakeTrt.TensorIOMode.INPUT if name == self.input else FakeTrt.TensorIOMode.OUTPUT

            def get_tensor_dtype(self, name):
                return FakeTrt.DataType.FLOAT

            def create_execution_context(self):
                return Context(self)

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, plan):
                return Engine(json.loads(plan[len(b"FAKEPLAN") :])) if plan.startswith(b"FAKEPLAN") else None

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime

    @staticmethod
    def nptype(dtype):
        return {FakeTrt.DataType.FLOAT: np.float32}[dtype]


class FakeBuffers:
    """Host memory standing in for device memory: a pointer is a key of ``MEMORY``."""

    MEMORY: ClassVar[dict[int, np.ndarray]] = {}
    _next: ClassVar[list[int]] = [16]

    def __init__(self) -> None:
        self.handle, self.names = 7, {}

    def _put(self, name, arr):
        ptr = self._next[0] = self._next[0] + 256
        self.MEMORY[ptr] = arr
        self.names[name] = ptr
        return ptr

    def upload(self, name, host):
        return self._put(name, host.copy())

    def allocate(self, name, shape, dtype):
        return self._put(name, np.zeros(shape, dtype))

    def download(self, name, host):
        host[...] = self.MEMORY[self.names[name]]
        return host

    def synchronize(self):
        pass

    def close(self):
        pass


GPU = {"name": "Orin", "compute_capability": "8.7", "board": "NVIDIA Jetson Orin Nano", "id": "Orin (sm_87) / Nano"}


@pytest.fixture
def fake_trt(monkeypatch):
    pytest.importorskip("onnxruntime")
    fake = FakeTrt()
    monkeypatch.setattr(trtmod, "_import_tensorrt", lambda: fake)
    monkeypatch.setattr(trtmod, "_import_cuda", lambda: None)
    monkeypatch.setattr(trtmod, "gpu_identity", lambda: dict(GPU))
    monkeypatch.setattr(trtmod, "_cuda_buffers", FakeBuffers)
    monkeypatch.setattr(trtmod, "_LOGGER", None)
    return fake


def _artifact(bundle: Path, precision: str, **kw):
    from edgesep.bundle import open_bundle

    art = prepare_tensorrt(bundle, precision=precision, **kw)
    with open_bundle(bundle) as b:
        return b.path_of(art), art.extra["build_config"], art


def test_fake_build_engine_flags_profile_and_cache(bundle, tmp_path, fake_trt):
    from edgesep._io import sha256_file

    path, cfg, _ = _artifact(bundle, "int8")
    cache = engine_cache_dir(tmp_path / "work")
    plan = build_engine(path, cfg, cache)
    key = engine_cache_key(sha256_file(path), "10.3.0.30", GPU["id"], cfg)
    assert plan == cache / f"{key}.plan"
    meta = json.loads((cache / f"{key}.json").read_text())
    assert meta["key"] == key and meta["plan_sha256"] == sha256_file(plan) and meta["gpu"] == GPU
    assert meta["build_config"] == cfg and meta["trt_version"] == "10.3.0.30"
    (rec,) = fake_trt.builds
    assert rec["flags"] == ["INT8"] and rec["cleared"] == [] and rec["workspace"] == 512 << 20
    assert rec["profile"] == ([1, 1, 8, 8], [1, 1, 8, 8], [64, 1, 8, 8])
    # reused: no second build, the same file untouched
    mtime = plan.stat().st_mtime_ns
    assert build_engine(path, cfg, cache) == plan and len(fake_trt.builds) == 1 and plan.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in cache.iterdir()) == sorted([f"{key}.plan", f"{key}.json"])  # no temp files
    # rebuilt: on request, over a damaged plan, over damaged metadata
    build_engine(path, cfg, cache, rebuild=True)
    plan.write_bytes(b"FAKEPLAN{}")
    build_engine(path, cfg, cache)
    (cache / f"{key}.json").write_text("{")
    build_engine(path, cfg, cache)
    assert (
        len(fake_trt.builds) == 4
        and sha256_file(plan) == json.loads((cache / f"{key}.json").read_text())["plan_sha256"]
    )


def test_fake_build_engine_fp32_static_and_new_keys(bundle, tmp_path, fake_trt, monkeypatch):
    p32, c32, _ = _artifact(bundle, "fp32")
    p16, c16, _ = _artifact(bundle, "fp16", batch=16)
    cache = tmp_path / "engines"
    a, b = build_engine(p32, c32, cache), build_engine(p16, c16, cache)
    assert a != b
    r32, r16 = fake_trt.builds
    assert r32["flags"] == [] and r32["cleared"] == ["TF32"]
    assert r16["flags"] == ["FP16"] and r16["profile"] is None and r16["static"] == [16, 1, 8, 8]  # static: no profile
    # another GPU -> another key, another build
    monkeypatch.setattr(trtmod, "gpu_identity", lambda: {**GPU, "id": "Orin (sm_87) / AGX"})
    assert build_engine(p32, c32, cache) not in (a, b) and len(fake_trt.builds) == 3


def test_fake_build_engine_parser_errors_name_the_node(tmp_path, fake_trt):
    onnx_path = tmp_path / "det.onnx"
    onnx_path.write_bytes(_tiny_model("Det", "batch").SerializeToString())
    cfg = make_build_config("input", ["batch", 1, 8, 8], "fp16")
    with pytest.raises(TensorRtBuildError) as info:
        build_engine(onnx_path, cfg, tmp_path / "engines")
    assert info.value.stage == "ONNX parsing"
    assert info.value.errors == ["name det_node, operator Det: No importer registered for op: Det"]
    assert "det_node" in str(info.value) and not (tmp_path / "engines").exists()
    ok_path = tmp_path / "ok.onnx"
    ok_path.write_bytes(_tiny_model(None, "batch").SerializeToString())
    with pytest.raises(ConfigError, match="names 'x'"):
        build_engine(ok_path, make_build_config("x", ["batch", 1, 8, 8], "fp16"), tmp_path / "e")
    with pytest.raises(ConfigError, match="static input shape"):
        static = tmp_path / "static.onnx"
        static.write_bytes(_tiny_model(None, 4).SerializeToString())
        build_engine(static, make_build_config("input", [8, 1, 8, 8], "fp16"), tmp_path / "e")
    with pytest.raises(ConfigError):
        build_engine(onnx_path, {"precision": "fp16"}, tmp_path / "engines")


def test_fake_runtime_chunks_pads_and_caches(bundle, tmp_path, fake_trt):
    from edgesep.bundle import open_bundle

    path, cfg, _ = _artifact(bundle, "fp16")
    with open_bundle(bundle) as b:
        x, _ = b.load_eval_set("clean")
        ref = _ort(b.path_of(b.artifact(kind="onnx", precision="fp32")), x)
    work = tmp_path / "work"
    with get_backend("tensorrt")(path, precision="fp16", workdir=work) as rt:  # build_config from the manifest
        out = rt.run(x)
        info = rt.info()
        assert rt.run(x[:0]).shape == (0, 10)
        with pytest.raises(ShapeMismatchError):
            rt.run(np.zeros((2, 1, 8, 9), np.float32))
    assert out.dtype == np.float32 and out.shape == (200, 10)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert fake_trt.executions == [(64, 1, 8, 8)] * 3 + [(8, 1, 8, 8)]  # chunks of the profile's max batch
    assert info["backend"] == "tensorrt" and info["version"] == "10.3.0.30" and info["precision"] == "fp16"
    assert info["gpu"] == "Orin" and info["compute_capability"] == "8.7" and info["engine_built_now"] is True
    assert info["cache_key"] and info["engine"] == str(engine_cache_dir(work) / f"{info['cache_key']}.plan")
    assert info["flags"] == ["FP16"] and info["checked_against"] == "10.3"
    json.dumps(info)
    # a second session reuses the engine
    rt2 = TensorRtRuntime(path, precision="fp16", workdir=work, build_config=cfg)
    assert rt2.info()["engine_built_now"] is False and rt2.info()["cache_key"] == info["cache_key"]
    assert len(fake_trt.builds) == 1


def test_fake_runtime_static_batch_pads(bundle, tmp_path, fake_trt):
    from edgesep.bundle import open_bundle

    path, _, _ = _artifact(bundle, "int8", batch=16)
    with open_bundle(bundle) as b:
        x, _ = b.load_eval_set("clean")
        ref = _ort(path, x[:16])
    rt = TensorRtRuntime(path, precision="int8", workdir=tmp_path)
    out = rt.run(x[:21])
    assert fake_trt.executions == [(16, 1, 8, 8), (16, 1, 8, 8)]  # 16 + (5 padded to 16)
    np.testing.assert_allclose(out[:16], ref, rtol=1e-5, atol=1e-5)
    padded = np.concatenate([x[16:21], np.zeros((11, 1, 8, 8), np.float32)])
    np.testing.assert_allclose(out[16:], _ort(path, padded)[:5], rtol=1e-5, atol=1e-5)
    rt.close()


def test_fake_runtime_refuses_mismatches(bundle, tmp_path, fake_trt):
    from edgesep.bundle import open_bundle

    path, _, _ = _artifact(bundle, "fp16")
    with pytest.raises(ConfigError, match="fp16"):
        TensorRtRuntime(path, precision="int8", workdir=tmp_path)
    with pytest.raises(ConfigError, match="unknown TensorRT options"):
        TensorRtRuntime(path, precision="fp16", workdir=tmp_path, threads_per_core=2)
    with pytest.raises(ConfigError, match="input"):
        TensorRtRuntime(path, precision="fp16", workdir=tmp_path, input_name="x")
    loose = tmp_path / "loose.onnx"
    shutil.copy(path, loose)
    with pytest.raises(ConfigError, match="no build config"):
        TensorRtRuntime(loose, precision="fp16", workdir=tmp_path)
    # a plain ONNX artifact of the bundle (kind onnx) gets a default profile from the manifest
    with open_bundle(bundle) as b:
        fp32 = b.path_of(b.artifact(kind="onnx", precision="fp32"))
    rt = TensorRtRuntime(fp32, precision="fp32", workdir=tmp_path)
    assert rt.info()["profile"]["max"] == [64, 1, 8, 8] and rt.info()["clear_flags"] == ["TF32"]


# ----------------------------------------------------------------------------------------------------------------
# on the Jetson: real TensorRT (-m tensorrt)

# parity vs the reference logits (torch fp32) per precision: max |err| / max |ref| for fp32 / fp16; int8 is judged on
# the median abs error (ONNX Runtime's int8 of these models: 0.03) and on top-1 agreement (issue 4 §5: >= 99%).
FP_RTOL = {"fp32": 1e-4, "fp16": 1e-2}
INT8_MEDIAN_ATOL = 0.1
INT8_MIN_AGREEMENT = 0.99


@pytest.fixture
def trt():
    return pytest.importorskip("tensorrt", reason=TRT_SKIP_REASON)


@pytest.fixture
def device_bundle(tmp_path, request) -> Path:
    """``EDGESEP_TRT_BUNDLE`` (a bundle made on a host) if set, else the tiny bundle trained here (needs torch)."""
    src = os.environ.get("EDGESEP_TRT_BUNDLE")
    if src:
        return Path(shutil.copytree(src, tmp_path / "device.bundle"))
    return Path(shutil.copytree(request.getfixturevalue("bundle_dir"), tmp_path / "device.bundle"))


def _device_artifact(bundle: Path, precision: str, batch=None):
    pytest.importorskip("onnx", reason="prepare_tensorrt needs onnx: pip install onnx")
    return _artifact(bundle, precision, batch=batch)


def _fp32_logits(bundle: Path, x: np.ndarray) -> np.ndarray | None:
    """ONNX Runtime fp32 logits of the bundle's model, or None when onnxruntime is not installed on the device."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    from edgesep.bundle import open_bundle

    with open_bundle(bundle) as b:
        return _ort(b.path_of(b.artifact(kind="onnx", precision="fp32")), x)


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_device_engine_builds_and_is_cached(trt, device_bundle, tmp_path, precision):
    from edgesep._io import sha256_file

    path, cfg, _ = _device_artifact(device_bundle, precision)
    cache = engine_cache_dir(tmp_path / "work")
    plan = build_engine(path, cfg, cache)
    key = engine_cache_key(sha256_file(path), trt.__version__, trtmod.gpu_identity()["id"], cfg)
    assert plan == cache / f"{key}.plan" and plan.stat().st_size > 0
    meta = json.loads((cache / f"{key}.json").read_text())
    assert meta["plan_sha256"] == sha256_file(plan) and meta["trt_version"] == trt.__version__
    mtime = plan.stat().st_mtime_ns
    assert build_engine(path, cfg, cache) == plan and plan.stat().st_mtime_ns == mtime  # reused, not rebuilt
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    assert engine is not None and engine.num_io_tensors == 2


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_device_parity(trt, device_bundle, tmp_path, precision):
    from edgesep.bundle import open_bundle

    path, _, _ = _device_artifact(device_bundle, precision)
    with open_bundle(device_bundle) as b:
        x_ref, ref = b.load_reference()  # torch fp32 logits
        x, y = b.load_eval_set("clean")
        gate = b.load_report("quantization")["gate"] if "quantization" in b.manifest.reports else []
        export = b.load_report("export")
    rt = TensorRtRuntime(path, precision=precision, workdir=tmp_path / "work")
    out_ref, out = rt.run(x_ref), rt.run(x)
    info = rt.info()
    rt.close()
    assert out.shape == (len(x), ref.shape[1]) and np.isfinite(out).all()
    err = np.abs(out_ref - ref)
    fp32 = _fp32_logits(device_bundle, x)
    agree_ref = float((out_ref.argmax(1) == ref.argmax(1)).mean())
    acc = float((out.argmax(1) == y).mean())
    print(f"\n{precision} on {info['gpu']} (TensorRT {info['version']}): max abs err {err.max():.3g}, median "
          f"{np.median(err):.3g}, max rel {err.max() / np.abs(ref).max():.3g}, top-1 {acc:.4f}")  # fmt: skip
    if precision in FP_RTOL:
        assert err.max() / np.abs(ref).max() <= FP_RTOL[precision]
        assert agree_ref == 1.0
        if fp32 is not None:
            assert float((out.argmax(1) == fp32.argmax(1)).mean()) >= (1.0 if precision == "fp32" else 0.99)
        clean = next(e for e in export["eval_sets"] if e["id"] == "clean")
        assert abs(acc - clean["accuracy_torch_fp32"]) <= (0.0 if precision == "fp32" else 0.01) + 1e-9
    else:
        assert np.median(err) <= INT8_MEDIAN_ATOL
        if fp32 is not None:
            assert float((out.argmax(1) == fp32.argmax(1)).mean()) >= INT8_MIN_AGREEMENT
        row = next((g for g in gate if g["metric"] == "clean"), None)
        if row is not None:  # ONNX Runtime's int8 top-1 on the same set, recorded at quantization
            assert abs(acc - row["int8"]) <= 0.02


@pytest.mark.tensorrt
def test_device_static_batch_and_chunks(trt, device_bundle, tmp_path):
    from edgesep.bundle import open_bundle

    with open_bundle(device_bundle) as b:
        x, _ = b.load_eval_set("clean")
    p_dyn, _, _ = _device_artifact(device_bundle, "fp16", batch=(1, 8, 32))
    p_static, _, _ = _device_artifact(device_bundle, "fp32", batch=16)
    dyn = TensorRtRuntime(p_dyn, precision="fp16", workdir=tmp_path)
    static = TensorRtRuntime(p_static, precision="fp32", workdir=tmp_path)
    full = static.run(x)  # chunks of 16, the last one padded
    assert full.shape == (len(x), 10)
    np.testing.assert_allclose(static.run(x[:5]), full[:5], rtol=1e-5, atol=1e-5)
    out = dyn.run(x)  # chunks of 32
    np.testing.assert_allclose(out, full, atol=5e-2 * np.abs(full).max())
    np.testing.assert_allclose(dyn.run(x[:1]), out[:1], rtol=1e-3, atol=1e-3)
    assert dyn.info()["cache_key"] != static.info()["cache_key"]
    dyn.close()
    static.close()


@pytest.mark.tensorrt
def test_device_parser_errors(trt, tmp_path):
    onnx_path = tmp_path / "det.onnx"
    onnx_path.write_bytes(_tiny_model("Det", "batch").SerializeToString())
    with pytest.raises(TensorRtBuildError) as info:
        build_engine(onnx_path, make_build_config("input", ["batch", 1, 8, 8], "fp16"), tmp_path / "engines")
    assert info.value.stage == "ONNX parsing" and info.value.errors
    assert "Det" in str(info.value)


@pytest.mark.tensorrt
def test_device_polygraphy_check(trt, device_bundle):
    """The documented polygraphy command: the engine vs the bundle's torch reference, run by polygraphy itself."""
    exe = shutil.which("polygraphy")
    if exe is None:
        pytest.skip("polygraphy is not installed: pip install polygraphy")
    for precision in ("fp16", "int8"):
        _, _, art = _device_artifact(device_bundle, precision)
        cmd = shlex.split(art.extra["commands"]["polygraphy"])
        done = subprocess.run([exe, *cmd[1:]], cwd=device_bundle, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
