"""Training: clean, PGD adversarial (Madry et al.) and fast FGSM-with-random-start (Wong et al. 2020).

Loss = cross-entropy on (adversarial) inputs + lambda_s * sparsity + lambda_c * condition term over every
separable (KronLinear) factor. Writes a run directory (see ``edgesep.runs``) and can resume from it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgesep._config import SerializableConfig, register_config
from edgesep._io import atomic_write_json
from edgesep.errors import CheckpointError, ConfigError
from edgesep.runs import (
    CONFIG_FILE,
    MODEL_FILE,
    load_state_strict,
    load_weights,
    read_json,
    save_weights,
    versions,
    write_config,
    write_metrics,
)

__all__ = ["TrainConfig", "train"]

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"

ADV_MODES = ("none", "pgd", "fgsm")
OPTIMIZERS = ("sgd", "adam", "condlr")
SCHEDULES = ("cosine", "step", "constant")


@register_config
@dataclass(frozen=True)
class TrainConfig(SerializableConfig):
    """Everything that defines a training run. Stored in config.json; a run directory alone reproduces it."""

    model: str = "kron_mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"  # sgd | adam | condlr (edgesep.optim.CondLR: low-rank layers orthonormal, cond(S) <= tau)
    lr: float = 1e-3
    momentum: float = 0.9
    tau: float = 1.0  # condlr: the bound on every low-rank layer's cond(S)
    rank_ratio: float | None = None  # passed to model builders that take rank_ratio (lowrank_*), unless in model_kwargs
    weight_decay: float = 0.0
    schedule: str = "cosine"
    step_every: int = 30  # epochs, for schedule="step"
    step_gamma: float = 0.1
    adv: str = "none"  # none | pgd | fgsm (fast FGSM with random start)
    eps: float = 0.1
    norm: str = "linf"
    adv_steps: int = 7
    adv_step_size: float | None = None
    eps_warmup_epochs: int = 0  # ramp eps linearly from 0 over the first epochs
    lambda_s: float = 0.0
    lambda_c: float = 0.0
    sparsity: str = "l1"
    condition: str | None = None  # None: the documented default of edgesep.regularizers
    prune: float = 0.0  # fraction of each separable factor's entries zeroed by magnitude after training
    seed: int = 0
    max_train: int | None = None  # use only the first N training images (quick runs)
    eval_n: int = 1000
    eval_steps: int = 20
    device: str = "cpu"

    def validate(self) -> None:
        """Raise ConfigError on inconsistent options, naming the valid values."""
        checks = [
            (self.adv in ADV_MODES, f"adv must be one of {ADV_MODES}, got {self.adv!r}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.norm in ("linf", "l2"), f"norm must be linf or l2, got {self.norm!r}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
            (self.eps >= 0, f"eps must be >= 0, got {self.eps}"),
            (self.adv_steps >= 1, f"adv steps must be >= 1, got {self.adv_steps}"),
            (0.0 <= self.prune < 1.0, f"prune must be in [0, 1), got {self.prune}"),
            (self.lambda_s >= 0 and self.lambda_c >= 0, "lambda_s and lambda_c must be >= 0"),
            (self.eval_n >= 0, f"eval_n must be >= 0, got {self.eval_n}"),
            (math.isfinite(self.tau) and self.tau >= 1.0, f"tau must be a finite number >= 1, got {self.tau}"),
            (
                self.rank_ratio is None or 0.0 <= self.rank_ratio < 1.0,
                f"rank_ratio must be in [0, 1) (the fraction of each layer's rank removed), got {self.rank_ratio}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


def _model_kwargs(config: TrainConfig, data) -> dict[str, Any]:
    """The model's kwargs: the user's, plus the dataset's input shape, classes and normalization where the model
    builder accepts them (normalization lives inside the model: inputs are pixels in [0, 1])."""
    from edgesep.models import get_model_builder

    params = inspect.signature(get_model_builder(config.model)).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    defaults = {
        "in_shape": list(data.input_shape),
        "in_channels": data.input_shape[0],
        "num_classes": data.num_classes,
        "mean": list(data.mean),
        "std": list(data.std),
    }
    if config.rank_ratio is not None:
        if "rank_ratio" not in params and not accepts_any:
            raise ConfigError(
                f"model {config.model!r} takes no rank_ratio; use a low-rank model (e.g. lowrank_lenet5) or "
                "`edgesep convert RUN --to lowrank --rank-ratio R`"
            )
        defaults["rank_ratio"] = config.rank_ratio
    kwargs = {k: v for k, v in defaults.items() if k in params or (accepts_any and k != "in_channels")}
    kwargs.update(config.model_kwargs)
    return kwargs


def _lr_factor(config: TrainConfig, progress: float) -> float:
    """Learning-rate multiplier at a fractional epoch `progress`."""
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress / config.epochs, 1.0)))
    if config.schedule == "step":
        return config.step_gamma ** int(progress // config.step_every)
    return 1.0


def _make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "condlr":
        from edgesep.optim import CondLR

        return CondLR.for_model(
            model, lr=config.lr, momentum=config.momentum, tau=config.tau, weight_decay=config.weight_decay
        )
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _adversarial(config: TrainConfig, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float):
    from edgesep.attacks import fgsm, pgd

    if config.adv == "none" or eps == 0:
        return x
    if config.adv == "fgsm":
        return fgsm(model, x, y, eps, norm=config.norm, random_start=True)
    return pgd(
        model,
        x,
        y,
        eps,
        steps=config.adv_steps,
        step_size=config.adv_step_size,
        norm=config.norm,
        random_start=True,
    )


# -- resumable state (safetensors + JSON; no pickle) ------------------------------------------------------------


def _save_state(run_dir: Path, model, optimizer, epoch: int, history: list, elapsed: float) -> None:
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for name, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{idx}.{name}"] = t
    tensors["rng.torch"] = torch.get_rng_state()
    save_weights(run_dir / STATE_TENSORS, tensors)
    atomic_write_json(
        run_dir / STATE_JSON,
        {"epoch": epoch, "history": history, "param_groups": opt["param_groups"], "elapsed_s": elapsed},
    )


def _load_state(run_dir: Path, model, optimizer) -> tuple[int, list, float]:
    meta = read_json(run_dir / STATE_JSON)
    tensors = load_weights(run_dir / STATE_TENSORS)
    load_state_strict(
        model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, str(run_dir / STATE_TENSORS)
    )
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["epoch"]), list(meta["history"]), float(meta.get("elapsed_s", 0.0))


# -- the loop ----------------------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool | None = None,
    log=None,
    transforms: list[dict[str, Any]] | None = None,
    init_weights: dict[str, torch.Tensor] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a model and write a run directory; returns the metrics that were written to metrics.json.

    Args:
        config: the run's options (validated here).
        out: run directory; created. Refuses to overwrite a finished run unless resuming.
        resume: continue from the last finished epoch stored in ``out``.
        progress: show a progress bar (default: when stderr is a terminal).
        log: callable taking a line of text (default: print to stderr).
        transforms: structural transforms (``edgesep.runs.register_transform``) applied to the freshly built
            model and recorded in config.json (fine-tuning a converted model, ``edgesep convert``); on resume the
            ones stored in config.json are used.
        init_weights: a state dict loaded (strictly) into the transformed model before training.
        extra_config: more entries for config.json (e.g. ``converted_from``).
    Raises:
        ConfigError, DatasetError, UnknownNameError, CheckpointError: user errors, with what to do.
    """
    from tqdm.auto import tqdm

    from edgesep.attacks import AttackSpec
    from edgesep.data import eval_indices, load_dataset
    from edgesep.evaluate import evaluate
    from edgesep.models import create_model
    from edgesep.pruning import magnitude_prune_
    from edgesep.regularizers import DEFAULT_CONDITION, regularization
    from edgesep.stats import model_stats

    config.validate()
    out = Path(out)
    log = log or (lambda s: print(s, file=sys.stderr))
    progress = sys.stderr.isatty() if progress is None else progress
    if resume:
        if not (out / STATE_JSON).is_file():
            raise CheckpointError(f"nothing to resume in {out}: no {STATE_JSON}; start a run with --out {out}")
        stored = TrainConfig.from_dict(read_json(out / CONFIG_FILE)["train"])
        if stored != config:
            config = stored
            log(f"resuming with the configuration stored in {out / CONFIG_FILE}")
    elif (out / MODEL_FILE).exists() or (out / STATE_JSON).exists():
        raise CheckpointError(f"{out} already holds a run; choose another --out, delete it, or pass --resume")

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    data = load_dataset(config.dataset, config.data_dir)
    x_train = torch.as_tensor(data.x_train[: config.max_train])
    y_train = torch.as_tensor(data.y_train[: config.max_train])
    x_test, y_test = torch.as_tensor(data.x_test), torch.as_tensor(data.y_test)
    device = torch.device(config.device)

    model_kwargs = _model_kwargs(config, data)
    model = create_model(config.model, **model_kwargs)
    if resume:
        transforms = read_json(out / CONFIG_FILE).get("transforms", [])
    if transforms:
        from edgesep.runs import apply_transforms

        model = apply_transforms(model, transforms)
    if init_weights is not None and not resume:
        load_state_strict(model, init_weights, "init_weights")
    model = model.to(device)
    optimizer = _make_optimizer(config, model)
    condition = config.condition or DEFAULT_CONDITION
    run_config = {
        "model": config.model,
        "model_kwargs": model_kwargs,
        "dataset": config.dataset,
        "input_shape": list(data.input_shape),
        "classes": list(data.classes),
        "normalization": {"mean": list(data.mean), "std": list(data.std), "inside_model": True},
        "train": config.to_dict(),
        "versions": versions(),
        **({"transforms": list(transforms)} if transforms else {}),
        **(extra_config or {}),
    }

    out.mkdir(parents=True, exist_ok=True)
    start_epoch, history, elapsed = 0, [], 0.0
    if resume:
        start_epoch, history, elapsed = _load_state(out, model, optimizer)
        log(f"resumed {out} after epoch {start_epoch}/{config.epochs}")
    else:
        write_config(out, run_config)

    n = len(x_train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    gen = torch.Generator().manual_seed(config.seed)
    for _ in range(start_epoch):  # keep the shuffling stream identical to an uninterrupted run
        torch.randperm(n, generator=gen)
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=gen)
        ramp = min(1.0, (epoch + 1) / config.eps_warmup_epochs) if config.eps_warmup_epochs else 1.0
        eps_now = config.eps * ramp
        tot_loss = tot_reg = 0.0
        correct = seen = 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
            leave=False,
            file=sys.stderr,
        )
        for step in bar:
            idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
            x, y = x_train[idx].to(device), y_train[idx].to(device)
            for g in optimizer.param_groups:
                g["lr"] = config.lr * _lr_factor(config, epoch + step / steps_per_epoch)
            x_in = _adversarial(config, model, x, y, eps_now)
            logits = model(x_in)
            loss = F.cross_entropy(logits, y)
            reg = regularization(
                model,
                lambda_s=config.lambda_s,
                lambda_c=config.lambda_c,
                sparsity=config.sparsity,
                condition=condition,
            )
            optimizer.zero_grad(set_to_none=True)
            (loss + reg).backward()
            optimizer.step()
            tot_loss += loss.item() * len(y)
            tot_reg += reg.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{tot_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        elapsed += time.perf_counter() - t0
        conds = {name: m.condition_number() for name, m in model.named_modules() if hasattr(m, "condition_number")}
        history.append(
            {
                "epoch": epoch + 1,
                "loss": tot_loss / seen,
                "reg": tot_reg / seen,
                "train_acc": correct / seen,
                "eps": eps_now,
                "lr": optimizer.param_groups[0]["lr"],
                "condition_numbers": conds,
                "time_s": time.perf_counter() - t0,
            }
        )
        log(
            f"epoch {epoch + 1}/{config.epochs}  loss {tot_loss / seen:.4f}  "
            f"{'adv ' if config.adv != 'none' else ''}train acc {correct / seen:.4f}  "
            f"({time.perf_counter() - t0:.1f}s)"
        )
        _save_state(out, model, optimizer, epoch + 1, history, elapsed)

    prune_report = None
    if config.prune > 0:
        prune_report = magnitude_prune_(model, config.prune)
    model.eval()
    weights_sha = save_weights(
        out / MODEL_FILE,
        model.state_dict(),
        metadata={"model": config.model, "edgesep": versions()["edgesep"]},
    )

    specs = [AttackSpec(name="pgd", norm=config.norm, eps=config.eps, steps=config.eval_steps)]
    if config.eps == 0:
        specs = []
    n_eval = min(config.eval_n, len(x_test))
    # a seeded subset, not the first n_eval (cifar10_jpeg's test split is sorted by class)
    idx = torch.as_tensor(eval_indices(len(x_test), n_eval))
    ev = evaluate(model, x_test[idx], y_test[idx], specs, progress=progress) if n_eval else None
    stats = model_stats(model, data.input_shape)
    from edgesep.layers.lowrank import lowrank_layer_stats

    stats["lowrank_layers"] = lowrank_layer_stats(model)
    metrics = {
        "schema_version": 1,
        "model": config.model,
        "dataset": config.dataset,
        "clean_accuracy": ev["clean"] if ev else None,
        "robust": ev["robust"] if ev else [],
        "eval_n": n_eval,
        **stats,
        "condition_term": condition,
        "prune": prune_report,
        "train_time_s": elapsed,
        "epochs": config.epochs,
        "history": history,
        "checkpoint_sha256": weights_sha,
    }
    write_metrics(out, metrics)
    return metrics


def replace(config: TrainConfig, **changes: Any) -> TrainConfig:
    """A copy of config with some fields changed (validated)."""
    new = dataclasses.replace(config, **changes)
    new.validate()
    return new
