"""The model registry and every registered model: build, forward, kron <-> dense equivalence, checkpoints."""

from __future__ import annotations

import copy
import inspect
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from edgesep.errors import CheckpointError, ConfigError, ShapeMismatchError, UnknownNameError
from edgesep.layers.kron import KronLinear
from edgesep.models import (
    KronTokenLinear,
    Normalize,
    _registry,
    balanced_factors,
    create_model,
    get_model_builder,
    list_models,
    register_model,
)

# small kwargs that keep each test fast; models not listed build with their defaults
SMALL = {
    "vgg16": {"width": 0.125},
    "kron_vgg16": {"width": 0.125},
}


def _build(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, **{**SMALL.get(name, {}), **kwargs}).eval()


@pytest.mark.parametrize("name", list_models())
def test_builds_with_defaults_and_forwards(name):
    model = create_model(name).eval()  # the true defaults, as config.json would rebuild them
    x = torch.rand(2, *model.in_shape, requires_grad=True)
    y = model(x)
    assert y.shape == (2, model.num_classes) == (2, 10)
    assert torch.isfinite(y).all()
    y.sum().backward()  # attacks need input gradients
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", list_models())
def test_num_classes_and_json_kwargs(name):
    model = _build(name, num_classes=3)
    assert model(torch.rand(1, *model.in_shape)).shape == (1, 3)
    # every builder default is JSON-serializable, so config.json can hold the kwargs
    params = inspect.signature(get_model_builder(name)).parameters
    json.dumps({k: p.default for k, p in params.items()})
    assert all(p.kind is p.KEYWORD_ONLY for p in params.values())


def test_list_models_wildcards():
    names = list_models()
    assert {"mlp", "kron_mlp", "cnn_small", "vgg16", "vit_tiny", "resnet20", "resnet32", "convex_small"} <= set(names)
    assert names == sorted(names)
    kron = list_models("kron*")
    assert kron == ["kron_cnn_small", "kron_mlp", "kron_vgg16", "kron_vit_tiny"]
    assert list_models("resnet??") == ["resnet20", "resnet32"]
    assert list_models("nothing*") == []


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        create_model("resnet18")
    assert "resnet18" in str(e.value) and "resnet20" in str(e.value) and "kron_mlp" in str(e.value)
    assert e.value.valid == list_models()


def test_unknown_kwarg_is_a_config_error():
    with pytest.raises(ConfigError, match="hidden_shapes"):
        create_model("kron_mlp", hidden=[3])
    with pytest.raises(ConfigError, match="head"):
        create_model("kron_cnn_small", head="dense")  # fixed by the variant
    with pytest.raises(ConfigError, match="head must be 'dense' or 'kron'"):
        create_model("cnn_small", head="sparse")
    with pytest.raises(ConfigError, match="in_shape must have 3 entries"):
        create_model("resnet20", in_shape=[3, 32])
    with pytest.raises(ConfigError, match="mean has 2 values but the input has 3 channels"):
        create_model("vgg16", mean=[0.5, 0.5], width=0.125)
    with pytest.raises(ConfigError, match="patch 5 must divide"):
        create_model("vit_tiny", patch=5)


def test_register_model(monkeypatch):
    monkeypatch.setattr(_registry, "_MODELS", dict(_registry._MODELS))

    @register_model("tiny_test_model")
    def tiny(*, num_classes: int = 10) -> nn.Module:
        return nn.Linear(4, num_classes)

    assert "tiny_test_model" in list_models("tiny*")
    assert create_model("tiny_test_model", num_classes=2).out_features == 2
    with pytest.raises(ConfigError, match="already registered"):
        register_model("tiny_test_model")(lambda: nn.Identity())


# ----------------------------------------------------------------------------------------------------------
# Kronecker models vs their dense equivalents


