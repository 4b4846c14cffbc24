"""The on-device runner (``python -m edgesep.devices.runner``) on this host, against independent references.

References: ONNX Runtime's own ``InferenceSession`` on the bundle's ``.npz`` files read with ``np.load`` (not the
bundle reader or ``edgesep.runtimes``) for clean / transferred accuracy and numerics; ``edgesep.attacks.square``
called directly on that session with the same seed for the query-only accuracy; ``numpy.percentile`` and
``numpy.std`` of ``raw_ms`` for the latency summary; ``hashlib`` for the hashes. Timings are never asserted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from edgesep.devices import _env
from edgesep.devices._result import STAGES, load_result, validate_result
from edgesep.devices.runner import main, run_benchmark
from edgesep.errors import BundleLookupError, ConfigError, IntegrityError

ort = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[2]
TINY = ["--min-runs", "50", "--min-seconds", "0.2", "--warmup", "3", "--throughput-batch", "16",
        "--throughput-seconds", "0.2", "--threads", "1", "--quiet"]  # fmt: skip
ENV_KEYS = {"hostname", "os", "kernel", "machine", "python", "numpy", "cpu_model", "cores", "governor",
            "clocks_mhz", "temperature_c", "jetson_power_mode", "runtime", "runtime_versions", "threads"}  # fmt: skip


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_run) -> Path:
    """kron_mlp (2 epochs, digits): fp32 + INT8 (gate off), clean:200 and a transferred PGD L-inf 0.1 set of 100."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from edgesep.export import export_run, quantize_bundle

    out = tmp_path_factory.mktemp("runner") / "kron.bundle"
    export_run(tiny_run(), out, eval_sets="clean:200,pgd:linf:0.1:10@100", progress=False, log=lambda _: None)
    quantize_bundle(out, max_drop=100, log=lambda _: None)
    return out


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _ort(bundle: Path, artifact_id: str):
    art = next(a for a in _manifest(bundle)["artifacts"] if a["id"] == artifact_id)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(bundle / art["file"]), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def _npz(bundle: Path, set_id: str) -> tuple[np.ndarray, np.ndarray]:
    entry = next(e for e in _manifest(bundle)["eval_sets"] if e["id"] == set_id)
    with np.load(bundle / entry["file"]) as z:
        return z["x"], z["y"]


