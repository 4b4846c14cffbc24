"""The local transport (this machine, and python in the emulated arm64 root) and the tvm-rpc transport.

Independent references: ``hashlib`` and ``os.statvfs`` on the same file system; ``Bundle.verify`` on the uploaded
copy; ONNX Runtime's own ``InferenceSession`` on the bundle's ONNX for the logits a TVM library returns over RPC.
The ssh transport has its own file (``test_ssh.py``: a real OpenSSH server).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgesep.bundle import open_bundle
from edgesep.devices import load_profile
from edgesep.devices.transports import (
    LocalTransport,
    RpcEngine,
    TransportError,
    TvmRpcTransport,
    default_workdir,
    fingerprint,
    open_transport,
)
from edgesep.errors import ConfigError

TRICKY = ["two words", "it's", '"dq"', "$(touch {m})", "`touch {m}`", "; touch {m}", "*", "\\", "", "a\nb", "ü ✓"]


def _write_profile(tmp: Path, name: str, **fields) -> object:
    lines = []
    for k, v in fields.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {json.dumps(v)}")
    for k, v in fields.items():
        if isinstance(v, dict):
            lines += [f"[{k}]", *(f"{kk} = {json.dumps(vv)}" for kk, vv in v.items())]
    path = tmp / f"{name}.toml"
    path.write_text(f'id = "{name}"\n' + "\n".join(lines) + "\n")
    return load_profile(path)


def _tree_hashes(d: Path) -> dict[str, str]:
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture
def local(tmp_path):
    p = _write_profile(tmp_path, "here", arch="native", transport="local", runtime="onnxruntime",
                       workdir=str(tmp_path / "work"))  # fmt: skip
    lines: list[str] = []
    with open_transport(p, log=lines.append) as t:
        yield t


# ------------------------------------------------------------------------------------------------------------ local


def test_local_run_args_env_exit_timeout(local, tmp_path):
    assert isinstance(local, LocalTransport)
    assert local.python_argv("-V") == [sys.executable, "-V"]  # python3 on the host profile: this interpreter
    marker = tmp_path / "PWNED"
    args = [a.format(m=marker) for a in TRICKY]
    r = local.run(local.python_argv("-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *args))
    assert json.loads(r.stdout) == args and not marker.exists()
    r = local.run(["python3", "-c", "import os; print(os.environ['EDGESEP_T'])"], env={"EDGESEP_T": "a $(b) 'c'"})
    assert r.stdout == "a $(b) 'c'\n"
    r = local.run(local.python_argv("-c", "import sys; sys.stderr.write('e'); sys.exit(4)"), check=False)
    assert (r.returncode, r.stderr) == (4, "e")
    with pytest.raises(TransportError, match=r"exited with 4"):
        local.run(local.python_argv("-c", "import sys; sys.exit(4)"))
    with pytest.raises(TransportError, match=r"ran past 0\.5 s"):
        local.run(["sleep", "10"], timeout=0.5)
    with pytest.raises(TransportError, match=r"cannot run 'no-such-program-edgesep'"):
        local.run(["no-such-program-edgesep"])


def test_local_files_and_bundle_sync(local, digits_bundle, tmp_path):
    wd = local.workdir()
    assert wd == str(tmp_path / "work") and Path(wd).is_dir()
    src = tmp_path / "x.bin"
    src.write_bytes(os.urandom(4096))
    local.put_file(src, f"{wd}/d/x.bin")
    assert local.sha256(f"{wd}/d/x.bin") == hashlib.sha256(src.read_bytes()).hexdigest()
    assert local.sha256(f"{wd}/nope") is None
    local.get_file(f"{wd}/d/x.bin", tmp_path / "back" / "x.bin")
    assert (tmp_path / "back" / "x.bin").read_bytes() == src.read_bytes()
    st = os.statvfs(wd)
    assert abs(local.free_disk_bytes(wd) - st.f_bavail * st.f_frsize) < 64 << 20

    remote, sent = local.put_bundle(digits_bundle)
    assert sent and _tree_hashes(Path(remote)) == _tree_hashes(digits_bundle)
    open_bundle(remote).close()  # verifies every hash
    assert local.put_bundle(digits_bundle) == (remote, False) and local.last_uploaded == []
    (Path(remote) / "manifest.json").unlink()
    _, sent = local.put_bundle(digits_bundle)
    assert sent and local.last_uploaded == ["manifest.json"]


def test_local_install_edgesep_is_importable_without_torch(local):
    lib = local.install_edgesep()
    code = (
        "import json, sys, edgesep.bundle, edgesep.runtimes; "
        "print(json.dumps([edgesep.__file__, 'torch' in sys.modules]))"
    )
    r = local.run(local.python_argv("-c", code), env={"PYTHONPATH": lib})
    where, torch_loaded = json.loads(r.stdout)
    assert where == f"{lib}/edgesep/__init__.py" and not torch_loaded
    assert local.install_edgesep() == lib and local.last_uploaded == []


def test_default_workdirs_and_wrong_transport(tmp_path):
    assert default_workdir(load_profile("rpi4")) == "~/edgesep"
    assert default_workdir(load_profile("arm64-qemu")) == "/opt/edgesep/work"
    assert default_workdir(load_profile("host")) == "~/.cache/edgesep/device/host"
    with pytest.raises(ConfigError, match=r"not 'local'"):
        LocalTransport(load_profile("rpi4"))
    with pytest.raises(ConfigError, match=r"not 'tvm-rpc'"):
        TvmRpcTransport(load_profile("host"))


def test_missing_emulated_root_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESEP_ARM64_ROOT", str(tmp_path / "no-root"))
    with pytest.raises(TransportError, match=r"edgesep device emulate arm64 --root"):
        open_transport(load_profile("arm64-qemu"))


def test_fingerprint_matches_ssh_keygen(tmp_path):
    """SHA256 fingerprints as OpenSSH prints them (ssh-keygen -lf is the reference)."""
    paramiko = pytest.importorskip("paramiko")
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen missing: apt-get install -y openssh-client")
    import subprocess

    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    want = subprocess.run(["ssh-keygen", "-lf", f"{key}.pub"], capture_output=True, text=True, check=True).stdout
    pub = paramiko.Ed25519Key(filename=str(key))
    assert fingerprint(pub) == want.split()[1]


@pytest.mark.arm64
def test_emulated_root_transport(arm64_root, digits_bundle, tmp_path):
    """python inside the qemu arm64 root: aarch64, arguments verbatim, a bundle copied in and verified there."""
    t = open_transport(load_profile("arm64-qemu"))
    args = [a.format(m="/tmp/PWNED") for a in TRICKY]
    code = "import json, platform, sys; print(json.dumps([platform.machine(), sys.argv[1:]]))"
    machine, got = json.loads(t.run(t.python_argv("-c", code, *args)).stdout)
    assert machine == "aarch64" and got == args
    with pytest.raises(ConfigError, match=r"only python runs there"):
        t.run(["ls"])
    remote, _ = t.put_bundle(digits_bundle)
    assert _tree_hashes(arm64_root / remote.lstrip("/")) == _tree_hashes(digits_bundle)
    assert t.put_bundle(digits_bundle) == (remote, False)
    lib = t.install_edgesep()
    verify = f"from edgesep.bundle import open_bundle; b = open_bundle({remote!r}); print(b.name, len(b.verify()))"
    r = t.run(t.python_argv("-c", verify), env={"PYTHONPATH": lib}, timeout=600)
    assert r.stdout.split()[0] == open_bundle(digits_bundle).name


# ---------------------------------------------------------------------------------------------------------- tvm-rpc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def host_lib(digits_bundle, tmp_path_factory):
    """A copy of the digits bundle with a TVM library for this host (batch 1, the "fused" pipeline: one build)."""
    pytest.importorskip("tvm")
    from edgesep.runtimes.tvm import compile_tvm

    b = tmp_path_factory.mktemp("rpc") / digits_bundle.name
    shutil.copytree(digits_bundle, b)
    art = compile_tvm(b, target="host", opt="fused", log=lambda _: None)
    return b, b / art.file


@dataclass
class RpcServer:
    port: int
    process: subprocess.Popen


def _start(argv: list[str], log: Path, ready: str) -> subprocess.Popen:
    """Start a TVM RPC server or tracker (own process group) and wait for ``ready`` in its log."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while ready not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"{argv[0]} did not start: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    """Kill the server's process group (it forks a worker per session)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def rpc_server(tmp_path_factory):
    """``python -m tvm.exec.rpc_server`` bound to loopback only (it runs whatever it is sent)."""
    pytest.importorskip("tvm")
    port = _free_port()
    log = tmp_path_factory.mktemp("rpc-server") / "server.log"
    argv = ["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)]
    proc = _start(argv, log, f"bind to 127.0.0.1:{port}")
    yield RpcServer(port, proc)
    _stop(proc)


def _ort_logits(bundle: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    with open_bundle(bundle) as b:
        path = str(b.path_of(b.artifact(kind="onnx", precision="fp32")))
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.mark.tvm
def test_tvm_rpc_engine_matches_onnxruntime(rpc_server, host_lib, tmp_path):
    bundle, lib = host_lib
    p = _write_profile(tmp_path, "rpc", arch="native", transport="tvm-rpc", address="127.0.0.1",
                       port=rpc_server.port, runtime="tvm", target="host")  # fmt: skip
    with open_transport(p) as t:
        assert isinstance(t, TvmRpcTransport)
        name = t.upload(lib)
        assert name == f"edgesep-{hashlib.sha256(lib.read_bytes()).hexdigest()[:16]}.so"
        eng = t.engine(lib, target="host")
        assert isinstance(eng, RpcEngine) and eng.input_shape[0] == 1
        with open_bundle(bundle) as b:
            x, ref = b.load_reference()
        x = x[:40]
        got = eng.run(x)  # 40 batch-1 calls over RPC
        want = _ort_logits(bundle, x)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
        assert (got.argmax(1) == ref[:40].argmax(1)).all()
        ms = eng.time_batch1(number=5, repeat=3)
        assert len(ms) == 3 and all(0 < v < 1e3 for v in ms)
        info = eng.info()
        assert info["transport"] == "tvm-rpc" and info["batch"] == 1 and info["server"].endswith(str(rpc_server.port))
        with pytest.raises(ConfigError, match=r"number and repeat"):
            eng.time_batch1(number=0)


@pytest.mark.tvm
def test_tvm_rpc_device_check_and_unreachable(rpc_server, tmp_path):
    from edgesep.devices.check import check_device

    p = _write_profile(tmp_path, "rpc", arch="native", transport="tvm-rpc", address="127.0.0.1",
                       port=rpc_server.port, runtime="tvm", target="host")  # fmt: skip
    res = check_device(p)
    assert res["ok"] and res["checks"][0]["name"] == "reachable"
    assert any(c.get("skipped") for c in res["checks"])

    dead = _write_profile(tmp_path, "dead", arch="native", transport="tvm-rpc", address="127.0.0.1",
                          port=_free_port(), runtime="tvm", target="host", connect_timeout=2)  # fmt: skip
    with pytest.raises(TransportError, match=r"python -m tvm\.exec\.rpc_server"):
        TvmRpcTransport(dead).connect()
    res = check_device(dead)
    assert not res["ok"] and res["checks"][0]["name"] == "reachable" and "rpc_server" in res["checks"][0]["fix"]


@pytest.mark.tvm
def test_tvm_rpc_through_a_tracker(host_lib, tmp_path):
    """A server registered with a local RPC tracker under a key; the transport asks the tracker for it."""
    pytest.importorskip("tvm")
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (pip install tornado)")

    bundle, lib = host_lib
    tport, sport = _free_port(), _free_port()
    tracker = _start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tport), "--port-end",
                      str(tport + 1)], tmp_path / "tracker.log", f"bind to 127.0.0.1:{tport}")  # fmt: skip
    server = None
    try:
        server = _start(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(sport), "--port-end",
                         str(sport + 1), "--tracker", f"127.0.0.1:{tport}", "--key", "edgesep-test"],
                        tmp_path / "server.log", "bind to 127.0.0.1")  # fmt: skip
        p = _write_profile(tmp_path, "trk", arch="native", transport="tvm-rpc", address="127.0.0.1",
                           port=tport, tracker_key="edgesep-test", runtime="tvm", target="host")  # fmt: skip
        with open_transport(p) as t:
            eng = t.engine(lib)
            with open_bundle(bundle) as b:
                x, _ = b.load_reference()
            np.testing.assert_allclose(eng.run(x[:8]), _ort_logits(bundle, x[:8]), rtol=1e-4, atol=1e-4)
            assert len(eng.time_batch1(number=2, repeat=2)) == 2
        wrong = _write_profile(tmp_path, "trk2", arch="native", transport="tvm-rpc", address="127.0.0.1",
                               port=tport, tracker_key="no-such-key", runtime="tvm", target="host",
                               connect_timeout=1)  # fmt: skip
        with pytest.raises(TransportError, match=r"no device with key 'no-such-key'.*edgesep-test"):
            TvmRpcTransport(wrong).connect()
    finally:
        if server is not None:
            _stop(server)
        _stop(tracker)


@pytest.mark.parametrize(
    ("value", "msg"), [("0", "is 0; must be in"), ("true", "must be a number"), ('"5"', "must be a number")]
)
def test_connect_timeout_is_validated(tmp_path, value, msg):
    path = tmp_path / "p.toml"
    head = 'id = "p"\narch = "native"\ntransport = "local"\nruntime = "onnxruntime"\n'
    path.write_text(f"{head}connect_timeout = {value}\n")
    with pytest.raises(ConfigError, match=rf"field 'connect_timeout' {msg}") as e:
        load_profile(path)
    assert str(path) in str(e.value)
    path.write_text(f"{head}connect_timeout = 2.5\n")
    assert load_profile(path).connect_timeout == 2.5
