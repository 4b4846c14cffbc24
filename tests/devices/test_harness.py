"""`edgesep bench`: the host harness deploys a bundle, runs the on-device runner there and collects the results.

Devices: this machine (``host``, local transport), a real OpenSSH server on loopback (the sshd of ``test_ssh.py``)
and a real TVM RPC server on loopback (``tvm-rpc``: the runner drives the library on the server). References: the
accuracies in every fetched result are recomputed here with ONNX Runtime directly on the bundle's eval sets; the
RPC result's clean accuracy is compared with the ONNX Runtime one (the TVM library must agree with it).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from edgesep.cli import main
from edgesep.devices._result import load_result
from edgesep.devices.harness import BenchError, BenchOptions, bench, result_name, summarize
from edgesep.errors import BundleLookupError, ConfigError

FAST = BenchOptions(min_runs=20, min_seconds=0.05, warmup=2, throughput_seconds=0.05, square_queries=10, square_eps=0.1,
                    square_n=10, max_eval=100)  # fmt: skip


def _support(file: str):
    """A sibling test module (its fixtures' helpers), loaded under a private name (no ``from conftest``)."""
    name = f"edgesep_tests_{Path(file).stem}_support"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(file))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture
def bundle(digits_bundle, tmp_path) -> Path:
    b = tmp_path / digits_bundle.name
    shutil.copytree(digits_bundle, b)
    return b


def _ort_accuracy(bundle: Path, onnx_file: str, eval_file: str, n: int) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle / onnx_file), providers=["CPUExecutionProvider"])
    with np.load(bundle / eval_file) as z:
        x, y = z["x"][:n], z["y"][:n]
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float((logits.argmax(1) == y).mean())


def _check_against_ort(bundle: Path, result: dict) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = {e["id"]: e["file"] for e in manifest["eval_sets"]}
    onnx_file = result["artifact"]["file"] if result["artifact"]["kind"] == "onnx" else "model.onnx"
    for entry in [result["accuracy"]["clean"], *result["accuracy"]["adversarial"]]:
        want = _ort_accuracy(bundle, onnx_file, files[entry["eval_set"]], entry["n"])
        assert entry["accuracy"] == pytest.approx(want, abs=1e-9), entry


def test_host_bench_runs_every_artifact_and_resumes(bundle, tmp_path):
    out = tmp_path / "results"
    lines: list[str] = []
    paths = bench(bundle, "host", out, select="all", options=FAST, log=lines.append)
    manifest = json.loads((bundle / "manifest.json").read_text())
    ids = {a["id"] for a in manifest["artifacts"]}
    assert {p.name for p in paths} == {result_name(manifest["name"], i, "host") for i in ids}
    for p in paths:
        r = load_result(p)
        assert r["status"] == "complete" and r["device"]["profile"] == "host"
        assert r["device"]["transport"] == "local" and r["device"]["emulated"] is False
        assert r["latency"]["n"] >= FAST.min_runs and r["accuracy"]["query"][0]["queries"] == FAST.square_queries
        assert r["settings"]["square_queries"] == FAST.square_queries
        _check_against_ort(bundle, r)
    # a second run keeps complete results with the same artifact and settings
    mtimes = {p: p.stat().st_mtime_ns for p in paths}
    lines.clear()
    again = bench(bundle, "host", out, select="all", options=FAST, log=lines.append)
    assert sorted(again) == sorted(paths) and all(p.stat().st_mtime_ns == mtimes[p] for p in paths)
    assert sum("already in" in ln for ln in lines) == len(paths)
    # other settings or --force re-measure
    one = next(iter(sorted(ids)))
    forced = bench(bundle, "host", out, artifact_id=one, options=FAST, force=True, log=lines.append)
    assert len(forced) == 1 and forced[0].stat().st_mtime_ns != mtimes[forced[0]]
    rows = summarize(paths)
    assert {r["artifact"] for r in rows} == ids and all(r["status"] == "complete" for r in rows)


