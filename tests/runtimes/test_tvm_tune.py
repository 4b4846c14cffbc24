"""MetaSchedule tuning (edgesep.runtimes.tvm_tune): a tiny digits MLP tuned for the host with a few trials.

One tuning per module (2 trials for 4 tasks, so two tasks get no trial and must be reported), then: the database
stored in the bundle and reused with trials=0 (the same library, byte for byte), parity against the test's own
ONNX Runtime session, the recorded winner and what ``load`` says about it, the thread count the library carries,
the CLI. The arm64 test tunes for rpi4 over RPC in the emulated root (slow; correctness only).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'edgesep[tvm]')")
pytest.importorskip("xgboost", reason="MetaSchedule's cost model needs xgboost (pip install 'edgesep[tvm]')")
pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxsim")

from edgesep._io import sha256_file  # noqa: E402
from edgesep.bundle import open_bundle  # noqa: E402
from edgesep.errors import ConfigError  # noqa: E402
from edgesep.export import export_run  # noqa: E402
from edgesep.runtimes import load  # noqa: E402
from edgesep.runtimes.tvm import TvmRuntime, elf_machine  # noqa: E402
from edgesep.runtimes.tvm_tune import (  # noqa: E402
    TuningDatabaseMissingError,
    parse_address,
    record_winner,
    tune_tvm,
    tuning_db_name,
)

pytestmark = [pytest.mark.tvm, pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")]

REPO = Path(__file__).resolve().parents[2]
N_TASKS = 4  # the digits mlp: normalize+reshape, three fused matmul(+bias, +relu)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_run) -> Path:
    """The digits mlp (2 epochs) as a bundle with model.onnx and a clean eval set of 200: never tuned."""
    b = tmp_path_factory.mktemp("tune") / "mlp.bundle"
    export_run(tiny_run("mlp"), b, eval_sets="clean:200", log=lambda _: None, progress=False)
    return b


@pytest.fixture(scope="module")
def tuned(exported, tmp_path_factory) -> tuple[Path, list[str]]:
    """A copy tuned for the host with 2 trials in total (1 per round): 2 of the 4 tasks get none."""
    b = Path(shutil.copytree(exported, tmp_path_factory.mktemp("tuned") / "mlp.bundle"))
    lines: list[str] = []
    tune_tvm(b, "host", 2, log=lines.append)
    return b, lines


def _clean(b: Path) -> np.ndarray:
    with np.load(b / "eval" / "clean.npz") as z:
        return z["x"]


def _ort(b: Path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(b / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))])


def test_tasks_without_trials_are_reported(tuned):
    b, lines = tuned
    with open_bundle(b) as bundle:
        art = bundle.artifact(id="tvm-lib-fp32-host")
    tu = art.extra["tuning"]
    assert art.extra["tuned"] is True and tu["trials"] == 2 and tu["trials_per_round"] == 1
    assert tu["allocation"] == "gradient" and tu["trials_per_task_max"] is None
    assert len(tu["tasks"]) == N_TASKS
    no_record = [t["name"] for t in tu["tasks"] if t["valid_records"] == 0]
    assert len(no_record) >= N_TASKS - 2  # at most one trial each for two tasks, none for the others
    assert tu["untuned_tasks"] == no_record and art.extra["scheduled"] is False
    assert all(t["best_us"] is None for t in tu["tasks"] if t["name"] in no_record)
    warning = [line for line in lines if "WARNING" in line]
    assert len(warning) == 1 and all(name in warning[0] for name in no_record)


def test_gradient_allocation_warms_every_task_up_and_spends_the_rest_unevenly(exported, tmp_path):
    # 24 trials for 4 tasks: rounds of 24 // 8 = 3, so the round-robin warm-up takes 12 and reaches every task; the
    # rest goes where the weighted latency still falls, so some task gets more than the equal split's
    # ceil(24 / 4) = 6 (the normalize+reshape task's search space is a handful of schedules: it stops early)
    import logging

    b = Path(shutil.copytree(exported, tmp_path / "mlp.bundle"))
    lines: list[str] = []
    # a handler someone else attached to MetaSchedule's logger (no name): MetaSchedule's own dictConfig failed on it
    # ("'NoneType' object has no attribute 'format'"); tune_tvm detaches it for the search and gives it back
    ms_logger, foreign = logging.getLogger("tvm.s_tir.meta_schedule"), logging.NullHandler()
    ms_logger.addHandler(foreign)
    try:
        art = tune_tvm(b, "host", 24, log=lines.append)
        # given back (pytest's capture handlers may sit there too); MetaSchedule's console / work-dir file handlers
        # closed and removed
        assert foreign in ms_logger.handlers
        assert not [h for h in ms_logger.handlers if (h.get_name() or "").startswith("tvm.s_tir.meta_schedule")]
    finally:
        ms_logger.removeHandler(foreign)
    tu = art.extra["tuning"]
    recs = [t["valid_records"] for t in tu["tasks"]]
    assert tu["trials_per_round"] == 3 and tu["allocation"] == "gradient" and tu["trials_per_task_max"] is None
    assert any("allocated by the gradient scheduler, 3 per round" in ln for ln in lines)
    # a candidate that fails to build or run (a heavily loaded machine) can still cost a task its warm-up round:
    # then it is reported, never silently unscheduled
    assert len(tu["untuned_tasks"]) <= 1, (tu["tasks"], lines)
    assert tu["untuned_tasks"] == [t["name"] for t in tu["tasks"] if t["valid_records"] == 0]
    assert art.extra["scheduled"] is (not tu["untuned_tasks"])
    assert max(recs) > 6, tu["tasks"]
    # the scheduler checks the global budget between rounds: it may overshoot by less than one round
    assert sum(recs) < 24 + 3, tu["tasks"]
    capped = tune_tvm(Path(shutil.copytree(exported, tmp_path / "capped.bundle")), "host", 8, max_trials_per_task=2,
                      log=lines.append)  # fmt: skip
    ct = capped.extra["tuning"]
    assert ct["allocation"] == "per-task cap" and ct["trials_per_task_max"] == 2
    assert all(t["valid_records"] <= 2 for t in ct["tasks"]), ct["tasks"]


def test_tuned_library_matches_onnxruntime(tuned):
    b, _ = tuned
    x = _clean(b)[:64]
    got = TvmRuntime(b / "model.host.so", precision="fp32").run(x)
    ref = _ort(b, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert (got.argmax(1) == ref.argmax(1)).all()
    with open_bundle(b) as bundle:
        par = bundle.artifact(id="tvm-lib-fp32-host").extra["parity"]
    assert par["ok"] and par["n"] == 200 and par["top1_agreement"] == 1.0


def test_database_stored_in_bundle_and_verified(tuned):
    b, _ = tuned
    with open_bundle(b) as bundle:  # verify=True: every file, the database report included, hash-checked
        src = bundle.artifact(id="onnx-fp32-any")
        name = tuning_db_name("host", src.sha256)
        assert name == f"tuning-host-{src.sha256[:16]}" and name in bundle.manifest.reports
        db = bundle.load_report(name)
        art = bundle.artifact(id="tvm-lib-fp32-host")
    ref = bundle.manifest.reports[name]
    assert sha256_file(b / ref.file) == ref.sha256
    assert db["model_sha256"] == src.sha256 and db["target"] == art.extra["target"]
    assert len(db["workloads"]) == N_TASKS  # every task's workload, tuned or not
    n_valid = sum(t["valid_records"] for t in art.extra["tuning"]["tasks"])
    assert 1 <= len(db["records"]) == n_valid == art.extra["tuning"]["database"]["records"] <= 2
    assert {r[0] for r in db["records"]} <= set(range(len(db["workloads"])))  # records point at workloads


def test_rebuild_from_database_is_the_same_library(tuned, tmp_path):
    b, _ = tuned
    copy = Path(shutil.copytree(b, tmp_path / "copy.bundle"))
    before = sha256_file(copy / "model.host.so")
    art = tune_tvm(copy, "host", 0, log=lambda _: None)
    assert art.extra["tuning"]["rebuilt_from_database"] and art.extra["tuning"]["new_records"] == 0
    assert art.sha256 == before == sha256_file(copy / "model.host.so")  # same records -> same code
    with open_bundle(b) as bundle:
        assert art.extra["tuning"]["untuned_tasks"] == bundle.artifact(id=art.id).extra["tuning"]["untuned_tasks"]
    x = _clean(b)[:16]
    rebuilt = TvmRuntime(copy / "model.host.so", precision="fp32").run(x)
    np.testing.assert_array_equal(rebuilt, TvmRuntime(b / "model.host.so", precision="fp32").run(x))


def test_rebuild_without_database_is_a_typed_error(exported):
    with pytest.raises(TuningDatabaseMissingError, match=r"no tuning database for target host.*--tune-trials"):
        tune_tvm(exported, "host", 0, log=lambda _: None)


def test_winner_recorded_from_the_measurement(tuned):
    b, _ = tuned
    with open_bundle(b) as bundle:
        lib = bundle.artifact(id="tvm-lib-fp32-host")
        winners = [a for a in bundle.manifest.artifacts if "host" in a.extra.get("preferred_for", [])]
    h = lib.extra["host_latency_ms"]
    assert len(winners) == 1
    expected = "tvm-lib-fp32-host" if h["tvm"] * 1.2 <= h["onnxruntime"] else "onnx-fp32-any"
    w = winners[0]
    assert w.id == expected and w.extra["winner_measured"]["tvm_ms"] == h["tvm"]
    assert f"{h['onnxruntime']:.4f} ms" in w.extra["preferred_reason"]
    with load(b) as s:
        assert s.artifact.id == expected
        assert s.info()["selected_because"].endswith(w.extra["preferred_reason"])


def test_record_winner_moves_the_target(tuned, tmp_path):
    b = Path(shutil.copytree(tuned[0], tmp_path / "w.bundle"))
    with open_bundle(b) as bundle:
        record_winner(bundle, "host", "tvm-lib-fp32-host", "measured: tvm faster", {"tvm_ms": 1.0})
    with load(b) as s:
        assert s.backend == "tvm" and "measured: tvm faster" in s.info()["selected_because"]
    with open_bundle(b) as bundle:
        assert "preferred_for" not in bundle.artifact(id="onnx-fp32-any").extra
        record_winner(bundle, "host", "onnx-fp32-any", "measured: ort faster", {"tvm_ms": 2.0})
        assert "preferred_for" not in bundle.artifact(id="tvm-lib-fp32-host").extra
    with load(b) as s:
        assert s.backend == "onnxruntime" and s.info()["selected_because"].endswith("measured: ort faster")


def test_library_carries_its_thread_count(tuned):
    b, _ = tuned
    with open_bundle(b) as bundle:
        art = bundle.artifact(id="tvm-lib-fp32-host")
    rt = TvmRuntime(b / "model.host.so", precision="fp32")
    assert rt.threads_from_library == art.extra["num_threads"] == art.extra["target"]["num-cores"]
    assert art.extra["target"]["num-cores"] == len(os.sched_getaffinity(0))


def test_remote_target_needs_a_device_and_addresses_are_checked(exported):
    with pytest.raises(ConfigError, match="--rpc"):
        tune_tvm(exported, "rpi4", 4, log=lambda _: None)
    with pytest.raises(ConfigError, match="--key"):
        tune_tvm(exported, "rpi4", 4, tracker="127.0.0.1:9190", log=lambda _: None)
    with pytest.raises(ConfigError, match="num-cores"):
        tune_tvm(exported, {"kind": "llvm", "mcpu": "generic"}, 4, log=lambda _: None)
    assert parse_address("10.0.0.2:9090") == ("10.0.0.2", 9090)
    for bad in ("10.0.0.2", "host:port", ":9090", "h:70000"):
        with pytest.raises(ConfigError):
            parse_address(bad)


def test_cli_rebuild_and_errors(tuned, tmp_path, capsys):
    from edgesep.cli import main

    copy = Path(shutil.copytree(tuned[0], tmp_path / "cli.bundle"))
    assert main(["compile", str(copy), "--tune-trials", "0"]) in (0, None)
    out = capsys.readouterr().out
    assert "rebuilt from the stored database" in out and "UNTUNED" in out and "recorded winner for host" in out
    assert main(["compile", str(copy), "--rpc", "127.0.0.1:9"]) == 2
    assert "--tune-trials" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- the emulated arm64 device


@pytest.fixture(scope="module")
def arm64_root() -> Path:
    from edgesep.devices.emulate import default_root, is_complete

    if os.geteuid() != 0:
        pytest.skip("the arm64 root needs root (chroot)")
    root = default_root()
    if not is_complete(root):
        pytest.skip(f"no complete arm64 root at {root}: build it with `edgesep device emulate arm64`")
    return root


@pytest.mark.arm64
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="apt-get install gcc-aarch64-linux-gnu")
def test_rpi4_tuned_over_rpc_on_the_emulated_device(exported, arm64_root, tmp_path):
    from edgesep.devices.emulate import start_rpc_server

    b = Path(shutil.copytree(exported, tmp_path / "arm.bundle"))
    lines: list[str] = []
    with start_rpc_server(arm64_root) as server:
        art = tune_tvm(b, "rpi4", 4, rpc=f"{server.host}:{server.port}", emulated=True, log=lines.append)
    assert elf_machine(b / art.file) == "aarch64" and art.target == "rpi4"
    assert art.extra["parity"]["ok"]  # the aarch64 build, run on the emulated device, vs x86 ONNX Runtime
    d = art.extra["device_latency_ms"]
    assert "emulated" in d["meaningless"] and any("MEANINGLESS" in line for line in lines)
    assert sum(t["valid_records"] for t in art.extra["tuning"]["tasks"]) >= 1  # measured on the device
    with open_bundle(b) as bundle:
        assert not any("rpi4" in a.extra.get("preferred_for", []) for a in bundle.manifest.artifacts)
    print(json.dumps({"tuning": art.extra["tuning"]["tasks"], "device_ms": d["tvm_on_device_ms"]}))
