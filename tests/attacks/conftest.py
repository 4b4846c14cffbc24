"""Fixtures for the attack tests: digits (loaded straight from scikit-learn) and a small MLP trained inline
with plain torch, so these tests depend on no other edgesep module.

The models are tiny: torch runs them on one thread here, which is faster than two, and much faster when the
cores are shared (two spinning OpenMP threads on a busy core were measured 20x slower).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

N_TRAIN = 1297  # the remaining 500 digits are the test split


class Digits(NamedTuple):
    x_train: np.ndarray  # (1297, 1, 8, 8) float32 in [0, 1]
    y_train: np.ndarray  # (1297,) int64
    x_test: np.ndarray  # (500, 1, 8, 8)
    y_test: np.ndarray  # (500,)


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="session")
def digits() -> Digits:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # (1797, 8, 8) -> (1797, 1, 8, 8)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    tr, te = perm[:N_TRAIN], perm[N_TRAIN:]
    return Digits(x[tr], y[tr], x[te], y[te])


@pytest.fixture(scope="session")
def mlp_state(digits: Digits) -> dict[str, torch.Tensor]:
    """State of a 64-64-10 MLP trained full-batch with Adam (about a second); > 90 % clean accuracy."""
    gen = torch.Generator().manual_seed(0)
    model = make_mlp()
    with torch.no_grad():
        for p in model.parameters():  # seeded init that leaves the global RNG alone
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if p.ndim > 1 else 0.01))
    x, y = torch.from_numpy(digits.x_train), torch.from_numpy(digits.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with one_thread():
        for _ in range(150):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(digits.x_test)).argmax(1).numpy() == digits.y_test).mean()
    assert acc > 0.9, f"fixture MLP reached only {acc:.3f} clean accuracy"
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def new_mlp(mlp_state: dict[str, torch.Tensor]) -> Callable[[], nn.Module]:
    """Builds fresh copies of the trained MLP (eval mode, no gradients)."""

    def build() -> nn.Module:
        model = make_mlp()
        model.load_state_dict(mlp_state)
        return model.eval()

    return build


@pytest.fixture
def mlp(new_mlp: Callable[[], nn.Module]) -> nn.Module:
    """A fresh copy of the trained MLP in eval mode (tests may change its mode or gradients)."""
    return new_mlp()


@pytest.fixture(scope="session")
def test_xy(digits: Digits) -> tuple[torch.Tensor, torch.Tensor]:
    """The 500 test digits as tensors."""
    return torch.from_numpy(digits.x_test), torch.from_numpy(digits.y_test)
