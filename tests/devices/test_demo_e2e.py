"""`edgesep demo` end to end, as the README's first command runs it: train -> export -> INT8 -> compile -> bench on a
device profile (with a Square attack against the engines) -> report. Small settings; marked ``slow`` and ``ci``:
deselected from ``-m 'not slow'`` runs but part of the default run and of CI.

Independent references: each result's clean and transferred accuracy is recomputed here with ONNX Runtime directly
on the bundle's eval sets (not through edgesep's loader or runner); the report is parsed as strict HTML5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ci]

SMALL = ["--epochs", "2", "--square-queries", "30", "--min-runs", "30", "--min-seconds", "0.2", "--max-eval", "300"]


def _demo(out: Path, *extra: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "220"}
    return subprocess.run([sys.executable, "-m", "edgesep", "demo", "--out", str(out), *SMALL, *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip


def _ort_accuracy(bundle: Path, artifact_file: str, eval_file: str, n: int) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle / artifact_file), providers=["CPUExecutionProvider"])
    with np.load(bundle / eval_file) as z:
        x, y = z["x"][:n], z["y"][:n]
    logits = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i : i + 1]})[0] for i in range(len(x))])
    return float((logits.argmax(1) == y).mean())


def _check_results(out: Path, device: str, emulated: bool) -> list[dict]:
    from edgesep.devices._result import load_results

    results = [r for _, r in load_results([out / "results"])]
    assert results, "no result files"
    by_art = {(r["bundle"]["name"], r["artifact"]["id"]): r for r in results}
    for label in ("dense", "separable"):
        manifest = json.loads((out / f"{label}.bundle" / "manifest.json").read_text())
        name = manifest["name"]
        kinds = {(a["kind"], a["precision"]) for a in manifest["artifacts"]}
        assert ("onnx", "fp32") in kinds
        for (bname, _), r in by_art.items():
            if bname != name:
                continue
            assert r["status"] == "complete", r["partial_reason"]
            assert r["device"]["profile"] == device and r["device"]["emulated"] is emulated
            acc = r["accuracy"]
            assert acc["clean"] and acc["adversarial"] and acc["query"]
            q = acc["query"][0]
            assert q["attack"] == "square" and q["queries"] == 30 and 0 <= q["accuracy"] <= q["clean_accuracy"]
            assert r["latency"]["n"] >= 30 and len(r["latency"]["raw_ms"]) == r["latency"]["n"]
            assert r["numerics"]["top1_agreement"] >= 0.9
            if r["artifact"]["kind"] == "onnx":  # recompute with ONNX Runtime directly
                ev = {e["id"]: e for e in manifest["eval_sets"]}
                for entry in [acc["clean"], *acc["adversarial"]]:
                    want = _ort_accuracy(out / f"{label}.bundle", r["artifact"]["file"], ev[entry["eval_set"]]["file"],
                                         entry["n"])  # fmt: skip
                    assert entry["accuracy"] == pytest.approx(want, abs=1e-9)
    return results


def _check_report(out: Path) -> None:
    import html5lib

    html = (out / "report.html").read_text()
    html5lib.HTMLParser(strict=True).parse(html)
    assert "<img" in html or "<svg" in html
    assert (out / "report.md").is_file()


def test_demo_on_host_trains_exports_quantizes_compiles_benches_and_reports(tmp_path):
    out = tmp_path / "demo"
    r = _demo(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "on-device benchmark: host" in r.stdout and "report:" in r.stdout
    results = _check_results(out, "host", emulated=False)
    backends = {x["artifact"]["backend"] for x in results}
    precisions = {x["artifact"]["precision"] for x in results}
    assert "onnxruntime" in backends and "tvm" in backends, backends
    assert "int8" in precisions or "gate" in r.stdout  # INT8 unless the gate refused it (then the table says so)
    _check_report(out)


@pytest.mark.arm64
def test_demo_on_the_emulated_arm64_device(tmp_path, arm64_root):
    out = tmp_path / "demo"
    r = _demo(out, "--device", "arm64-qemu")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = _check_results(out, "arm64-qemu", emulated=True)
    assert all(x["environment"]["machine"] == "aarch64" for x in results)
    # ONNX Runtime (fp32, int8) and the TVM library cross-compiled for rpi4, all run on aarch64
    assert {(x["artifact"]["backend"], x["artifact"]["target"]) for x in results} >= {("onnxruntime", "any"),
                                                                                       ("tvm", "rpi4")}
    assert "latency numbers are meaningless" in r.stdout
    _check_report(out)
