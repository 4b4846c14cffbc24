"""Fixtures for the emulated arm64 device: the root (built once into a cache directory) and a tiny digits bundle.

The root lives in ``$EDGESEP_ARM64_ROOT`` or ``~/.cache/edgesep/arm64-root`` and is reused across runs: a cold
build takes about a minute (debootstrap, 110 .debs, 14 wheels, 830 MB), a warm one is a no-op. Under pytest-xdist
each worker builds through the same lock, so one builds and the others find it done.

Everything that needs the root skips with the reason when this machine cannot have it: not root, a missing host
tool (the reason names the Debian packages), or no network to the Debian mirror or the package index.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import pytest

from edgesep.devices.emulate import (
    FetchError,
    HostToolMissingError,
    build_arm64_root,
    debian_mirror,
    default_root,
    is_complete,
    missing_host_tools,
)

BUILD_LOG: list[str] = []  # the session's build log, for the report of a failing test


def _reachable(url: str, timeout: float = 5.0) -> bool:
    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def arm64_root() -> Path:
    """A complete arm64 root (built or repaired on first use; a no-op when the cached one is complete)."""
    if os.geteuid() != 0:
        pytest.skip("the arm64 root needs root (debootstrap, chroot); run the tests as root or in a container")
    missing = missing_host_tools()
    if missing:
        pytest.skip(str(HostToolMissingError(missing)))
    root = default_root()
    if not is_complete(root):
        mirror = debian_mirror()
        if not _reachable(mirror):
            pytest.skip(f"no network to the Debian mirror {mirror}: cannot build the arm64 root at {root}")
        try:
            build_arm64_root(root, mirror=mirror, progress=False, log=BUILD_LOG.append)
        except FetchError as e:
            if e.network:
                pytest.skip(f"no network to fetch {e.item} for the arm64 root: {e}")
            raise
    return root


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory, tiny_run) -> Path:
    """A tiny bundle: kron_mlp trained 2 epochs on digits, fp32 ONNX + INT8 (gate off: max_drop=100), clean:300."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from edgesep.export import export_run, quantize_bundle

    def quiet(_: str) -> None:
        pass

    out = tmp_path_factory.mktemp("arm64")
    export_run(tiny_run(), out / "kron.bundle", eval_sets="clean:300", log=quiet, progress=False)
    quantize_bundle(out / "kron.bundle", max_drop=100, log=quiet)
    return out / "kron.bundle"