def _runner(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgesep.devices.runner", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)  # fmt: skip


def test_cli_result_is_complete_and_matches_independent_references(bundle, tmp_path):
    out = tmp_path / "res" / "result.json"
    r = _runner(str(bundle), "--out", str(out), "--profile-id", "host", *TINY, "--square-queries", "30",
                "--square-n", "20", "--seed", "3")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # --quiet
    res = load_result(out)  # validate_result inside
    assert res["status"] == "complete" and res["partial_reason"] is None
    assert res["stages_done"] == list(STAGES)
    m = _manifest(bundle)

    # blocks: bundle, artifact, device, environment
    assert res["bundle"]["manifest_sha256"] == hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert res["bundle"]["model"] == "kron_mlp" and res["bundle"]["layers"] == f"kron({len(m['provenance']['layers'])})"
    art = res["artifact"]
    assert (art["id"], art["backend"], art["precision"]) == ("onnx-fp32-any", "onnxruntime", "fp32")
    assert art["sha256"] == hashlib.sha256((bundle / art["file"]).read_bytes()).hexdigest()
    assert res["device"] == {"profile": "host", "arch": os.uname().machine, "emulated": False, "transport": "local"}
    env = res["environment"]
    assert set(env) == ENV_KEYS
    assert env["machine"] == os.uname().machine and env["numpy"] == np.__version__ and env["threads"] == 1
    assert env["runtime"] == "onnxruntime" and env["runtime_versions"]["onnxruntime"] == ort.__version__
    assert env["cores"] == len(os.sched_getaffinity(0))

    # numerics: ONNX Runtime on reference.npz vs its stored logits, computed here with numpy
    with np.load(bundle / "reference.npz") as z:
        x_ref, ref = z["x"], z["logits"]
    got = _ort(bundle, "onnx-fp32-any")(x_ref)
    num = res["numerics"]
    assert num["n"] == len(x_ref) == m["reference"]["n"]
    assert num["max_abs"] == pytest.approx(float(np.abs(got - ref).max()), rel=1e-6, abs=1e-9)
    assert num["max_rel"] == pytest.approx(float(np.abs(got - ref).max() / np.abs(ref).max()), rel=1e-6, abs=1e-12)
    assert num["max_rel"] < 1e-4 and num["top1_agreement"] == float(np.mean(got.argmax(1) == ref.argmax(1))) == 1.0

    # clean and transferred accuracy: ONNX Runtime directly on the eval npz files
    predict = _ort(bundle, "onnx-fp32-any")
    x, y = _npz(bundle, "clean")
    correct = int(np.sum(predict(x).argmax(1) == y))
    assert res["accuracy"]["clean"] == {"eval_set": "clean", "n": 200, "correct": correct, "accuracy": correct / 200}
    (adv,) = res["accuracy"]["adversarial"]
    xa, ya = _npz(bundle, "pgd-linf-0.1-10")
    ca = int(np.sum(predict(xa).argmax(1) == ya))
    assert adv == {"eval_set": "pgd-linf-0.1-10", "mode": "transferred", "attack": "pgd", "norm": "linf", "eps": 0.1,
                   "steps": 10, "crafted_on": "torch-fp32", "n": 100, "correct": ca, "accuracy": ca / 100}  # fmt: skip
    assert ca < correct  # the attack transfers at all (the runner did not replay the clean images)

    # query-only Square: the same attack called directly on ONNX Runtime with the same seed gives the same numbers
    from edgesep.attacks.square import square_attack

    sq_ref = square_attack(predict, x[:20], y[:20], 0.1, n_queries=30, seed=3)
    (sq,) = res["accuracy"]["query"]
    assert sq["eps"] == 0.1 and sq["queries"] == 30 and sq["seed"] == 3 and sq["n"] == 20 and sq["eval_set"] == "clean"
    assert sq["accuracy"] == sq_ref.robust_accuracy
    assert sq["correct"] == int(20 - sq_ref.success.sum())
    assert sq["mean_queries"] == pytest.approx(float(sq_ref.queries.mean()))
    assert sq["clean_accuracy"] == float(np.mean(predict(x[:20]).argmax(1) == y[:20]))

    # latency: every sample kept; the summary is numpy's
    lat = res["latency"]
    raw = np.array(lat["raw_ms"])
    assert lat["batch"] == 1 and lat["warmup"] == 3 and lat["min_runs"] == 50 and lat["n"] == len(raw) >= 50
    for q in (50, 90, 99):
        assert lat[f"p{q}"] == pytest.approx(np.percentile(raw, q), rel=1e-9)
    assert lat["mean"] == pytest.approx(raw.mean()) and lat["std"] == pytest.approx(raw.std())
    assert (lat["min"], lat["max"]) == (raw.min(), raw.max()) and raw.min() > 0
    thr = res["throughput"]
    assert thr["batch"] == 16 and thr["n_batches"] >= 1 and thr["seconds"] >= 0.2
    assert thr["samples_per_s"] == pytest.approx(thr["n_batches"] * 16 / thr["seconds"])


def test_function_api_int8_artifact_and_stage_subset(bundle, tmp_path):
    out = tmp_path / "int8.json"
    lines: list[str] = []
    res = run_benchmark(bundle, out, artifact_id="onnx-int8-any", min_runs=20, min_seconds=0, warmup=0, threads=1,
                        max_eval=150, stages="numerics,clean,latency", log=lines.append)  # fmt: skip
    assert res == json.loads(out.read_text())
    validate_result(res)
    assert res["status"] == "complete" and res["stages_done"] == ["verify", "numerics", "clean", "latency"]
    assert res["artifact"]["precision"] == "int8"
    assert res["artifact"]["selected_because"] == "artifact_id='onnx-int8-any'"
    assert res["accuracy"]["adversarial"] == [] and res["accuracy"]["query"] == [] and res["throughput"] is None
    x, y = _npz(bundle, "clean")
    correct = int(np.sum(_ort(bundle, "onnx-int8-any")(x[:150]).argmax(1) == y[:150]))
    assert res["accuracy"]["clean"]["n"] == 150 and res["accuracy"]["clean"]["correct"] == correct
    with np.load(bundle / "reference.npz") as z:
        got, ref = _ort(bundle, "onnx-int8-any")(z["x"]), z["logits"]
    assert res["numerics"]["max_abs"] == pytest.approx(float(np.abs(got - ref).max()), rel=1e-6)
    assert res["numerics"]["max_abs"] > 1e-4  # int8 logits moved: this really is the quantized model
    assert res["latency"]["n"] >= 20
    stages = [ln.split(":")[0] for ln in lines]
    assert stages[:5] == ["verify", "artifact", "numerics", "clean", "latency"]


class _Engine:
    """A caller's engine (as the host passes a TVM RPC session): ONNX Runtime behind run/info, batches recorded."""

    def __init__(self, bundle: Path):
        self.predict, self.batches = _ort(bundle, "onnx-fp32-any"), []

    def run(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(len(x))
        return self.predict(x)

    def info(self) -> dict:
        return {"backend": "tvm", "threads": 4, "batch": 8}


def test_given_engine_is_measured_and_device_block_overridden(bundle, tmp_path):
    eng = _Engine(bundle)
    dev = {"profile": "rpi4", "arch": "aarch64", "emulated": False, "transport": "tvm-rpc"}
    res = run_benchmark(bundle, tmp_path / "r.json", artifact_id="onnx-fp32-any", engine=eng, device=dev, min_runs=7,
                        min_seconds=0, warmup=2, throughput_batch=20, throughput_seconds=0, log=None,
                        stages=["latency", "throughput"])  # fmt: skip
    assert res["device"] == dev and res["environment"]["runtime"] == "tvm" and res["environment"]["threads"] == 4
    assert eng.batches[: 2 + 7] == [1] * 9 and res["latency"]["n"] == 7  # warmup + samples at batch 1, via .run
    assert eng.batches[9:] == [20, 20] and res["throughput"]["n_batches"] == 1  # one warm-up batch, then timed
    assert any("static batch of 8" in n and "3 run(s)" in n for n in res["notes"])


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_latency_keeps_samples_as_partial(bundle, tmp_path, sig, code):
    # --max-runs far above what 120 s can reach: on a quiet machine the default cap (100k runs of a ~15 us engine)
    # would end the latency stage in seconds and the signal would land in the next stage
    out = tmp_path / "r.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgesep.devices.runner", str(bundle), "--out", str(out), "--min-seconds", "120",
         "--max-runs", "1000000000", "--stages", "latency,throughput", "--threads", "1"],
        stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the first flush during latency (FLUSH_SECONDS after it starts)
            if out.is_file() and json.loads(out.read_text()).get("latency"):
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        else:
            pytest.fail("the runner never wrote latency samples")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    res = load_result(out)
    assert res["status"] == "partial" and res["partial_reason"].startswith("interrupted during latency")
    assert res["stages_done"] == ["verify"] and res["throughput"] is None
    assert res["latency"]["n"] == len(res["latency"]["raw_ms"]) > 0
    assert "Traceback" not in err and f"interrupted by {sig.name}" in err and str(out) in err
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind


def test_missing_artifact_exits_2_with_the_listing_and_writes_nothing(bundle, tmp_path):
    out = tmp_path / "r.json"
    r = _runner(str(bundle), "--out", str(out), "--artifact", "tvm-fp32-rpi4")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "onnx-fp32-any" in r.stderr and "onnx-int8-any" in r.stderr
    assert not out.exists()
    with pytest.raises(BundleLookupError, match="onnx-int8-any"):
        run_benchmark(bundle, out, backend="tvm", log=None)


def test_bad_settings_exit_2_before_anything_runs(bundle, tmp_path):
    for args in (["--min-runs", "0"], ["--stages", "clean,warp"], ["--max-runs", "5", "--min-runs", "10"]):
        r = _runner(str(bundle), "--out", str(tmp_path / "r.json"), *args)
        assert r.returncode == 2 and r.stderr.startswith("error: --") and len(r.stderr.splitlines()) == 1, r.stderr
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(ConfigError, match="is a directory"):
        run_benchmark(bundle, tmp_path, log=None)


def test_square_without_linf_set_asks_for_eps(bundle, tmp_path):
    copy = tmp_path / "b.bundle"
    shutil.copytree(bundle, copy)
    m = _manifest(copy)
    m["eval_sets"] = [e for e in m["eval_sets"] if e["kind"] == "clean"]
    (copy / "eval" / "pgd-linf-0.1-10.npz").unlink()
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError, match="--square-eps"):
        run_benchmark(copy, tmp_path / "r.json", square_queries=5, log=None)
    assert not (tmp_path / "r.json").exists()
    res = run_benchmark(copy, tmp_path / "r.json", square_queries=5, square_n=4, square_eps=0.05, log=None,
                        stages="square")  # fmt: skip
    assert res["accuracy"]["query"][0]["eps"] == 0.05 and res["accuracy"]["query"][0]["n"] == 4


