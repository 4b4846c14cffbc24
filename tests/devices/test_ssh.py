"""The ssh transport against a REAL OpenSSH server on 127.0.0.1 (Debian's openssh-server), started by a fixture.

The server gets a fresh ed25519 host key, an unprivileged free port, key-only auth (a fresh client key) and the
internal SFTP server. Host-key fingerprints are checked against ``ssh-keygen -lf`` (an independent tool), file
contents against ``hashlib`` on this machine's side of the same file system, free space against ``os.statvfs``.
Skips with the reason when sshd is not installed or we are not root (sshd's privilege separation needs root).
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
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgesep.bundle import open_bundle
from edgesep.devices import load_profile
from edgesep.devices import transports as tr
from edgesep.devices.transports import (
    DiskFullError,
    HostKeyError,
    SshTransport,
    TransportError,
    open_transport,
)
from edgesep.errors import ConfigError

SSHD = "/usr/sbin/sshd"


# ------------------------------------------------------------------------------------------- a real sshd (fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgesep-test", "-f", str(path)], check=True)


def ssh_fingerprint(pub: Path) -> str:
    """``SHA256:...`` from ``ssh-keygen -lf`` (OpenSSH's own computation, independent of edgesep)."""
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], check=True, capture_output=True, text=True).stdout
    return out.split()[1]


@dataclass
class Sshd:
    dir: Path
    port: int
    host_pub: Path
    client_key: Path
    process: subprocess.Popen

    def known_hosts_line(self) -> str:
        kind, b64 = self.host_pub.read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {b64}\n"

    def profile(self, name: str, tmp: Path, *, known_hosts: str | None = None, **fields) -> object:
        """Write a profile TOML for this server (known_hosts pre-filled unless given) and load it."""
        kh = tmp / f"{name}.known_hosts"
        kh.write_text(self.known_hosts_line() if known_hosts is None else known_hosts)
        base = {
            "id": name, "arch": "native", "transport": "ssh", "address": "127.0.0.1", "port": self.port,
            "user": "root", "known_hosts": str(kh), "key": str(self.client_key), "python": sys.executable,
            "workdir": str(tmp / f"{name}-work"), "runtime": "onnxruntime", "connect_timeout": 5,
        }  # fmt: skip
        base.update(fields)
        lines = []
        tables = {k: v for k, v in base.items() if isinstance(v, dict)}
        for k, v in base.items():
            if not isinstance(v, dict):
                lines.append(f"{k} = {json.dumps(v)}")
        for k, v in tables.items():
            lines.append(f"[{k}]")
            lines += [f"{kk} = {json.dumps(vv)}" for kk, vv in v.items()]
        path = tmp / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return load_profile(path)

    def session_pids(self) -> list[int]:
        """The per-connection sshd processes: descendants of the listener whose command is sshd."""
        parent: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        found, frontier = [], {self.process.pid}
        while frontier:
            kids = {pid for pid, pp in parent.items() if pp in frontier}
            found += [k for k in kids if _comm(k) == "sshd"]
            frontier = kids
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_sshd(d: Path) -> Sshd:
    """Start ``/usr/sbin/sshd -D`` on a free loopback port with fresh keys in ``d``; wait for its banner."""
    if not Path(SSHD).is_file() or shutil.which("ssh-keygen") is None:
        pytest.skip(f"{SSHD} or ssh-keygen missing: apt-get install -y openssh-server (see .ci/arm64-setup)")
    if os.geteuid() != 0:
        pytest.skip("a test sshd needs root (privilege separation, login as root); run the tests as root")
    d.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    _keygen(d / "host_ed25519")
    _keygen(d / "client_ed25519")
    (d / "authorized_keys").write_text(Path(f"{d / 'client_ed25519'}.pub").read_text())
    port = _free_port()
    config = d / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host_ed25519'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
        "Subsystem sftp internal-sftp\nLogLevel ERROR\n"
    )
    t = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True)
    if t.returncode != 0:
        pytest.fail(f"sshd refuses the test config: {t.stderr}")
    log = open(d / "sshd.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    server = Sshd(d, port, d / "host_ed25519.pub", d / "client_ed25519", proc)
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return server
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text(errors='replace')}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture
def ssh(sshd, tmp_path):
    """A connected SshTransport to the test server (known host), closed after the test."""
    lines: list[str] = []
    with open_transport(sshd.profile("loop", tmp_path), log=lines.append) as t:
        t.lines = lines
        yield t


