"""edgesep.evaluate: accuracies against hand-computed and torchattacks references, result format, contract.

The model here is trained inline with plain torch on scikit-learn's digits (no other edgesep module), with
its input normalization inside the model, as the bundle format requires.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torchattacks
from torch import nn

from edgesep.attacks import AttackSpec, parse
from edgesep.errors import ConfigError, ShapeMismatchError
from edgesep.evaluate import accuracy, evaluate, robust_accuracy

N_TRAIN = 1297


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one torch thread, and far faster when the cores are shared."""
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


class Normalize(nn.Module):
    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x):
        return (x - self.mean) / self.std


def make_model() -> nn.Module:
    return nn.Sequential(
        Normalize(0.3, 0.4), nn.Flatten(), nn.Linear(64, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Linear(48, 10)
    )


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # (1797, 8, 8) -> (1797, 1, 8, 8) in [0, 1]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(1).permutation(len(x))
    tr, te = perm[:N_TRAIN], perm[N_TRAIN:]
    return x[tr], y[tr], x[te], y[te]


@pytest.fixture(scope="module")
def state(data) -> dict[str, torch.Tensor]:
    x_tr, y_tr, _, _ = data
    gen = torch.Generator().manual_seed(0)
    model = make_model()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    x, y = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    with one_thread():
        for _ in range(100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def model(state) -> nn.Module:
    m = make_model()
    m.load_state_dict(state)
    return m.eval()


def ref_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).argmax(1) == y


def test_accuracy_matches_a_direct_computation(model, data):
    _, _, x, y = data
    expected = ref_correct(model, torch.from_numpy(x), torch.from_numpy(y)).double().mean().item()
    assert expected > 0.9
    for batch_size in (1, 7, 256, 10_000):
        assert accuracy(model, x, y, batch_size=batch_size) == pytest.approx(expected, abs=1e-12)
    assert accuracy(model, torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, abs=1e-12)
    assert accuracy(model, x.astype(np.float64), y.astype(np.int32)) == pytest.approx(expected, abs=1e-12)


def test_fgsm_robust_accuracy_matches_torchattacks(model, data):
    _, _, x, y = data
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    adv = torchattacks.FGSM(model, eps=0.1)(xt, yt)
    expected = (ref_correct(model, xt, yt) & ref_correct(model, adv, yt)).double().mean().item()
    for batch_size in (64, 500):
        got = robust_accuracy(model, x, y, parse("fgsm:linf:0.1"), batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-12)


def test_pgd_robust_accuracy_matches_torchattacks(model, data):
    _, _, x, y = data
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    torch.manual_seed(0)
    adv = torchattacks.PGD(model, eps=0.05, alpha=0.0125, steps=10)(xt, yt)
    expected = (ref_correct(model, xt, yt) & ref_correct(model, adv, yt)).double().mean().item()
    torch.manual_seed(0)  # one batch: the same random start as torchattacks
    got = robust_accuracy(model, x, y, parse("pgd:linf:0.05:10"), batch_size=len(y))
    assert abs(got - expected) <= 0.005, (got, expected)
    torch.manual_seed(0)  # other batches draw other starts: equal up to noise
    got = robust_accuracy(model, x, y, parse("pgd:linf:0.05:10"), batch_size=128)
    assert abs(got - expected) <= 0.02, (got, expected)


def test_robust_counts_only_examples_correct_when_clean(model, data, monkeypatch):
    import edgesep.evaluate as ev

    x_tr, y_tr, x, y = data
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    ok = ref_correct(model, xt, yt)
    proto = {c: xt[ok & (yt == c)][0] for c in range(10)}  # a correctly classified image per class

    def fixing_attack(model, xb, yb, spec, *, n_classes=None):  # "adversarial" inputs the model gets right
        return torch.stack([proto[int(c)] for c in yb])

    monkeypatch.setattr(ev, "run_attack", fixing_attack)
    got = robust_accuracy(model, x, y, parse("pgd:linf:0.1:10"))
    assert got == pytest.approx(accuracy(model, x, y)) and got < 1.0


def test_evaluate_result(model, data):
    _, _, x, y = data
    x, y = x[:200], y[:200]
    specs = [parse(s) for s in ("clean", "fgsm:linf:0.05", "pgd:linf:0.05:10", "pgd:l2:0.5:20:restarts=2")]
    torch.manual_seed(0)
    res = evaluate(model, x, y, specs, batch_size=64)
    assert json.loads(json.dumps(res)) == res  # JSON-ready
    assert res["n"] == 200
    assert res["clean"] == pytest.approx(accuracy(model, x, y))
    assert [r["attack"] for r in res["robust"]] == ["clean", "fgsm", "pgd", "pgd"]
    assert set(res["robust"][0]) == {"attack", "norm", "eps", "steps", "step_size", "restarts", "accuracy"}
    clean, fg, pg, l2 = res["robust"]
    assert clean["accuracy"] == res["clean"] and clean["eps"] == 0.0
    assert fg["steps"] == 1 and fg["step_size"] is None
    assert pg["step_size"] == pytest.approx(2.5 * 0.05 / 10) and pg["steps"] == 10
    assert (l2["norm"], l2["eps"], l2["steps"], l2["restarts"]) == ("l2", 0.5, 20, 2)
    assert pg["accuracy"] <= fg["accuracy"] + 0.02  # PGD at least about as strong as FGSM
    for r in res["robust"]:
        assert 0.0 <= r["accuracy"] <= res["clean"]  # robust counts only examples also correct clean


def test_autoattack_spec(model, data):
    _, _, x, y = data
    x, y = x[:40], y[:40]
    aa = robust_accuracy(model, x, y, parse("autoattack:linf:0.1"))
    torch.manual_seed(0)
    pg = robust_accuracy(model, x, y, parse("pgd:linf:0.1:20"))
    assert aa <= pg + 0.025  # one example of 40


def test_modes_restored_and_no_grads(model, data):
    _, _, x, y = data
    model.train()
    bn = model[3]
    stats = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    evaluate(model, x[:64], y[:64], [parse("pgd:linf:0.05:3")], batch_size=32)
    assert all(m.training for m in model.modules())
    assert torch.equal(stats[0], bn.running_mean) and torch.equal(stats[1], bn.num_batches_tracked)
    assert all(p.grad is None for p in model.parameters())


def test_progress_is_silent_without_a_terminal(model, data, capfd):
    _, _, x, y = data
    robust_accuracy(model, x[:64], y[:64], parse("fgsm:linf:0.1"), batch_size=16, progress=True)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_errors(model, data):
    _, _, x, y = data
    with pytest.raises(ConfigError, match="batch_size"):
        accuracy(model, x, y, batch_size=0)
    with pytest.raises(ConfigError, match="no examples"):
        accuracy(model, x[:0], y[:0])
    with pytest.raises(ConfigError, match="AttackSpec"):
        robust_accuracy(model, x, y, "pgd:linf:0.1:10")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="AttackSpec"):
        evaluate(model, x, y, [AttackSpec("clean"), "fgsm:linf:0.1"])  # type: ignore[list-item]
    with pytest.raises(ShapeMismatchError):
        accuracy(model, x, y[:-1])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        accuracy(model, x * 16, y)
