"""TVM: compile a bundle (host, rpi4 cross-compile, int8 QDQ), run the library locally and over RPC, the CLI.

Two tiny digits runs (kron_mlp and mlp, 2 epochs) are exported and quantized once per module. Independent
references: the test's own ONNX Runtime sessions on the bundle's ONNX files, the ELF header read byte by byte,
sha256 of the files, a loopback RPC server started as its own process.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'edgesep[tvm]')")
pytest.importorskip("torch")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxsim")

from edgesep._io import sha256_file  # noqa: E402
from edgesep.bundle import open_bundle  # noqa: E402
from edgesep.errors import BundleContentError, ConfigError, UnknownNameError  # noqa: E402
from edgesep.export import export_run, quantize_bundle  # noqa: E402
from edgesep.runtimes import get_backend  # noqa: E402
from edgesep.runtimes.tvm import (  # noqa: E402
    PIPELINES,
    CompilerMissingError,
    TvmRuntime,
    compile_tvm,
    run_rpc,
)

pytestmark = [pytest.mark.tvm, pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")]

REPO = Path(__file__).resolve().parents[2]
HAS_AARCH64_GCC = shutil.which("aarch64-linux-gnu-gcc") is not None
EM_AARCH64 = 183  # ELF e_machine of aarch64


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_run) -> dict[str, Path]:
    """kron_mlp and mlp digits bundles, each with model.onnx, model.int8.onnx and a clean eval set of 200."""
    root = tmp_path_factory.mktemp("tvm")
    out = {}
    for model in ("kron_mlp", "mlp"):
        run = tiny_run(model)
        b = root / f"{model}.bundle"
        export_run(run, b, eval_sets="clean:200", log=_quiet, progress=False)
        quantize_bundle(b, calib=128, max_drop=100, max_robust_drop=100, log=_quiet)
        out[model] = b
    return out


@pytest.fixture(scope="module")
def host_fp32(bundles) -> dict[str, Path]:
    """Host fp32 builds: kron_mlp with the default (measure every pipeline), mlp with one pipeline."""
    compile_tvm(bundles["kron_mlp"], target="host", log=_quiet)
    compile_tvm(bundles["mlp"], target="host", opt="fused", log=_quiet)
    return bundles


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _clean(bundle_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    with open_bundle(bundle_dir) as b:
        return b.load_eval_set("clean")


@pytest.mark.parametrize("model", ["kron_mlp", "mlp"])
def test_host_build_matches_onnxruntime_fp32(host_fp32, model):
    d = host_fp32[model]
    x, _ = _clean(d)
    with open_bundle(d) as b:
        art = b.artifact(kind="tvm-lib", precision="fp32", target="host")
        rt = get_backend("tvm")(b.path_of(art), precision="fp32", target="host")
        ref = _ort(b.path_of(b.artifact(kind="onnx", precision="fp32")), x)
    assert isinstance(rt, TvmRuntime)
    got = rt.run(x)
    assert got.dtype == np.float32 and got.shape == ref.shape == (200, 10)
    assert np.max(np.abs(got - ref)) <= 1e-5
    assert np.array_equal(got.argmax(1), ref.argmax(1))
    info = rt.info()
    assert (info["backend"], info["precision"], info["target"], info["batch"]) == ("tvm", "fp32", "host", 1)
    assert info["input_shape"] == [1, 1, 8, 8] and info["version"].startswith("0.27")


def test_artifact_in_manifest_and_verifies(host_fp32):
    d = host_fp32["kron_mlp"]
    with open_bundle(d) as b:  # verifies every sha256
        art = b.artifact(kind="tvm-lib", precision="fp32", target="host")
        assert (art.id, art.file) == ("tvm-lib-fp32-host", "model.host.so")
        assert art.sha256 == sha256_file(d / "model.host.so")
        x = art.extra
    assert x["tvm_version"].startswith("0.27") and x["batch"] == 1 and x["input_shape"] == [1, 1, 8, 8]
    assert x["target"]["kind"] == "llvm" and x["target"]["num-cores"] >= 1
    # opt="default" measured every no-search pipeline and kept the fastest correct one
    assert set(x["pipeline_candidates"]) == set(PIPELINES) and x["pipeline"] in PIPELINES
    ok = {p: r for p, r in x["pipeline_candidates"].items() if r["ok"]}
    assert x["pipeline"] == min(ok, key=lambda p: ok[p]["latency_ms"])
    lat = x["host_latency_ms"]
    assert lat["tvm"] > 0 and lat["onnxruntime"] > 0 and lat["batch"] == 1
    assert x["default_runtime"] == ("onnxruntime" if lat["onnxruntime"] <= lat["tvm"] else "tvm")
    assert x["parity"]["ok"] and x["parity"]["max_rel_err"] <= 1e-4
    json.dumps(x)  # plain JSON


def test_static_batch_chunks_and_pads(host_fp32, tmp_path):
    d = Path(shutil.copytree(host_fp32["mlp"], tmp_path / "mlp.bundle"))
    art = compile_tvm(d, target="host", batch=4, opt="fused", log=_quiet)
    assert art.extra["batch"] == 4 and art.extra["input_shape"] == [4, 1, 8, 8]
    x, _ = _clean(d)
    rt = TvmRuntime(d / art.file, precision="fp32", target="host")
    ref = _ort(d / "model.onnx", x[:7])
    got = rt.run(x[:7])  # two chunks of 4, the second zero-padded
    assert got.shape == (7, 10) and np.max(np.abs(got - ref)) <= 1e-5
    assert rt.run(x[:0]).shape == (0, 10)
    with pytest.raises(Exception, match="shape"):
        rt.run(np.zeros((2, 1, 9, 9), np.float32))


@pytest.mark.skipif(not HAS_AARCH64_GCC, reason="no aarch64-linux-gnu-gcc: apt-get install gcc-aarch64-linux-gnu")
def test_rpi4_cross_compile_is_aarch64_elf(bundles, tmp_path):
    d = Path(shutil.copytree(bundles["kron_mlp"], tmp_path / "kron.bundle"))
    art = compile_tvm(d, target="rpi4", opt="fused", log=_quiet)
    lib = d / art.file
    head = lib.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 2  # ELFCLASS64
    assert int.from_bytes(head[18:20], "little" if head[5] == 1 else "big") == EM_AARCH64
    assert (art.id, art.kind, art.target, art.file) == ("tvm-lib-fp32-rpi4", "tvm-lib", "rpi4", "model.rpi4.so")
    assert art.extra["target"]["mcpu"] == "cortex-a72" and art.extra["cc"] == "aarch64-linux-gnu-gcc"
    assert "host build" in art.extra["host_latency_ms"]["measured_on"]  # a proxy: the library cannot run here
    assert "preferred_for" not in art.extra
    with open_bundle(d) as b:
        assert b.artifact(id="tvm-lib-fp32-rpi4").sha256 == sha256_file(lib)
    if os.uname().machine not in ("aarch64", "arm64"):
        with pytest.raises(BundleContentError, match="aarch64"):
            TvmRuntime(lib, precision="fp32", target="rpi4")


def test_arm_int8_expects_onnxruntime_kernels(bundles):
    from edgesep.runtimes.tvm import _int8_note

    with open_bundle(bundles["kron_mlp"]) as b:
        q = _int8_note(b, "rpi4", "aarch64", False, {"tvm": 1.0, "onnxruntime": 2.0})
    assert q["expected_winner"] == "onnxruntime" and q["alternative"]["artifact"] == "onnx-int8-any"
    assert q["measured_here"] is False and "measure" in q["must_measure_on_device"]


def test_missing_cross_compiler_names_the_package(bundles, monkeypatch):
    import edgesep.runtimes.tvm as tvm_rt

    real = shutil.which
    monkeypatch.setattr(tvm_rt.shutil, "which", lambda c, *a, **k: None if "aarch64" in c else real(c, *a, **k))
    before = sha256_file(bundles["mlp"] / "manifest.json")
    with pytest.raises(CompilerMissingError, match="apt-get install gcc-aarch64-linux-gnu"):
        compile_tvm(bundles["mlp"], target="rpi5", log=_quiet)
    assert sha256_file(bundles["mlp"] / "manifest.json") == before


def test_unknown_target_and_bad_options(bundles):
    with pytest.raises(UnknownNameError, match="host, rpi4, rpi5"):
        compile_tvm(bundles["mlp"], target="rpi9", log=_quiet)
    with pytest.raises(ConfigError, match="precision"):
        compile_tvm(bundles["mlp"], precision="fp16", log=_quiet)
    with pytest.raises(ConfigError, match="opt"):
        compile_tvm(bundles["mlp"], opt="tuned", log=_quiet)


@pytest.fixture
def rpc_server():
    """A TVM RPC server on 127.0.0.1 only (it runs whatever it is sent), in its own process group.

    The process runs ``tvm.rpc.server.PopenRPCServerState``, the server loop that ``python -m tvm.exec.rpc_server``
    runs in a worker process; started directly it imports TVM once instead of twice (half the start-up time).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "from tvm.rpc.server import PopenRPCServerState\n"
        f"s = PopenRPCServerState('127.0.0.1', {port}, {port + 1})\n"
        "print('listening', s.port, flush=True)\n"
        "s.thread.join()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)  # import tvm takes seconds on a loaded machine
        line = proc.stdout.readline() if ready else ""  # "listening PORT", or EOF if the server died
        if not line.startswith("listening"):
            pytest.fail(f"the RPC server did not start (exit code {proc.poll()})")
        yield "127.0.0.1", int(line.split()[1])
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server forks one child per session: kill the whole group
        proc.wait(10)
        proc.stdout.close()


