"""GDWS at network level: alphas, conversion, BN recalibration, form choice, run directories, export, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgesep.errors import ConfigError
from edgesep.gdws import (
    apply_gdws_spec,
    choose_forms,
    compute_alphas,
    convert_model,
    find_targets,
    fold_model,
    gdws_run,
    recalibrate_bn,
)
from edgesep.layers.gdws import GDWSConv2d
from edgesep.stats import count_macs

REPO = Path(__file__).resolve().parents[1]


def _small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, stride=2),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=3),  # grouped: skipped
        nn.Conv2d(6, 8, 1),  # 1x1: skipped
        nn.Dropout(0.5),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def _reference_alphas(model: nn.Module, x: torch.Tensor, name: str) -> np.ndarray:
    """The reference code's loop: one image, one class pair, one backward at a time (model in eval mode)."""
    w = model.get_submodule(name).weight
    m, c, k1, k2 = w.shape
    total = np.zeros(c)
    model.eval()
    for xi in x:
        z = model(xi[None])[0]
        t = int(z.argmax())
        for j in range(len(z)):
            if j == t:
                continue
            d = z[t] - z[j]
            (gw,) = torch.autograd.grad(d, w, retain_graph=True)
            total += (gw.double() ** 2).sum(dim=(0, 2, 3)).numpy() / (2 * d.item() ** 2 * m * k1 * k2)
    return total / len(x)


def test_targets_skip_first_grouped_and_pointwise():
    targets, skipped = find_targets(_small_cnn())
    assert targets == ["3", "9"]
    reasons = {s["name"]: s["reason"] for s in skipped}
    assert "first" in reasons["0"] and "grouped" in reasons["6"] and "1x1" in reasons["7"]
    assert find_targets(_small_cnn(), skip_first=False)[0] == ["0", "3", "9"]


def test_alphas_match_the_per_example_reference_in_eval_mode_and_restore_modes():
    model = _small_cnn()
    model.train()
    model[4].eval()  # a caller's per-module flag must survive too
    x = torch.rand(5, 1, 8, 8)
    y = torch.randint(0, 3, (5,))
    got = compute_alphas(model, x, y, ["3", "9"], attack=None, batch_size=2)
    assert model.training and not model[4].training and model[1].training
    assert all(p.grad is None for p in model.parameters())
    for name in ("3", "9"):
        np.testing.assert_allclose(got[name].numpy(), _reference_alphas(model, x, name), rtol=1e-4, atol=1e-12)
    # under PGD: same seed, same alphas; eval mode regardless of the caller's mode
    a1 = compute_alphas(model.train(), x, y, ["3"], attack="pgd:linf:0.1:3", seed=1)
    a2 = compute_alphas(model.eval(), x, y, ["3"], attack="pgd:linf:0.1:3", seed=1)
    torch.testing.assert_close(a1["3"], a2["3"])
    assert not torch.allclose(a1["3"], got["3"].double())  # the attack moved the images


def test_convert_meets_the_mac_budget_and_counts_like_torch():
    model = _small_cnn().eval()
    for alloc in ("lego", "uniform", "greedy", "equal"):
        new, rep = convert_model(model, (1, 12, 12), mac_budget=0.5, allocation=alloc)
        assert rep["converted_macs_after"] <= 0.5 * rep["converted_macs_before"]
        saved = rep["conv_macs_before"] - rep["conv_macs_after"]
        assert count_macs(model, (1, 12, 12)) - count_macs(new, (1, 12, 12)) == saved  # torch's FlopCounter
        assert isinstance(new.get_submodule("3"), GDWSConv2d) and isinstance(model.get_submodule("3"), nn.Conv2d)
        assert [r["name"] for r in rep["layers"]] == ["3", "9"]
    with pytest.raises(ConfigError, match="exactly one budget"):
        convert_model(model, (1, 12, 12))
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        convert_model(model, (1, 12, 12), mac_budget=1.5)


def test_equal_allocation_is_the_largest_equal_g_that_fits_each_layer():
    model = _small_cnn().eval()
    new, rep = convert_model(model, (1, 12, 12), mac_budget=0.5, allocation="equal")
    for r in rep["layers"]:
        conv = model.get_submodule(r["name"])
        k2, c, m = math.prod(conv.kernel_size), conv.in_channels, conv.out_channels
        g = r["g_min"]
        assert r["g_max"] == g and new.get_submodule(r["name"]).form == "branches"
        assert g * c * (k2 + m) <= 0.5 * m * c * k2 < (g + 1) * c * (k2 + m)  # per output pixel
    # within an equal g, keeping every channel's top-g triplets is the optimum: the error is the per-layer tail sum
    from edgesep.layers.gdws import channel_svd

    for r in rep["layers"]:
        s = channel_svd(model.get_submodule(r["name"]).weight).s
        assert r["frobenius_error"] == pytest.approx(float((s[:, r["g_min"] :] ** 2).sum()), rel=1e-9)
    x = torch.rand(3, 1, 12, 12)
    torch.testing.assert_close(new(x), fold_model(new)(x), atol=1e-5, rtol=1e-5)
    # a budget below one kernel per channel keeps one (plain DWS) and says so
    _, rep = convert_model(model, (1, 12, 12), mac_budget=0.01, allocation="equal")
    assert all(r["g_max"] == 1 for r in rep["layers"]) and rep["warnings"]


