"""Magnitude pruning of Kronecker factors: exact counts against numpy, dense equivalence, masks."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgesep.errors import ConfigError, ShapeMismatchError, UnknownNameError
from edgesep.layers.kron import KronLinear
from edgesep.pruning import PRUNE_SCOPES, apply_masks_, magnitude_prune_, nonzeros, prune_masks

FAST = settings(max_examples=25, deadline=None)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        KronLinear((3, 4), (2, 5)),
        nn.Flatten(),
        nn.Linear(10, 12),
        nn.Unflatten(1, (2, 3, 2)),
        KronLinear((2, 3, 2), (3, 1, 4), bias=False),
    )
    with torch.no_grad():  # factors of different scales, as after training
        model[4].factors[0].mul_(10.0)
    return model


def _factors_np(model: nn.Module) -> list[np.ndarray]:
    return [u.detach().numpy().copy() for m in model.modules() if isinstance(m, KronLinear) for u in m.factors]


def _expected_drop(group: list[np.ndarray], amount: float) -> int:
    return math.floor(amount * sum(a.size for a in group))


def _assert_smallest_were_pruned(before: list[np.ndarray], after: list[np.ndarray], amount: float):
    """In the pooled group: exactly floor(amount n) entries zeroed, none larger than any kept one."""
    b = np.concatenate([a.ravel() for a in before])
    a = np.concatenate([x.ravel() for x in after])
    pruned = (a == 0) & (b != 0)
    assert np.count_nonzero(a) == b.size - _expected_drop(before, amount)
    assert np.all((a == b) | pruned)  # kept entries are untouched
    if pruned.any() and (~pruned).any():
        assert np.abs(b[pruned]).max() <= np.abs(b[~pruned]).min()


@pytest.mark.parametrize("scope", PRUNE_SCOPES)
@pytest.mark.parametrize("amount", [0.1, 0.25, 0.5, 0.9])
def test_counts_are_exact(scope, amount):
    model = _model()
    before = _factors_np(model)
    report = magnitude_prune_(model, amount, scope=scope)
    after = _factors_np(model)
    if scope == "factor":
        groups = [[0], [1], [2], [3], [4]]
    elif scope == "layer":
        groups = [[0, 1], [2, 3, 4]]
    else:
        groups = [[0, 1, 2, 3, 4]]
    for g in groups:
        _assert_smallest_were_pruned([before[i] for i in g], [after[i] for i in g], amount)
    assert nonzeros(model) == sum(np.count_nonzero(a) for a in after)
    assert report["nonzeros_after"] == nonzeros(model)
    assert report["nonzeros_before"] == sum(np.count_nonzero(a) for a in before) == report["params"]
    assert report["layers"]["0"] == {
        "params": before[0].size + before[1].size,
        "nonzeros_before": before[0].size + before[1].size,
        "nonzeros_after": np.count_nonzero(after[0]) + np.count_nonzero(after[1]),
    }
    assert set(report["layers"]) == {"0", "4"}


def test_global_scope_is_scale_dependent_and_factor_scope_is_not():
    # the module docstring's reason for the default: kron(c U1, U2 / c) is the same layer
    model = _model()
    magnitude_prune_(model, 0.5, scope="global")
    per_factor = [np.count_nonzero(a) for a in _factors_np(model)]
    assert per_factor[2] == _factors_np(_model())[2].size  # the scaled-up factor loses nothing
    model = _model()
    magnitude_prune_(model, 0.5)  # scope="factor"
    assert [np.count_nonzero(a) for a in _factors_np(model)] == [a.size - a.size // 2 for a in _factors_np(_model())]


@FAST
@given(
    st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=3),
    st.floats(0.0, 0.99),
    st.sampled_from(PRUNE_SCOPES),
)
def test_pruned_layer_is_the_kron_of_the_pruned_factors(shapes, amount, scope):
    torch.manual_seed(0)
    layer = KronLinear(tuple(n for _, n in shapes), tuple(m for m, _ in shapes)).double()
    report = magnitude_prune_(layer, amount, scope=scope)
    pruned = [u.detach().numpy() for u in layer.factors]
    np.testing.assert_allclose(layer.to_dense().detach().numpy(), functools.reduce(np.kron, pruned), rtol=1e-12)
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    expected = x.numpy() @ functools.reduce(np.kron, pruned).T + layer.bias.detach().numpy().reshape(-1)
    np.testing.assert_allclose(layer(x).reshape(3, -1).detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    groups = [[u.numel()] for u in layer.factors] if scope == "factor" else [[u.numel() for u in layer.factors]]
    assert report["nonzeros_after"] == sum(sum(g) - math.floor(amount * sum(g)) for g in groups)
    assert set(prune_masks(layer)) == {f"factors.{i}" for i in range(len(shapes))}


@pytest.mark.parametrize("scope", PRUNE_SCOPES)
def test_amount_zero_changes_nothing(scope):
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = magnitude_prune_(model, 0.0, scope=scope)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert report["nonzeros_after"] == report["nonzeros_before"] == report["params"]
    assert all(bool(m.all()) for m in prune_masks(model).values())


def test_existing_zeros_count_towards_the_amount():
    layer = KronLinear((4,), (5,), bias=False)
    with torch.no_grad():
        layer.factors[0].view(-1)[:6] = 0
    report = magnitude_prune_(layer, 0.5)
    assert report["nonzeros_before"] == 14 and report["nonzeros_after"] == 10


def test_ties_still_prune_exactly():
    layer = KronLinear((3, 3), (3, 3))
    with torch.no_grad():
        for u in layer.factors:
            u.fill_(-0.5)
    magnitude_prune_(layer, 0.4, scope="layer")
    assert nonzeros(layer) == 18 - math.floor(0.4 * 18)


def test_masks_keep_pruned_entries_zero_after_updates():
    model = _model()
    before = _factors_np(model)
    report = magnitude_prune_(model, 0.6, scope="global")
    masks = prune_masks(model)
    assert set(masks) == {"0.factors.0", "0.factors.1", "4.factors.0", "4.factors.1", "4.factors.2"}
    assert set(masks) <= {n for n, _ in model.named_parameters()}
    pruned = [(b != 0) & (a == 0) for b, a in zip(before, _factors_np(model), strict=True)]
    assert all(np.array_equal(~m.numpy(), z) for m, z in zip(masks.values(), pruned, strict=True))
    with torch.no_grad():  # an optimizer step
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    apply_masks_(model, masks)
    params = dict(model.named_parameters())
    for n, m in masks.items():
        assert torch.equal(params[n].detach() == 0, ~m)
    assert nonzeros(model) == report["nonzeros_after"]


def test_apply_masks_does_not_let_nan_survive():
    layer = KronLinear((2,), (2,))
    masks = {"factors.0": torch.tensor([[True, False], [True, True]])}
    with torch.no_grad():
        layer.factors[0][0, 1] = math.nan
    apply_masks_(layer, masks)
    assert layer.factors[0][0, 1].item() == 0.0


def test_report_is_json_serializable():
    report = magnitude_prune_(_model(), 0.3)
    assert json.loads(json.dumps(report)) == report


def test_model_without_kron_layers():
    model = nn.Sequential(nn.Linear(3, 3))
    report = magnitude_prune_(model, 0.5)
    assert report["params"] == report["nonzeros_after"] == 0 and report["layers"] == {}
    assert nonzeros(model) == 0 and prune_masks(model) == {}


@pytest.mark.parametrize("amount", [-0.1, 1.0, 1.5, math.nan])
def test_bad_amount_is_a_config_error(amount):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        magnitude_prune_(_model(), amount)


def test_bad_scope_and_bad_masks():
    model = _model()
    with pytest.raises(ConfigError, match="factor, layer, global"):
        magnitude_prune_(model, 0.5, scope="row")
    with pytest.raises(UnknownNameError, match="nope"):
        apply_masks_(model, {"nope": torch.ones(2, 3, dtype=torch.bool)})
    with pytest.raises(ShapeMismatchError, match=r"\(3, 2\).*\(2, 3\)"):
        apply_masks_(model, {"0.factors.0": torch.ones(3, 2, dtype=torch.bool)})