def test_rpc_round_trip_matches_local(host_fp32, rpc_server):
    d = host_fp32["kron_mlp"]
    x, _ = _clean(d)
    lib = d / "model.host.so"
    local = TvmRuntime(lib, precision="fp32").run(x[:9])
    logits, timings = run_rpc(lib, *rpc_server, x[:9], number=5, repeat=2)
    np.testing.assert_allclose(logits, local, rtol=0, atol=1e-6)
    assert timings["number"] == 5 and timings["repeat"] == 2 and len(timings["results_ms"]) == 2
    assert all(t > 0 for t in timings["results_ms"]) and timings["batch"] == 1


def test_int8_qdq_build_agrees_with_onnxruntime_int8(bundles, tmp_path):
    d = Path(shutil.copytree(bundles["kron_mlp"], tmp_path / "kron.bundle"))
    art = compile_tvm(d, target="host", precision="int8", opt="fused", log=_quiet)
    assert (art.file, art.precision) == ("model.host.int8.so", "int8")
    x, _ = _clean(d)
    got = TvmRuntime(d / art.file, precision="int8", target="host").run(x)
    ref = _ort(d / "model.int8.onnx", x)
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.99
    lat = art.extra["host_latency_ms"]
    assert all(lat[k] > 0 for k in ("tvm", "onnxruntime", "tvm_fp32", "onnxruntime_fp32"))
    assert art.extra["int8"]["measured_here"] is True
    assert art.extra["int8"]["winner_measured"] in ("onnxruntime", "tvm")