def test_tampered_bundle_is_a_failed_result(bundle, tmp_path):
    copy = tmp_path / "b.bundle"
    shutil.copytree(bundle, copy)
    f = copy / "eval" / "clean.npz"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one pixel byte changed, same size: only the sha256 can tell
    f.write_bytes(bytes(data))
    out = tmp_path / "r.json"
    r = _runner(str(copy), "--out", str(out), "--quiet")
    assert r.returncode == 2 and "eval/clean.npz" in r.stderr and "Traceback" not in r.stderr
    res = load_result(out)
    assert res["status"] == "failed" and res["partial_reason"].startswith("verify: ") and res["stages_done"] == []
    assert "eval/clean.npz" in res["partial_reason"]
    with pytest.raises(IntegrityError):
        run_benchmark(copy, out, log=None)
    # --no-verify skips the bundle check; the eval set is still hash-checked when it is read
    with pytest.raises(IntegrityError):
        run_benchmark(copy, out, verify=False, stages="clean", log=None)
    res = load_result(out)
    assert res["status"] == "failed" and res["stages_done"] == ["verify"]
    assert res["partial_reason"].startswith("clean: ") and any("--no-verify" in n for n in res["notes"])


_BLOCK = textwrap.dedent(
    """
    import runpy, sys
    BLOCKED = ("torch", "onnx", "onnxscript", "onnxsim", "typer", "rich", "tvm", "sklearn", "safetensors")
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked (device side)")
            return None
    sys.meta_path.insert(0, _Block())
    sys.argv = ["runner", *sys.argv[1:]]
    try:
        runpy.run_module("edgesep.devices.runner", run_name="__main__")
    finally:
        print("LOADED", sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED)))
    """
)


