"""Run directory -> bundle, and INT8 into a bundle: the ``edgesep export`` / ``quantize`` / ``inspect`` pipeline.

``export_run`` turns a run directory (``edgesep train``) into a bundle: the fp32 ONNX file (Kronecker layers
lowered, simplified), checked against the torch model on real images; clean and adversarial eval sets crafted on
the float torch model; reference inputs and torch logits; provenance (model, statistics, training config,
checkpoint hash, export report, parity). ``quantize_bundle`` adds the INT8 QDQ file to such a bundle when it
passes the accuracy gate on the bundle's own eval sets. ``inspect_bundle`` summarizes a bundle (numpy only; onnx
for the op census if it is installed).

Choices (also in the README):

- **Eval-set spec**: comma-separated items. ``clean:N`` (or ``clean`` for the default N) is the clean set; any
  attack spec of ``edgesep.attacks.parse`` (``pgd:linf:0.1:40``, ``fgsm:l2:0.5``, ``pgd:linf:8/255:20:restarts=2``)
  with an optional ``@N`` is an adversarial set, e.g. ``clean:1000,pgd:linf:0.1:40@1000``. N defaults to
  ``DEFAULT_EVAL_N`` (1000) and is capped at the size of the test split.
- **Which images**: every eval set, and the reference, takes a prefix of one fixed permutation of the test split,
  ``np.random.default_rng(0).permutation(n_test)`` (some test splits are class-sorted: a plain prefix of the
  shared CIFAR-10 copy is all airplanes). So the sets are nested and the reference inputs are the first clean
  ones. The indices are recorded in the ``export`` report.
- **Adversarial sets** are crafted on the float torch model (``crafted_on="torch-fp32"``) with torch's RNG seeded
  with 0 (inside ``torch.random.fork_rng``: the caller's RNG state is untouched); on any other engine their
  accuracy is a *transferred* robust accuracy. Each set's float top-1 accuracy on its own inputs (and, for an
  adversarial set, the robust accuracy: correct clean *and* attacked) is in the ``export`` report.
- **Parity** runs on ``PARITY_N`` (1000) real images: the test split, topped up with training images when the
  test split is smaller (``digits`` has 359). Max relative error <= 1e-4 and 100% top-1 agreement, or
  ``ParityError``.
- **Reference** (``reference.npz``): the first ``n_reference`` eval images and the torch fp32 logits; with a static
  batch, n_reference is rounded up to a multiple of it. If polygraphy is installed, the same data are also stored
  as polygraphy JSON (reports ``polygraphy_inputs`` and ``polygraphy_outputs``, one iteration per batch), so
  ``polygraphy run model.onnx --trt --load-inputs reports/polygraphy_inputs.json --load-outputs
  reports/polygraphy_outputs.json`` compares an engine with the torch reference.
- **Atomic export**: the bundle is written into a hidden staging directory beside ``out_bundle`` and renamed into
  place at the end; an existing bundle is replaced (with ``overwrite``) only after the new one is complete.
- **Calibration** for ``quantize_bundle``: the first ``calib`` training images of the run's dataset (the train
  splits of ``digits`` and ``cifar10`` are shuffled on load), never the held-out eval images the gate uses.

This module imports neither torch nor onnx at import time: ``inspect_bundle`` needs numpy only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgesep._io import jsonable, sha256_file
from edgesep.bundle import MANIFEST_NAME, Bundle, create_bundle, open_bundle, open_bundle_for_writing
from edgesep.errors import BundleError, ConfigError, EdgesepError, ParityError

if TYPE_CHECKING:
    from edgesep.attacks import AttackSpec
    from edgesep.export._quantize import QuantReport

__all__ = [
    "DEFAULT_EVAL_N",
    "EVAL_SETS_SYNTAX",
    "PARITY_N",
    "PARITY_RTOL",
    "EvalSetSpec",
    "export_run",
    "inspect_bundle",
    "parse_eval_sets",
    "quantize_bundle",
]

DEFAULT_EVAL_N = 1000
PARITY_N = 1000
PARITY_RTOL = 1e-4
EVAL_SETS_SYNTAX = (
    "comma-separated eval sets: 'clean:N' (or 'clean') and attack specs with an optional '@N' count, e.g. "
    "'clean:1000,pgd:linf:0.1:40@1000,fgsm:linf:8/255'; an attack spec is "
    "'fgsm:NORM:EPS', 'pgd:NORM:EPS[:STEPS][:step_size=S][:restarts=R]' or 'autoattack:NORM:EPS'; "
    f"N defaults to {DEFAULT_EVAL_N}"
)
_ORDER = "np.random.default_rng(0).permutation(n_test)"
_CRAFTED_ON = "torch-fp32"
_ATTACK_BATCH = 256

Log = Callable[[str], None]


def _stderr_log(line: str) -> None:
    print(line, file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# eval-set specs


@dataclasses.dataclass(frozen=True)
class EvalSetSpec:
    """One eval set to build: an attack spec (``clean`` for the clean set) and how many test images it takes."""

    attack: AttackSpec
    n: int = DEFAULT_EVAL_N

    @property
    def kind(self) -> str:
        """``"clean"`` or ``"adversarial"``."""
        return "clean" if self.attack.name == "clean" else "adversarial"

    @property
    def id(self) -> str:
        """The eval set's id and file stem, e.g. ``clean``, ``pgd-linf-0.1-40``, ``fgsm-l2-0.5``."""
        a = self.attack
        if a.name == "clean":
            return "clean"
        parts = [a.name, a.norm, f"{a.eps:g}"]
        if a.name == "pgd":
            parts.append(str(a.steps))
            if a.step_size is not None:
                parts.append(f"ss{a.step_size:g}")
            if a.restarts != 1:
                parts.append(f"r{a.restarts}")
        return "-".join(parts)

    def __str__(self) -> str:
        return f"clean:{self.n}" if self.attack.name == "clean" else f"{self.attack}@{self.n}"


