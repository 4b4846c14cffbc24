"""Post-training conversion of dense layers into structured ones: ``edgesep convert RUN --to lowrank|tt|kron``.

``convert_model(model, to, **opts) -> (model, transforms)`` replaces dense layers of a (trained) model by a
structured family, computed from the dense weights:

- ``lowrank``: every selected ``nn.Linear`` / ``nn.Conv2d`` (groups 1, zero padding) becomes ``LowRankLinear`` /
  ``LowRankConv2d`` by truncated SVD, rank from ``rank_ratio`` (r = ceil((1 - ratio) min(m, n))) or ``rank``
  (capped at each layer's full rank).
- ``kron``: every selected ``nn.Linear`` becomes the nearest Kronecker product (``KronLinear.from_dense``, Van
  Loan–Pitsianis) with ``factors`` (default 2) balanced factor shapes of its in and out features. The layer keeps
  nn.Linear's interface: (B, N) in, (B, M) out (``FlatKronLinear``).
- ``tt``: ``edgesep.layers.tt.convert_to_tt`` (TT-SVD of Linear / Conv2d layers).

``transforms`` is the JSON list that a run's ``config["transforms"]`` stores: each ``{"kind": ..., "layers": {name:
structure}}`` records only shapes, so ``edgesep.runs.load_run`` rebuilds the converted structure from the base
model (``runs.register_transform``) and then loads the weights strictly. Layer selection: ``layers`` (fnmatch
patterns of module names, default every eligible layer) minus ``exclude``.

``convert_run`` does the same for a run directory and writes a new run directory, optionally fine-tuned with the
run's own training configuration (``edgesep.train.train`` with the transforms and the converted weights).
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edgesep.errors import CheckpointError, ConfigError, UnknownNameError
from edgesep.layers.kron import KronLinear
from edgesep.layers.lowrank import LowRankConv2d, LowRankLinear
from edgesep.layers.tt import apply_tt_structure, convert_to_tt
from edgesep.runs import register_transform

__all__ = [
    "FlatKronLinear",
    "convert_model",
    "convert_run",
    "list_converters",
    "register_converter",
    "select_layers",
    "set_submodule",
]

Converter = Callable[..., tuple[nn.Module, list[dict[str, Any]]]]
_CONVERTERS: dict[str, Converter] = {}


def register_converter(name: str, fn: Converter) -> Converter:
    """Register ``fn(model, **opts) -> (model, transforms)`` as ``convert_model(model, to=name)``.

    ``fn`` receives a copy of the model (it may modify it in place) and returns it with the list of transform
    specs that ``load_run`` needs to rebuild the structure; register those kinds with
    ``edgesep.runs.register_transform``.
    """
    _CONVERTERS[name] = fn
    return fn


def list_converters() -> list[str]:
    return sorted(_CONVERTERS)


def convert_model(model: nn.Module, to: str, **opts: Any) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Convert the dense layers of a copy of ``model`` to the family ``to``; the input model is not modified.

    Args:
        model: a (trained) model.
        to: a registered converter: ``lowrank``, ``kron``, ``tt``, or one added with ``register_converter``.
        opts: the converter's options (``rank_ratio`` / ``rank``, ``factors``, ``layers``, ``exclude``, ...).
    Returns:
        (converted model in the input's train/eval mode, transforms for a run's ``config["transforms"]``).
    Raises:
        UnknownNameError: unknown family. ConfigError: bad options or no layer selected.
    """
    if to not in _CONVERTERS:
        raise UnknownNameError("conversion target", to, _CONVERTERS)
    fn = _CONVERTERS[to]
    try:
        inspect.signature(fn).bind(model, **opts)
    except TypeError as e:
        params = list(inspect.signature(fn).parameters.values())[1:]
        accepted = ", ".join(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        raise ConfigError(f"convert --to {to}: {e}; its options are: {accepted}") from None
    return fn(copy.deepcopy(model), **opts)


# ----------------------------------------------------------------------------------------------------------------
# helpers shared by the converters


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (``features.0``) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def select_layers(
    model: nn.Module,
    types: tuple[type, ...],
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    family: str = "",
) -> list[tuple[str, nn.Module]]:
    """(name, module) of the modules of ``types`` whose names match a ``layers`` pattern (default: all) and no
    ``exclude`` pattern, in module order.

    Raises:
        ConfigError: nothing selected (the message lists the eligible names).
    """
    eligible = [(n, m) for n, m in model.named_modules() if n and type(m) in types]
    chosen = [
        (n, m)
        for n, m in eligible
        if (layers is None or any(fnmatch.fnmatchcase(n, p) for p in layers))
        and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    ]
    if not chosen:
        names = ", ".join(n for n, _ in eligible) or "none"
        raise ConfigError(
            f"convert --to {family}: no layer selected (layers={list(layers) if layers else 'all'}, "
            f"exclude={list(exclude)}); eligible {', '.join(t.__name__ for t in types)} layers: {names}"
        )
    return chosen


# ----------------------------------------------------------------------------------------------------------------
# lowrank


def _convert_lowrank(
    model: nn.Module,
    *,
    rank_ratio: float | None = None,
    rank: int | None = None,
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> tuple[nn.Module, list[dict[str, Any]]]:
    if (rank is None) == (rank_ratio is None):
        raise ConfigError("convert --to lowrank needs exactly one of --rank-ratio R (e.g. 0.5) or --rank N")
    spec: dict[str, dict[str, Any]] = {}
    for name, m in select_layers(model, (nn.Linear, nn.Conv2d), layers, exclude, "lowrank"):
        if isinstance(m, nn.Linear):
            r = None if rank is None else min(int(rank), m.in_features, m.out_features)
            new = LowRankLinear.from_dense(m, r, rank_ratio=rank_ratio)
            spec[name] = {"type": "linear", "in_features": m.in_features, "out_features": m.out_features,
                          "rank": new.rank, "bias": m.bias is not None}  # fmt: skip
        else:
            n = m.in_channels * math.prod(m.kernel_size)
            r = None if rank is None else min(int(rank), n, m.out_channels)
            new = LowRankConv2d.from_dense(m, r, rank_ratio=rank_ratio)
            spec[name] = {"type": "conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                          "kernel_size": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
                          "dilation": list(m.dilation), "rank": new.rank, "bias": m.bias is not None}  # fmt: skip
        spec[name]["approx_error"] = new.approx_error
        set_submodule(model, name, new.train(m.training))
    return model, [{"kind": "lowrank", "layers": spec}]


def _rebuild_lowrank(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    for name, s in spec["layers"].items():
        if s["type"] == "linear":
            new: nn.Module = LowRankLinear(s["in_features"], s["out_features"], s["rank"], bias=s["bias"])
        else:
            new = LowRankConv2d(
                s["in_channels"], s["out_channels"], s["kernel_size"], s["stride"], s["padding"], s["dilation"],
                s["rank"], bias=s["bias"],
            )  # fmt: skip
        set_submodule(model, name, new)
    return model


# ----------------------------------------------------------------------------------------------------------------
# kron


class FlatKronLinear(KronLinear):
    """A KronLinear with nn.Linear's interface: input (B, N) (or un-flattened), output (B, M) flattened.

    What ``convert --to kron`` puts in place of an ``nn.Linear`` (whose neighbours expect flat features)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).flatten(1)  # (B, m_1, ..., m_d) -> (B, M)


def _balanced(n: int, d: int) -> list[int]:
    from edgesep.models._common import balanced_factors

    return sorted(balanced_factors(n, d), reverse=True)


def _convert_kron(
    model: nn.Module,
    *,
    factors: int = 2,
    shapes: dict[str, dict[str, Sequence[int]]] | None = None,
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> tuple[nn.Module, list[dict[str, Any]]]:
    if int(factors) < 1:
        raise ConfigError(f"convert --to kron: factors must be >= 1, got {factors}")
    shapes = shapes or {}
    spec: dict[str, dict[str, Any]] = {}
    for name, m in select_layers(model, (nn.Linear,), layers, exclude, "kron"):
        given = shapes.get(name, {})
        in_shape = list(given.get("in_shape") or _balanced(m.in_features, int(factors)))
        out_shape = list(given.get("out_shape") or _balanced(m.out_features, len(in_shape)))
        new = FlatKronLinear.from_dense(m, in_shape, out_shape)
        spec[name] = {"in_shape": in_shape, "out_shape": out_shape, "bias": m.bias is not None,
                      "approx_error": new.approx_error}  # fmt: skip
        set_submodule(model, name, new.train(m.training))
    return model, [{"kind": "kron", "layers": spec}]


def _rebuild_kron(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    for name, s in spec["layers"].items():
        set_submodule(model, name, FlatKronLinear(s["in_shape"], s["out_shape"], bias=s["bias"]))
    return model


register_converter("lowrank", _convert_lowrank)
register_transform("lowrank", _rebuild_lowrank)
register_converter("kron", _convert_kron)
register_transform("kron", _rebuild_kron)
register_converter("tt", convert_to_tt)  # edgesep.layers.tt: TT-SVD of Linear / Conv2d layers
register_transform("tt", apply_tt_structure)


# ----------------------------------------------------------------------------------------------------------------
# run directories


def convert_run(
    run_dir: str | Path,
    to: str,
    out: str | Path,
    *,
    fine_tune_epochs: int = 0,
    train_overrides: dict[str, Any] | None = None,
    data_dir: str | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    **opts: Any,
) -> dict[str, Any]:
    """Convert a run directory's model and write a new run directory ``out``; returns its metrics.

    The new run's config.json is the base run's (same ``model`` and ``model_kwargs``) plus ``transforms`` (the
    base's, then this conversion's) and ``converted_from``; ``load_run(out)`` rebuilds it. With
    ``fine_tune_epochs`` > 0 the converted model is trained further with the base run's training configuration
    (``epochs`` set to ``fine_tune_epochs``, ``train_overrides`` applied, e.g. ``{"lr": 1e-3, "optimizer":
    "condlr", "tau": 1.1}``); otherwise it is evaluated with the base run's eval settings.

    Raises:
        CheckpointError: the base run cannot be loaded or ``out`` already holds a run.
        ConfigError / UnknownNameError: bad options.
    """
    import sys

    from edgesep.runs import CONFIG_FILE, MODEL_FILE, load_run, save_weights, write_config, write_metrics
    from edgesep.train import STATE_JSON, TrainConfig, replace, train

    log = log or (lambda s: print(s, file=sys.stderr))
    out = Path(out)
    if (out / MODEL_FILE).exists() or (out / STATE_JSON).exists():
        raise CheckpointError(f"{out} already holds a run; choose another --out or delete it")
    if int(fine_tune_epochs) < 0:
        raise ConfigError(f"--fine-tune-epochs must be >= 0, got {fine_tune_epochs}")
    if train_overrides and not fine_tune_epochs:
        raise ConfigError("training options (--lr, --optimizer, --tau, ...) need --fine-tune-epochs E > 0")
    base, config = load_run(run_dir)
    if "train" not in config:
        raise CheckpointError(f"{Path(run_dir) / CONFIG_FILE} has no training configuration; convert a run of "
                              "`edgesep train`")  # fmt: skip
    tconf = TrainConfig.from_dict(config["train"])
    if data_dir is not None:
        tconf = replace(tconf, data_dir=str(data_dir))
    model, new_transforms = convert_model(base, to, **opts)
    for t in new_transforms:
        for name, s in t.get("layers", {}).items():
            extra = f", rank {s['rank']}" if "rank" in s else ""
            err = f", relative error {s['approx_error']:.4f}" if "approx_error" in s else ""
            log(f"converted {name} to {t['kind']}{extra}{err}")
    transforms = list(config.get("transforms", [])) + new_transforms
    source = {"run": str(run_dir), "to": to, "options": _jsonable(opts)}
    provenance = {"converted_from": {**source, "checkpoint_sha256": _sha(Path(run_dir) / MODEL_FILE)}}
    if fine_tune_epochs:
        tconf = replace(tconf, epochs=int(fine_tune_epochs), **(train_overrides or {}))
        return train(
            tconf, out, progress=progress, log=log, transforms=transforms,
            init_weights=model.state_dict(), extra_config=provenance,
        )  # fmt: skip
    # no fine-tuning: write the converted weights and evaluate like train's final step
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, {**config, "transforms": transforms, **provenance})
    model.eval()
    sha = save_weights(out / MODEL_FILE, model.state_dict(), metadata={"model": config["model"]})
    metrics = _evaluate_run(model, tconf, config, progress)
    metrics["transforms"] = [t["kind"] for t in transforms]
    metrics["checkpoint_sha256"] = sha
    write_metrics(out, metrics)
    # a cheap self-check: the written run reloads to the same function
    reloaded, _ = load_run(out)
    x = torch.rand(2, *config["input_shape"])
    with torch.no_grad():
        if not torch.allclose(reloaded(x), model(x), rtol=1e-5, atol=1e-6):
            raise CheckpointError(f"{out} does not reload to the converted model; this is a bug, please report it")
    return metrics


def _sha(path: Path) -> str:
    from edgesep._io import sha256_file

    return sha256_file(path)


def _jsonable(opts: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}


def _evaluate_run(model: nn.Module, tconf: Any, config: dict[str, Any], progress: bool | None) -> dict[str, Any]:
    import sys

    from edgesep.attacks import AttackSpec
    from edgesep.data import load_dataset
    from edgesep.evaluate import evaluate
    from edgesep.layers.lowrank import lowrank_layer_stats
    from edgesep.stats import model_stats

    data = load_dataset(config["dataset"], tconf.data_dir)
    n_eval = min(tconf.eval_n, len(data.y_test))
    specs = [] if tconf.eps == 0 else [AttackSpec(name="pgd", norm=tconf.norm, eps=tconf.eps, steps=tconf.eval_steps)]
    x, y = torch.as_tensor(data.x_test[:n_eval]), torch.as_tensor(data.y_test[:n_eval])
    progress = sys.stderr.isatty() if progress is None else progress
    ev = evaluate(model, x, y, specs, progress=progress) if n_eval else None
    stats = model_stats(model, data.input_shape)
    stats["lowrank_layers"] = lowrank_layer_stats(model)
    return {
        "schema_version": 1,
        "model": config["model"],
        "dataset": config["dataset"],
        "clean_accuracy": ev["clean"] if ev else None,
        "robust": ev["robust"] if ev else [],
        "eval_n": n_eval,
        **stats,
        "train_time_s": 0.0,
        "epochs": 0,
        "history": [],
    }
