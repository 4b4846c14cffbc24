"""The CondLR optimizer and low-rank training through the pipeline.

Independent references: a numpy re-implementation of one CondLR step (tangent projection, scaling, momentum,
sign-fixed QR retraction, conditioning of S), numpy SVDs for orthonormality and condition numbers, an
uninterrupted run for resume, ONNX Runtime for the exported lowrank_lenet5 (the bundle's parity check and the
test's own session)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from edgesep.errors import ConfigError
from edgesep.layers.lowrank import LowRankConv2d, LowRankLinear, lowrank_layers
from edgesep.models import create_model
from edgesep.optim import CondLR, condition_core, condlr_param_groups, stiefel_project
from edgesep.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def _quiet(_: str) -> None:
    pass


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------------------------
# numpy reference of one step for one triplet (float64)


def _np_sign_qr(x):
    q, r = np.linalg.qr(x)
    d = np.sign(np.diag(r))
    d[d == 0] = 1
    return q * d


def _np_proj(u, g):
    a = u.T @ g
    return g - u @ ((a + a.T) / 2)


def _np_condition(s, tau):
    p, sv, qh = np.linalg.svd(s)
    mu = np.sqrt((sv**2).sum() / len(sv))
    e = mu * (tau - 1) / (tau + 1)
    new = np.full_like(sv, mu) if tau == 1 else np.clip(sv, mu - e, mu + e)
    return (p * new) @ qh


def _np_step(u, s, v, gu, gs, gv, bufs, lr, mom, tau):
    sv = np.linalg.svd(s, compute_uv=False)
    scale = 1 / ((s**2).sum() / len(s)) if tau == 1 else (sv.min() / sv.max()) ** 2
    out = []
    for w, g, key in ((u, gu, "u"), (v, gv, "v")):
        d = _np_proj(w, g) * scale
        b = d if bufs.get(key) is None else mom * _np_proj(w, bufs[key]) + d
        bufs[key] = b
        out.append(_np_sign_qr(w - lr * _np_proj(w, b)))
    b = gs if bufs.get("s") is None else mom * bufs["s"] + gs
    bufs["s"] = b
    return out[0], _np_condition(s - lr * b, tau), out[1]


def _layer64(seed: int = 0) -> LowRankLinear:
    torch.manual_seed(seed)
    layer = LowRankLinear(12, 9, rank=4).double()
    with torch.no_grad():
        layer.S.copy_(torch.randn(4, 4, dtype=torch.float64))  # ill-conditioned, full
    return layer


@pytest.mark.parametrize("tau", [1.0, 1.1, 1.5])
def test_steps_match_the_numpy_reference(tau):
    layer = _layer64()
    opt = CondLR.for_model(layer, lr=0.05, momentum=0.9, tau=tau)
    u, s, v = (p.detach().numpy().copy() for p in (layer.U, layer.S, layer.V))
    bufs: dict = {}
    x = torch.randn(16, 12, dtype=torch.float64)
    y = torch.randint(0, 9, (16,))
    for _ in range(3):  # three steps: the momentum buffers are transported and used
        opt.zero_grad()
        F.cross_entropy(layer(x), y).backward()
        gu, gs, gv = (p.grad.numpy().copy() for p in (layer.U, layer.S, layer.V))
        u, s, v = _np_step(u, s, v, gu, gs, gv, bufs, 0.05, 0.9, tau)
        opt.step()
        np.testing.assert_allclose(layer.U.detach().numpy(), u, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(layer.V.detach().numpy(), v, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(layer.S.detach().numpy(), s, rtol=1e-9, atol=1e-11)
    sv = np.linalg.svd(s, compute_uv=False)
    assert sv.max() / sv.min() <= tau * (1 + 1e-12)


def test_tangent_projection_against_numpy():
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((10, 4)))[0]
    g = rng.standard_normal((10, 4))
    z = stiefel_project(torch.from_numpy(u), torch.from_numpy(g)).numpy()
    ref = g - u @ (u.T @ g + g.T @ u) / 2
    np.testing.assert_allclose(z, ref, atol=1e-14)
    np.testing.assert_allclose(u.T @ z + z.T @ u, np.zeros((4, 4)), atol=1e-13)  # in the tangent space
    # the part of g normal to the tangent space (U sym(Uᵀ G)) is orthogonal to it in the Frobenius inner product
    assert abs(np.sum((g - z) * z)) < 1e-12


def test_conditioning_tau_1_is_sqrt_a_times_orthogonal_and_tau_gt_1_clamps():
    rng = np.random.default_rng(1)
    s = rng.standard_normal((6, 6))
    a = (s**2).sum() / 6
    s1 = condition_core(torch.from_numpy(s), 1.0).numpy()
    np.testing.assert_allclose(s1.T @ s1, a * np.eye(6), atol=1e-12)
    q = s1 / np.sqrt(a)  # S = sqrt(a) Q with Q the polar factor of S: Qᵀ S symmetric positive definite
    np.testing.assert_allclose(q.T @ s, (q.T @ s).T, atol=1e-12)
    assert np.all(np.linalg.eigvalsh((q.T @ s + s.T @ q) / 2) > 0)
    for tau in (1.1, 1.5, 3.0):
        st = condition_core(torch.from_numpy(s), tau).numpy()
        sv, sv0 = np.linalg.svd(st, compute_uv=False), np.linalg.svd(s, compute_uv=False)
        assert sv.max() / sv.min() == pytest.approx(min(tau, sv0.max() / sv0.min()), rel=1e-9)
        mu = np.sqrt(a)
        e = mu * (tau - 1) / (tau + 1)
        np.testing.assert_allclose(sv, np.clip(sv0, mu - e, mu + e), rtol=1e-10)
    # an S already inside the band is left alone
    ok = np.diag([1.0, 1.02, 0.98])
    np.testing.assert_allclose(condition_core(torch.from_numpy(ok), 1.5).numpy(), ok, atol=1e-14)


@pytest.mark.parametrize("tau", [1.0, 1.1, 1.5])
def test_after_every_step_orthonormal_and_cond_le_tau_float32(tau):
    torch.manual_seed(0)
    model = create_model("lowrank_lenet5", rank_ratio=0.5)
    opt = CondLR.for_model(model, lr=0.1, momentum=0.9, tau=tau, weight_decay=1e-4)
    x = torch.rand(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        for name, m in lowrank_layers(model):
            r = m.rank
            for w in (m.U, m.V):
                w64 = w.detach().double().numpy()
                assert np.linalg.norm(w64.T @ w64 - np.eye(r)) < 1e-5, name
            sv = np.linalg.svd(m.S.detach().double().numpy(), compute_uv=False)
            assert sv.max() / sv.min() <= tau * (1 + 1e-5), name
            if tau == 1.0:
                s = m.S.detach().double().numpy()
                np.testing.assert_allclose(s.T @ s, (s**2).sum() / r * np.eye(r), rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0]  # a few steps on one batch lower the loss


def test_float64_stays_on_the_manifold_tightly():
    torch.manual_seed(1)
    conv = LowRankConv2d(3, 8, 3, rank=4).double()
    opt = CondLR.for_model(conv, lr=0.5, momentum=0.9, tau=1.1)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for _ in range(20):
        opt.zero_grad()
        conv(x).pow(2).mean().backward()
        opt.step()
        eu, ev = conv.orthonormality_error()
        assert eu < 1e-13 and ev < 1e-13
        assert conv.cond_s() <= 1.1 * (1 + 1e-12)


def test_plain_parameters_get_torch_sgd_updates():
    torch.manual_seed(2)
    a = torch.nn.Linear(5, 3)
    b = torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    opt_a = CondLR(a.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    x = torch.randn(8, 5)
    for _ in range(4):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-7)


def test_state_dict_round_trip_continues_identically():
    layer = _layer64(3)
    opt = CondLR.for_model(layer, lr=0.05, momentum=0.9, tau=1.1)
    x = torch.randn(8, 12, dtype=torch.float64)

    def step(m, o):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()

    step(layer, opt)
    twin = _layer64(3)
    twin.load_state_dict(layer.state_dict())
    opt2 = CondLR.for_model(twin, lr=0.05, momentum=0.9, tau=1.1)
    sd = opt.state_dict()
    groups = json.loads(json.dumps(sd["param_groups"]))  # the group options survive JSON (train_state.json)
    opt2.load_state_dict({"state": sd["state"], "param_groups": groups})
    step(layer, opt)
    step(twin, opt2)
    for p, q in zip(layer.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_bad_options_and_groups_are_config_errors():
    layer = LowRankLinear(6, 5, rank=2)
    with pytest.raises(ConfigError, match="tau"):
        CondLR.for_model(layer, tau=0.9)
    with pytest.raises(ConfigError, match="momentum"):
        CondLR.for_model(layer, momentum=1.0)
    with pytest.raises(ConfigError, match=r"\[U \(m, r\), S \(r, r\), V \(n, r\)\]"):
        CondLR([{"params": [layer.U, layer.V], "lowrank": True}])
    groups = condlr_param_groups(torch.nn.Sequential(layer, torch.nn.Linear(5, 2)))
    assert [g["lowrank"] for g in groups] == [True, False] and len(groups[1]["params"]) == 3  # U S V; bias + lin


# ----------------------------------------------------------------------------------------------------------------
# training runs (MNIST from the shared data)

QUICK = {"dataset": "mnist", "max_train": 192, "batch_size": 64, "eval_n": 0, "lr": 0.05, "momentum": 0.9}


def test_resume_is_bit_identical(tmp_path, shared_data):
    cfg = TrainConfig(model="lowrank_lenet5", optimizer="condlr", tau=1.1, rank_ratio=0.5, epochs=3,
                      data_dir=str(shared_data / "mnist"), **QUICK)  # fmt: skip
    full = train(cfg, tmp_path / "full", progress=False, log=_quiet)

    def interrupt_after_epoch_2(line: str) -> None:
        if line.startswith("epoch 2/3"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False, log=interrupt_after_epoch_2)
    train(cfg, tmp_path / "cut", resume=True, progress=False, log=_quiet)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # per-epoch condition numbers of every low-rank layer, all <= tau
    conds = full["history"][-1]["condition_numbers"]
    assert set(conds) == {"conv1", "conv2", "fc1", "fc2"} and max(conds.values()) <= 1.1 * (1 + 1e-4)
    assert [r["rank"] for r in full["lowrank_layers"]] == [3, 8, 60, 42]


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory, shared_data) -> Path:
    """lowrank_lenet5 trained by the CLI: --optimizer condlr --tau 1.1 --rank-ratio 0.5."""
    from edgesep.cli import main

    out = tmp_path_factory.mktemp("condlr") / "run"
    args = ["train", "--model", "lowrank_lenet5", "--data", "mnist", "--data-dir", str(shared_data / "mnist"),
            "--optimizer", "condlr", "--tau", "1.1", "--rank-ratio", "0.5", "--lr", "0.05", "--epochs", "2",
            "--max-train", "512", "--batch-size", "64", "--eval-n", "200", "--eps", "0", "--out", str(out)]  # fmt: skip
    rc = main(args)
    assert rc == 0
    return out


def test_cli_train_records_tau_rank_ratio_and_conditions(lenet_run):
    cfg = json.loads((lenet_run / "config.json").read_text())
    assert cfg["train"]["_data"]["optimizer"] == "condlr" and cfg["train"]["_data"]["tau"] == 1.1
    assert cfg["model_kwargs"]["rank_ratio"] == 0.5
    m = json.loads((lenet_run / "metrics.json").read_text())
    assert m["history"][1]["loss"] < m["history"][0]["loss"] and m["clean_accuracy"] is not None
    for row in m["lowrank_layers"]:
        assert row["cond_s"] <= 1.1 * (1 + 1e-5) and row["orth_error_U"] < 1e-5 and row["orth_error_V"] < 1e-5
        assert row["condition_number"] == pytest.approx(row["cond_s"], rel=1e-4)  # U, V orthonormal


def test_condlr_on_a_model_without_rank_ratio_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="takes no rank_ratio"):
        train(TrainConfig(model="mlp", rank_ratio=0.5, epochs=1, eval_n=0), tmp_path / "r", log=_quiet)


def test_export_parity_standard_ops_and_int8(lenet_run, tmp_path, shared_data):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxsim")
    from edgesep.export import export_run, quantize_bundle
    from edgesep.runs import load_run

    out = tmp_path / "lenet.bundle"
    export_run(lenet_run, out, eval_sets="clean:300", log=_quiet, progress=False)
    onnx_path = out / "model.onnx"
    if not onnx_path.exists():
        onnx_path = next(out.rglob("*.onnx"))
    graph = onnx.load(onnx_path)
    domains = {n.domain for n in graph.graph.node}
    assert domains <= {"", "ai.onnx"}, domains  # standard ops only: no custom domain
    ops = {n.op_type for n in graph.graph.node}
    assert "Conv" in ops and ops <= {"Conv", "Relu", "MaxPool", "MatMul", "Gemm", "Add", "Sub", "Div", "Reshape",
                                     "Flatten", "Mul", "Transpose"}, ops  # fmt: skip
    model, _ = load_run(lenet_run)
    from edgesep.data import load_dataset

    x = load_dataset("mnist", shared_data / "mnist").x_test[:64]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    rep = quantize_bundle(out, calib=128, data_dir=shared_data / "mnist", log=_quiet, max_drop=5.0)
    assert Path(rep.out_path).is_file()
