"""Device profiles: the shipped ones validate, bad fields are typed errors naming file and field, the CLI lists them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgesep.devices import PROFILES_DIR, DeviceProfile, list_profiles, load_profile
from edgesep.errors import ConfigError, UnknownNameError

SHIPPED = ("host", "arm64-qemu", "rpi4", "rpi5", "jetson-orin-nano", "jetson-agx-orin")

SSH_OK = """
id = "mydev"
arch = "aarch64"
transport = "ssh"
address = "10.0.0.5"
user = "me"
known_hosts = "~/.ssh/known_hosts"
key = "~/.ssh/id_ed25519"
runtime = "onnxruntime"
"""


def _write(tmp_path: Path, text: str, name: str = "dev.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGESEP_PROFILES_DIR"}
    return {**env, "COLUMNS": "250", **extra}


@pytest.fixture(autouse=True)
def _no_user_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGESEP_PROFILES_DIR", raising=False)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads_and_validates(name: str) -> None:
    p = load_profile(name)
    assert isinstance(p, DeviceProfile) and p.id == name and p.shipped
    assert Path(p.source).name == f"{name}.toml"
    assert p.arch in ("x86_64", "aarch64") and p.transport in ("local", "ssh", "tvm-rpc")
    assert p.runtime in ("onnxruntime", "tvm", "tensorrt")
    if p.transport == "ssh":
        assert p.address and p.user and p.known_hosts and p.key


def test_shipped_set_and_specific_fields() -> None:
    assert sorted(p.id for p in list_profiles()) == sorted(SHIPPED)
    assert sorted(f.stem for f in PROFILES_DIR.glob("*.toml")) == sorted(SHIPPED)
    qemu = load_profile("arm64-qemu")
    assert qemu.emulated and qemu.transport == "local" and qemu.arch == "aarch64" and qemu.root
    assert "timing" in qemu.notes or "latency" in qemu.notes
    for jetson in ("jetson-orin-nano", "jetson-agx-orin"):
        p = load_profile(jetson)
        assert p.runtime == "tensorrt" and p.versions == {"onnxruntime": ">=1.18", "tensorrt": "10.3.*"}
    assert not load_profile("host").emulated and load_profile("host").root_path() is None


def test_shipped_tvm_targets_are_runtimes_tvm_names() -> None:
    """Profiles name targets that runtimes/tvm.py defines (the dicts are not copied)."""
    pytest.importorskip("numpy")
    from edgesep.runtimes.tvm import TARGETS

    for p in list_profiles():
        if p.target is not None:
            assert isinstance(p.target, str) and p.target in TARGETS, p.id
    assert load_profile("rpi4").target == "rpi4" and load_profile("rpi5").target == "rpi5"


def test_emulated_root_path_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EDGESEP_ARM64_ROOT", raising=False)
    assert load_profile("arm64-qemu").root_path() == Path("~/.cache/edgesep/arm64-root").expanduser()
    monkeypatch.setenv("EDGESEP_ARM64_ROOT", str(tmp_path))
    assert load_profile("arm64-qemu").root_path() == tmp_path


def test_unknown_id_lists_shipped_ids() -> None:
    with pytest.raises(UnknownNameError) as e:
        load_profile("rpi3")
    for name in SHIPPED:
        assert name in str(e.value)


def test_user_profile_from_path(tmp_path: Path) -> None:
    path = _write(tmp_path, SSH_OK)
    p = load_profile(path)
    assert p.id == "mydev" and p.address == "10.0.0.5" and not p.shipped and p.source == str(path)
    assert load_profile(str(path)) == p


def test_user_profiles_from_env_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, SSH_OK)
    _write(
        tmp_path,
        """
        id = "rpc-board"
        arch = "aarch64"
        transport = "tvm-rpc"
        tracker_key = "rasp4b"
        runtime = "tvm"
        target = {kind = "llvm", mtriple = "aarch64-linux-gnu", mcpu = "cortex-a53", num-cores = 4}
        """,
        "rpc.toml",
    )
    monkeypatch.setenv("EDGESEP_PROFILES_DIR", str(tmp_path))
    ids = [p.id for p in list_profiles()]
    assert set(SHIPPED) <= set(ids) and {"mydev", "rpc-board"} <= set(ids)
    assert load_profile("mydev").user == "me"
    assert load_profile("rpc-board").target["mcpu"] == "cortex-a53"


def test_user_profile_clashing_with_shipped_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, SSH_OK.replace('"mydev"', '"rpi4"'))
    monkeypatch.setenv("EDGESEP_PROFILES_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=r"'id'.*already"):
        list_profiles()


BASE_LOCAL = 'id = "d"\narch = "x86_64"\ntransport = "local"\nruntime = "onnxruntime"\n'
SSH_LINES = [line for line in SSH_OK.strip().splitlines()]


def _ssh_without(field: str) -> str:
    return "\n".join(line for line in SSH_LINES if not line.startswith(f"{field} ")) + "\n"


@pytest.mark.parametrize(
    ("text", "field", "hint"),
    [
        (SSH_OK + 'password = "hunter2"\n', "password", "key"),
        (BASE_LOCAL + 'colour = "red"\n', "colour", "unknown"),
        (BASE_LOCAL.replace('id = "d"\n', ""), "id", "missing"),
        (BASE_LOCAL.replace('runtime = "onnxruntime"\n', ""), "runtime", "missing"),
        (BASE_LOCAL + 'port = "22"\n', "port", "integer"),
        (BASE_LOCAL + "port = 70000\n", "port", "65535"),
        (BASE_LOCAL + "emulated = 1\n", "emulated", "true or false"),
        (BASE_LOCAL + 'versions = ">=1"\n', "versions", "table"),
        (BASE_LOCAL + "target = 3\n", "target", "string"),
        (BASE_LOCAL.replace('"x86_64"', '"riscv64"'), "arch", "aarch64"),
        (BASE_LOCAL.replace('"local"', '"telnet"'), "transport", "tvm-rpc"),
        (BASE_LOCAL.replace('"onnxruntime"', '"tflite"'), "runtime", "tensorrt"),
        (BASE_LOCAL.replace('"onnxruntime"', '"tvm"'), "target", "runtime = 'tvm'"),
        (_ssh_without("address"), "address", "ssh"),
        (_ssh_without("user"), "user", "ssh"),
        (_ssh_without("known_hosts"), "known_hosts", "ssh"),
        (BASE_LOCAL.replace('"local"', '"tvm-rpc"'), "address", "tracker_key"),
        (BASE_LOCAL.replace('"local"', '"tvm-rpc"') + 'address = "h"\n', "port", "tracker_key"),
        (BASE_LOCAL + 'tracker_key = "k"\n', "tracker_key", "tvm-rpc"),
        (SSH_OK + "emulated = true\n", "emulated", "local"),
        (BASE_LOCAL + 'root = "/x"\n', "root", "emulated"),
        (BASE_LOCAL + '[versions]\ntflite = "2"\n', "versions.tflite", "not a runtime"),
        (BASE_LOCAL + "[versions]\nonnxruntime = 1\n", "versions.onnxruntime", "specifier"),
        (BASE_LOCAL.replace('"d"', '"a b"'), "id", "A-Za-z0-9"),
    ],
)
def test_invalid_profile_names_file_and_field(tmp_path: Path, text: str, field: str, hint: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    msg = str(e.value)
    assert str(path) in msg and f"field {field!r}" in msg and hint in msg, msg
    if field == "password":
        assert "hunter2" not in msg


def test_tvm_rpc_direct_is_valid(tmp_path: Path) -> None:
    text = BASE_LOCAL.replace('"local"', '"tvm-rpc"') + 'address = "10.0.0.9"\nport = 9090\n'
    p = load_profile(_write(tmp_path, text))
    assert (p.transport, p.address, p.port) == ("tvm-rpc", "10.0.0.9", 9090)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such profile file"):
        load_profile(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_profile(_write(tmp_path, "id = \n"))


def test_profiles_are_frozen() -> None:
    p = load_profile("host")
    with pytest.raises(AttributeError):
        p.id = "other"  # type: ignore[misc]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgesep", *args], capture_output=True, text=True, timeout=120, env=env or _env()
    )


def test_cli_lists_all_shipped_profiles() -> None:
    r = _cli("devices")
    assert r.returncode == 0, r.stderr
    for name in SHIPPED:
        assert name in r.stdout
    for col in ("arch", "transport", "address", "runtime", "target", "notes"):
        assert col in r.stdout
    r = _cli("devices", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert sorted(row["id"] for row in rows) == sorted(SHIPPED)


def test_cli_bad_user_profile_exits_2_without_traceback(tmp_path: Path) -> None:
    _write(tmp_path, SSH_OK + 'password = "hunter2"\n', "bad.toml")
    r = _cli("devices", env=_env(EDGESEP_PROFILES_DIR=str(tmp_path)))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "password" in r.stderr and "bad.toml" in r.stderr
    assert "hunter2" not in r.stderr + r.stdout


def test_cli_user_profile_from_env_dir_is_listed(tmp_path: Path) -> None:
    _write(tmp_path, SSH_OK)
    r = _cli("devices", env=_env(EDGESEP_PROFILES_DIR=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert "mydev" in r.stdout and "10.0.0.5" in r.stdout


_BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "typer", "numpy"):
                raise ImportError(f"{name} is blocked in this test (device side)")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


def test_devices_import_without_torch_typer_or_numpy() -> None:
    code = _BLOCK_TORCH + textwrap.dedent(
        """
        import edgesep.devices
        ids = [p.id for p in edgesep.devices.list_profiles()]
        assert not {"torch", "typer", "numpy"} & set(sys.modules), sorted(sys.modules)
        print(len(ids))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0 and r.stdout.strip() == str(len(SHIPPED)), r.stderr
