"""Square Attack (numpy, query-only): contract, strength against white-box PGD and torchattacks.Square."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from edgesep.attacks import pgd
from edgesep.attacks.square import SquareResult, p_schedule, square_attack
from edgesep.errors import ConfigError, ShapeMismatchError

N = 300  # test digits attacked here
EPS = 0.1


def predictor(model: nn.Module):
    """The torch model as the numpy-in, numpy-out function a device engine would expose."""

    def predict(xb: np.ndarray) -> np.ndarray:
        assert xb.dtype == np.float32 and xb.ndim == 4
        assert xb.min() >= 0.0 and xb.max() <= 1.0
        with torch.no_grad():
            return model(torch.from_numpy(xb)).numpy()

    return predict


def pred_labels(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).argmax(1).numpy()


@pytest.fixture(scope="module")
def square_run(new_mlp, digits) -> tuple[SquareResult, float, float]:
    """One 1000-query run on N digits, shared by the tests below: (result, clean acc, PGD robust acc)."""
    model = new_mlp()
    x, y = digits.x_test[:N], digits.y_test[:N]
    res = square_attack(predictor(model), x, y, EPS, n_queries=1000, seed=0)
    clean = float((pred_labels(model, x) == y).mean())
    torch.manual_seed(0)
    adv = pgd(model, torch.from_numpy(x), torch.from_numpy(y), EPS, steps=20)
    pgd_acc = float((pred_labels(model, adv.numpy()) == y).mean())
    return res, clean, pgd_acc


def test_module_does_not_import_torch():
    code = (
        "import sys\n"
        "import edgesep.attacks.square\n"
        "from edgesep.attacks import AttackSpec, parse, ATTACKS, get_attack, square_attack\n"
        "assert parse('pgd:linf:0.1:40').steps == 40 and 'pgd' in ATTACKS\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "from edgesep.attacks import pgd\n"  # and the torch attacks still load lazily
        "assert 'torch' in sys.modules and callable(pgd)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_stays_in_ball_and_box(square_run, digits):
    res, _, _ = square_run
    x = digits.x_test[:N]
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == np.float32
    assert np.abs(res.x_adv - x).max() <= EPS + 1e-6
    assert res.x_adv.min() >= 0.0 and res.x_adv.max() <= 1.0


def test_result_is_consistent_with_the_model(square_run, mlp, digits):
    res, _, _ = square_run
    y = digits.y_test[:N]
    # success is what an independent prediction on x_adv says, and robust accuracy is its complement
    np.testing.assert_array_equal(res.success, pred_labels(mlp, res.x_adv) != y)
    assert res.robust_accuracy == pytest.approx(1.0 - res.success.mean())
    # queries: 1..budget; already-misclassified inputs cost the one clean query and stay unchanged
    assert res.queries.min() >= 1 and res.queries.max() <= 1000
    wrong = pred_labels(mlp, digits.x_test[:N]) != y
    assert (res.queries[wrong] == 1).all()
    np.testing.assert_array_equal(res.x_adv[wrong], digits.x_test[:N][wrong])
    # examples not fooled used the whole budget; fooled ones stopped early
    assert (res.queries[~res.success] == 1000).all()
    assert np.median(res.queries[res.success & ~wrong]) < 1000


def test_breaks_an_undefended_model_about_as_well_as_pgd(square_run):
    res, clean, pgd_acc = square_run
    assert res.robust_accuracy < clean - 0.4, (clean, res.robust_accuracy)
    # a query-only attack should not beat white-box PGD by more than noise
    assert res.robust_accuracy >= pgd_acc - 0.03, (pgd_acc, res.robust_accuracy)


def test_at_least_as_strong_as_torchattacks_square(square_run, mlp, digits):
    import torchattacks

    res, _, _ = square_run
    x, y = torch.from_numpy(digits.x_test[:N]), torch.from_numpy(digits.y_test[:N])
    ref = torchattacks.Square(mlp, eps=EPS, n_queries=1000, p_init=0.05, seed=0)(x, y)
    with torch.no_grad():
        ref_acc = (mlp(ref).argmax(1) == y).double().mean().item()
    # torchattacks draws one square position for the whole batch per iteration and never resamples a
    # square that changes nothing, so it is weaker; ours must not be weaker than it
    assert res.robust_accuracy <= ref_acc + 0.02, (res.robust_accuracy, ref_acc)


def test_deterministic_for_a_seed(mlp, digits):
    x, y = digits.x_test[:40], digits.y_test[:40]
    a = square_attack(predictor(mlp), x, y, 0.05, n_queries=100, seed=7)
    b = square_attack(predictor(mlp), x, y, 0.05, n_queries=100, seed=7)
    c = square_attack(predictor(mlp), x, y, 0.05, n_queries=100, seed=8)
    np.testing.assert_array_equal(a.x_adv, b.x_adv)
    np.testing.assert_array_equal(a.queries, b.queries)
    np.testing.assert_array_equal(a.success, b.success)
    assert not np.array_equal(a.x_adv, c.x_adv)


def test_targeted(mlp, digits):
    x, y = digits.x_test[:60], digits.y_test[:60]
    target = (y + 1) % 10
    res = square_attack(predictor(mlp), x, target, 0.3, n_queries=500, targeted=True)
    assert res.success.mean() > 0.5
    np.testing.assert_array_equal(res.success, pred_labels(mlp, res.x_adv) == target)
    assert np.abs(res.x_adv - x).max() <= 0.3 + 1e-6


def test_budget_edges(mlp, digits):
    x, y = digits.x_test[:20], digits.y_test[:20]
    one = square_attack(predictor(mlp), x, y, 0.1, n_queries=1)  # the clean query only
    np.testing.assert_array_equal(one.x_adv, x)
    assert (one.queries == 1).all()
    zero = square_attack(predictor(mlp), x, y, 0.0, n_queries=50)  # nothing can change
    np.testing.assert_array_equal(zero.x_adv, x)
    np.testing.assert_array_equal(zero.success, pred_labels(mlp, x) != y)


def test_queries_follow_the_algorithm():
    """Record every query against a model the attack can never improve on (constant logits): after the clean
    query comes the vertical-stripe init, then each query changes the init inside one s x s square, with s
    from the p schedule, and the squares reach every pixel (last row and column included)."""
    n, eps, budget = 20, 0.1, 300
    x = np.full((n, 1, 8, 8), 0.5, dtype=np.float32)
    y = np.zeros(n, dtype=np.int64)
    seen: list[np.ndarray] = []

    def predict(xb):
        seen.append(xb.copy())
        return np.tile(np.array([[5.0] + [0.0] * 9], dtype=np.float32), (len(xb), 1))

    res = square_attack(predict, x, y, eps, n_queries=budget)
    assert len(seen) == budget and (res.queries == budget).all() and not res.success.any()
    np.testing.assert_array_equal(seen[0], x)
    init = seen[1]
    np.testing.assert_allclose(np.abs(init - x), eps, atol=1e-6)
    assert (init == init[:, :, :1, :]).all()  # one sign per column: vertical stripes
    np.testing.assert_array_equal(res.x_adv, init)  # never improved, so the init is kept
    covered = np.zeros((8, 8), dtype=bool)
    for i_iter, q in enumerate(seen[2:]):
        s = max(min(round(np.sqrt(p_schedule(0.05, i_iter, budget) * 64)), 7), 1)
        for changed in np.abs(q - init)[:, 0] > 1e-7:  # (8, 8) per example
            rows, cols = np.nonzero(changed)
            assert rows.size, "every query must change something"
            assert rows.max() - rows.min() < s and cols.max() - cols.min() < s
            covered |= changed
    assert covered.all(), covered


def test_p_schedule_matches_the_paper():
    # reference values from square_attack.py::p_selection (max-andr/square-attack), 10 000 iterations
    expected = {0: 0.8, 10: 0.8, 11: 0.4, 50: 0.4, 51: 0.2, 201: 0.1, 501: 0.05, 1001: 0.025, 2001: 0.0125}
    expected |= {4001: 0.8 / 128, 6001: 0.8 / 256, 8001: 0.8 / 512, 9999: 0.8 / 512}
    for it, p in expected.items():
        assert p_schedule(0.8, it, 10000) == pytest.approx(p), it
    assert p_schedule(0.8, 100, 1000) == pytest.approx(0.8 / 16)  # rescaled: 100/1000 -> 1000/10000
    assert p_schedule(0.8, 101, 1000) == pytest.approx(0.8 / 32)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"eps": -0.1}, ConfigError, "eps must be"),
        ({"eps": 0.1, "n_queries": 0}, ConfigError, "n_queries"),
        ({"eps": 0.1, "p_init": 0.0}, ConfigError, "p_init"),
        ({"eps": 0.1, "p_init": 1.5}, ConfigError, "p_init"),
    ],
)
def test_validation(mlp, digits, kwargs, err, match):
    with pytest.raises(err, match=match):
        square_attack(predictor(mlp), digits.x_test[:4], digits.y_test[:4], **kwargs)


def test_input_and_predict_validation(mlp, digits):
    x, y = digits.x_test[:4], digits.y_test[:4]
    with pytest.raises(ShapeMismatchError):
        square_attack(predictor(mlp), x[:, 0], y, 0.1)  # (N, H, W)
    with pytest.raises(ShapeMismatchError):
        square_attack(predictor(mlp), x, y[:3], 0.1)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        square_attack(predictor(mlp), x * 255, y, 0.1)
    with pytest.raises(ShapeMismatchError, match="predict must return"):
        square_attack(lambda xb: np.zeros(len(xb)), x, y, 0.1)
    with pytest.raises(ConfigError, match="labels must be in"):
        square_attack(predictor(mlp), x, y + 10, 0.1)
