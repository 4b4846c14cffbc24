"""`edgesep demo`: an end-to-end run on data that ships with a dependency (scikit-learn's 8x8 digits).

Trains a dense MLP and a separable (Kronecker) MLP of the same depth with PGD adversarial training, evaluates
both under PGD, and returns a comparison. Later stages (export, compile, on-device benchmark) extend it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgesep.runs import CONFIG_FILE

__all__ = ["DEMO_MODELS", "run_demo"]

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