# ------------------------------------------------------------------------------------------------------ host keys


def test_unknown_host_key_is_refused_with_its_fingerprint(sshd, tmp_path):
    p = sshd.profile("unknown", tmp_path, known_hosts="")
    with pytest.raises(HostKeyError) as e:
        open_transport(p)
    fp = ssh_fingerprint(sshd.host_pub)
    msg = str(e.value)
    assert fp in msg and e.value.fingerprint == fp and not e.value.changed
    assert "--trust-new-host" in msg and "\n" not in msg
    assert Path(p.known_hosts).read_text() == ""  # nothing recorded without consent


def test_trust_new_host_prints_and_records_the_key(sshd, tmp_path):
    p = sshd.profile("trust", tmp_path, known_hosts="")
    lines: list[str] = []
    with open_transport(p, trust_new_host=True, log=lines.append) as t:
        assert t.run(["true"]).returncode == 0
    fp = ssh_fingerprint(sshd.host_pub)
    assert any(fp in line and p.known_hosts in line for line in lines)
    assert Path(p.known_hosts).read_text() == sshd.known_hosts_line()
    with open_transport(p) as t:  # now known: no trust needed
        assert t.run(["true"]).returncode == 0


def test_changed_host_key_is_refused_even_with_trust(sshd, tmp_path):
    other = tmp_path / "other_ed25519"
    _keygen(other)
    kind, b64 = Path(f"{other}.pub").read_text().split()[:2]
    p = sshd.profile("changed", tmp_path, known_hosts=f"[127.0.0.1]:{sshd.port} {kind} {b64}\n")
    before = Path(p.known_hosts).read_text()
    for trust in (False, True):
        with pytest.raises(HostKeyError) as e:
            open_transport(p, trust_new_host=trust)
        assert e.value.changed
        assert ssh_fingerprint(sshd.host_pub) in str(e.value) and ssh_fingerprint(Path(f"{other}.pub")) in str(e.value)
        assert "ssh-keygen -R" in str(e.value)
    assert Path(p.known_hosts).read_text() == before


# ----------------------------------------------------------------------------------------------- connection faults


def test_refused_port_and_wrong_key_and_missing_key(sshd, tmp_path):
    p = sshd.profile("refused", tmp_path, port=_free_port())
    t0 = time.monotonic()
    with pytest.raises(TransportError, match=r"cannot connect to root@127\.0\.0\.1") as e:
        open_transport(p)
    assert time.monotonic() - t0 < 5 and "\n" not in str(e.value)

    stranger = tmp_path / "stranger_ed25519"
    _keygen(stranger)
    p = sshd.profile("stranger", tmp_path, key=str(stranger))
    with pytest.raises(TransportError, match=r"authentication to .* failed .*ssh-copy-id"):
        open_transport(p)

    p = sshd.profile("nokey", tmp_path, key=str(tmp_path / "absent_key"))
    with pytest.raises(ConfigError, match=r"does not exist; create one with `ssh-keygen"):
        open_transport(p)


