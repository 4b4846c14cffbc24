"""Post-training conversion (``edgesep convert``): dense -> lowrank / kron, run directories that reload, CLI.

Independent references: the dense base model (full-rank conversion is exact), numpy (truncated SVD and the
Kronecker product of the factors), the in-memory converted model vs the reloaded run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgesep.cli import main
from edgesep.convert import FlatKronLinear, convert_model, convert_run, register_converter
from edgesep.errors import ConfigError, UnknownNameError
from edgesep.layers.lowrank import LowRankConv2d, LowRankLinear
from edgesep.models import create_model
from edgesep.runs import apply_transforms, load_run

REPO = Path(__file__).resolve().parents[1]


def _quiet(_: str) -> None:
    pass


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _x(n: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def mlp_run(tiny_run) -> Path:
    return tiny_run("mlp")


@pytest.mark.parametrize(("to", "opts"), [("lowrank", {"rank_ratio": 0.5}), ("kron", {}),
                                          ("lowrank", {"rank": 4, "exclude": ["classifier"]})])  # fmt: skip
def test_round_trip_reloads_to_the_same_logits(mlp_run, tmp_path, to, opts):
    base, _ = load_run(mlp_run)
    expected, transforms = convert_model(base, to, **opts)
    out = tmp_path / "conv"
    convert_run(mlp_run, to, out, log=_quiet, **opts)
    model, config = load_run(out)
    assert config["transforms"] == json.loads(json.dumps(transforms))
    assert config["converted_from"]["to"] == to and config["model"] == "mlp"
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), expected.eval()(_x()), rtol=0, atol=0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["params"] == sum(p.numel() for p in model.parameters())


def test_lowrank_conversion_is_the_truncated_svd(mlp_run):
    base, _ = load_run(mlp_run)
    model, transforms = convert_model(base, "lowrank", rank_ratio=0.5)
    w = base.features[0].weight.detach().numpy().astype(np.float64)  # (256, 64)
    p, s, qt = np.linalg.svd(w, full_matrices=False)
    ref = (p[:, :32] * s[:32]) @ qt[:32]
    np.testing.assert_allclose(model.features[0].to_dense().detach().numpy(), ref, atol=1e-5)
    spec = transforms[0]["layers"]["features.0"]
    assert spec["rank"] == 32 and spec["approx_error"] == pytest.approx(
        np.sqrt((s[32:] ** 2).sum() / (s**2).sum()), rel=1e-6
    )
    assert isinstance(base.features[0], nn.Linear)  # the input model is left alone


def test_full_rank_conversion_is_exact_for_linear_and_conv():
    torch.manual_seed(0)
    dense = create_model("lenet5").double().eval()
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    model, transforms = convert_model(dense, "lowrank", rank_ratio=0.0)
    assert isinstance(model.conv2, LowRankConv2d) and isinstance(model.fc1, LowRankLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-10, atol=1e-10)
    # the transform alone rebuilds the structure: same parameter names and shapes
    rebuilt = apply_transforms(create_model("lenet5"), transforms)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_kron_conversion_is_the_nearest_kronecker_product(mlp_run):
    base, _ = load_run(mlp_run)
    model, transforms = convert_model(base, "kron", layers=["features.*"])
    layer = model.features[2]
    assert isinstance(layer, FlatKronLinear) and isinstance(model.classifier, nn.Linear)
    a, b = (f.detach().numpy().astype(np.float64) for f in layer.factors)
    w = base.features[2].weight.detach().numpy().astype(np.float64)  # (256, 256) = (16*16, 16*16)
    # Van Loan–Pitsianis in numpy: rearrange so kron(A, B) is the outer product vec(A) vec(B)ᵀ
    r = w.reshape(16, 16, 16, 16).transpose(0, 2, 1, 3).reshape(256, 256)
    s = np.linalg.svd(r, compute_uv=False)
    np.testing.assert_allclose(np.kron(a, b), w, atol=np.linalg.norm(w))  # shapes agree
    err = np.linalg.norm(w - np.kron(a, b)) / np.linalg.norm(w)
    assert err == pytest.approx(np.sqrt(1 - s[0] ** 2 / (s**2).sum()), rel=1e-5)
    assert transforms[0]["layers"]["features.2"]["in_shape"] == [16, 16]


def test_fine_tuning_with_condlr_keeps_the_constraints(mlp_run, tmp_path):
    out = tmp_path / "ft"
    m = convert_run(mlp_run, "lowrank", out, rank_ratio=0.5, fine_tune_epochs=1,
                    train_overrides={"optimizer": "condlr", "lr": 0.01, "tau": 1.2}, log=_quiet)  # fmt: skip
    assert len(m["history"]) == 1
    for row in m["lowrank_layers"]:
        assert row["cond_s"] <= 1.2 * (1 + 1e-5) and row["orth_error_U"] < 1e-5
    model, config = load_run(out)
    assert config["train"]["_data"]["optimizer"] == "condlr" and config["transforms"][0]["kind"] == "lowrank"
    w = model.features[0]
    assert w.condition_number() <= 1.2 * (1 + 1e-4)


def test_registered_converters_and_errors(mlp_run, tmp_path):
    base, _ = load_run(mlp_run)
    with pytest.raises(UnknownNameError, match="unknown conversion target 'nope'"):
        convert_model(base, "nope")
    with pytest.raises(ConfigError, match="exactly one"):
        convert_model(base, "lowrank")
    with pytest.raises(ConfigError, match="its options are: factors, shapes, layers, exclude"):
        convert_model(base, "kron", rank=3)
    with pytest.raises(ConfigError, match="eligible"):
        convert_model(base, "lowrank", rank=2, layers=["conv*"])

    def half(model, **_):  # a converter from outside: scales the classifier (structure unchanged)
        with torch.no_grad():
            model.classifier.weight.mul_(0.5)
        return model, []

    register_converter("test_half", half)
    model, transforms = convert_model(base, "test_half")
    assert transforms == [] and torch.equal(model.classifier.weight, base.classifier.weight * 0.5)


def test_cli_convert_and_one_line_errors(mlp_run, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["convert", str(mlp_run), "--to", "lowrank", "--rank-ratio", "0.5", "--exclude", "classifier",
                 "--out", str(out)]) == 0  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    model, _ = load_run(out)
    assert isinstance(model.classifier, nn.Linear) and isinstance(model.features[0], LowRankLinear)
    cases = [
        (["--to", "lowrank", "--out", str(tmp_path / "a")], "exactly one of --rank-ratio"),
        (["--to", "svd", "--rank", "3", "--out", str(tmp_path / "b")], "unknown conversion target 'svd'"),
        (["--to", "lowrank", "--rank-ratio", "0.5", "--out", str(out)], "already holds a run"),
        (["--to", "kron", "--rank", "3", "--out", str(tmp_path / "c")], "do not apply to --to kron"),
        (["--to", "lowrank", "--rank-ratio", "0.5", "--tau", "1.1", "--out", str(tmp_path / "d")],
         "need --fine-tune-epochs"),
    ]  # fmt: skip
    for args, needle in cases:
        assert main(["convert", str(mlp_run), *args]) == 2, args
        err = " ".join(capsys.readouterr().err.split())  # rich wraps at the (test) terminal's width
        assert "Traceback" not in err and err.startswith("error: ") and needle in err, err
    # the installed entry point behaves the same (one line, exit 2, no traceback)
    env = {**os.environ, "COLUMNS": "300"}
    r = subprocess.run([sys.executable, "-m", "edgesep", "convert", "missing", "--to", "lowrank", "--rank", "2",
                        "--out", "e"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not found" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_fine_tuning_resumes_bit_identically(mlp_run, tmp_path):
    from safetensors.torch import load_file

    from edgesep.train import TrainConfig, train

    kw = {"rank_ratio": 0.5, "fine_tune_epochs": 2, "train_overrides": {"optimizer": "condlr", "lr": 0.01}}
    convert_run(mlp_run, "lowrank", tmp_path / "full", log=_quiet, **kw)

    def interrupt_after_epoch_1(line: str) -> None:  # epoch 2's log line comes before its state is saved
        if line.startswith("epoch 2/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_run(mlp_run, "lowrank", tmp_path / "cut", log=interrupt_after_epoch_1, **kw)
    # resume rebuilds the converted structure from the transforms stored in config.json
    stored = json.loads((tmp_path / "cut" / "config.json").read_text())
    train(TrainConfig.from_dict(stored["train"]), tmp_path / "cut", resume=True, progress=False, log=_quiet)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert set(a) == set(b) and any(k.endswith(".U") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert isinstance(load_run(tmp_path / "cut")[0].features[0], LowRankLinear)
