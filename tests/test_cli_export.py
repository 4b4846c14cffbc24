"""`edgesep export / quantize / inspect` end to end in a subprocess; user errors exit 2 without a traceback."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxsim")


ADV_ID = "pgd-linf-0.1-5"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "edgesep", *args], capture_output=True, text=True, timeout=600,
                          env=env)  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tiny_run) -> Path:
    return tiny_run()


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("cli_export") / "kron.bundle"
    r = _cli("export", str(run_dir), "--out", str(out), "--eval-sets", "clean:200,pgd:linf:0.1:5@100")
    return out, r


@pytest.fixture
def bundle_copy(exported, tmp_path) -> Path:
    out, r = exported
    assert r.returncode == 0, r.stderr
    return Path(shutil.copytree(out, tmp_path / "kron.bundle"))


def test_export_prints_census_parity_eval_sets_and_the_bundle(exported):
    out, r = exported
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    for needle in (
        "ONNX op census (opset 18)",
        "MatMul",
        "Transpose",
        "parity with torch on 1000 images",
        "top-1 agreement 100.00%",
        "clean",
        ADV_ID,
        "torch fp32 top-1 %",
        f"bundle 'kron': {out.resolve()}",
    ):
        assert needle in r.stdout, needle
    assert (out / "manifest.json").is_file() and (out / f"eval/{ADV_ID}.npz").is_file()


def test_quantize_then_inspect(bundle_copy):
    r = _cli("quantize", str(bundle_copy), "--calib", "128", "--max-drop", "100", "--max-robust-drop", "100")
    assert r.returncode == 0, r.stderr
    for needle in (
        "gate passed",
        "accuracy: fp32 vs int8",
        f"robust[{ADV_ID}]",
        "per-layer SQNR",
        "SQNR dB",
        "kept in fp32: none",
        "bytes (",
        "added model.int8.onnx",
    ):
        assert needle in r.stdout, needle

    r = _cli("inspect", str(bundle_copy))
    assert r.returncode == 0, r.stderr
    for needle in (
        "bundle 'kron'",
        "verified (every file's sha256 matches",
        "input input ['batch', 1, 8, 8]",
        "onnx-fp32-any",
        "onnx-int8-any",
        "model.int8.onnx",
        ADV_ID,
        "torch-fp32",
        "kron_mlp on digits",
        "op census",
        "DequantizeLinear",
        "int8 gate (minmax)",
        "total size",
    ):
        assert needle in r.stdout, needle

    r = _cli("inspect", str(bundle_copy), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert [a["precision"] for a in info["artifacts"]] == ["fp32", "int8"]
    assert [e["id"] for e in info["eval_sets"]] == ["clean", ADV_ID]
    assert info["op_census"]["onnx-int8-any"]["QuantizeLinear"] > 0


def test_failed_gate_prints_the_report_and_exits_2(bundle_copy):
    manifest = (bundle_copy / "manifest.json").read_bytes()
    r = _cli("quantize", str(bundle_copy), "--calib", "64", "--max-drop=-1")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "accuracy gate failed on clean" in r.stderr and "gate FAILED" in r.stdout
    assert (bundle_copy / "manifest.json").read_bytes() == manifest


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["export", "{tmp}/no_run", "--out", "{tmp}/x.bundle"], "not found"),
        (["export", "{run}", "--out", "{tmp}/x.bundle", "--eval-sets", "clean:100;pgd"], "comma-separated eval sets"),
        (["export", "{run}", "--out", "{tmp}/x.bundle", "--eval-sets", "pgd:linf"], "needs at least a norm"),
        (["export", "{run}", "--out", "{bundle}"], "--overwrite"),
        (["quantize", "{tmp}/missing.bundle"], "edgesep export"),
        (["inspect", "{tmp}"], "no manifest.json"),
    ],
)
def test_user_errors_exit_2_without_traceback(exported, run_dir, tmp_path, args, needle):
    out, _ = exported
    r = _cli(*[a.format(tmp=tmp_path, run=run_dir, bundle=out) for a in args])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert needle.lower() in r.stderr.lower()


def test_inspect_refuses_a_tampered_bundle(bundle_copy):
    path = bundle_copy / "eval" / "clean.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    r = _cli("inspect", str(bundle_copy))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "sha256" in r.stderr and "eval/clean.npz" in r.stderr


def test_check_passes_for_tensorrt_and_tvm_then_fails_on_an_unsupported_op(bundle_copy):
    r = _cli("quantize", str(bundle_copy), "--calib", "128", "--max-drop", "100", "--max-robust-drop", "100")
    assert r.returncode == 0, r.stderr
    r = _cli("check", str(bundle_copy), "--for", "tensorrt", "--json", str(bundle_copy.parent / "trt.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "onnx-int8-any (model.int8.onnx): tensorrt 10.3: OK" in r.stdout
    reports = json.loads((bundle_copy.parent / "trt.json").read_text())
    assert {rep["artifact"] for rep in reports} == {"onnx-fp32-any", "onnx-int8-any"}
    if importlib.util.find_spec("tvm") is not None:
        r = _cli("check", str(bundle_copy), "--for", "tvm", "--artifact", "onnx-fp32-any")
        assert r.returncode == 0, r.stdout + r.stderr

    # an artifact with an op TensorRT's ONNX parser does not support (MatMulInteger): non-zero exit, node named
    from onnx import TensorProto, helper

    from edgesep.bundle import open_bundle

    graph = helper.make_graph(  # named like the manifest's input and output, which the deep check requires
        [helper.make_node("MatMulInteger", ["input", "b"], ["logits"], name="the_bad_node")],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.UINT8, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.INT32, [1, 2])],
        initializer=[helper.make_tensor("b", TensorProto.UINT8, [4, 2], [1] * 8)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    open_bundle(bundle_copy).add_artifact(model.SerializeToString(), "bad.onnx", "onnx", "int8", target="bad")
    r = _cli("check", str(bundle_copy), "--for", "tensorrt", "--artifact", "onnx-int8-bad")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "the_bad_node" in r.stdout and "would fail on tensorrt" in r.stderr