def _parse_count(text: str, item: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"eval set {item!r}: the count {text!r} must be an integer >= 1; expected {EVAL_SETS_SYNTAX}")
    return n


def parse_eval_sets(spec: str) -> list[EvalSetSpec]:
    """Parse an eval-set spec such as ``"clean:1000,pgd:linf:0.1:40@1000"`` (syntax: ``EVAL_SETS_SYNTAX``).

    Raises:
        ConfigError: empty items, a bad attack spec or count, two sets with the same id or two clean sets; the
            message shows the syntax.
    """
    from edgesep.attacks import AttackSpec, parse

    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"the eval-set spec is empty; expected {EVAL_SETS_SYNTAX}")
    out: list[EvalSetSpec] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise ConfigError(f"eval-set spec {spec!r} has an empty item; expected {EVAL_SETS_SYNTAX}")
        head, at, count = item.partition("@")
        n = _parse_count(count.strip(), item) if at else DEFAULT_EVAL_N
        name, _, rest = head.strip().partition(":")
        if name.strip().lower() == "clean":
            if rest.strip():
                if at:
                    raise ConfigError(
                        f"eval set {item!r}: give the count once ('clean:N'); expected {EVAL_SETS_SYNTAX}"
                    )
                n = _parse_count(rest.strip(), item)
            attack = AttackSpec("clean")
        else:
            try:
                attack = parse(head)
            except EdgesepError as e:
                raise ConfigError(f"eval set {item!r}: {e}. Eval sets are {EVAL_SETS_SYNTAX}") from e
        out.append(EvalSetSpec(attack, n))
    ids = [s.id for s in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        what = "more than one clean set" if dup == ["clean"] else f"the same set twice ({', '.join(dup)})"
        raise ConfigError(f"eval-set spec {spec!r} asks for {what}; give each set once")
    return out


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _stored_data_dir(provenance_or_config: dict[str, Any], key: str) -> str | None:
    train = provenance_or_config.get(key)
    if isinstance(train, dict):
        data = train.get("_data", train)
        if isinstance(data, dict) and isinstance(data.get("data_dir"), str):
            return data["data_dir"]
    return None


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BundleError(f"{out} exists and is not a directory; choose another bundle path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise BundleError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
        if not (out / MANIFEST_NAME).is_file():
            raise BundleError(
                f"{out} is not empty and holds no {MANIFEST_NAME}; refusing to replace it, remove it yourself"
            )


def _positive_int(v: object, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


def _parity_images(x_test: np.ndarray, x_train: np.ndarray, n: int) -> np.ndarray:
    """``n`` real images: the test split first, then training images when the test split is smaller."""
    x = x_test[:n]
    if len(x) < n:
        x = np.concatenate([x, x_train[: n - len(x)]])
    return np.ascontiguousarray(x, dtype=np.float32)


def _predict(model: Any, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Float32 torch logits for a numpy batch (model in eval mode)."""
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            outs.append(model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size]))).float().numpy())
    return np.concatenate(outs).astype(np.float32)


def _craft(model: Any, x: np.ndarray, y: np.ndarray, spec: AttackSpec, progress: bool) -> np.ndarray:
    """Adversarial examples on the float torch model, in batches, with torch's RNG seeded by 0 (state restored)."""
    import torch
    from tqdm.auto import tqdm

    from edgesep.evaluate import run_attack

    out = []
    starts = range(0, len(x), _ATTACK_BATCH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for i in tqdm(starts, desc=str(spec), unit="batch", disable=not progress, leave=False, file=sys.stderr):
            xb = torch.from_numpy(np.ascontiguousarray(x[i : i + _ATTACK_BATCH]))
            yb = torch.from_numpy(np.ascontiguousarray(y[i : i + _ATTACK_BATCH]))
            out.append(run_attack(model, xb, yb, spec).detach().float().cpu().numpy())
    # an attack's clamp keeps [0, 1]; clip again so float32 round-off can never leave the declared input range
    return np.clip(np.concatenate(out), 0.0, 1.0).astype(np.float32)


def _polygraphy_reports(input_name: str, output_name: str, x: np.ndarray, logits: np.ndarray, batch: int | None):
    """Polygraphy JSON (inputs: a list of feed dicts; outputs: ``RunResults``), or None without polygraphy."""
    try:
        from polygraphy.comparator import RunResults
        from polygraphy.comparator.struct import IterationResult
        from polygraphy.json import to_json
    except ImportError:
        return None
    step = batch or len(x)
    feeds, iterations = [], []
    runner = "edgesep-torch-fp32"
    for i in range(0, len(x), step):
        feeds.append({input_name: x[i : i + step]})
        iterations.append(IterationResult(outputs={output_name: logits[i : i + step]}, runtime=0.0, runner_name=runner))
    results = RunResults()
    results.append((runner, iterations))
    return json.loads(to_json(feeds)), json.loads(to_json(results))


# ----------------------------------------------------------------------------------------------------------------
# export


def export_run(
    run_dir: str | os.PathLike,
    out_bundle: str | os.PathLike,
    *,
    eval_sets: str = f"clean:{DEFAULT_EVAL_N}",
    batch: int | None = None,
    opset: int = 18,
    n_reference: int = 16,
    overwrite: bool = False,
    data_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    log: Log | None = None,
) -> Bundle:
    """Export a run directory to a bundle: fp32 ONNX, parity check, eval sets, reference outputs, provenance.

    Args:
        run_dir: a run directory written by ``edgesep train``.
        out_bundle: the bundle directory to write, by convention ``NAME.bundle``; the bundle is named after its
            stem.
        eval_sets: which eval sets to build; see ``EVAL_SETS_SYNTAX`` (e.g. ``"clean:1000,pgd:linf:0.1:40@1000"``).
        batch: None for a symbolic batch axis; an int for a static batch size.
        opset: ONNX opset (17, 18 or 20).
        n_reference: reference inputs stored with their torch logits (rounded up to a multiple of a static batch).
        overwrite: replace an existing bundle at ``out_bundle`` (only a directory holding a manifest).
        data_dir: where the run's dataset lives; default: the data_dir stored in the run's training config.
        progress: show attack progress bars (default: when stderr is a terminal).
        log: callable taking one line of text (default: print to stderr).
    Returns:
        The finished bundle, opened and verified.
    Raises:
        ConfigError: a bad eval-set spec, opset, batch or n_reference.
        BundleError: ``out_bundle`` exists and ``overwrite`` is not set (or it is not a bundle).
        CheckpointError, DatasetError: the run or its dataset cannot be loaded.
        ParityError: ONNX Runtime disagrees with torch on the parity images.
        GraphCheckError: the exported graph fails a structural check.
    """
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    log = log or _stderr_log
    progress = sys.stderr.isatty() if progress is None else progress
    # every check that needs no torch first: a typo fails in a fraction of a second
    specs = parse_eval_sets(eval_sets)
    n_reference = _positive_int(n_reference, "n_reference")
    if batch is not None:
        batch = _positive_int(batch, "batch")
    out = Path(out_bundle)
    _check_out(out, overwrite)
    name = out.name[: -len(".bundle")] if out.name.endswith(".bundle") and out.name != ".bundle" else out.stem
    if not name:
        raise ConfigError(f"cannot name a bundle after {out!r}; use a path such as models/kron.bundle")

    import torch

    from edgesep.data import load_dataset
    from edgesep.export._onnx import export_onnx, parity
    from edgesep.runs import MODEL_FILE, load_run
    from edgesep.stats import model_stats

    with torch.random.fork_rng(devices=[]):  # building the model draws initial weights: keep the caller's RNG
        model, config = load_run(run_dir)
    input_shape = tuple(int(d) for d in config["input_shape"])
    classes = [str(c) for c in config["classes"]]
    stored_dir = _stored_data_dir(config, "train")
    data = load_dataset(config["dataset"], data_dir if data_dir is not None else stored_dir)
    n_test = len(data.y_test)

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        t = time.perf_counter()
        onnx_path = stage / "work" / "model.onnx"
        report = export_onnx(model, input_shape, onnx_path, opset=opset, batch=batch)
        seconds["export"] = time.perf_counter() - t
        log(f"exported {config['model']} to ONNX opset {opset} ({report.file_size:,} bytes)")

        t = time.perf_counter()
        x_par = _parity_images(data.x_test, data.x_train, PARITY_N)
        par = parity(model, onnx_path, x_par, rtol=PARITY_RTOL)
        par["images"] = "test split" + (" + training images" if len(x_par) > n_test else "")
        seconds["parity"] = time.perf_counter() - t
        if not par["ok"]:
            raise ParityError("model.onnx", par["n"], par["max_rel_err"], par["top1_agreement"], PARITY_RTOL)
        log(
            f"parity with torch on {par['n']} images: max rel err {par['max_rel_err']:.2e}, "
            f"top-1 agreement {100 * par['top1_agreement']:.1f}%"
        )

        stats = model_stats(model, input_shape)
        export_dict = {**report.to_dict(), "path": "model.onnx"}
        provenance = jsonable(
            {
                "model": config["model"],
                "model_kwargs": config.get("model_kwargs", {}),
                "dataset": config["dataset"],
                "params": stats["params"],
                "fc_params": stats["fc_params"],
                "fc_dense_equivalent_params": stats["fc_dense_equivalent_params"],
                "nonzeros": stats["nonzeros"],
                "macs": stats["macs"],
                "layers": stats["kron_layers"],
                "training": config.get("train", {}),
                "normalization": config.get("normalization"),
                "versions": config.get("versions", {}),
                "checkpoint_sha256": sha256_file(Path(run_dir) / MODEL_FILE),
                "export": export_dict,
                "parity": par,
            }
        )
        bdim: int | str = batch if batch is not None else "batch"
        bundle = create_bundle(
            stage / out.name,
            name=name,
            input_spec={"name": report.input_name, "shape": [bdim, *input_shape]},
            output_spec={"name": report.output_name, "shape": [bdim, len(classes)]},
            classes=classes,
            provenance=provenance,
        )
        bundle.add_artifact(
            onnx_path,
            "model.onnx",
            "onnx",
            "fp32",
            "any",
            extra={
                "opset": opset,
                "dynamic_batch": batch is None,
                "exporter": f"torch {torch.__version__} (dynamo)",
                "simplified": report.simplified,
            },
        )

        order = np.random.default_rng(0).permutation(n_test)
        rows = []
        t = time.perf_counter()
        for s in specs:
            n = min(s.n, n_test)
            if n < s.n:
                log(f"eval set {s.id}: the test split has {n_test} images, using all of them instead of {s.n}")
            idx = order[:n]
            x = np.ascontiguousarray(data.x_test[idx], dtype=np.float32)
            y = np.ascontiguousarray(data.y_test[idx], dtype=np.int64)
            t_set = time.perf_counter()
            clean_pred = _predict(model, x).argmax(1)
            if s.kind == "clean":
                bundle.add_eval_set(f"eval/{s.id}.npz", x, y, kind="clean")
                acc, robust = float(np.mean(clean_pred == y)), None
            else:
                x_adv = _craft(model, x, y, s.attack, progress)
                adv_pred = _predict(model, x_adv).argmax(1)
                a = s.attack
                bundle.add_eval_set(
                    f"eval/{s.id}.npz",
                    x_adv,
                    y,
                    kind="adversarial",
                    attack=a.name,
                    norm=a.norm,
                    eps=a.eps,
                    steps=a.steps,
                    crafted_on=_CRAFTED_ON,
                )
                acc = float(np.mean(adv_pred == y))
                robust = float(np.mean((adv_pred == y) & (clean_pred == y)))
            secs = time.perf_counter() - t_set
            rows.append(
                {
                    "id": s.id,
                    "kind": s.kind,
                    "spec": str(s.attack),
                    "n": n,
                    "accuracy_torch_fp32": acc,
                    "robust_accuracy_torch_fp32": robust,
                    "crafted_on": None if s.kind == "clean" else _CRAFTED_ON,
                    "seconds": round(secs, 3),
                }
            )
            log(f"eval set {s.id}: {n} images, torch fp32 top-1 {100 * acc:.2f}% ({secs:.1f} s)")
        seconds["eval_sets"] = time.perf_counter() - t

        n_ref = min(n_reference, n_test)
        if batch is not None:  # a static-batch engine runs whole batches only
            n_ref = -(-n_ref // batch) * batch
        ref_idx = np.resize(order, n_ref)  # wraps around only when a static batch exceeds the test split
        x_ref = np.ascontiguousarray(data.x_test[ref_idx], dtype=np.float32)
        logits = _predict(model, x_ref)
        bundle.set_reference(x_ref, logits)

        poly = _polygraphy_reports(report.input_name, report.output_name, x_ref, logits, batch)
        if poly is None:
            poly_note = "polygraphy is not installed: no polygraphy JSON of the reference written"
        else:
            bundle.add_report("polygraphy_inputs", poly[0])
            bundle.add_report("polygraphy_outputs", poly[1])
            poly_note = "reference written as polygraphy JSON (reports/polygraphy_inputs.json, polygraphy_outputs.json)"
        log(poly_note)

        seconds["total"] = time.perf_counter() - t_start
        used = max([r["n"] for r in rows] + [min(n_ref, n_test)])
        bundle.add_report(
            "export",
            jsonable(
                {
                    "run_dir": os.fspath(run_dir),
                    "eval_order": {
                        "split": "test",
                        "n_test": n_test,
                        "order": _ORDER,
                        "indices": order[:used].tolist(),
                    },
                    "eval_sets": rows,
                    "reference": {"n": n_ref, "indices": "the first n of eval_order"},
                    "polygraphy": poly_note,
                    "seconds": {k: round(v, 3) for k, v in seconds.items()},
                }
            ),
        )
        bundle.verify()
        _move_into_place(stage / out.name, out, stage, overwrite)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log(f"wrote bundle {out} in {time.perf_counter() - t_start:.1f} s")
    return open_bundle(out)


def _move_into_place(src: Path, out: Path, stage: Path, overwrite: bool) -> None:
    """Rename the finished bundle onto ``out``; an old bundle there is moved aside first, then deleted."""
    _check_out(out, overwrite)  # again: something may have appeared at out while exporting
    if out.is_dir() and any(out.iterdir()):
        os.replace(out, stage / "previous")
    elif out.is_dir():
        out.rmdir()
    os.replace(src, out)


# ----------------------------------------------------------------------------------------------------------------
# quantize


def quantize_bundle(
    bundle_path: str | os.PathLike,
    *,
    calib: int = 512,
    method: str = "minmax",
    exclude: Sequence[str] = (),
    auto_exclude: bool = False,
    max_drop: float = 1.0,
    max_robust_drop: float = 2.0,
    data_dir: str | os.PathLike | None = None,
    log: Log | None = None,
) -> QuantReport:
    """Quantize a bundle's fp32 ONNX to INT8 (ORT static QDQ) and add it when it passes the accuracy gate.

    Calibration uses the first ``calib`` training images of the run's dataset; the gate uses the bundle's clean
    eval set (held-out test images, ``max_drop``) and each adversarial eval set (crafted on the float model, so
    transferred to int8; ``max_robust_drop``). On success the bundle gains the artifact ``model.int8.onnx``
    (kind onnx, precision int8, target any; an earlier one is replaced) and the report ``quantization``.

    Args:
        bundle_path: a bundle directory (not a tar: the result is written into it).
        calib: calibration images.
        method, exclude, auto_exclude, max_drop, max_robust_drop: as in ``quantize_onnx``.
        data_dir: where the dataset lives; default: the data_dir of the training config in the provenance.
        log: callable taking one line of text (default: print to stderr).
    Returns:
        The ``QuantReport``; its ``fp32_path`` / ``out_path`` are the files in the bundle.
    Raises:
        BundleError: the bundle does not verify, is a tar, or has no fp32 ONNX artifact.
        ConfigError: bad options, or a bundle without a clean eval set.
        DatasetError: the dataset cannot be loaded.
        AccuracyGateError: the gate failed; nothing was added and the bundle is unchanged.
    """
    log = log or _stderr_log
    calib = _positive_int(calib, "calib")
    path = Path(bundle_path)
    bundle = open_bundle_for_writing(path, "quantize")

    import onnxruntime as ort

    from edgesep.data import load_dataset
    from edgesep.export._quantize import quantize_onnx

    fp32 = bundle.artifact(kind="onnx", precision="fp32")
    clean = [e for e in bundle.manifest.eval_sets if e.kind == "clean"]
    if len(clean) != 1:
        raise ConfigError(
            f"bundle {bundle.name!r} has {len(clean)} clean eval sets; the accuracy gate needs exactly one. "
            "Re-export with --eval-sets 'clean:1000,...'"
        )
    prov = bundle.manifest.provenance
    dataset = prov.get("dataset")
    if not isinstance(dataset, str):
        raise BundleError(f"bundle {bundle.name!r} names no dataset in its provenance; it was not written by export")
    data = load_dataset(dataset, data_dir if data_dir is not None else _stored_data_dir(prov, "training"))
    if calib > len(data.x_train):
        log(f"calibration: the training split has {len(data.x_train)} images, using all of them instead of {calib}")
    x_cal = np.ascontiguousarray(data.x_train[:calib], dtype=np.float32)
    eval_clean = bundle.load_eval_set(clean[0].id)
    eval_adv = [(e.id, *bundle.load_eval_set(e.id)) for e in bundle.manifest.eval_sets if e.kind == "adversarial"]

    with tempfile.TemporaryDirectory(prefix="edgesep-quant-") as tmp:
        int8_tmp = Path(tmp) / "model.int8.onnx"
        report = quantize_onnx(
            bundle.path_of(fp32),
            int8_tmp,
            calib_x=x_cal,
            eval_clean=eval_clean,
            eval_adv=eval_adv,
            method=method,
            exclude=exclude,
            auto_exclude=auto_exclude,
            max_drop=max_drop,
            max_robust_drop=max_robust_drop,
        )
        art = bundle.add_artifact(
            int8_tmp,
            "model.int8.onnx",
            "onnx",
            "int8",
            "any",
            extra={
                "quantizer": f"onnxruntime {ort.__version__} quantize_static (QDQ)",
                "method": report.method,
                "per_channel": report.per_channel,
                "calib_n": report.calib_n,
                "calib_data": f"{dataset} training split, first {report.calib_n}",
                "excluded": list(report.excluded),
                "kept_fp32": list(report.kept_fp32),
                "from": fp32.id,
            },
        )
    report = dataclasses.replace(report, fp32_path=fp32.file, out_path=art.file)
    bundle.add_report("quantization", report.to_dict())
    log(f"added {art.file} ({art.size:,} bytes) and reports/quantization.json to {path}")
    return dataclasses.replace(
        report, fp32_path=os.fspath(bundle.path_of(fp32)), out_path=os.fspath(bundle.path_of(art))
    )


# ----------------------------------------------------------------------------------------------------------------
# inspect


def inspect_bundle(bundle_path: str | os.PathLike, *, census: bool = True) -> dict[str, Any]:
    """Verify a bundle and summarize it as JSON-ready data (numpy only; the op census needs onnx).

    Returns:
        ``{path, name, schema_version, edgesep_version, created, verified, input, output, classes, artifacts
        [{id, file, kind, precision, target, size, sha256}], eval_sets [{id, kind, attack, norm, eps, steps,
        crafted_on, n, accuracy_torch_fp32}], reference, provenance {model, dataset, params, fc_params, macs,
        checkpoint_sha256, opset}, reports [names], quantization (gate rows or None), op_census {artifact id:
        {op: count}} (None when onnx is not installed or ``census`` is off), total_size}``.
    Raises:
        BundleError: the bundle does not verify.
    """
    with open_bundle(bundle_path) as bundle:
        m = bundle.manifest
        accs: dict[str, float] = {}
        with contextlib.suppress(EdgesepError, KeyError, TypeError):
            if "export" in m.reports:
                accs = {r["id"]: r["accuracy_torch_fp32"] for r in bundle.load_report("export")["eval_sets"]}
        quant = None
        with contextlib.suppress(EdgesepError, KeyError, TypeError):
            if "quantization" in m.reports:
                q = bundle.load_report("quantization")
                quant = {"method": q["method"], "kept_fp32": q["kept_fp32"], "gate": q["gate"]}
        ops: dict[str, dict[str, int]] | None = None
        if census:
            try:
                from edgesep.export._graph import op_census
            except ImportError:
                ops = None
            else:
                ops = {a.id: op_census(bundle.path_of(a)) for a in m.artifacts if a.kind in ("onnx", "trt-onnx")}
        prov = m.provenance
        export = prov.get("export") if isinstance(prov.get("export"), dict) else {}
        files = m.files()
        return {
            "path": os.fspath(bundle.root),
            "name": m.name,
            "schema_version": m.schema_version,
            "edgesep_version": m.edgesep_version,
            "created": m.created,
            "verified": True,
            "input": m.input.to_dict(),
            "output": m.output.to_dict(),
            "classes": list(m.classes),
            "artifacts": [
                {k: a.to_dict()[k] for k in ("id", "file", "kind", "precision", "target", "size", "sha256")}
                for a in m.artifacts
            ],
            "eval_sets": [
                {
                    **{k: e.to_dict()[k] for k in ("id", "kind", "attack", "norm", "eps", "steps", "crafted_on", "n")},
                    "accuracy_torch_fp32": accs.get(e.id),
                }
                for e in m.eval_sets
            ],
            "reference": None if m.reference is None else m.reference.to_dict(),
            "provenance": {
                "model": prov.get("model"),
                "dataset": prov.get("dataset"),
                "params": prov.get("params"),
                "fc_params": prov.get("fc_params"),
                "macs": prov.get("macs"),
                "checkpoint_sha256": prov.get("checkpoint_sha256"),
                "opset": export.get("opset"),
            },
            "reports": sorted(m.reports),
            "quantization": quant,
            "op_census": ops,
            "total_size": sum(f.size for f in files) + (bundle.root / MANIFEST_NAME).stat().st_size,
        }
