"""`edgesep device check PROFILE`: against this machine (``host``), a real OpenSSH server on loopback (the fixture of
``test_ssh.py``), and bundles that do or do not fit the profile.

References: the device facts are compared with what this interpreter reports itself (``platform``, ``numpy``,
``onnxruntime`` versions: the loopback "device" is this machine); bundle sizes with ``os.path.getsize``; version
specifiers of the fallback comparator with ``packaging``.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
from pathlib import Path

import numpy as np
import pytest

from edgesep.cli import main
from edgesep.devices import check as check_mod
from edgesep.devices.check import _fallback_satisfies, check_device, version_satisfies


def _ssh_support():
    """``test_ssh.py`` as a module (its sshd starter), without ``from conftest``-style name clashes."""
    name = "edgesep_tests_ssh_support"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("test_ssh.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = _ssh_support().start_sshd(tmp_path_factory.mktemp("sshd-check"))
    yield server
    server.stop()


def _by_name(result: dict) -> dict[str, dict]:
    return {c["name"]: c for c in result["checks"]}


def _machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


# ---------------------------------------------------------------------------------------------------- all is well


def test_host_profile_passes_with_true_facts():
    import onnxruntime

    res = check_device("host")
    assert res["ok"], res
    c = _by_name(res)
    assert list(c) == ["reachable", "architecture", "python", "numpy", "runtime:onnxruntime", "disk"]
    assert res["probe"]["machine"] == platform.machine() and res["probe"]["python"] == platform.python_version()
    assert res["probe"]["modules"]["numpy"]["version"] == np.__version__
    assert res["probe"]["modules"]["onnxruntime"]["version"] == onnxruntime.__version__
    assert all(x["fix"] == "" for x in res["checks"])


def test_ssh_profile_passes_and_bundle_size_is_counted(sshd, tmp_path, digits_bundle):
    p = sshd.profile("loop", tmp_path)
    res = check_device(p, digits_bundle)
    assert res["ok"], res
    c = _by_name(res)
    assert list(c)[-2:] == ["bundle", "disk"]
    size = sum(f.stat().st_size for f in digits_bundle.rglob("*") if f.is_file())
    assert f"{size / 1e6:.2f} MB" in c["bundle"]["detail"]
    assert f"the bundle ({size / 1e6:.1f} MB)" in c["disk"]["detail"]
    assert not (tmp_path / "loop-work").exists()  # checking creates nothing on the device


# --------------------------------------------------------------------------------------------------------- faults


def test_wrong_architecture_fails_with_the_fix(sshd, tmp_path):
    other = "aarch64" if _machine() == "x86_64" else "x86_64"
    p = sshd.profile("wrongarch", tmp_path, arch=other)
    res = check_device(p)
    c = _by_name(res)["architecture"]
    assert not res["ok"] and not c["ok"]
    assert f"device is {platform.machine()}, profile says {other}" == c["detail"]
    assert f'set arch = "{_machine()}" in {p.source}' in c["fix"]
    assert all(x["ok"] for x in res["checks"] if x["name"] != "architecture")


def test_runtime_version_mismatch_says_what_to_install(sshd, tmp_path):
    p = sshd.profile("oldort", tmp_path, versions={"onnxruntime": ">=99"})
    res = check_device(p)
    c = _by_name(res)["runtime:onnxruntime"]
    assert not res["ok"] and not c["ok"]
    assert "does not satisfy >=99" in c["detail"]
    assert c["fix"] == f"{sys.executable} -m pip install --upgrade 'onnxruntime>=99'"


def test_missing_numpy_and_runtime_on_a_bare_python(sshd, tmp_path):
    """The system python3 of this machine has no numpy nor onnxruntime: both fail with the pip command."""
    bare = "/usr/bin/python3"
    if not Path(bare).exists():
        pytest.skip("needs the system python3")
    import subprocess

    if subprocess.run([bare, "-c", "import numpy"], capture_output=True).returncode == 0:
        pytest.skip("the system python3 has numpy here: nothing is missing")
    res = check_device(sshd.profile("bare", tmp_path, python=bare))
    c = _by_name(res)
    assert not c["numpy"]["ok"] and c["numpy"]["fix"] == f"{bare} -m pip install --upgrade numpy"
    assert "ModuleNotFoundError" in c["numpy"]["detail"]
    assert not c["runtime:onnxruntime"]["ok"]
    assert c["runtime:onnxruntime"]["fix"] == f"{bare} -m pip install --upgrade onnxruntime"
    assert c["python"]["ok"] and c["architecture"]["ok"]


def test_bundle_without_the_needed_artifact(sshd, tmp_path, digits_bundle):
    # the bundle is checked on the host even when the device is down (a dead port also skips importing tvm there)
    port = _ssh_support()._free_port()
    p = sshd.profile("tvmdev", tmp_path, runtime="tvm", target="rpi4", port=port, connect_timeout=2)
    res = check_device(p, digits_bundle)
    assert [c["name"] for c in res["checks"]] == ["reachable", "bundle"]
    c = _by_name(res)["bundle"]
    assert not c["ok"] and "has no tvm-lib built for target rpi4" in c["detail"]
    assert c["fix"] == f"edgesep compile {digits_bundle} --backend tvm --target rpi4"
    trt = sshd.profile("trtdev", tmp_path, runtime="tensorrt")
    c = _by_name(check_device(trt, digits_bundle))
    assert c["bundle"]["fix"] == f"edgesep compile {digits_bundle} --backend tensorrt"
    assert "nvidia-jetpack" in c["runtime:tensorrt"]["fix"]  # and tensorrt is not importable here


def test_broken_bundle_and_full_disk(sshd, tmp_path, digits_bundle, monkeypatch):
    import shutil

    broken = tmp_path / digits_bundle.name
    shutil.copytree(digits_bundle, broken)
    victim = next(f for f in sorted(broken.rglob("*.npz")))
    victim.write_bytes(victim.read_bytes()[:-1] + b"x")
    p = sshd.profile("disk", tmp_path)
    c = _by_name(check_device(p, broken))["bundle"]
    assert not c["ok"] and "sha256" in c["detail"] and "re-export" in c["fix"]

    monkeypatch.setattr(check_mod, "DISK_MARGIN_BYTES", 1 << 62)  # more than any disk has
    c = _by_name(check_device(p, digits_bundle))["disk"]
    assert not c["ok"] and c["fix"].startswith("free at least") and "`workdir`" in c["fix"]


def test_unknown_host_key_and_unreachable(sshd, tmp_path):
    p = sshd.profile("newhost", tmp_path, known_hosts="")
    res = check_device(p)
    assert [c["name"] for c in res["checks"]] == ["reachable"]
    fp = _ssh_support().ssh_fingerprint(sshd.host_pub)
    assert fp in res["checks"][0]["detail"] and "--trust-new-host" in res["checks"][0]["fix"]
    lines: list[str] = []
    assert check_device(p, trust_new_host=True, log=lines.append)["ok"]
    assert any(fp in line for line in lines)

    sock = _ssh_support()._free_port()
    res = check_device(sshd.profile("gone", tmp_path, port=sock, connect_timeout=2))
    assert not res["ok"] and "cannot connect" in res["checks"][0]["detail"]
    assert "runs sshd" in res["checks"][0]["fix"]


# ------------------------------------------------------------------------------------------------------------ CLI


def test_cli_exit_codes_table_and_json(sshd, tmp_path, capsys):
    good = sshd.profile("cli-good", tmp_path)
    bad = sshd.profile("cli-bad", tmp_path, versions={"onnxruntime": ">=99"})
    assert main(["device", "check", good.source, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["profile"] == "cli-good"
    assert main(["device", "check", bad.source]) == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and "1 check(s) failed: runtime:onnxruntime" in text
    assert main(["device", "check", "no-such-profile"]) == 2
    assert "unknown device profile 'no-such-profile'" in capsys.readouterr().err
    assert main(["device", "check", str(tmp_path / "missing.toml")]) == 2


# ------------------------------------------------------------------------------------------------------- versions


VERSIONS = ["0.9", "1.17.3", "1.18", "1.18.0", "1.18.0.post1", "1.18.0rc1", "1.19.2", "2.0", "2.0.0+cu12",
            "2.0b2", "10.3.0.30", "10.4.1", "0.27.0", "0.27.0.post1", "0.27.0rc0"]  # fmt: skip
SPECS = [">=1.18", "<2", ">=1.16,<2", "==1.18.*", "10.3.*", "!=1.18.0", "~=1.18", "~=1.18.0", ">0.27", "==2",
         ">=0.27", "<=1.18", ">1.18.0", "<1.18.0", "<2.0", "==1.18.0", "1.18", "!=2.*", ">=0.27.0rc0", ">1.18.0.post0",
         "<1.18.0rc2", "~=10.3.0"]  # fmt: skip


@pytest.mark.parametrize("spec", SPECS)
def test_fallback_comparator_agrees_with_packaging(spec):
    pytest.importorskip("packaging")
    for v in VERSIONS:
        assert _fallback_satisfies(v, check_mod._norm_spec(spec)) == version_satisfies(v, spec), (v, spec)


def test_invalid_specifier_is_a_failed_check(sshd, tmp_path):
    with pytest.raises(ValueError):
        version_satisfies("1.0", ">>1")
    with pytest.raises(ValueError):
        _fallback_satisfies("1.0", ">>1")
    p = sshd.profile("badspec", tmp_path, versions={"onnxruntime": ">>1"})
    c = _by_name(check_device(p))["runtime:onnxruntime"]
    assert not c["ok"] and "not a valid specifier" in c["detail"] and p.source in c["fix"]
