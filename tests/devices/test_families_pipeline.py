"""Every layer family through the whole pipeline: convert -> export -> INT8 (gated) -> TVM for host and rpi4 ->
bench on ``host`` and on the emulated ``arm64-qemu`` device. Marked ``slow`` and ``ci``: part of the default run.

Families: GDWS (post-training, on a small CNN), CondLR-style low-rank and tensor-train (post-training conversions
of a dense MLP; their training paths are tested in tests/test_condlr.py and tests/layers/test_tt.py). Tiny digits
models, tiny benchmark settings: this proves the path, not the accuracy (benchmarks/ has the numbers).

References: the clean accuracy each device reports for each artifact is recomputed here with ONNX Runtime on this
host from the bundle's fp32 / INT8 ONNX and eval set (independent of edgesep's loader and runner); the TVM
libraries' accuracy must equal the fp32 ONNX one to within one image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgesep.devices._result import load_result
from edgesep.devices.harness import BenchOptions, bench

pytestmark = [pytest.mark.slow, pytest.mark.ci, pytest.mark.tvm]

TINY = BenchOptions(min_runs=10, min_seconds=0.05, warmup=2, throughput_seconds=0.05, square_queries=5, square_n=10,
                    max_eval=100)  # fmt: skip


def _quiet(_: str) -> None:
    pass


def _family_run(family: str, tiny_run, out: Path) -> Path:
    if family == "gdws":
        from edgesep.gdws import gdws_run

        gdws_run(str(tiny_run("cnn_small")), out, mac_budget=0.5, weighted=False, eval_n=0, log=_quiet)
    else:
        from edgesep.convert import convert_run

        opts = {"rank_ratio": 0.5} if family == "lowrank" else {"rank": 4}
        convert_run(tiny_run("mlp"), family, out, progress=False, log=_quiet, **opts)
    return out


def _ort_clean(bundle: Path, onnx_file: str, eval_file: str, n: int) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle / onnx_file), providers=["CPUExecutionProvider"])
    with np.load(bundle / eval_file) as z:
        x, y = z["x"][:n], z["y"][:n]
    return float((sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1) == y).mean())


@pytest.fixture(scope="module")
def family_bundles(tiny_run, tmp_path_factory):
    pytest.importorskip("tvm")
    from edgesep.export import export_run, quantize_bundle
    from edgesep.runtimes.tvm import compile_tvm

    made = {}
    for family in ("gdws", "lowrank", "tt"):
        d = tmp_path_factory.mktemp(family)
        run = _family_run(family, tiny_run, d / "run")
        b = d / f"{family}.bundle"
        export_run(run, b, eval_sets="clean:100,pgd:linf:0.1:5@50", progress=False, log=_quiet)
        quantize_bundle(b, max_drop=100, log=_quiet)
        for target in ("host", "rpi4"):
            compile_tvm(b, target=target, opt="fused", log=_quiet)
        made[family] = b
    return made


def _check(bundle: Path, paths: list[Path], device: str, backends: set[tuple[str, str]]) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    clean_file = next(e["file"] for e in manifest["eval_sets"] if e["kind"] == "clean")
    got = set()
    for p in paths:
        r = load_result(p)
        assert r["status"] == "complete" and r["device"]["profile"] == device, r["partial_reason"]
        art = r["artifact"]
        got.add((art["backend"], art["precision"]))
        onnx_file = art["file"] if art["kind"] == "onnx" else "model.onnx"
        want = _ort_clean(bundle, onnx_file, clean_file, r["accuracy"]["clean"]["n"])
        tol = 0 if art["kind"] == "onnx" else 1 / r["accuracy"]["clean"]["n"] + 1e-9
        assert abs(r["accuracy"]["clean"]["accuracy"] - want) <= tol, (art["id"], want)
        assert r["numerics"]["top1_agreement"] >= 0.9 and r["latency"]["n"] >= TINY.min_runs
    assert backends <= got, got


@pytest.mark.parametrize("family", ["gdws", "lowrank", "tt"])
def test_family_bench_on_host(family, family_bundles, tmp_path):
    b = family_bundles[family]
    paths = bench(b, "host", tmp_path / "res", select="all", options=TINY, log=_quiet)
    _check(b, paths, "host", {("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("tvm", "fp32")})


@pytest.mark.arm64
@pytest.mark.parametrize("family", ["gdws", "lowrank", "tt"])
def test_family_bench_on_the_emulated_arm64_device(family, family_bundles, arm64_root, tmp_path):
    b = family_bundles[family]
    paths = bench(b, "arm64-qemu", tmp_path / "res", select="all", options=TINY, log=_quiet)
    _check(b, paths, "arm64-qemu", {("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("tvm", "fp32")})
    assert all(load_result(p)["environment"]["machine"] == "aarch64" for p in paths)
