"""Run directories: ``model.safetensors`` + ``config.json`` + ``metrics.json``. A run directory alone rebuilds the
model; nothing is pickled. Resumable training state lives beside it in ``train_state.safetensors`` + ``.json``."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from edgesep import __version__
from edgesep._io import atomic_write_bytes, atomic_write_json, sha256_file
from edgesep.errors import CheckpointError

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "apply_transforms",
    "load_run",
    "load_weights",
    "read_json",
    "register_transform",
    "save_weights",
    "versions",
]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


def versions() -> dict[str, str]:
    """Versions that matter for reproducing a run."""
    import numpy

    return {
        "edgesep": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write tensors as safetensors atomically; returns the file's sha256."""
    # safetensors refuses shared storage; clone so tied or sliced tensors serialize independently
    data = st_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)
    return sha256_file(path)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} not found")
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}); re-create it with edgesep train") from e


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict) with a CheckpointError that lists missing / unexpected / mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source} does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"shape mismatches {shapes[:8]}; was it written for another model or configuration?"
        )
    model.load_state_dict(state)


# Structural transforms: a run made by post-training conversion (GDWS, low-rank, tensor-train, Kronecker) stores
# the base model (``model`` + ``model_kwargs``) and, in ``config["transforms"]``, the list of structural changes
# applied to it, each ``{"kind": NAME, ...JSON spec...}``. ``load_run`` rebuilds the base model, re-applies each
# transform's *structure* (shapes only, no data needed: weights come from the safetensors file), then loads the
# weights strictly. A transform registers ``fn(model, spec) -> model`` under its kind.
_TRANSFORMS: dict[str, Any] = {}


def register_transform(kind: str, fn: Any) -> Any:
    """Register ``fn(model, spec: dict) -> nn.Module`` that rebuilds the structure a transform ``kind`` made."""
    _TRANSFORMS[kind] = fn
    return fn


def _load_transform_modules() -> None:
    # The modules that define transforms register them on import; import lazily so runs.py stays light.
    import importlib

    for mod in ("edgesep.gdws", "edgesep.convert"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def apply_transforms(model: nn.Module, transforms: list[dict[str, Any]], source: str = "config") -> nn.Module:
    """Re-apply the structural transforms recorded in a run's config (see ``register_transform``)."""
    if transforms and not _TRANSFORMS:
        _load_transform_modules()
    for i, spec in enumerate(transforms):
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind not in _TRANSFORMS:
            _load_transform_modules()
        if kind not in _TRANSFORMS:
            raise CheckpointError(
                f"{source}: transform {i} has kind {kind!r}, which this edgesep does not know "
                f"(known: {sorted(_TRANSFORMS)}); upgrade edgesep or re-create the run"
            )
        model = _TRANSFORMS[kind](model, spec)
    return model


def load_run(run_dir: str | Path, *, map_location: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a run directory and load its weights. Returns (model in eval mode, config)."""
    from edgesep.models import create_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} not found; create one with `edgesep train --out {run_dir}`")
    config = read_json(run_dir / CONFIG_FILE)
    if "model" not in config:
        raise CheckpointError(f"{run_dir / CONFIG_FILE} has no 'model' entry; it was not written by edgesep train")
    model = create_model(config["model"], **config.get("model_kwargs", {}))
    model = apply_transforms(model, config.get("transforms", []), str(run_dir / CONFIG_FILE))
    load_state_strict(model, load_weights(run_dir / MODEL_FILE), str(run_dir / MODEL_FILE))
    return model.to(map_location).eval(), config


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    atomic_write_json(run_dir / CONFIG_FILE, config)


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    atomic_write_json(run_dir / METRICS_FILE, metrics)