def test_beta_zero_is_exact_and_a_huge_beta_keeps_one_kernel_and_says_so():
    model = _small_cnn().eval()
    x = torch.rand(4, 1, 12, 12)
    new, rep = convert_model(model, (1, 12, 12), beta=0.0)
    torch.testing.assert_close(new(x), model(x), atol=1e-5, rtol=1e-5)
    new, rep = convert_model(model, (1, 12, 12), beta=1e9)
    assert [r["G"] for r in rep["layers"]] == [1, 1]
    assert len(rep["warnings"]) == 2 and "would keep no kernel" in rep["warnings"][0]
    assert all(r["forced_min_keep"] for r in rep["layers"])


def test_spec_rebuilds_the_structure_and_fold_keeps_the_function():
    from edgesep.gdws import gdws_spec

    model = _small_cnn().eval()
    new, _ = convert_model(model, (1, 12, 12), mac_budget=0.6, allocation="uniform")
    spec = json.loads(json.dumps(gdws_spec(new)))
    rebuilt = apply_gdws_spec(_small_cnn(seed=1).eval(), spec)
    rebuilt.load_state_dict(new.state_dict())
    x = torch.rand(3, 1, 12, 12)
    torch.testing.assert_close(rebuilt(x), new(x))
    torch.testing.assert_close(fold_model(new)(x), new(x), atol=1e-5, rtol=1e-5)


