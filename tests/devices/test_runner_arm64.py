"""The on-device runner inside the emulated arm64 root (aarch64 CPython, numpy and ONNX Runtime under qemu-user).

Correctness only: qemu is ~35x slower than native, so the latency settings are tiny and no timing is asserted.
Reference: the same runner on this x86 host, whose numbers ``test_runner.py`` checks against ONNX Runtime directly,
and ``edgesep.attacks.square`` called here on x86 ONNX Runtime with the same seed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path, PurePosixPath

import numpy as np
import pytest

from edgesep.devices._result import STAGES, load_result
from edgesep.devices.emulate import copy_bundle, run_in_root
from edgesep.devices.runner import run_benchmark

pytestmark = pytest.mark.arm64
ort = pytest.importorskip("onnxruntime")

# qemu settings (brief: --min-runs 20 --min-seconds 0 --max-eval 100 --square-queries 20 --square-n 20)
ARGS = ["--min-runs", "20", "--min-seconds", "0", "--warmup", "2", "--max-eval", "100", "--square-queries", "20",
        "--square-n", "20", "--throughput-batch", "16", "--throughput-seconds", "0.2", "--threads", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_run) -> Path:
    """kron_mlp (2 epochs, digits): fp32 + INT8 (gate off), clean:200 and a transferred PGD L-inf 0.1 set of 100."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from edgesep.export import export_run, quantize_bundle

    out = tmp_path_factory.mktemp("runner_arm64") / "kron.bundle"
    export_run(tiny_run(), out, eval_sets="clean:200,pgd:linf:0.1:10@100", progress=False, log=lambda _: None)
    quantize_bundle(out, max_drop=100, log=lambda _: None)
    return out


@pytest.mark.parametrize(
    ("artifact", "stages"),
    [("onnx-fp32-any", list(STAGES)), ("onnx-int8-any", ["verify", "numerics", "clean", "adversarial"])],
    ids=["fp32", "int8"],
)  # the aarch64 int8 kernels are what matters for int8; its timing stages would only repeat fp32's under qemu
def test_runner_in_arm64_root_matches_the_host(arm64_root, bundle, tmp_path, artifact, stages):
    prefix = PurePosixPath(f"/opt/edgesep-runner-{uuid.uuid4().hex[:8]}")  # one per test: xdist workers share the root
    try:
        inside = copy_bundle(arm64_root, bundle, prefix=prefix)
        out = prefix / "result.json"
        r = run_in_root(arm64_root, ["-m", "edgesep.devices.runner", str(inside), "--out", str(out), "--artifact",
                                     artifact, "--profile-id", "arm64-qemu", "--stages", ",".join(stages), *ARGS],
                        env={"PYTHONPATH": str(prefix)}, timeout=600, check=False)  # fmt: skip
        host_copy = tmp_path / "arm64.json"
        shutil.copy(arm64_root / out.relative_to("/"), host_copy)
        installed = arm64_root / prefix.relative_to("/") / "edgesep"
        assert not (installed / "attacks" / "autoattack.py").exists()  # the torch side is not on the device
        assert (installed / "devices" / "runner.py").read_bytes() == Path(
            __import__("edgesep.devices.runner", fromlist=["x"]).__file__
        ).read_bytes()
    finally:
        shutil.rmtree(arm64_root / prefix.relative_to("/"), ignore_errors=True)
    assert r.returncode == 0, r.stdout + r.stderr
    dev = load_result(host_copy)
    assert dev["status"] == "complete" and dev["stages_done"] == stages
    assert dev["environment"]["machine"] == "aarch64" and dev["device"]["arch"] == "aarch64"
    assert dev["device"]["emulated"] is True and dev["device"]["profile"] == "arm64-qemu"
    assert "qemu-user" in dev["environment"]["cpu_model"] and any("emulated" in n for n in dev["notes"])
    assert dev["artifact"]["id"] == artifact
    assert dev["artifact"]["sha256"] == hashlib.sha256((bundle / dev["artifact"]["file"]).read_bytes()).hexdigest()
    if "latency" in stages:
        assert dev["latency"]["n"] >= 20 and dev["throughput"]["n_batches"] >= 1

    # the same runner on x86, same images and settings: identical accuracies (fp32 and int8 kernels alike)
    host = run_benchmark(bundle, tmp_path / "host.json", artifact_id=artifact, max_eval=100, square_queries=20,
                         square_n=20, threads=1, stages="numerics,clean,adversarial,square", log=None)  # fmt: skip
    assert dev["accuracy"]["clean"] == host["accuracy"]["clean"]
    assert dev["accuracy"]["clean"]["n"] == 100
    assert dev["accuracy"]["adversarial"] == host["accuracy"]["adversarial"]
    assert dev["numerics"]["top1_agreement"] == host["numerics"]["top1_agreement"]
    assert dev["numerics"]["max_abs"] == pytest.approx(host["numerics"]["max_abs"], abs=1e-4)
    if artifact == "onnx-fp32-any":
        assert dev["numerics"]["max_rel"] < 1e-4
        # the query-only attack against the aarch64 engine equals the attack on x86 ONNX Runtime (fp32 logits agree
        # to ~1e-6, far below any margin the attack compares)
        from edgesep.attacks.square import square_attack

        m = json.loads((bundle / "manifest.json").read_text())
        sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        with np.load(bundle / next(e["file"] for e in m["eval_sets"] if e["id"] == "clean")) as z:
            x, y = z["x"][:20], z["y"][:20]
        ref = square_attack(lambda b: sess.run(None, {name: b})[0], x, y, 0.1, n_queries=20, seed=0)
        (sq,) = dev["accuracy"]["query"]
        assert sq["accuracy"] == ref.robust_accuracy and sq["mean_queries"] == pytest.approx(ref.queries.mean())
        assert sq["accuracy"] == host["accuracy"]["query"][0]["accuracy"]