def _densify(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every KronLinear replaced by the equivalent nn.Linear (via to_dense)."""
    dense = copy.deepcopy(model)
    for module in list(dense.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, KronLinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.to_dense())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias.reshape(-1))
                # (B, n_1, ..., n_d) -> (B, N) -> (B, M) -> (B, m_1, ..., m_d)
                setattr(module, child_name, nn.Sequential(nn.Flatten(1), lin, nn.Unflatten(1, child.out_shape)))
    assert not any(isinstance(m, KronLinear) for m in dense.modules())
    return dense


KRON_CASES = [(name, {}) for name in list_models("kron*")] + [
    ("kron_mlp", {"in_shape": [1, 28, 28]}),
    ("kron_mlp", {"in_shape": [3, 32, 32], "hidden_shapes": [[4, 8, 8], [2, 4, 4], [2, 2, 3]]}),
    ("cnn_small", {"head": "kron", "in_shape": [1, 8, 8], "hidden_shape": [4, 2, 2]}),
    ("vit_tiny", {"kron": True, "in_shape": [1, 8, 8], "patch": 2, "dim": 24, "heads": 2, "depth": 1}),
]


@pytest.mark.parametrize(("name", "kwargs"), KRON_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(KRON_CASES)])
def test_kron_model_matches_dense_equivalent(name, kwargs):
    model = _build(name, **kwargs)
    kron_layers = [m for m in model.modules() if isinstance(m, KronLinear)]
    assert kron_layers, f"{name} has no KronLinear"
    # random (not identity) factors and BatchNorm statistics so the comparison means something
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    dense = _densify(model)
    x = torch.rand(3, *model.in_shape)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)
    n_kron = sum(p.numel() for p in model.parameters())
    n_dense = sum(p.numel() for p in dense.parameters())
    assert n_kron < n_dense


def test_kron_token_linear_matches_dense():
    layer = KronTokenLinear(64, 192)
    assert layer.in_factors == (8, 8) and layer.kron.out_shape == (12, 16)
    x = torch.randn(2, 5, 64)
    ref = x @ layer.kron.to_dense().T + layer.kron.bias.reshape(-1)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_mismatched_factor_shapes_raise():
    with pytest.raises(ShapeMismatchError) as e:
        create_model("kron_mlp", in_shape=[1, 28, 28], hidden_shapes=[[16, 16], [16, 16]])
    assert "(16, 16)" in str(e.value) and "(1, 28, 28)" in str(e.value)
    with pytest.raises(ShapeMismatchError) as e:
        create_model("kron_mlp", in_shape=[1, 28, 28], hidden_shapes=[[1, 16, 16], [16, 16]])
    assert "(16, 16)" in str(e.value) and "(1, 16, 16)" in str(e.value)
    with pytest.raises(ShapeMismatchError, match=r"hidden_shape \(8, 16\) has 2 factors"):
        create_model("kron_cnn_small", hidden_shape=[8, 16])
    with pytest.raises(ShapeMismatchError, match=r"\(8, 8, 4\) does not hold the 64 features"):
        create_model("kron_vgg16", width=0.125, kron_in_shape=[8, 8, 4])
    with pytest.raises(ConfigError, match="hidden=100 but hidden_shape"):
        create_model("kron_cnn_small", hidden=100, hidden_shape=[8, 4, 4])


def test_default_shapes_follow_in_shape():
    digits, mnist = create_model("kron_mlp"), create_model("kron_mlp", in_shape=[1, 28, 28])
    assert [m.out_shape for m in digits.modules() if isinstance(m, KronLinear)] == [(1, 16, 16)] * 2
    assert [m.out_shape for m in mnist.modules() if isinstance(m, KronLinear)] == [(1, 16, 16)] * 2
    assert [m.out_features for m in create_model("mlp", in_shape=[1, 28, 28]).modules() if isinstance(m, nn.Linear)][
        :2
    ] == [256, 256]
    head = create_model("kron_vgg16").head.fc
    assert head.in_shape == (8, 8, 8) and head.out_shape == (8, 8, 8)
    assert create_model("kron_cnn_small").head.fc.in_shape == (32, 7, 7)


@pytest.mark.parametrize("seed", range(3))
def test_kron_init_has_linear_scale(seed):
    torch.manual_seed(seed)
    layer = KronLinear((1, 8, 8), (1, 16, 16))  # a 1x1 factor: a single random scalar before rescaling
    torch.testing.assert_close(layer.to_dense().pow(2).mean().sqrt(), torch.tensor((3 * 64) ** -0.5))
    # every Kronecker model builds its KronLinears this way
    for name in list_models("kron*"):
        for m in _build(name).modules():
            if isinstance(m, KronLinear):
                rms = m.to_dense().pow(2).mean().sqrt()
                torch.testing.assert_close(rms, torch.tensor((3 * m.in_features) ** -0.5), msg=name)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 4))
def test_balanced_factors(n, d):
    f = balanced_factors(n, d)
    assert len(f) == d and math.prod(f) == n and list(f) == sorted(f)


def test_balanced_factors_examples():
    assert balanced_factors(512, 3) == (8, 8, 8)
    assert balanced_factors(192, 2) == (12, 16)
    assert balanced_factors(13, 2) == (1, 13)


# ----------------------------------------------------------------------------------------------------------
# normalization inside the model, state_dict layouts, checkpoints


def test_normalize_inside_model_without_state():
    norm = Normalize([0.5, 0.25, 0.0], [0.5, 0.5, 2.0])
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(norm(x)[:, 1], (x[:, 1] - 0.25) / 0.5)
    assert norm.state_dict() == {}
    model = create_model("mlp", in_shape=[1, 8, 8], mean=0.5, std=0.25)
    assert not any(k.startswith("normalize") for k in model.state_dict())
    torch.testing.assert_close(model.normalize(torch.ones(1, 1, 8, 8)), torch.full((1, 1, 8, 8), 2.0))


def test_resnet_keys_match_the_checkpoint_layout():
    keys = set(create_model("resnet20").state_dict())
    assert {"conv1.weight", "bn1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer3.2.bn2.bias",
            "linear.weight", "linear.bias"} <= keys  # fmt: skip
    assert all(k.split(".")[0] in {"conv1", "bn1", "layer1", "layer2", "layer3", "linear"} for k in keys)
    keys32 = {k for k in create_model("resnet32").state_dict() if not k.endswith("num_batches_tracked")}
    assert len(keys32) == 157 and "layer2.4.conv2.weight" in keys32
    model = create_model("resnet20")
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_resnet_option_a_shortcut():
    block = create_model("resnet20").layer2[0]
    x = torch.randn(1, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (1, 32, 4, 4)
    torch.testing.assert_close(s[:, 8:24], x[:, :, ::2, ::2])
    assert s[:, :8].abs().sum() == 0 and s[:, 24:].abs().sum() == 0


def test_convex_small_keys_and_shapes():
    model = create_model("convex_small")
    assert sorted(model.state_dict()) == [f"{i}.{p}" for i in (0, 2, 5, 7) for p in ("bias", "weight")]
    assert model[5].in_features == 1568
    assert create_model("convex_small", in_channels=3)[5].in_features == 2048
    assert create_model("convex_small", in_shape=[3, 32, 32]).in_shape == (3, 32, 32)
    with pytest.raises(ConfigError, match="in_channels"):
        create_model("convex_small", in_channels=2, in_shape=[3, 32, 32])


def test_checkpoint_roundtrip(tmp_path):
    src = _build("resnet20")
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    # like the shipped checkpoints: no num_batches_tracked
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(tmp_path / "r20.safetensors"))
    model = create_model("resnet20", pretrained=str(tmp_path / "r20.safetensors")).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))


def test_bad_checkpoints_raise(tmp_path):
    state = create_model("convex_small").state_dict()
    wrong_keys = {("fc." + k if k.startswith("7.") else k): v for k, v in state.items()}
    save_file(wrong_keys, str(tmp_path / "keys.safetensors"))
    with pytest.raises(CheckpointError) as e:
        create_model("convex_small", pretrained=str(tmp_path / "keys.safetensors"))
    assert "missing keys ['7.bias', '7.weight']" in str(e.value)
    assert "unexpected keys ['fc.7.bias', 'fc.7.weight']" in str(e.value)

    save_file(dict(state), str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=r"7.weight: checkpoint \(10, 100\) vs model \(5, 100\)"):
        create_model("convex_small", num_classes=5, pretrained=str(tmp_path / "shape.safetensors"))

    with pytest.raises(CheckpointError, match="missing keys"):
        create_model("resnet20", pretrained=str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match="not found"):
        create_model("resnet32", pretrained=str(tmp_path / "absent.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        create_model("convex_small", pretrained=str(tmp_path / "junk.safetensors"))
