"""Run directory -> bundle (export_run), INT8 into a bundle (quantize_bundle), bundle summary (inspect_bundle).

One tiny ``kron_mlp`` run on digits (2 epochs) is exported once per module. Independent references: the test's
own ONNX Runtime session for the reference logits, the torch model for eval-set accuracies and the eps ball of
the adversarial images, sha256 of the files for "nothing changed", polygraphy's own loader for its JSON.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxsim")

from edgesep._io import sha256_file  # noqa: E402
from edgesep.bundle import MANIFEST_NAME, open_bundle  # noqa: E402
from edgesep.errors import AccuracyGateError, BundleError, ConfigError, ParityError  # noqa: E402
from edgesep.export import (  # noqa: E402
    DEFAULT_EVAL_N,
    EVAL_SETS_SYNTAX,
    export_run,
    inspect_bundle,
    parse_eval_sets,
    quantize_bundle,
)
from edgesep.runs import MODEL_FILE, load_run  # noqa: E402

# torch.export's pytree code warns about its own deprecated LeafSpec on every export
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

EVAL_SETS = "clean:300,pgd:linf:0.1:10@200"
ADV_ID = "pgd-linf-0.1-10"


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def run_dir(tiny_run) -> Path:
    return tiny_run()


@pytest.fixture(scope="module")
def bundle_dir(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipeline") / "kron.bundle"
    export_run(run_dir, out, eval_sets=EVAL_SETS, log=_quiet, progress=False)
    return out


@pytest.fixture
def bundle_copy(bundle_dir, tmp_path) -> Path:
    """A private copy for tests that write into the bundle."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "copy.bundle"))


@pytest.fixture(scope="module")
def model(run_dir):
    return load_run(run_dir)[0]


def _top1(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).argmax(1).numpy()


# ----------------------------------------------------------------------------------------------------------------
# eval-set specs


def test_parse_eval_sets_counts_and_ids():
    sets = parse_eval_sets(" clean:5 , pgd:linf:8/255:20@7,fgsm:l2:0.5, pgd:linf:0.1:5:restarts=2@3")
    assert [s.id for s in sets] == ["clean", "pgd-linf-0.0313725-20", "fgsm-l2-0.5", "pgd-linf-0.1-5-r2"]
    assert [s.n for s in sets] == [5, 7, DEFAULT_EVAL_N, 3]
    assert [s.kind for s in sets] == ["clean", "adversarial", "adversarial", "adversarial"]
    assert sets[1].attack.eps == pytest.approx(8 / 255) and sets[1].attack.steps == 20
    assert [s.n for s in parse_eval_sets("clean")] == [DEFAULT_EVAL_N]
    assert [s.n for s in parse_eval_sets("clean@9")] == [9]
    # the canonical string form parses back to the same sets
    assert parse_eval_sets(",".join(map(str, sets))) == sets


@pytest.mark.parametrize(
    "spec",
    ["", "clean:0", "clean:x", "clean:5@6", "pgd:linf", "pgd:linf:0.1@", "pgd:linf:0.1@-3", "cw:l2:1", "clean,,clean",
     "clean,clean:10", "pgd:linf:0.1:10,pgd:linf:0.1:10@5", "pgd:linf:abc"],
)  # fmt: skip
def test_bad_eval_set_specs_raise_config_error_with_the_syntax(spec):
    with pytest.raises(ConfigError) as info:
        parse_eval_sets(spec)
    msg = str(info.value)
    assert EVAL_SETS_SYNTAX in msg or "give each set once" in msg


def test_export_with_a_bad_spec_fails_before_writing_anything(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="comma-separated eval sets"):
        export_run(run_dir, tmp_path / "x.bundle", eval_sets="clean:300;pgd", log=_quiet)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# export_run