def test_bench_runs_the_recorded_winner_by_default_and_says_why(bundle, tmp_path, capsys, monkeypatch):
    from edgesep.bundle import open_bundle
    from edgesep.cli import out_console
    from edgesep.runtimes import load
    from edgesep.runtimes.tvm import compile_tvm
    from edgesep.runtimes.tvm_tune import record_winner

    # no winner recorded: one artifact per precision, the profile's runtime (ONNX Runtime) first, and why
    lines: list[str] = []
    paths = bench(bundle, "host", tmp_path / "r1", options=FAST, log=lines.append)
    got = {load_result(p)["artifact"]["id"]: load_result(p)["artifact"]["selected_because"] for p in paths}
    assert set(got) == {"onnx-fp32-any", "onnx-int8-any"}
    assert all("no recorded winner for target 'host'" in why for why in got.values())
    # a TVM library for this machine, recorded as the winner for 'host' (as `edgesep compile --tune-trials` does)
    art = compile_tvm(bundle, target="host", opt="fused", log=lambda _: None)
    with open_bundle(bundle) as b:
        record_winner(b, "host", art.id, "tuned TVM 0.01 ms vs ONNX Runtime 0.02 ms (test)", {"tvm_ms": 0.01})
    with load(bundle) as s:  # the app's API picks the same artifact
        assert s.artifact.id == art.id
    lines.clear()
    paths = bench(bundle, "host", tmp_path / "r2", options=FAST, log=lines.append)
    results = {load_result(p)["artifact"]["id"]: load_result(p) for p in paths}
    assert set(results) == {art.id, "onnx-int8-any"}  # fp32: the winner, not the ONNX file; int8 unchanged
    r = results[art.id]
    assert r["artifact"]["backend"] == "tvm" and r["status"] == "complete"
    why = r["artifact"]["selected_because"]
    assert why.startswith("recorded winner for target 'host': tuned TVM 0.01 ms") and "onnx-fp32-any" in why
    assert "--all" in why and any(f"{art.id} on host: selected because recorded winner" in ln for ln in lines)
    _check_against_ort(bundle, r)  # the library agrees with ONNX Runtime fp32 (same clean accuracy)
    # the CLI says why under its table; --all runs every artifact
    monkeypatch.setattr(out_console, "width", 220)
    capsys.readouterr()
    assert main(["bench", str(bundle), "--out", str(tmp_path / "r2"), "--min-runs", "20", "--min-seconds", "0.05",
                 "--max-eval", "100"]) == 0  # fmt: skip
    assert f"{art.id} ran because: recorded winner for target 'host'" in capsys.readouterr().out
    every = bench(bundle, "host", tmp_path / "r3", select="all", options=FAST, log=lambda _: None)
    assert {load_result(p)["artifact"]["id"] for p in every} == {"onnx-fp32-any", "onnx-int8-any", art.id}
    with pytest.raises(ConfigError, match="winner, all"):
        bench(bundle, "host", tmp_path / "r4", select="best", options=FAST, log=lambda _: None)