def test_runner_needs_numpy_and_the_runtime_only(bundle, tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-c", _BLOCK, str(bundle), "--out", str(out), *TINY, "--square-queries", "5",
                        "--square-n", "4"], capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert "LOADED []" in r.stdout, r.stdout + r.stderr
    assert load_result(out)["status"] == "complete", r.stderr
    # the blocker can fail: a module that needs torch is caught
    r = subprocess.run([sys.executable, "-c", _BLOCK.replace("edgesep.devices.runner", "edgesep.train")],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode != 0 and "torch is blocked" in r.stderr


def test_main_returns_exit_codes_in_process(bundle, tmp_path, capsys):
    assert main([str(bundle), "--out", str(tmp_path / "r.json"), "--artifact", "nope"]) == 2
    assert "no artifact matches" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- environment probe


def test_environment_probe_reads_this_machine():
    env = _env.probe_environment("onnxruntime", 3)
    assert set(env) == ENV_KEYS == set(_env.ENV_FIELDS)
    assert env["machine"] == os.uname().machine and env["kernel"] == os.uname().release
    assert env["hostname"] == os.uname().nodename and env["runtime"] == "onnxruntime" and env["threads"] == 3
    assert env["runtime_versions"]["onnxruntime"] == ort.__version__
    json.dumps(env)  # plain JSON


_PI4 = (
    "processor\t: 0\nBogoMIPS\t: 108.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd08\n\n"
    "Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
)
_QEMU = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"


def test_cpu_model_decodes_arm_cores_and_flags_qemu(monkeypatch):
    monkeypatch.setattr(_env, "_read", lambda p: _PI4 if str(p) == "/proc/cpuinfo" else None)
    monkeypatch.setattr(_env.platform, "machine", lambda: "aarch64")
    assert _env.cpu_model() == "ARM Cortex-A72 (Raspberry Pi 4 Model B Rev 1.4)"
    assert not _env.looks_emulated()
    monkeypatch.setattr(_env, "_read", lambda p: _QEMU if str(p) == "/proc/cpuinfo" else None)
    assert _env.looks_emulated() and "seen through qemu-user" in _env.cpu_model()
    assert not _env.looks_emulated(machine="x86_64")  # the same cpuinfo natively


def test_jetson_power_mode_from_nvpmodel(tmp_path, monkeypatch):
    exe = tmp_path / "nvpmodel"
    exe.write_text("#!/bin/sh\n[ \"$1\" = -q ] && printf 'NV Fan Mode:quiet\\nNV Power Mode: 15W\\n0\\n'\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert _env._jetson_power_mode() == "15W (mode 0)"
    assert _env.probe_environment()["jetson_power_mode"] == "15W (mode 0)"