def test_manifest_describes_model_artifact_eval_sets_and_provenance(bundle_dir, run_dir):
    b = open_bundle(bundle_dir)
    m = b.manifest
    assert m.name == "kron"
    assert list(m.input.shape) == ["batch", 1, 8, 8] and m.input.range == (0.0, 1.0)
    assert list(m.output.shape) == ["batch", 10] and m.classes == tuple(str(i) for i in range(10))
    (art,) = m.artifacts
    assert (art.file, art.kind, art.precision, art.target) == ("model.onnx", "onnx", "fp32", "any")
    assert art.extra["opset"] == 18 and art.extra["dynamic_batch"] is True

    clean, adv = m.eval_sets
    assert (clean.id, clean.kind, clean.n, clean.attack) == ("clean", "clean", 300, None)
    assert (adv.id, adv.kind, adv.n) == (ADV_ID, "adversarial", 200)
    assert (adv.attack, adv.norm, adv.eps, adv.steps, adv.crafted_on) == ("pgd", "linf", 0.1, 10, "torch-fp32")

    p = m.provenance
    config = json.loads((run_dir / "config.json").read_text())
    assert p["model"] == "kron_mlp" and p["dataset"] == "digits" and p["model_kwargs"] == config["model_kwargs"]
    assert p["checkpoint_sha256"] == sha256_file(run_dir / MODEL_FILE)
    assert p["training"] == config["train"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (p["params"], p["fc_params"], p["macs"]) == (metrics["params"], metrics["fc_params"], metrics["macs"])
    assert [layer["name"] for layer in p["layers"]] == [r["name"] for r in metrics["kron_layers"]] != []
    assert p["export"]["path"] == "model.onnx" and p["export"]["sha256"] == art.sha256
    assert p["export"]["census_after"]["MatMul"] >= 2
    assert p["parity"]["ok"] and p["parity"]["n"] >= 1000 and p["parity"]["top1_agreement"] == 1.0
    assert p["parity"]["max_rel_err"] <= 1e-4
    assert m.reference is not None and m.reference.n == 16
    assert {"export", "polygraphy_inputs", "polygraphy_outputs"} >= set(m.reports) >= {"export"}


def test_bundle_verifies_including_the_deep_onnx_check(bundle_dir):
    files = open_bundle(bundle_dir).verify(deep_onnx=True)
    assert {"model.onnx", "eval/clean.npz", f"eval/{ADV_ID}.npz", "reference.npz", "reports/export.json"} <= set(files)
    assert not [p for p in bundle_dir.parent.iterdir() if p.name.startswith(".kron.bundle")]  # no staging left


def test_eval_sets_load_and_the_attack_lowers_torch_accuracy(bundle_dir, model):
    b = open_bundle(bundle_dir)
    x, y = b.load_eval_set("clean")
    xa, ya = b.load_eval_set(ADV_ID)
    assert x.shape == (300, 1, 8, 8) and xa.shape == (200, 1, 8, 8)
    assert x.dtype == xa.dtype == np.float32 and y.dtype == ya.dtype == np.int64
    # the sets are prefixes of one permutation: the adversarial images are the first clean ones, moved within eps
    np.testing.assert_array_equal(ya, y[:200])
    assert np.abs(xa - x[:200]).max() <= 0.1 + 1e-6 and np.abs(xa - x[:200]).max() > 0.05
    acc_clean = float(np.mean(_top1(model, x[:200]) == ya))
    acc_adv = float(np.mean(_top1(model, xa) == ya))
    assert acc_adv < acc_clean - 0.1
    # the recorded float accuracies are the torch model's
    rows = {r["id"]: r for r in b.load_report("export")["eval_sets"]}
    assert rows["clean"]["accuracy_torch_fp32"] == pytest.approx(float(np.mean(_top1(model, x) == y)))
    assert rows[ADV_ID]["accuracy_torch_fp32"] == pytest.approx(acc_adv)
    assert rows[ADV_ID]["robust_accuracy_torch_fp32"] <= acc_adv


def test_eval_order_is_the_recorded_fixed_permutation(bundle_dir):
    from edgesep.data import load_dataset

    b = open_bundle(bundle_dir)
    order = b.load_report("export")["eval_order"]
    data = load_dataset("digits")
    expected = np.random.default_rng(0).permutation(len(data.y_test))
    assert order["n_test"] == len(data.y_test) and order["indices"] == expected[:300].tolist()
    x, y = b.load_eval_set("clean")
    np.testing.assert_array_equal(x, data.x_test[expected[:300]])
    np.testing.assert_array_equal(y, data.y_test[expected[:300]])


def test_reference_logits_match_onnx_runtime_on_the_fp32_artifact(bundle_dir):
    b = open_bundle(bundle_dir)
    x, logits = b.load_reference()
    x_clean, _ = b.load_eval_set("clean")
    np.testing.assert_array_equal(x, x_clean[:16])
    session = ort.InferenceSession(str(b.path_of(b.artifact(precision="fp32"))), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, logits, rtol=1e-4, atol=1e-5 * np.abs(logits).max())
    assert (got.argmax(1) == logits.argmax(1)).all()


def test_polygraphy_json_holds_the_reference(bundle_dir):
    pytest.importorskip("polygraphy")
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    b = open_bundle(bundle_dir)
    x, logits = b.load_reference()
    results = RunResults.load(str(b.path_of("reports/polygraphy_outputs.json")))
    ((runner, iterations),) = list(results)
    assert runner == "edgesep-torch-fp32" and len(iterations) == 1
    np.testing.assert_array_equal(np.asarray(iterations[0]["logits"]), logits)
    (feed,) = load_json(str(b.path_of("reports/polygraphy_inputs.json")))
    np.testing.assert_array_equal(np.asarray(feed["input"]), x)


def test_inspect_summarizes_a_verified_bundle(bundle_dir):
    info = inspect_bundle(bundle_dir)
    assert info["verified"] and info["name"] == "kron"
    assert [a["id"] for a in info["artifacts"]] == ["onnx-fp32-any"]
    assert [(e["id"], e["n"]) for e in info["eval_sets"]] == [("clean", 300), (ADV_ID, 200)]
    assert all(0 <= e["accuracy_torch_fp32"] <= 1 for e in info["eval_sets"])
    assert info["provenance"]["model"] == "kron_mlp" and info["provenance"]["opset"] == 18
    census = info["op_census"]["onnx-fp32-any"]
    assert census["MatMul"] >= 2 and "Gemm" in census
    on_disk = sum(p.stat().st_size for p in bundle_dir.rglob("*") if p.is_file())
    assert info["total_size"] == on_disk
    json.dumps(info)  # plain JSON


def test_existing_bundle_is_refused_then_replaced_with_overwrite(run_dir, bundle_dir, tmp_path):
    other = tmp_path / "other.bundle"
    other.mkdir()
    (other / "keep.txt").write_text("not a bundle")
    with pytest.raises(BundleError, match=r"holds no manifest\.json"):
        export_run(run_dir, other, eval_sets="clean:20", overwrite=True, log=_quiet)
    assert (other / "keep.txt").read_text() == "not a bundle"
    shutil.rmtree(other)
    out = Path(shutil.copytree(bundle_dir, tmp_path / "o.bundle"))
    with pytest.raises(BundleError, match="--overwrite"):
        export_run(run_dir, out, eval_sets="clean:20", log=_quiet)
    state = torch.random.get_rng_state()
    # a static batch: the input shape says so, and the reference is whole batches
    b = export_run(run_dir, out, eval_sets="clean:20,fgsm:linf:0.1@8", batch=16, n_reference=6, overwrite=True,
                   log=_quiet)  # fmt: skip
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched
    assert b.name == "o" and list(b.manifest.input.shape) == [16, 1, 8, 8] and b.manifest.reference.n == 16
    assert [e.id for e in b.manifest.eval_sets] == ["clean", "fgsm-linf-0.1"]
    b.verify(deep_onnx=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.bundle"]  # the old bundle and the staging dir are gone


def test_parity_failure_raises_and_leaves_no_bundle(run_dir, tmp_path, monkeypatch):
    import edgesep.export._onnx as onnx_mod

    def bad_parity(model, path, x, rtol=1e-4):
        return {"n": len(x), "max_abs_err": 1.0, "max_rel_err": 0.5, "top1_agreement": 0.9, "rtol": rtol, "ok": False}

    monkeypatch.setattr(onnx_mod, "parity", bad_parity)
    with pytest.raises(ParityError, match=r"top-1 agreement 90\.00%"):
        export_run(run_dir, tmp_path / "p.bundle", eval_sets="clean:20", log=_quiet)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# quantize_bundle


def test_quantize_adds_the_int8_artifact_and_report(bundle_copy):
    fp32_sha = sha256_file(bundle_copy / "model.onnx")
    report = quantize_bundle(bundle_copy, calib=128, max_drop=100.0, max_robust_drop=100.0, log=_quiet)
    assert report.passed and report.calib_n == 128
    assert [r.metric for r in report.gate] == ["clean", f"robust[{ADV_ID}]"]
    assert [r.n for r in report.gate] == [300, 200]
    b = open_bundle(bundle_copy)
    b.verify(deep_onnx=True)
    int8 = b.artifact(precision="int8")
    assert (int8.file, int8.kind, int8.target) == ("model.int8.onnx", "onnx", "any")
    assert int8.sha256 == report.sha256_int8 and report.out_path == str(b.path_of(int8))
    assert int8.extra["method"] == "minmax" and int8.extra["calib_n"] == 128
    stored = b.load_report("quantization")
    assert stored["passed"] and stored["fp32_path"] == "model.onnx" and stored["out_path"] == "model.int8.onnx"
    assert stored["sha256_fp32"] == fp32_sha == sha256_file(bundle_copy / "model.onnx")
    # the int8 file runs and mostly agrees with fp32 on the clean set
    x, _ = b.load_eval_set("clean")
    s32 = ort.InferenceSession(str(bundle_copy / "model.onnx"), providers=["CPUExecutionProvider"])
    s8 = ort.InferenceSession(str(bundle_copy / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    agree = np.mean(s32.run(None, {"input": x})[0].argmax(1) == s8.run(None, {"input": x})[0].argmax(1))
    assert agree > 0.8
    assert inspect_bundle(bundle_copy)["quantization"]["gate"][0]["metric"] == "clean"


def test_failed_gate_changes_nothing(bundle_copy):
    manifest = (bundle_copy / MANIFEST_NAME).read_bytes()
    fp32_sha = sha256_file(bundle_copy / "model.onnx")
    with pytest.raises(AccuracyGateError) as info:
        quantize_bundle(bundle_copy, calib=64, max_drop=-1.0, log=_quiet)
    assert info.value.metric == "clean" and info.value.report is not None
    assert (bundle_copy / MANIFEST_NAME).read_bytes() == manifest
    assert sha256_file(bundle_copy / "model.onnx") == fp32_sha
    assert not (bundle_copy / "model.int8.onnx").exists()
    open_bundle(bundle_copy).verify()


def test_quantize_needs_a_bundle_directory(tmp_path):
    with pytest.raises(BundleError, match="edgesep export"):
        quantize_bundle(tmp_path / "missing.bundle", log=_quiet)
    with pytest.raises(ConfigError, match="calib"):
        quantize_bundle(tmp_path, calib=0, log=_quiet)