def test_missing_artifact_and_bad_out_are_one_line_errors(bundle, tmp_path, capsys):
    with pytest.raises(BundleLookupError, match="nope"):
        bench(bundle, "host", tmp_path / "r", artifact_id="nope", options=FAST, log=lambda _: None)
    assert main(["bench", str(bundle), "--artifact", "nope", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "onnx-fp32-any" in err and "Traceback" not in err
    (tmp_path / "afile").write_text("x")
    assert main(["bench", str(bundle), "--out", str(tmp_path / "afile")]) == 2
    assert main(["bench", str(bundle), "--device", "no-such-device"]) == 2
    assert not list((tmp_path / "r").glob("*.json")) if (tmp_path / "r").exists() else True


def test_runtime_version_mismatch_and_wrong_arch_stop_before_running(bundle, tmp_path, capsys):
    import platform

    from edgesep.devices import load_profile

    def profile(name: str, **fields: str) -> Path:
        host = load_profile("host").to_dict()
        lines = [f'id = "{name}"', 'transport = "local"', 'runtime = "onnxruntime"', 'python = "python3"',
                 f'arch = "{fields.get("arch", "native")}"', "[versions]",
                 f'onnxruntime = "{fields.get("ort", ">=1.0")}"']  # fmt: skip
        assert host["transport"] == "local"
        p = tmp_path / f"{name}.toml"
        p.write_text("\n".join(lines) + "\n")
        return p

    out = tmp_path / "r"
    assert main(["bench", str(bundle), "--device", str(profile("old", ort=">=99")), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "expects >=99" in err and "Traceback" not in err
    other = "aarch64" if platform.machine() == "x86_64" else "x86_64"
    assert main(["bench", str(bundle), "--device", str(profile("wrongarch", arch=other)), "--out", str(out)]) == 2
    assert "edgesep device check" in capsys.readouterr().err
    assert not list(out.glob("*.json")) if out.exists() else True


def test_nothing_for_the_target_says_how_to_compile(bundle, tmp_path):
    # rpi4 runs TVM libraries built for rpi4; this bundle has none, and its ONNX artifacts are portable (target
    # "any") -- so a tvm-only device has nothing to run
    from edgesep.bundle import open_bundle
    from edgesep.devices import load_profile
    from edgesep.devices.harness import device_artifacts

    with open_bundle(bundle) as b:
        with pytest.raises(BundleLookupError, match="edgesep compile BUNDLE --backend tvm --target rpi4"):
            device_artifacts(b, load_profile("rpi4"), ["tvm"])
        with pytest.raises(BenchError, match="lacks"):
            device_artifacts(b, load_profile("rpi4"), ["tvm"], artifact_id="onnx-fp32-any")


def test_cli_bench_prints_the_summary(bundle, tmp_path, capsys, monkeypatch):
    from edgesep.cli import out_console

    monkeypatch.setattr(out_console, "width", 220)  # a wide terminal: no folded cells
    code = main(["bench", str(bundle), "--out", str(tmp_path / "res"), "--artifact", "onnx-fp32-any",
                 "--min-runs", "10", "--min-seconds", "0.05", "--max-eval", "50"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "onnx-fp32-any" in out and "complete" in out


def test_ssh_bench_uploads_once_and_collects(bundle, tmp_path):
    ssh = _support("test_ssh.py")
    server = ssh.start_sshd(tmp_path / "sshd")
    try:
        profile = server.profile("loop", tmp_path)
        lines: list[str] = []
        paths = bench(bundle, profile, tmp_path / "res", artifact_id="onnx-fp32-any", options=FAST,
                      log=lines.append)  # fmt: skip
        r = load_result(paths[0])
        assert r["status"] == "complete" and r["device"]["transport"] == "ssh" and r["device"]["profile"] == "loop"
        _check_against_ort(bundle, r)
        lines.clear()
        bench(bundle, profile, tmp_path / "res", artifact_id="onnx-fp32-any", options=FAST, force=True,
              log=lines.append)  # fmt: skip
        assert any("not re-sent" in ln for ln in lines), lines
    finally:
        server.stop()


@pytest.mark.tvm
def test_tvm_rpc_bench_measures_the_library_on_the_server(digits_bundle, tmp_path_factory, tmp_path):
    pytest.importorskip("tvm")
    tr = _support("test_transports.py")
    from edgesep.runtimes.tvm import compile_tvm

    b = tmp_path / digits_bundle.name
    shutil.copytree(digits_bundle, b)
    art = compile_tvm(b, target="host", opt="fused", log=lambda _: None)
    port = tr._free_port()
    log = tmp_path / "server.log"
    proc = tr._start(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end",
                      str(port + 1)], log, f"bind to 127.0.0.1:{port}")  # fmt: skip
    try:
        profile = tr._write_profile(tmp_path, "rpc", arch="native", transport="tvm-rpc", address="127.0.0.1",
                                    port=port, runtime="tvm", target="host")  # fmt: skip
        paths = bench(b, profile, tmp_path / "res", options=FAST, log=lambda _: None)
        assert len(paths) == 1
        r = load_result(paths[0])
        assert r["status"] == "complete" and r["artifact"]["id"] == art.id
        assert r["device"]["transport"] == "tvm-rpc"
        _check_against_ort(b, r)  # the library on the server agrees with ONNX Runtime fp32 here
    finally:
        tr._stop(proc)
