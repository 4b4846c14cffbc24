"""`edgesep.runtimes.parity`: an artifact vs the ONNX Runtime fp32 reference on the bundle's eval data.

One tiny ``kron_mlp`` run on digits is exported once per module with a clean and a PGD eval set and quantized
(gate wide open). Independent references: numpy on the test's own InferenceSession outputs, and runtimes made
here that are wrong on purpose, so the check is shown to fail when it should.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from edgesep.bundle import open_bundle  # noqa: E402
from edgesep.errors import BundleLookupError, ConfigError, ShapeMismatchError  # noqa: E402
from edgesep.export import export_run, quantize_bundle  # noqa: E402
from edgesep.runtimes import PARITY_THRESHOLDS, Runtime, compare_logits, load, parity, parity_ok  # noqa: E402
from edgesep.runtimes.onnxruntime import OnnxRuntime  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
ADV_ID = "pgd-linf-0.1-5"


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, tiny_run) -> Path:
    root = tmp_path_factory.mktemp("runtimes_parity")
    run = tiny_run()
    out = root / "kron.bundle"
    export_run(run, out, eval_sets="clean:200,pgd:linf:0.1:5@100", log=_quiet, progress=False)
    quantize_bundle(out, max_drop=100, max_robust_drop=100, log=_quiet)
    return out


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


class _Wrong(Runtime):
    """An ONNX Runtime session whose logits are changed by ``fn``: a backend with a bug."""

    name = "wrong-on-purpose"  # not registered

    @classmethod
    def available(cls) -> bool:
        return True

    @classmethod
    def version(cls) -> str | None:
        return "0"

    def __init__(self, path: str | Path, *, precision: str, fn: Any = None, **kw: Any):
        self.inner = OnnxRuntime(path, precision=precision)
        self.precision, self.fn = precision, fn

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.fn(self.inner.run(x))

    def info(self) -> dict[str, Any]:
        return {**self.inner.info(), "backend": self.name}


def test_the_rule_and_its_exact_thresholds():
    assert PARITY_THRESHOLDS["fp32"] == {"max_rel_err": 1e-4, "top1_agreement": 1.0}
    assert PARITY_THRESHOLDS["int8"] == PARITY_THRESHOLDS["fp16"] == {"max_rel_err": None, "top1_agreement": 0.99}
    assert parity_ok("fp32", 1e-4, 1.0) == (True, [])
    assert not parity_ok("fp32", 1.0001e-4, 1.0)[0]
    assert not parity_ok("fp32", 0.0, 0.995)[0]
    assert not parity_ok("fp32", math.nan, 1.0)[0]
    assert parity_ok("int8", 0.5, 0.99) == (True, [])
    ok, why = parity_ok("int8", 0.0, 0.9899)
    assert not ok and why == ["top-1 agreement 98.99% < 99%"]
    with pytest.raises(ConfigError, match="int4"):
        parity_ok("int4", 0.0, 1.0)


def test_compare_logits_against_hand_numbers():
    ref = np.array([[2.0, 1.0, 0.0], [0.0, -4.0, 1.0]], np.float32)
    out = ref + np.array([[0.0, 0.5, 0.0], [3.0, 0.0, 0.0]], np.float32)  # 2nd row's top-1 moves to class 0
    m = compare_logits(out, ref)
    assert m == {"n": 2, "max_abs_err": 3.0, "max_rel_err": 0.75, "top1_agreement": 0.5, "nonfinite": 0}
    bad = out.copy()
    bad[0, 0] = np.nan
    assert compare_logits(bad, ref)["nonfinite"] == 1 and compare_logits(bad, ref)["max_rel_err"] == math.inf
    with pytest.raises(ShapeMismatchError, match="does not belong"):
        compare_logits(out[:, :2], ref)


def test_fp32_onnxruntime_is_ok_against_ort_and_torch(bundle_dir):
    with load(bundle_dir) as s:
        r = parity(s)
    assert r["ok"] and r["failures"] == []
    assert r["thresholds"] == {"max_rel_err": 1e-4, "top1_agreement": 1.0}
    assert (r["precision"], r["backend"], r["eval_sets"], r["n"]) == ("fp32", "onnxruntime", ["clean"], 200)
    assert r["artifact"]["id"] == "onnx-fp32-any" and r["reference"]["artifact"] == "onnx-fp32-any"
    assert r["max_rel_err"] <= 1e-4 and r["top1_agreement"] == 1.0
    t = r["torch"]
    assert t["ok"] and t["n"] == 16 and t["max_rel_err"] <= 1e-4 and t["top1_agreement"] == 1.0
    assert r["accuracy"] == r["accuracy_reference"]


def test_int8_agreement_is_recorded_and_matches_numpy(bundle_dir):
    with load(bundle_dir, precision="int8") as s:
        r = parity(s, eval_set="all")
    assert r["eval_sets"] == ["clean", ADV_ID] and r["n"] == 300
    assert r["thresholds"] == {"max_rel_err": None, "top1_agreement": 0.99}
    assert r["top1_agreement"] >= 0.99 and r["ok"], r
    assert r["torch"]["ok"] is None  # measured, judged for fp32 only
    # the same numbers, computed independently
    with open_bundle(bundle_dir) as b:
        x = np.concatenate([b.load_eval_set(i)[0] for i in ("clean", ADV_ID)])
    out, ref = _ort(bundle_dir / "model.int8.onnx", x), _ort(bundle_dir / "model.onnx", x)
    assert r["max_abs_err"] == pytest.approx(float(np.abs(out - ref).max()), rel=1e-6)
    assert r["max_rel_err"] == pytest.approx(float(np.abs(out - ref).max() / np.abs(ref).max()), rel=1e-6)
    assert r["top1_agreement"] == float(np.mean(out.argmax(1) == ref.argmax(1)))
    assert 0 < r["max_rel_err"] < 0.5  # int8 moves the logits, a little
    print(f"\nint8 parity on {r['n']} eval images: {r}")


def test_parity_fails_for_a_perturbed_runtime(bundle_dir):
    path = bundle_dir / "model.onnx"
    with open_bundle(bundle_dir) as b:
        scale = float(np.abs(_ort(path, b.load_eval_set("clean")[0])).max())
    noise = np.random.default_rng(0)

    def jitter(z: np.ndarray) -> np.ndarray:  # 1e-3 of the logit range: top-1 survives, fp32 parity does not
        return (z + noise.uniform(-1e-3, 1e-3, z.shape).astype(np.float32) * scale).astype(np.float32)

    r = parity(_Wrong(path, precision="fp32", fn=jitter), bundle_dir)
    assert not r["ok"] and r["artifact"] is None and r["backend"] == "wrong-on-purpose"
    assert 1e-4 < r["max_rel_err"] <= 1e-3
    assert any("max relative error" in f for f in r["failures"]), r["failures"]
    assert r["torch"]["ok"] is False

    def roll(z: np.ndarray) -> np.ndarray:  # every class shifted by one: top-1 always wrong
        return np.ascontiguousarray(np.roll(z, 1, axis=1))

    r = parity(_Wrong(bundle_dir / "model.int8.onnx", precision="int8", fn=roll), bundle_dir, eval_set=ADV_ID)
    assert not r["ok"] and r["top1_agreement"] < 0.5 and r["n"] == 100
    assert r["failures"] == [f"top-1 agreement {100 * r['top1_agreement']:.2f}% < 99%"]


def test_parity_fails_for_the_wrong_artifact(bundle_dir):
    # the int8 model passed off as the fp32 one
    r = parity(OnnxRuntime(bundle_dir / "model.int8.onnx", precision="fp32"), bundle_dir)
    assert not r["ok"] and r["max_rel_err"] > 1e-4
    with load(bundle_dir, precision="int8") as s:
        r = parity(s, precision="fp32", n=50)
    assert not r["ok"] and r["n"] == 50 and r["precision"] == "fp32"


def test_usage_errors(bundle_dir):
    rt = OnnxRuntime(bundle_dir / "model.onnx", precision="fp32")
    with pytest.raises(ConfigError, match="bundle="):
        parity(rt)
    with pytest.raises(BundleLookupError, match="fgsm"):
        parity(rt, bundle_dir, eval_set="fgsm-linf-0.1")
    with pytest.raises(ConfigError, match="n must be"):
        parity(rt, bundle_dir, n=0)
    with pytest.raises(ConfigError, match="int4"):
        parity(rt, bundle_dir, precision="int4")
