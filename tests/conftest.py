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
