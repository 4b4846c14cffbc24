"""`edgesep.runtimes.load` / `Session` / `select_artifact`: the API an app embeds.

One tiny ``kron_mlp`` run on digits (2 epochs) is exported once per module, with a PGD eval set, and quantized
(gate wide open: these tests are about selection, not accuracy). Independent references: the test's own ONNX
Runtime session, sha256 of the files, and a subprocess where torch, typer and onnx cannot be imported.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from edgesep._io import sha256_file  # noqa: E402
from edgesep.bundle import open_bundle, pack  # noqa: E402
from edgesep.errors import (  # noqa: E402
    BackendMissingError,
    BundleLookupError,
    ConfigError,
    IntegrityError,
    ShapeMismatchError,
    UnknownNameError,
)
from edgesep.export import export_run, quantize_bundle  # noqa: E402
from edgesep.runtimes import PREFERRED_KEY, Session, get_backend, load, select_artifact  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, tiny_run) -> Path:
    root = tmp_path_factory.mktemp("runtimes_api")
    out = root / "kron.bundle"
    export_run(tiny_run(), out, eval_sets="clean:200,pgd:linf:0.1:5@100", log=_quiet, progress=False)
    quantize_bundle(out, max_drop=100, max_robust_drop=100, log=_quiet)
    return out


@pytest.fixture
def bundle_copy(bundle_dir, tmp_path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "kron.bundle"))


@pytest.fixture(scope="module")
def clean(bundle_dir) -> tuple[np.ndarray, np.ndarray]:
    with open_bundle(bundle_dir) as b:
        return b.load_eval_set("clean")


def _ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# ---- selection


def test_default_is_fp32_onnx_on_onnxruntime_with_full_info(bundle_dir, clean):
    x, _ = clean
    with load(bundle_dir) as s:
        assert isinstance(s, Session)
        a = s.artifact
        assert (a.kind, a.precision, a.target, s.backend) == ("onnx", "fp32", "any", "onnxruntime")
        info = s.info()
        assert json.loads(json.dumps(info)) == info  # JSON-ready
        assert info["backend"] == "onnxruntime" and info["version"] == ort.__version__
        assert info["precision"] == "fp32" and info["target"] == "any" and info["threads"] is None
        assert info["providers"] == ["CPUExecutionProvider"]
        assert info["bundle"] == "kron" and info["artifact"] == a.id
        assert info["sha256"] == sha256_file(bundle_dir / "model.onnx")
        assert "default order" in info["selected_because"]
        np.testing.assert_array_equal(s.run(x), _ort_logits(bundle_dir / "model.onnx", x))


def test_precision_int8_selects_the_qdq_artifact(bundle_dir, clean):
    x, _ = clean
    with load(bundle_dir, precision="int8", threads=1) as s:
        assert s.artifact.file == "model.int8.onnx" and s.artifact.precision == "int8"
        assert s.info()["threads"] == 1
        np.testing.assert_array_equal(s.run(x), _ort_logits(bundle_dir / "model.int8.onnx", x))


def test_portable_onnx_serves_any_target(bundle_dir):
    with open_bundle(bundle_dir) as b:
        assert select_artifact(b, target="rpi4").artifact.id == "onnx-fp32-any"
        assert select_artifact(b, backend="onnxruntime", precision="int8").artifact.id == "onnx-int8-any"


def test_unknown_names_and_no_match_list_what_exists(bundle_dir):
    with pytest.raises(UnknownNameError, match="valid backends: onnxruntime, tensorrt, tvm"):
        load(bundle_dir, backend="openvino")
    with pytest.raises(UnknownNameError, match="precision"):
        load(bundle_dir, precision="int4")
    with pytest.raises(ConfigError, match="target"):
        load(bundle_dir, target="")
    with pytest.raises(ConfigError, match="threads"):
        load(bundle_dir, threads=0)
    with pytest.raises(BundleLookupError) as e:
        load(bundle_dir, backend="tvm")
    msg = str(e.value)
    assert "no artifact" in msg and "backend='tvm'" in msg
    assert "onnx-fp32-any" in msg and "onnx-int8-any" in msg and "model.int8.onnx" in msg
    with pytest.raises(BundleLookupError, match="fp16"):
        load(bundle_dir, precision="fp16")
    with pytest.raises(BundleLookupError, match="no artifact matches"):
        load(bundle_dir, artifact_id="tvm-fp32-rpi4")
    with pytest.raises(BundleLookupError, match="its precision is 'int8'"):
        load(bundle_dir, artifact_id="onnx-int8-any", precision="fp32")


def test_recorded_winner_is_the_default_for_its_target_only(bundle_copy):
    with open_bundle(bundle_copy) as b:
        a = b.artifact(id="onnx-int8-any")
        data = b.path_of(a).read_bytes()
        b.add_artifact(data, a.file, a.kind, a.precision, a.target, {**a.extra, PREFERRED_KEY: ["host", "rpi5"]})
    with load(bundle_copy) as s:
        assert s.artifact.id == "onnx-int8-any"
        assert "recorded winner for target 'host'" in s.info()["selected_because"]
    with open_bundle(bundle_copy) as b:
        assert select_artifact(b, target="rpi5").artifact.id == "onnx-int8-any"
        assert select_artifact(b, target="rpi4").artifact.id == "onnx-fp32-any"  # no winner recorded there
        assert select_artifact(b, precision="fp32").artifact.id == "onnx-fp32-any"  # an explicit filter wins


def test_target_none_means_this_machine_and_exact_target_beats_any(bundle_copy):
    with open_bundle(bundle_copy) as b:
        int8 = b.path_of(b.artifact(id="onnx-int8-any")).read_bytes()
        b.add_artifact(int8, "model.rpi4.int8.onnx", "onnx", "int8", "rpi4")
        b.add_artifact(b"not a real library", "model.rpi4.so", "tvm-lib", "fp32", "rpi4")
        assert select_artifact(b, precision="int8").artifact.id == "onnx-int8-any"
        assert select_artifact(b, target="rpi4", precision="int8").artifact.id == "onnx-int8-rpi4"
        # ONNX Runtime before TVM unless asked (TVM's unscheduled builds are slower)
        assert select_artifact(b, target="rpi4").artifact.id == "onnx-fp32-any"
        sel = select_artifact(b, backend="tvm", target="rpi4")
        assert (sel.artifact.id, sel.backend) == ("tvm-lib-fp32-rpi4", "tvm")
        with pytest.raises(BundleLookupError, match="pass target="):
            select_artifact(b, backend="tvm")


def test_a_tie_asks_for_artifact_id(bundle_copy, clean):
    with open_bundle(bundle_copy) as b:
        b.add_artifact(b.path_of(b.artifact(id="onnx-fp32-any")).read_bytes(), "copy.onnx", "onnx", "fp32", id="copy")
    with pytest.raises(BundleLookupError, match=r"2 artifacts .* tie.*artifact_id="):
        load(bundle_copy)
    with load(bundle_copy, artifact_id="copy") as s:
        assert s.artifact.file == "copy.onnx" and s.info()["selected_because"] == "artifact_id='copy'"


# ---- verification


def test_a_tampered_artifact_is_refused_at_load(bundle_copy):
    p = bundle_copy / "model.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    p.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        load(bundle_copy)
    # without the whole-bundle check, the artifact that runs is still hash-checked on the bytes it loads
    with pytest.raises(IntegrityError, match=r"model\.onnx.*sha256"):
        load(bundle_copy, verify=False)
    with load(bundle_copy, precision="int8", verify=False) as s:  # the intact artifact still loads
        assert s.artifact.precision == "int8"


def test_a_tampered_eval_set_fails_verification(bundle_copy):
    p = bundle_copy / "eval" / "clean.npz"
    data = p.read_bytes()
    p.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(IntegrityError, match=r"clean\.npz"):
        load(bundle_copy)


def test_a_tar_bundle_loads_and_close_removes_the_extraction(bundle_dir, tmp_path, clean):
    x, _ = clean
    tar = pack(bundle_dir, tmp_path / "kron.tar")
    s = load(tar)
    root = s.bundle.root
    assert root.is_dir()
    np.testing.assert_array_equal(s.run(x[:5]), _ort_logits(bundle_dir / "model.onnx", x[:5]))
    s.close()
    assert not root.exists()
    with pytest.raises(ConfigError, match="closed"):
        s.run(x[:5])


def test_an_open_bundle_is_verified_and_left_open(bundle_copy):
    b = open_bundle(bundle_copy)
    (bundle_copy / "reference.npz").write_bytes(b"changed after opening")
    with pytest.raises(IntegrityError, match=r"reference\.npz"):
        load(b)
    with load(b, verify=False) as s:
        assert s.bundle is b
    assert b.manifest.name == "kron"  # the caller's bundle is not closed by the session


def test_a_missing_backend_names_what_to_install(bundle_dir, monkeypatch):
    cls = get_backend("onnxruntime")
    monkeypatch.setattr(cls, "available", classmethod(lambda c: False))
    with pytest.raises(BackendMissingError, match=r"needs the onnxruntime backend.*pip install onnxruntime"):
        load(bundle_dir)


# ---- the session


def test_session_api(bundle_dir, clean):
    x, y = clean
    with load(bundle_dir) as s:
        assert s.classes == tuple(str(i) for i in range(10))
        spec = s.input_spec
        assert (spec.name, list(spec.shape), spec.dtype, spec.range) == ("input", ["batch", 1, 8, 8], "float32", (0, 1))
        assert s.sample_shape == (1, 8, 8)
        logits = s.run(x)
        assert logits.dtype == np.float32 and logits.shape == (200, 10)
        pred = s.predict(x)
        assert pred.dtype == np.int64
        np.testing.assert_array_equal(pred, logits.argmax(1))
        assert np.mean(pred == y) > 0.5  # trained, if briefly
        assert "kron" in repr(s) and "onnx-fp32-any" in repr(s)


@pytest.mark.parametrize(
    ("make", "err", "needle"),
    [
        (lambda x: x.astype(np.float64), ConfigError, "astype"),
        (lambda x: (x * 255).astype(np.uint8), ConfigError, "/ 255"),
        (lambda x: x.tolist(), ConfigError, "numpy array"),
        (lambda x: x[0], ShapeMismatchError, r"x\[None\]"),
        (lambda x: x[:, :, :7], ShapeMismatchError, "resize"),
        (lambda x: np.repeat(x, 3, axis=1), ShapeMismatchError, "C=1"),
        (lambda x: x * 255, ConfigError, "1/255"),
        (lambda x: x - 0.5, ConfigError, "do not normalize"),
        (lambda x: np.where(x > 0.5, np.nan, x).astype(np.float32), ConfigError, "nan"),
    ],
)
def test_session_refuses_inputs_off_the_spec(bundle_dir, clean, make, err, needle):
    x, _ = clean
    with load(bundle_dir) as s, pytest.raises(err, match=needle):
        s.run(make(x[:4]))


def test_session_runs_an_empty_batch(bundle_dir, clean):
    x, _ = clean
    with load(bundle_dir) as s:
        assert s.run(x[:0]).shape == (0, 10)


# ---- the device side


# Meta-path finders that make torch, typer and onnx unimportable, as on a device with numpy + onnxruntime only.
_BLOCK = textwrap.dedent(
    """
    import sys
    BLOCKED = ("torch", "typer", "onnx")
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test (device side)")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


def test_device_side_runs_with_torch_typer_and_onnx_blocked(bundle_dir):
    code = _BLOCK + textwrap.dedent(
        f"""
        for name in BLOCKED:  # the blocker really blocks
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise SystemExit(f"{{name}} imported")
        from edgesep.runtimes import load, parity
        with load({str(bundle_dir)!r}) as s:
            x, y = s.bundle.load_eval_set("clean")
            pred = s.predict(x)
            r = parity(s)
        with load({str(bundle_dir)!r}, precision="int8") as s8:
            r8 = parity(s8, eval_set="all")
        assert r["ok"] and r8["ok"], (r, r8)
        leaked = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        assert not leaked, leaked
        print("ok", int((pred == y).sum()))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok ")
