"""`edgesep demo`: an end-to-end run on data that ships with a dependency (scikit-learn's 8x8 digits).

Trains a dense MLP and a separable (Kronecker) MLP of the same depth with PGD adversarial training, evaluates
both under PGD, then (with the `export` extra) exports each to a bundle with a transferred PGD eval set, quantizes
it to INT8 behind the accuracy gate, and times fp32 and int8 in ONNX Runtime on this CPU. Later stages (compile,
on-device benchmark) extend it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgesep.runs import CONFIG_FILE

__all__ = ["DEMO_MODELS", "deploy_demo", "run_demo"]

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


def _ort_latency_ms(path: Path, shape: tuple[int, ...], seconds: float = 0.5) -> float:
    """Median batch-1 latency of an ONNX file in ONNX Runtime on this CPU (2 intra-op threads)."""
    import time

    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).random((1, *shape), dtype=np.float32)}
    for _ in range(20):
        sess.run(None, feed)
    samples, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(samples) < 20:
        t0 = time.perf_counter()
        sess.run(None, feed)
        samples.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(samples))


def deploy_demo(rows: list[dict[str, Any]], *, eps: float = 0.1, steps: int = 20, log=None) -> list[dict[str, Any]]:
    """Export each demo run to a bundle, quantize it behind the accuracy gate and time it in ONNX Runtime.

    Returns one row per model: bundle, sizes, fp32 and int8 accuracy (clean and transferred PGD, from the gate),
    latency at batch 1, and the gate's verdict (a failed gate is reported, not raised).
    """
    from edgesep.errors import AccuracyGateError
    from edgesep.export import export_run, quantize_bundle

    out = []
    for r in rows:
        bundle_dir = Path(r["run_dir"]).with_suffix(".bundle")
        bundle = export_run(
            r["run_dir"], bundle_dir, eval_sets=f"clean:1000,pgd:linf:{eps}:{steps}@1000", overwrite=True,
            progress=False, log=_silent,
        )  # fmt: skip
        shape = tuple(bundle.manifest.input.shape[1:])
        row = {"label": r["label"], "bundle": str(bundle_dir), "gate": "passed"}
        try:
            q = quantize_bundle(bundle_dir, calib=512, auto_exclude=True, log=_silent).to_dict()
        except AccuracyGateError as e:
            q = e.report.to_dict() if getattr(e, "report", None) is not None else None
            row["gate"] = f"failed: {e}"
        fp32 = bundle_dir / "model.onnx"
        row["size_fp32"] = fp32.stat().st_size
        row["latency_fp32_ms"] = _ort_latency_ms(fp32, shape)
        if q is not None:
            gate = {g["metric"]: g for g in q["gate"]}
            clean = gate["clean"]
            robust = next(g for k, g in gate.items() if k.startswith("robust"))
            row.update(clean_fp32=clean["fp32"], clean_int8=clean["int8"], robust_fp32=robust["fp32"],
                       robust_int8=robust["int8"], kept_fp32=q["kept_fp32"])  # fmt: skip
        int8 = bundle_dir / "model.int8.onnx"
        if int8.is_file():
            row["size_int8"] = int8.stat().st_size
            row["latency_int8_ms"] = _ort_latency_ms(int8, shape)
        if log:
            log(f"{r['label']}: bundle {bundle_dir} ({row['gate']})")
        out.append(row)
    return out