def test_runtime_imports_no_torch_onnx_or_onnxruntime(host_fp32):
    lib = host_fp32["mlp"] / "model.host.so"
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx", "onnxruntime", "typer"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import numpy as np
from edgesep.runtimes import get_backend
rt = get_backend("tvm")({str(lib)!r}, precision="fp32", target="host")
print(rt.run(np.zeros((3, 1, 8, 8), np.float32)).shape)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("(3, 10)")


def test_cli_compile_host(bundles, tmp_path):
    d = Path(shutil.copytree(bundles["mlp"], tmp_path / "mlp.bundle"))
    r = subprocess.run(
        [sys.executable, "-m", "edgesep", "compile", str(d), "--backend", "tvm", "--target", "host", "--opt", "fused"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    with open_bundle(d) as b:
        art = b.artifact(kind="tvm-lib", target="host")
    assert art.sha256 in r.stdout and "model.host.so" in r.stdout
    assert "ONNX Runtime stays the default" in r.stdout or "TVM is faster than ONNX Runtime" in r.stdout


def test_cli_unknown_target_is_one_red_line(bundles, capsys):
    from edgesep.cli import main

    assert main(["compile", str(bundles["mlp"]), "--target", "rpi9"]) == 2
    err = capsys.readouterr().err
    assert "unknown target 'rpi9'" in err and "Traceback" not in err


def test_missing_tvm_is_a_typed_error(tmp_path):
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tvm":
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from edgesep.errors import BackendMissingError
from edgesep.runtimes import get_backend
cls = get_backend("tvm")
assert cls.available() is False
try:
    cls("model.host.so", precision="fp32")
except BackendMissingError as e:
    print("missing:", e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pip install 'edgesep[tvm]'" in r.stdout