def test_bn_recalibration_equals_the_batch_statistics():
    model = _small_cnn().eval()
    new, _ = convert_model(model, (1, 12, 12), mac_budget=0.5)
    new[4].momentum = 0.3
    new.train()
    new[8].eval()
    x = torch.rand(50, 1, 12, 12)
    assert recalibrate_bn(new, x, batch_size=50) == 2
    assert new.training and not new[8].training and new[4].momentum == 0.3
    with torch.no_grad():
        h = new[3](torch.relu(new[1](new[0](x))))  # the input of BN 4, from the recalibrated BN 1
    torch.testing.assert_close(new[4].running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new[4].running_var, h.var(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)  # unbiased, as BN


def test_choose_forms_keeps_the_fastest_and_never_a_slower_form():
    model = _small_cnn().eval()
    new, _ = convert_model(model, (1, 12, 12), mac_budget=0.5)
    x = torch.rand(2, 1, 12, 12)
    before = new(x)
    new, rows = choose_forms(new, (1, 12, 12), "torch", repeat=5, warmup=1)
    for r in rows:
        assert r["ms"][r["chosen"]] == min(r["ms"].values())
        layer = new.get_submodule(r["name"])
        assert isinstance(layer, nn.Conv2d) if r["chosen"] == "dense" else layer.form == r["chosen"]
    torch.testing.assert_close(new(x), before, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- pretrained


@pytest.fixture(scope="module")
def resnet_gdws(tmp_path_factory, shared_models, shared_data):
    """(in-memory converted resnet20, its run directory, test images): unweighted, half the MACs."""
    from edgesep.data import load_dataset
    from edgesep.models import create_model

    ckpt = shared_models / "akamaster_resnet_cifar10/resnet20.safetensors"
    data_dir = shared_data / "cifar10_jpeg"
    out = tmp_path_factory.mktemp("gdws") / "r20"
    metrics = gdws_run(
        "resnet20", out, mac_budget=0.5, weighted=False, eval_n=64, pretrained=str(ckpt), data_dir=str(data_dir),
        log=lambda _: None,
    )  # fmt: skip
    model = create_model("resnet20", pretrained=str(ckpt)).eval()
    new, rep = convert_model(model, (3, 32, 32), mac_budget=0.5)
    data = load_dataset("cifar10", data_dir)
    idx = np.random.default_rng(0).permutation(len(data.y_test))[:64]
    return new, out, data.x_test[idx], data.y_test[idx], metrics, rep


def test_resnet20_run_dir_loads_to_the_same_logits(resnet_gdws):
    from edgesep.runs import load_run

    new, out, x, _, metrics, rep = resnet_gdws
    loaded, config = load_run(out)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        torch.testing.assert_close(loaded(xt), new(xt), atol=1e-5, rtol=1e-5)
    assert config["transforms"][-1]["kind"] == "gdws" and len(config["transforms"][-1]["layers"]) == 18
    assert config["train"]["_type"] == "PretrainedSource"
    assert metrics["gdws"]["conv_mac_reduction"] == pytest.approx(rep["conv_mac_reduction"])
    assert rep["conv_mac_reduction"] > 1.9 and rep["converted_mac_reduction"] >= 2.0
    assert metrics["macs"]["before"] - metrics["macs"]["after"] == rep["conv_macs_before"] - rep["conv_macs_after"]
    acc = metrics["clean_accuracy"]
    assert acc["n"] == 64 and acc["after"] <= acc["before"] + 0.1
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.pt*"))


def test_small_gdws_model_exports_with_ort_and_reference_parity(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    from edgesep.export._onnx import export_onnx

    new, _ = convert_model(_small_cnn().eval(), (1, 12, 12), mac_budget=0.5, allocation="greedy")
    new.get_submodule("9").set_form("gather")
    path = tmp_path / "s.onnx"
    export_onnx(new, (1, 12, 12), path)
    m = onnx.load(path)
    assert {"Conv", "Gather"} <= {n.op_type for n in m.graph.node}
    x = torch.rand(4, 1, 12, 12)
    with torch.no_grad():
        want = new(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], want, rtol=1e-4, atol=1e-5)
    got = ReferenceEvaluator(m).run(None, {m.graph.input[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_resnet20_gdws_exports_to_standard_ops_with_ort_parity(resnet_gdws, tmp_path):
    import onnx
    import onnxruntime as ort

    from edgesep.export._onnx import export_onnx

    new, _, x, _, _, _ = resnet_gdws
    path = tmp_path / "g.onnx"
    export_onnx(new, (3, 32, 32), path)
    m = onnx.load(path)
    ops = {n.op_type for n in m.graph.node}
    assert {"Conv", "Gather"} <= ops
    assert ops <= {"Conv", "Gather", "Relu", "Add", "Slice", "Pad", "Sub", "Div", "ReduceMean", "Reshape", "Gemm",
                   "GlobalAveragePool", "Flatten", "Mul"}  # fmt: skip
    groups = [a.i for n in m.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert sum(g > 1 for g in groups) == 18  # one depthwise conv per converted layer
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = new(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.slow
def test_gdws_bundle_quantizes_behind_the_gate(resnet_gdws, tmp_path):
    from edgesep.export import export_run, quantize_bundle

    _, out, _, _, _, _ = resnet_gdws
    bundle = tmp_path / "g.bundle"
    export_run(out, bundle, eval_sets="clean:300", log=lambda _: None)
    rep = quantize_bundle(bundle, calib=128, max_drop=100, max_robust_drop=100, log=lambda _: None)
    assert rep.per_channel and rep.passed
    dw = [ly for ly in rep.layers if ly.op_type == "Conv" and ly.weight_shape[1:] == [1, 3, 3]]
    assert len(dw) == 18 and all(ly.quantized and ly.weight_axis == 0 for ly in dw)
    assert all(ly.weight_scales == ly.weight_shape[0] for ly in dw)  # one scale per depthwise kernel
    clean = next(r for r in rep.gate if r.metric == "clean")
    assert clean.n == 300


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_gdws_on_convex_small(tmp_path, shared_models, shared_data):
    from edgesep.cli import main
    from edgesep.runs import load_run

    out = tmp_path / "cs"
    args = ["gdws", "convex_small", "--mac-budget", "0.5", "--alphas", "4", "--eval-n", "100", "--out", str(out),
            "--pretrained", str(shared_models / "convex_adversarial/mnist.safetensors"),
            "--data-dir", str(shared_data / "mnist")]  # fmt: skip
    main(args)
    model, config = load_run(out)
    assert isinstance(model.get_submodule("2"), GDWSConv2d)  # the second conv; the first is kept
    assert config["gdws"]["_data"]["weighted"] and (out / "alphas.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["gdws"]["converted_mac_reduction"] >= 2.0
    assert math.isfinite(metrics["clean_accuracy"]["after"])
    # the equal allocation, forms timed at batch 4 on ONNX Runtime: branches among the timed forms, the choice kept
    out2 = tmp_path / "cs_eq"
    assert main([*args[:8], "--out", str(out2), "--allocation", "equal", "--unweighted", "--choose-form", "onnxruntime",
                 "--choose-batch", "4", *args[10:]]) == 0  # fmt: skip
    forms = json.loads((out2 / "metrics.json").read_text())["gdws"]["forms"]
    assert forms["runtime"] == "onnxruntime" and forms["batch"] == 4
    assert all({"dense", "gather", "branches"} <= set(r["ms"]) for r in forms["layers"])
    model2, config2 = load_run(out2)
    layer = model2.get_submodule("2")
    chosen = forms["layers"][0]["chosen"]
    assert (isinstance(layer, nn.Conv2d) if chosen == "dense" else layer.form == chosen)
    assert config2["gdws"]["_data"]["choose_batch"] == 4 and config2["gdws"]["_data"]["allocation"] == "equal"


def test_cli_gdws_errors_are_one_line(tmp_path, capsys):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "edgesep", "gdws", "resnet20", "--beta", "1", "--mac-budget", "0.5", "--out",
         str(tmp_path / "x")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 2
    assert "exactly one of --beta" in r.stderr and "Traceback" not in r.stderr
