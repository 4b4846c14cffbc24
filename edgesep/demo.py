"""`edgesep demo`: an end-to-end run on data that ships with a dependency (scikit-learn's 8x8 digits).

1. ``run_demo``: trains a dense MLP and a separable (Kronecker) MLP of the same depth with PGD adversarial training
   and evaluates both under PGD.
2. ``deploy_demo`` (the `export` extra): exports each to a bundle with a clean and a transferred PGD eval set and
   quantizes it to INT8 behind the accuracy gate.
3. ``bench_demo``: compiles each bundle with TVM for the device's target (and the host), runs every artifact on the
   device profile (``host`` by default) with the on-device runner -- clean and transferred accuracy, a query-only
   Square attack against the engine itself, numerics vs the fp32 reference, latency samples -- and writes an HTML
   and a Markdown report with plots from the result files.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgesep.runs import CONFIG_FILE

__all__ = ["DEMO_MODELS", "DemoBench", "bench_demo", "deploy_demo", "run_demo"]

# (label, model name); both get the dataset's input shape, classes and normalization from the trainer
DEMO_MODELS = (("dense", "mlp"), ("separable", "kron_mlp"))


def _silent(_line: str) -> None:
    pass


def _every_tenth_epoch(log):
    """Pass through the trainer's lines but only every tenth (and the last) epoch line."""

    def filtered(line: str) -> None:
        if line.startswith("epoch "):
            done, total = line.split()[1].split("/")
            if int(done) % 10 and done != total:
                return
        log(line)

    return filtered


