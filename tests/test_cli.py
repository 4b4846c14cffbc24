"""The CLI: commands run end to end; user errors exit 2 with one line and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgesep.cli import main


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "edgesep", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=env)  # fmt: skip


def test_models_lists_with_wildcards(capsys):
    assert main(["models", "kron*"]) == 0
    names = capsys.readouterr().out.split()
    assert "kron_mlp" in names and "mlp" not in names


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--model", "nope", "--out", "{tmp}/r"], "unknown model 'nope'"),
        (["train", "--data", "imagenet", "--out", "{tmp}/r"], "unknown dataset 'imagenet'"),
        (["train", "--data", "mnist", "--data-dir", "{tmp}/missing", "--out", "{tmp}/r"], "missing"),
        (
            ["train", "--model", "kron_mlp", "--model-arg", "hidden_shapes=[[2,3]]", "--out", "{tmp}/r"],
            "shape",
        ),
        (["eval", "{tmp}/no_run"], "not found"),
        (["train", "--adv", "cw", "--out", "{tmp}/r"], "adv must be one of"),
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path, args, needle):
    r = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert needle.lower() in r.stderr.lower()


def test_train_then_eval_writes_json(tmp_path):
    r = _cli("train", "--model", "kron_mlp", "--epochs", "2", "--adv", "fgsm", "--eval-n", "100",
             "--eval-steps", "3", "--out", str(tmp_path / "run"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "clean acc" in r.stdout
    r = _cli("eval", str(tmp_path / "run"), "--attack", "pgd", "--eps", "0.1", "--steps", "5", "--n", "100",
             "--json", str(tmp_path / "out.json"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["n"] == 100 and 0 <= out["robust"][0]["accuracy"] <= out["clean"] <= 1
    # attacks without steps (FGSM) take the same command line; --steps only applies to PGD
    r = _cli("eval", str(tmp_path / "run"), "--attack", "fgsm", "--eps", "0.1", "--n", "100")
    assert r.returncode == 0, r.stderr
    assert "fgsm linf eps=0.1" in r.stdout


def test_demo_runs_and_prints_the_comparison(tmp_path):
    # the training and deployment halves only: the on-device half (compile, bench, report) is tests/test_demo_e2e.py
    r = _cli("demo", "--epochs", "3", "--no-bench", "--out", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr
    assert "dense (mlp)" in r.stdout and "separable (kron_mlp)" in r.stdout
    assert "fewer FC parameters" in r.stdout
    assert (tmp_path / "demo" / "separable" / "metrics.json").is_file()
    # the deployment half: bundles that verify, INT8 artifacts where the gate passed, ONNX Runtime timings
    assert "deployment: ONNX bundles" in r.stdout
    from edgesep.bundle import open_bundle

    for label in ("dense", "separable"):
        bundle = open_bundle(tmp_path / "demo" / f"{label}.bundle")
        assert bundle.artifact(precision="fp32").file == "model.onnx"
        assert {e.kind for e in bundle.manifest.eval_sets} == {"clean", "adversarial"}
