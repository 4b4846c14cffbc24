"""Training, run directories and resume, on the bundled digits (seconds on 2 cores)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from edgesep.errors import CheckpointError, ConfigError, UnknownNameError
from edgesep.runs import load_run
from edgesep.train import TrainConfig, train

QUICK = dict(dataset="digits", epochs=3, batch_size=64, lr=3e-3, eval_n=200, eval_steps=5, seed=0)


def _quiet(_line: str) -> None:
    pass


def test_run_directory_rebuilds_the_model(tmp_path):
    cfg = TrainConfig(model="kron_mlp", adv="fgsm", eps=0.1, lambda_c=1e-3, **QUICK)
    m = train(cfg, tmp_path / "run", progress=False, log=_quiet)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert {"model.safetensors", "config.json", "metrics.json"} <= set(files)
    assert not [f for f in files if f.endswith((".pt", ".pth", ".pkl", ".bin"))]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"] == "kron_mlp" and config["normalization"]["inside_model"]
    assert TrainConfig.from_dict(config["train"]) == cfg

    model, _ = load_run(tmp_path / "run")
    weights = load_file(tmp_path / "run" / "model.safetensors")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)

    import numpy as np

    from edgesep.data import load_dataset
    from edgesep.evaluate import accuracy

    data = load_dataset("digits")
    idx = np.random.default_rng(0).permutation(len(data.y_test))[:200]  # the trainer's seeded eval subset
    acc = accuracy(model, torch.as_tensor(data.x_test[idx]), torch.as_tensor(data.y_test[idx]))
    assert acc == pytest.approx(m["clean_accuracy"], abs=1e-9)
    assert m["clean_accuracy"] > 0.6  # 3 epochs of adversarial training on digits
    for key in (
        "params",
        "fc_params",
        "nonzeros",
        "macs",
        "kron_layers",
        "robust",
        "train_time_s",
        "history",
    ):
        assert key in m
    assert len(m["history"]) == 3 and m["robust"][0]["eps"] == 0.1
    assert all(r["condition_number"] >= 1.0 for r in m["kron_layers"])


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(model="kron_mlp", adv="pgd", eps=0.1, adv_steps=2, **{**QUICK, "eval_n": 50})
    train(cfg, tmp_path / "full", progress=False, log=_quiet)

    def interrupt_after_epoch_2(line: str) -> None:
        if line.startswith("epoch 2/3"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False, log=interrupt_after_epoch_2)
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    train(cfg, tmp_path / "cut", resume=True, progress=False, log=_quiet)
    full = load_file(tmp_path / "full" / "model.safetensors")
    cut = load_file(tmp_path / "cut" / "model.safetensors")
    for k in full:
        torch.testing.assert_close(cut[k], full[k], rtol=0, atol=0)


def test_refuses_to_overwrite_and_to_resume_nothing(tmp_path):
    cfg = TrainConfig(model="mlp", **{**QUICK, "epochs": 1, "eval_n": 0})
    train(cfg, tmp_path / "r", progress=False, log=_quiet)
    with pytest.raises(CheckpointError, match="already holds a run"):
        train(cfg, tmp_path / "r", progress=False, log=_quiet)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(cfg, tmp_path / "empty", resume=True, progress=False, log=_quiet)


@pytest.mark.parametrize(
    ("changes", "match"),
    [({"adv": "cw"}, "adv must be one of"), ({"optimizer": "lion"}, "optimizer"), ({"eps": -1.0}, "eps"),
     ({"prune": 1.0}, "prune"), ({"epochs": 0}, "epochs")],
)  # fmt: skip
def test_bad_options_are_config_errors(tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match):
        train(TrainConfig(**{**QUICK, **changes}), tmp_path / "r", progress=False, log=_quiet)


def test_unknown_model_lists_valid_ones(tmp_path):
    with pytest.raises(UnknownNameError, match="kron_mlp"):
        train(TrainConfig(model="nope", **QUICK), tmp_path / "r", progress=False, log=_quiet)


def test_condition_term_lowers_the_condition_number(tmp_path):
    base = dict(model="kron_mlp", adv="none", **{**QUICK, "epochs": 4, "eval_n": 0})
    free = train(TrainConfig(**base), tmp_path / "free", progress=False, log=_quiet)
    reg = train(TrainConfig(lambda_c=0.1, **base), tmp_path / "reg", progress=False, log=_quiet)
    c_free = max(r["condition_number"] for r in free["kron_layers"])
    c_reg = max(r["condition_number"] for r in reg["kron_layers"])
    assert c_reg < c_free


def test_pgd_training_is_more_robust_than_clean_training(tmp_path):
    base = dict(model="mlp", **{**QUICK, "epochs": 8, "eval_n": 300, "eval_steps": 10})
    clean = train(TrainConfig(adv="none", eps=0.15, **base), tmp_path / "clean", progress=False, log=_quiet)
    adv = train(TrainConfig(adv="pgd", eps=0.15, adv_steps=5, **base), tmp_path / "adv", progress=False,
                log=_quiet)  # fmt: skip
    assert adv["robust"][0]["accuracy"] > clean["robust"][0]["accuracy"] + 0.1


def test_pruning_reports_nonzeros(tmp_path):
    cfg = TrainConfig(model="kron_mlp", prune=0.5, **{**QUICK, "epochs": 1, "eval_n": 0})
    m = train(cfg, tmp_path / "r", progress=False, log=_quiet)
    assert m["nonzeros"] < m["params"]
    assert all(r["nonzeros"] < r["params"] for r in m["kron_layers"])
