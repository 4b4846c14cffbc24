"""Smoke test of benchmarks/families.py on scikit-learn's digits: one row per family, sane numbers.

Minimal settings (1 epoch on 300 images, 40 test images, PGD-20, ORT latency only: TVM is skipped for time).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("edgesep_bench_families", REPO / "benchmarks" / "families.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def families():
    return _load_script()


@pytest.fixture(scope="module")
def result(families, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("families")
    out = tmp / "families.json"
    threads = torch.get_num_threads()
    try:
        rc = families.main(
            ["--datasets", "digits", "--epochs", "1", "--max-train", "300", "--n-eval", "40", "--rounds", "1",
             "--min-time", "0.01", "--gdws-alphas-n", "16", "--threads", "1", "--no-tvm", "--out", str(out),
             "--work", str(tmp / "work")]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return json.loads(out.read_text()), out


def test_one_row_per_family_with_sane_numbers(families, result):
    from edgesep.runs import load_run

    res, out = result
    assert res["partial"] is False
    assert [r["label"] for r in res["rows"]] == list(families.LABELS)
    assert {r["family"] for r in res["rows"]} == {"dense", "kron", "lowrank", "tt", "gdws"}
    assert out.with_suffix(".png").stat().st_size > 1000
    budget = res["budgets"]["digits"]
    for r in res["rows"]:
        model, _ = load_run(r["run_dir"])  # the rebuilt model (transforms applied) from its run directory
        assert r["params"] == sum(p.numel() for p in model.parameters()), r["label"]
        assert 0.0 <= r["robust"] <= r["clean"] + 1e-9 <= 1.0 + 1e-9, r["label"]
        assert r["n_eval"] == 40
        assert r["macs"] > 0 and r["max_cond"] >= 1.0 and math.isfinite(r["max_cond"]), r["label"]
        lat = r["latency"]
        assert lat["ort_b1_ms"] > 0 and lat["ort_b64_ms"] > 0 and "tvm_b1_ms" not in lat
        if r["budget"] is not None:
            assert r["budget"] == budget and abs(r["params"] / budget - 1) <= families.TOLERANCE
    rows = {r["label"]: r for r in res["rows"]}
    # the Kronecker MLP defines the budget; the CondLR layers keep cond(S) <= tau
    assert rows["kron"]["params"] == budget
    assert rows["condlr"]["max_cond"] <= families.TAU * (1 + 1e-6)
    # GDWS: at most half of its parent's convertible-conv MACs, fewer MACs and parameters in total
    assert rows["gdws"]["gdws"]["converted_mac_reduction"] >= 2.0 - 1e-9
    assert rows["gdws"]["macs"] < rows["dense-cnn"]["macs"]


def test_resume_skips_finished_rows_and_summarizes(families, result, capsys):
    _, out = result
    before = json.loads(out.read_text())
    assert families.main(["--datasets", "digits", "--epochs", "1", "--max-train", "300", "--n-eval", "40",
                          "--rounds", "1", "--min-time", "0.01", "--gdws-alphas-n", "16", "--threads", "1",
                          "--no-tvm", "--out", str(out), "--work", str(out.parent / "work")]) == 0  # fmt: skip
    after = json.loads(out.read_text())
    assert after["rows"] == before["rows"]  # nothing re-measured (row_s and latencies would differ)
    assert families.main(["--summarize", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.count("| digits |") == len(families.LABELS)


def test_budget_rule_matches_every_family_on_mnist_shapes(families):
    budget, specs = families.plan((1, 28, 28), 10, 0.01)
    assert budget == 13726  # kron_mlp hidden (4, 16, 16) x 2 on MNIST
    for label in ("condlr", "tt"):
        p = sum(x.numel() for x in families.build(specs[label], (1, 28, 28), 10).parameters())
        assert abs(p / budget - 1) <= families.TOLERANCE, (label, p)
    lowrank = families.build(specs["condlr"], (1, 28, 28), 10)
    r = specs["condlr"]["knob"]["rank"]
    # independent count: two rank-r layers (U, S, V, bias) + the dense classifier
    assert sum(x.numel() for x in lowrank.parameters()) == (
        (784 * r + r * r + 256 * r + 256) + (256 * r + r * r + 256 * r + 256) + (256 * 10 + 10)
    )