def test_connect_timeout_on_a_silent_server(sshd, tmp_path):
    """A port that accepts TCP but never sends an ssh banner: the connect timeout (1 s) ends it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    try:
        p = sshd.profile("silent", tmp_path, port=srv.getsockname()[1], connect_timeout=1)
        t0 = time.monotonic()
        with pytest.raises(TransportError, match=r"connect_timeout|timed out|cannot connect"):
            open_transport(p)
        assert time.monotonic() - t0 < 6
    finally:
        stop.set()
        th.join()
        for c in held:
            c.close()
        srv.close()


# -------------------------------------------------------------------------------------------------------- commands


TRICKY = [
    "two words",
    "it's",
    '"double"',
    "$(touch {marker})",
    "`touch {marker}`",
    "; touch {marker}",
    "a && touch {marker}",
    "*",
    "\\",
    "",
    "line\nbreak",
    "tab\there",
    "ünïcødé ✓",
    "$HOME",
    "--not-an-option",
]


def test_every_argument_arrives_verbatim(ssh, tmp_path):
    marker = tmp_path / "PWNED"
    args = [a.format(marker=marker) for a in TRICKY]
    r = ssh.run(ssh.python_argv("-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *args))
    assert json.loads(r.stdout) == args
    env = {"EDGESEP_T1": "a b $(touch " + str(marker) + ")", "EDGESEP_T2": "it's"}
    code = "import json, os; print(json.dumps([os.environ['EDGESEP_T1'], os.environ['EDGESEP_T2']]))"
    r = ssh.run(ssh.python_argv("-c", code), env=env)
    assert json.loads(r.stdout) == [env["EDGESEP_T1"], env["EDGESEP_T2"]]
    assert not marker.exists()  # no shell ever interpreted an argument


def test_exit_codes_and_output(ssh):
    r = ssh.run(ssh.python_argv("-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"),
                check=False)  # fmt: skip
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    with pytest.raises(TransportError, match=r"exited with 3") as e:
        ssh.run(ssh.python_argv("-c", "import sys; print('the tail'); sys.exit(3)"))
    assert "the tail" in str(e.value)
    big = ssh.run(ssh.python_argv("-c", "import sys; sys.stdout.write('x' * 3_000_000)"))  # > the ssh window
    assert len(big.stdout) == 3_000_000
    # a background child keeps stdout open after the command exits: run returns anyway (a short grace for output)
    t0 = time.monotonic()
    r = ssh.run(["sh", "-c", "sleep 20 & echo hi"])
    assert r.stdout == "hi\n" and time.monotonic() - t0 < 10


def test_command_timeout(ssh):
    t0 = time.monotonic()
    with pytest.raises(TransportError, match=r"ran past 1 s"):
        ssh.run(["sleep", "30"], timeout=1)
    assert time.monotonic() - t0 < 4
    assert ssh.run(["true"]).returncode == 0  # the connection is still usable


def test_connection_killed_mid_run(sshd, tmp_path):
    token = f"edgesep-drop-{uuid.uuid4().hex}"
    with open_transport(sshd.profile("drop", tmp_path)) as t:
        errors: list[BaseException] = []

        def go() -> None:
            try:
                t.run(t.python_argv("-c", "import time; time.sleep(20)", token), timeout=60)
            except BaseException as e:
                errors.append(e)

        th = threading.Thread(target=go)
        th.start()
        try:
            deadline = time.monotonic() + 10
            while not _pids_with(token) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _pids_with(token), "the remote command did not start"
            mine = sshd.session_pids()
            assert mine  # the server side of this connection (the only one open now)
            for pid in mine:  # kill it while `sleep` runs remotely
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            th.join(10)
            assert not th.is_alive()
        finally:
            for pid in _pids_with(token):  # the orphaned remote python
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        assert len(errors) == 1 and type(errors[0]) is TransportError
        msg = str(errors[0])
        assert "connection to 127.0.0.1 dropped while running" in msg
        assert "re-run the same command: uploads are skipped when unchanged" in msg and "\n" not in msg
        with pytest.raises(TransportError, match=r"closed|dropped"):
            t.run(["true"])
    assert sshd.process.poll() is None  # the listener survived: only the session died


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _pids_with(token: str) -> list[int]:
    out = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if token.encode() in cmd.read_bytes():
                out.append(int(cmd.parent.name))
        except OSError:
            continue
    return [p for p in out if p != os.getpid()]


# ------------------------------------------------------------------------------------------------------------ files


def _tree_hashes(d: Path) -> dict[str, str]:
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_put_bundle_uploads_skips_and_resumes(ssh, digits_bundle, tmp_path):
    remote, uploaded = ssh.put_bundle(digits_bundle)
    manifest_sha = hashlib.sha256((digits_bundle / "manifest.json").read_bytes()).hexdigest()
    assert uploaded and remote == f"{tmp_path / 'loop-work'}/bundles/{digits_bundle.name}-{manifest_sha[:12]}"
    assert _tree_hashes(Path(remote)) == _tree_hashes(digits_bundle)  # same machine: compare with hashlib
    assert ssh.last_uploaded[-1] == "manifest.json"  # the commit point goes last
    with open_bundle(remote) as b:
        assert b.verify() is not None

    again, uploaded = ssh.put_bundle(digits_bundle)
    assert (again, uploaded, ssh.last_uploaded) == (remote, False, [])

    # a half-finished upload: one file missing, a stale .part and the manifest never written
    victim = sorted(f for f in _tree_hashes(digits_bundle) if f != "manifest.json")[0]
    (Path(remote) / victim).unlink()
    (Path(remote) / "manifest.json").unlink()
    (Path(remote) / (victim + ".part")).write_bytes(b"half")
    _, uploaded = ssh.put_bundle(digits_bundle)
    assert uploaded and ssh.last_uploaded == [victim, "manifest.json"]
    assert _tree_hashes(Path(remote)) == _tree_hashes(digits_bundle)

    # a corrupted remote file is replaced; an unlisted one removed (the loader refuses unlisted files)
    (Path(remote) / victim).write_bytes(b"corrupt")
    (Path(remote) / "stray.txt").write_text("x")
    _, uploaded = ssh.put_bundle(digits_bundle)
    assert ssh.last_uploaded == [victim] and _tree_hashes(Path(remote)) == _tree_hashes(digits_bundle)


def test_full_disk_is_refused_before_sending(ssh, digits_bundle, monkeypatch):
    free = ssh.free_disk_bytes(ssh.workdir())
    monkeypatch.setattr(tr, "DISK_MARGIN_BYTES", free + 1)  # "the device" has less room than the margin
    with pytest.raises(DiskFullError, match=r"free space on the device, or set `workdir`"):
        ssh.put_bundle(digits_bundle)
    assert not list((Path(ssh.workdir()) / "bundles").glob(f"{digits_bundle.name}-*/manifest.json"))


def test_files_hashes_free_disk(ssh, tmp_path):
    wd = ssh.workdir()
    assert Path(wd).is_dir() and wd == str(tmp_path / "loop-work")
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(300_000))
    ssh.put_file(src, f"{wd}/blob.bin")
    assert ssh.sha256(f"{wd}/blob.bin") == hashlib.sha256(src.read_bytes()).hexdigest()
    assert ssh.sha256(f"{wd}/absent") is None
    back = tmp_path / "back" / "blob.bin"
    ssh.get_file(f"{wd}/blob.bin", back)
    assert back.read_bytes() == src.read_bytes()
    assert not list(back.parent.glob(".*tmp"))
    with pytest.raises(TransportError, match=r"does not exist on the device"):
        ssh.get_file(f"{wd}/absent", tmp_path / "absent")
    st = os.statvfs(wd)
    assert abs(ssh.free_disk_bytes(wd) - st.f_bavail * st.f_frsize) < 64 << 20
    assert abs(ssh.free_disk_bytes(f"{wd}/not/yet/made") - st.f_bavail * st.f_frsize) < 64 << 20


def test_tilde_workdir_is_the_remote_home(sshd, tmp_path, monkeypatch):
    p = sshd.profile("tilde", tmp_path, workdir=f"~/edgesep-test-{uuid.uuid4().hex[:8]}")
    with open_transport(p) as t:
        wd = t.workdir()
        try:
            home = t.run(t.python_argv("-c", "import os; print(os.path.expanduser('~'))")).stdout.strip()
            assert wd == home + p.workdir[1:] and Path(wd).is_dir()
        finally:
            shutil.rmtree(wd, ignore_errors=True)


def test_install_edgesep_syncs_the_device_package(ssh):
    lib = ssh.install_edgesep()
    code = (
        "import json, sys, edgesep, edgesep.bundle, edgesep.runtimes; "
        "print(json.dumps([edgesep.__file__, 'torch' in sys.modules]))"
    )
    r = ssh.run(ssh.python_argv("-c", code), env={"PYTHONPATH": lib})
    where, torch_loaded = json.loads(r.stdout)
    assert where == f"{lib}/edgesep/__init__.py" and not torch_loaded
    assert ssh.last_uploaded  # first time: everything
    ssh.install_edgesep()
    assert ssh.last_uploaded == []  # unchanged: nothing sent (pycache written by the import is ignored)


def test_wrong_transport_is_a_config_error(sshd, tmp_path):
    with pytest.raises(ConfigError, match=r"not 'ssh'"):
        SshTransport(load_profile("host"))