def run_demo(
    out: str | Path = "runs/demo",
    *,
    epochs: int = 30,
    eps: float = 0.1,
    eval_steps: int = 20,
    lambda_c: float = 1e-2,
    seed: int = 0,
    progress: bool | None = None,
    log=None,
) -> list[dict[str, Any]]:
    """Train and evaluate the demo pair; returns one summary row per model."""
    from edgesep.train import TrainConfig, train

    out = Path(out)
    rows = []
    for label, model in DEMO_MODELS:
        run_dir = out / label
        if (run_dir / CONFIG_FILE).is_file():  # an earlier demo's run: the demo owns this directory
            shutil.rmtree(run_dir)
        config = TrainConfig(
            model=model,
            dataset="digits",
            epochs=epochs,
            batch_size=64,
            optimizer="adam",
            lr=3e-3,
            schedule="cosine",
            adv="pgd",
            eps=eps,
            adv_steps=7,
            eps_warmup_epochs=max(1, epochs // 5),
            lambda_c=lambda_c if model.startswith("kron") else 0.0,
            seed=seed,
            eval_n=1000,
            eval_steps=eval_steps,
        )
        if log:
            log(f"training {label} ({model}) with PGD-{config.adv_steps} eps={eps} for {epochs} epochs -> {run_dir}")
        m = train(config, run_dir, progress=progress, log=_every_tenth_epoch(log) if log else _silent)
        conds = [layer["condition_number"] for layer in m["kron_layers"]]
        rows.append(
            {
                "label": label,
                "model": model,
                "run_dir": str(run_dir),
                "params": m["params"],
                "fc_params": m["fc_params"],
                "macs": m["macs"],
                "clean_accuracy": m["clean_accuracy"],
                "robust_accuracy": m["robust"][0]["accuracy"] if m["robust"] else None,
                "attack": f"pgd-{eval_steps} linf eps={eps}",
                "max_condition_number": max(conds) if conds else None,
                "train_time_s": m["train_time_s"],
                "eval_n": m["eval_n"],
            }
        )
    return rows


def deploy_demo(rows: list[dict[str, Any]], *, eps: float = 0.1, steps: int = 20, log=None) -> list[dict[str, Any]]:
    """Export each demo run to a bundle and quantize it behind the accuracy gate.

    Returns one row per model: bundle, sizes, fp32 and int8 accuracy (clean and transferred PGD, from the gate) and
    the gate's verdict (a failed gate is reported, not raised). Latency is measured by ``bench_demo``.
    """
    from edgesep.errors import AccuracyGateError
    from edgesep.export import export_run, quantize_bundle

    out = []
    for r in rows:
        bundle_dir = Path(r["run_dir"]).with_suffix(".bundle")
        export_run(
            r["run_dir"], bundle_dir, eval_sets=f"clean:1000,pgd:linf:{eps}:{steps}@1000", overwrite=True,
            progress=False, log=_silent,
        )  # fmt: skip
        row = {"label": r["label"], "bundle": str(bundle_dir), "gate": "passed"}
        try:
            q = quantize_bundle(bundle_dir, calib=512, auto_exclude=True, log=_silent).to_dict()
        except AccuracyGateError as e:
            q = e.report.to_dict() if getattr(e, "report", None) is not None else None
            row["gate"] = f"failed: {e}"
        fp32 = bundle_dir / "model.onnx"
        row["size_fp32"] = fp32.stat().st_size
        if q is not None:
            gate = {g["metric"]: g for g in q["gate"]}
            clean = gate["clean"]
            robust = next(g for k, g in gate.items() if k.startswith("robust"))
            row.update(clean_fp32=clean["fp32"], clean_int8=clean["int8"], robust_fp32=robust["fp32"],
                       robust_int8=robust["int8"], kept_fp32=q["kept_fp32"])  # fmt: skip
        int8 = bundle_dir / "model.int8.onnx"
        if int8.is_file():
            row["size_int8"] = int8.stat().st_size
        if log:
            log(f"{r['label']}: bundle {bundle_dir} ({row['gate']})")
        out.append(row)
    return out


@dataclass(frozen=True)
class DemoBench:
    """Settings of the demo's on-device stage (the defaults keep the whole demo under 10 minutes on 2 cores)."""

    device: str = "host"
    square_queries: int = 300
    square_n: int = 100
    min_runs: int = 300
    min_seconds: float = 2.0
    throughput_seconds: float = 1.0
    max_eval: int | None = None
    tvm: bool = True


def bench_demo(
    deployed: list[dict[str, Any]], out: str | Path, settings: DemoBench | None = None, *, log=None
) -> dict[str, Any]:
    """Compile (TVM) and benchmark the demo bundles on a device profile, then write the reports.

    Returns ``{"results": [paths], "report_html", "report_md", "compile": [notes]}``.
    """
    from edgesep.devices import load_profile
    from edgesep.devices.harness import BenchOptions, bench
    from edgesep.devices.report import build_report

    s = settings or DemoBench()
    log = log or _silent
    profile = load_profile(s.device)
    out = Path(out)
    results_dir = out / "results"
    notes = []
    if s.tvm:
        targets = ["host"]
        if isinstance(profile.target, str) and profile.target not in targets and profile.runtime != "tensorrt":
            targets.append(profile.target)
        notes += _compile_tvm(deployed, targets, log)
    options = BenchOptions(min_runs=s.min_runs, min_seconds=s.min_seconds, throughput_seconds=s.throughput_seconds,
                           square_queries=s.square_queries, square_n=s.square_n, max_eval=s.max_eval)  # fmt: skip
    paths: list[Path] = []
    for d in deployed:
        log(f"benchmarking {d['bundle']} on {profile.id}")
        # every artifact (fp32/INT8, ONNX Runtime/TVM): the demo compares them, not only what would be deployed
        paths += bench(d["bundle"], profile, results_dir, select="all", options=options, log=log)
    build_report([results_dir], out / "report.html", title=f"edgesep demo on {profile.id}", formats=("html", "md"))
    return {"results": paths, "report_html": out / "report.html", "report_md": out / "report.md", "compile": notes,
            "device": profile.id}  # fmt: skip


def _compile_tvm(deployed: list[dict[str, Any]], targets: list[str], log) -> list[str]:
    """TVM libraries (fp32, batch 1) for each bundle and target; a missing TVM or compiler is a note, not a failure."""
    from edgesep.errors import EdgesepError
    from edgesep.runtimes.tvm import compile_tvm  # imports TVM lazily: a missing TVM is a BackendMissingError below

    notes = []
    for d in deployed:
        for target in targets:
            try:
                a = compile_tvm(d["bundle"], target=target, log=_silent)
            except EdgesepError as e:
                notes.append(f"{Path(d['bundle']).name}: TVM for {target} skipped: {e}")
                log(notes[-1])
                continue
            log(f"{Path(d['bundle']).name}: compiled {a.id} ({a.extra.get('pipeline')})")
    return notes
