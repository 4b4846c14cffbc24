"""Shared fixtures: where the shared datasets and checkpoints live, and skips when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (CI clones with shared/ beside it); EDGESEP_SHARED overrides.
SHARED = Path(os.environ.get("EDGESEP_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    p = SHARED / "data"
    if not p.is_dir():
        pytest.skip(f"shared datasets not found at {p} (set EDGESEP_SHARED)")
    return p


@pytest.fixture(scope="session")
def shared_models() -> Path:
    p = SHARED / "models"
    if not p.is_dir():
        pytest.skip(f"shared checkpoints not found at {p} (set EDGESEP_SHARED)")
    return p


def pytest_configure(config) -> None:
    # Under pytest-xdist every worker is its own process: one torch thread each keeps 2 workers on 2 cores from
    # oversubscribing (measured: tiny training loops ran ~20x slower with 2 threads per worker).
    if os.environ.get("PYTEST_XDIST_WORKER"):
        try:
            import torch
        except ImportError:
            return
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``tiny_run(model="kron_mlp") -> run dir``: a model trained for 2 epochs on digits, once per session and model.

    Shared by the export, runtime, example and device tests; treat the directory as read-only (export from it, or
    copy it first).
    """
    runs: dict[str, Path] = {}

    def make(model: str = "kron_mlp") -> Path:
        if model not in runs:
            from edgesep.train import TrainConfig, train

            out = tmp_path_factory.mktemp(f"tiny_run_{model}") / "run"
            train(TrainConfig(model=model, dataset="digits", epochs=2, lr=1e-2, eval_n=0), out, log=lambda _: None)
            runs[model] = out
        return runs[model]

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module, as under xdist: on a busy 2-core machine LAPACK's small SVDs / QRs (CondLR's
    retraction and conditioning) run ~25x slower with 2 spinning threads than with 1. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
