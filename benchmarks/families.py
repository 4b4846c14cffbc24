"""One table for all four layer families (issue 8 §4): dense, Kronecker (with and without the condition term),
CondLR low-rank, tensor-train and GDWS, at matched parameter budgets, trained the same way.

Rows per dataset (in this order):

- ``dense-mlp``: ``mlp`` 784-256-256-10 (the uncompressed reference of the MLP rows);
- ``kron+cond`` / ``kron``: ``kron_mlp`` with hidden shapes (4, 16, 16) x 2, lambda_c > 0 / = 0;
- ``condlr``: ``mlp`` whose two hidden layers are ``LowRankLinear`` of rank r (a ``lowrank`` transform, trained
  from scratch with ``--optimizer condlr`` at tau 1.1);
- ``tt``: ``tt_mlp`` with two TT hidden layers of 256 units (modes 4x4x4x4) and TT rank r;
- ``dense-cnn``: ``cnn_small`` (the GDWS parent and its own reference row);
- ``gdws``: the trained ``dense-cnn`` converted by ``edgesep.gdws.gdws_run`` at a MAC budget of 0.5 of its
  convertible convs (weighted by PGD sensitivities; BatchNorm recalibrated if the model has any), no training.

**Matched budget rule.** The common budget B is the total parameter count of the Kronecker MLP (its structure is
the least flexible: hidden shapes (4, 16, 16) fix it; 13,726 on MNIST). CondLR and TT pick the rank r whose
model's total parameter count is closest to B and must land within +-15 % of it (else the script stops). All
parameters of these MLPs are FC parameters, the dense classifier included. The dense rows and GDWS are not
budget-matched: they are references (GDWS is matched on its parent's MACs instead).

Training (every trained row the same): PGD adversarial training (L-inf eps 0.1, 7 steps, random start) for
``--epochs`` epochs on the first ``--max-train`` training images, batch 64, eps ramped linearly over the first
``--eps-warmup`` epochs, cosine schedule, seed 0; Adam 1e-3 (CondLR: its momentum-SGD optimizer at
``--condlr-lr``). Evaluation on the first ``--n-eval`` test images: clean
and PGD-20 (L-inf eps 0.1, step 2.5 eps / 20, random start). Condition number: the largest over the row's
structured layers of each layer's own ``condition_number()`` (Kron: prod of factor conds; low-rank: over its r
nonzero singular values; TT: of the dense equivalent); GDWS: the equivalent dense kernel matrix (M, C K K) over
its top min(G, M, C K K) singular values; dense rows: the layers their compressed siblings replace (hidden Linear
layers, the GDWS-converted convs), over min(m, n) singular values.

Latency: each row is exported (``export_run``, symbolic batch) and compiled with TVM for the host at batch 1
(``compile_tvm``, untuned). After the rows of a dataset are trained, all its ONNX Runtime sessions (fp32, batch 1
and 64, ``--threads`` intra-op threads) and TVM libraries are timed in one process, interleaved in rounds: p50 per
measurement, median over rounds.

The JSON is written atomically after every row ("partial": true until the end) and a rerun with the same settings
resumes, skipping finished rows (trained run directories under ``--work`` are reused too).

    nice python benchmarks/families.py --datasets mnist fashion_mnist --out benchmarks/results/families.json
    python benchmarks/families.py --quick --datasets mnist --out /tmp/families_quick.json   # ~3 min smoke
    python benchmarks/families.py --summarize benchmarks/results/families.json             # the README table
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgesep._io import atomic_write_json
from edgesep.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_timing.py: helpers the scripts share
from _timing import time_ms

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
LABELS = ("dense-mlp", "kron+cond", "kron", "condlr", "tt", "dense-cnn", "gdws")
FAMILY = {
    "dense-mlp": "dense",
    "kron+cond": "kron",
    "kron": "kron",
    "condlr": "lowrank",
    "tt": "tt",
    "dense-cnn": "dense",
    "gdws": "gdws",
}
HIDDEN = 256  # hidden width of the dense, CondLR and TT MLPs (the dense MLP's default on MNIST)
KRON_HIDDEN = (4, 16, 16)  # the Kronecker MLP's hidden shape: fixes the common budget B
TT_HIDDEN_MODES = (4, 4, 4, 4)  # 256 units
TOLERANCE = 0.15  # each budget-matched family within +-15 % of B
EPS, TRAIN_STEPS, EVAL_STEPS = 0.1, 7, 20
TAU = 1.1
MAC_BUDGET = 0.5


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# the rows: models at a matched parameter budget


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lowrank_transform(in_features: int, rank: int) -> list[dict[str, Any]]:
    """The ``lowrank`` transform making ``mlp(hidden=[HIDDEN, HIDDEN])``'s two hidden layers rank-``rank``."""
    dims = {"features.0": (in_features, HIDDEN), "features.2": (HIDDEN, HIDDEN)}
    layers = {
        name: {"type": "linear", "in_features": n, "out_features": m, "rank": min(rank, n, m), "bias": True}
        for name, (n, m) in dims.items()
    }
    return [{"kind": "lowrank", "layers": layers}]


def build(spec: dict[str, Any], in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The (untrained) model of a row spec: registered model + its transforms."""
    from edgesep.models import create_model
    from edgesep.runs import apply_transforms

    model = create_model(spec["model"], in_shape=list(in_shape), num_classes=num_classes, **spec["model_kwargs"])
    return apply_transforms(model, spec["transforms"]) if spec["transforms"] else model


def _closest(make: Callable[[int], dict[str, Any]], knobs: range, budget: int, in_shape, num_classes):
    """(knob, spec, params) whose parameter count is closest to budget."""
    best = None
    for k in knobs:
        spec = make(k)
        p = _params(build(spec, in_shape, num_classes))
        if best is None or abs(p - budget) < abs(best[2] - budget):
            best = (k, spec, p)
        if p > budget * (1 + TOLERANCE):  # counts grow with the knob
            break
    return best


def plan(in_shape: tuple[int, ...], num_classes: int, lambda_c: float) -> tuple[int, dict[str, dict[str, Any]]]:
    """The common budget B and one spec per row: model, model_kwargs, transforms, training overrides, knob.

    Raises:
        ConfigError: a budget-matched family that cannot get within +-15 % of B.
    """
    n_in = math.prod(in_shape)
    kron_kwargs = {"hidden_shapes": [list(KRON_HIDDEN)] * 2}
    kron = {"model": "kron_mlp", "model_kwargs": kron_kwargs, "transforms": [], "train": {}}
    budget = _params(build(kron, in_shape, num_classes))
    specs: dict[str, dict[str, Any]] = {
        "dense-mlp": {"model": "mlp", "model_kwargs": {"hidden": [HIDDEN, HIDDEN]}, "transforms": [], "train": {}},
        "kron+cond": {**kron, "train": {"lambda_c": lambda_c}, "knob": {"hidden_shapes": kron_kwargs["hidden_shapes"]}},
        "kron": {**kron, "knob": {"hidden_shapes": kron_kwargs["hidden_shapes"]}},
    }

    def lowrank(r: int) -> dict[str, Any]:
        return {"model": "mlp", "model_kwargs": {"hidden": [HIDDEN, HIDDEN]}, "transforms": lowrank_transform(n_in, r),
                "train": {"optimizer": "condlr", "tau": TAU}, "knob": {"rank": r}}  # fmt: skip

    def tt(r: int) -> dict[str, Any]:
        kw = {"hidden_modes": [list(TT_HIDDEN_MODES)] * 2, "ranks": r}
        return {"model": "tt_mlp", "model_kwargs": kw, "transforms": [], "train": {}, "knob": {"tt_rank": r}}

    for label, make, knobs in (("condlr", lowrank, range(1, HIDDEN + 1)), ("tt", tt, range(1, 65))):
        k, spec, p = _closest(make, knobs, budget, in_shape, num_classes)
        if abs(p - budget) > TOLERANCE * budget:
            raise ConfigError(
                f"{label}: no rank puts the model within +-{TOLERANCE:.0%} of the budget {budget:,} (closest: "
                f"{p:,} at {k}); change KRON_HIDDEN or HIDDEN in benchmarks/families.py"
            )
        specs[label] = spec
    specs["dense-cnn"] = {"model": "cnn_small", "model_kwargs": {}, "transforms": [], "train": {}}
    specs["gdws"] = {"parent": "dense-cnn", "mac_budget": MAC_BUDGET}
    return budget, specs


# ----------------------------------------------------------------------------------------------------------------
# measurements


def _matrix_cond(w: torch.Tensor, rank: int | None = None) -> float:
    s = torch.linalg.svdvals(w.detach().double())
    s = s[: rank or len(s)]
    return (s[0] / s[-1]).item() if s[-1] > 0 else math.inf


def condition_numbers(model: nn.Module, dense_layers: list[str] = ()) -> dict[str, float]:
    """{layer: condition number} of the structured layers (see the module docstring), plus ``dense_layers``
    (Linear / Conv2d weights as (m, n) matrices over min(m, n) singular values)."""
    from edgesep.layers.gdws import GDWSConv2d
    from edgesep.layers.kron import KronLinear
    from edgesep.layers.lowrank import LowRankConv2d, LowRankLinear
    from edgesep.layers.tt import TTConv2d, TTLinear

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, KronLinear | LowRankLinear | LowRankConv2d | TTLinear | TTConv2d):
            out[name] = float(m.condition_number())
        elif isinstance(m, GDWSConv2d):
            w = m.to_conv().weight  # (M, C, K1, K2)
            mat = w.reshape(w.shape[0], -1)  # (M, C K1 K2)
            out[name] = _matrix_cond(mat, min(m.num_kernels, *mat.shape))
        elif name in dense_layers:
            out[name] = _matrix_cond(m.weight.reshape(m.weight.shape[0], -1))  # (m, n)
    return out


def time_dataset(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """{label: {"ort_b1_ms", "ort_b64_ms", "tvm_b1_ms"}}: every row's sessions in one process, interleaved in
    rounds (p50 per measurement, median over rounds)."""
    from edgesep.runtimes import load

    rng = np.random.default_rng(0)
    fns: dict[tuple[str, str], Callable[[], Any]] = {}
    for r in rows:
        shape = tuple(r["input_shape"])
        ort = load(r["bundle"], backend="onnxruntime", precision="fp32", threads=args.threads)
        for b in (1, 64):
            x = rng.random((b, *shape), dtype=np.float32)
            fns[(r["label"], f"ort_b{b}_ms")] = lambda s=ort, a=x: s.run(a)
        if not args.no_tvm:
            tvm = load(r["bundle"], backend="tvm", precision="fp32")
            x1 = rng.random((1, *shape), dtype=np.float32)
            fns[(r["label"], "tvm_b1_ms")] = lambda s=tvm, a=x1: s.run(a)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in fns}
    for _ in range(args.rounds):
        for key, fn in fns.items():
            times[key].append(time_ms(fn, args.min_time))
    out: dict[str, dict[str, float]] = {r["label"]: {} for r in rows}
    for (label, what), ts in times.items():
        out[label][what] = float(np.median(ts))
        out[label][what.replace("_ms", "_rounds_ms")] = ts
    return out


# ----------------------------------------------------------------------------------------------------------------
# one row


def _train_row(spec: dict[str, Any], run_dir: Path, dataset: str, data_dir: str | None, args) -> None:
    """Train (or resume, or reuse) the row's run directory."""
    from edgesep.train import TrainConfig, train

    if (run_dir / "model.safetensors").is_file() and (run_dir / "metrics.json").is_file():
        return
    overrides = dict(spec["train"])
    if overrides.get("optimizer") == "condlr":
        overrides["lr"] = args.condlr_lr
    fields = dict(
        model=spec["model"], model_kwargs=spec["model_kwargs"], dataset=dataset, data_dir=data_dir,
        epochs=args.epochs, batch_size=args.batch_size, optimizer="adam", lr=1e-3, adv="pgd", eps=EPS,
        adv_steps=TRAIN_STEPS, eps_warmup_epochs=args.eps_warmup, max_train=args.max_train, eval_n=0, seed=args.seed,
    )  # fmt: skip
    cfg = TrainConfig(**{**fields, **overrides})
    resume = (run_dir / "train_state.json").is_file()
    train(cfg, run_dir, resume=resume, progress=False, log=lambda s: None, transforms=spec["transforms"] or None)


def measure_row(
    label: str, spec: dict[str, Any], dataset: str, data_dir: str | None, work: Path, data, budget: int, args
) -> dict[str, Any]:
    """Train or convert, evaluate, count, export and compile one row; latency is filled in later."""
    from edgesep.attacks import AttackSpec
    from edgesep.evaluate import evaluate
    from edgesep.export import export_run
    from edgesep.gdws import find_targets, gdws_run
    from edgesep.runs import load_run, read_json
    from edgesep.runtimes.tvm import compile_tvm
    from edgesep.stats import count_macs

    run_dir = work / (f"{label}-lr{args.condlr_lr:g}" if label == "condlr" else label)
    row: dict[str, Any] = {"dataset": dataset, "label": label, "family": FAMILY[label], "run_dir": str(run_dir)}
    t0 = time.perf_counter()
    if label == "gdws":
        parent = work / spec["parent"]
        if not (run_dir / "model.safetensors").is_file():
            parent_model, _ = load_run(parent)
            has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in parent_model.modules())
            gdws_run(
                str(parent), run_dir, mac_budget=spec["mac_budget"], alphas_n=args.gdws_alphas_n,
                bn_recalib=args.gdws_bn_recalib if has_bn else 0, eval_n=0, overwrite=True, log=lambda s: None,
            )  # fmt: skip
        gm = read_json(run_dir / "metrics.json")
        row["train_s"] = None
        row["convert_s"] = gm["seconds"]
        row["parent_train_s"] = read_json(parent / "metrics.json")["train_time_s"]
        row["gdws"] = {k: gm["gdws"][k] for k in ("mac_budget", "weighted", "converted_mac_reduction",
                                                   "conv_mac_reduction")}  # fmt: skip
        row["gdws"]["bn_recalib"] = gm["gdws"].get("bn_recalib")
        row["knob"] = {"mac_budget": spec["mac_budget"]}
    else:
        _train_row(spec, run_dir, dataset, data_dir, args)
        row["train_s"] = read_json(run_dir / "metrics.json")["train_time_s"]
        row["knob"] = spec.get("knob")
    model, config = load_run(run_dir)
    model.eval()
    shape = tuple(config["input_shape"])
    row["model"] = config["model"]
    row["model_kwargs"] = {k: v for k, v in config["model_kwargs"].items() if k not in ("mean", "std")}
    row["input_shape"] = list(shape)
    row["params"] = _params(model)
    row["budget"] = budget if label in ("kron+cond", "kron", "condlr", "tt") else None
    row["budget_dev"] = row["params"] / budget - 1 if row["budget"] else None
    row["macs"] = count_macs(model, shape)
    dense = []
    if label == "dense-mlp":
        dense = [n for n, m in model.named_modules() if n.startswith("features.") and isinstance(m, nn.Linear)]
    elif label == "dense-cnn":
        dense = find_targets(model)[0]
    conds = condition_numbers(model, dense)
    row["conds"] = conds
    row["max_cond"] = max(conds.values()) if conds else None
    n = min(args.n_eval, len(data.y_test))
    torch.manual_seed(args.seed)  # PGD's random start: the same draw for a rerun of the row
    ev = evaluate(model, data.x_test[:n], data.y_test[:n], [AttackSpec("pgd", "linf", EPS, EVAL_STEPS)])
    row["n_eval"] = n
    row["clean"] = ev["clean"]
    row["robust"] = ev["robust"][0]["accuracy"]
    row["attack"] = {k: ev["robust"][0][k] for k in ("attack", "norm", "eps", "steps", "step_size")}
    bundle = run_dir.parent / f"{run_dir.name}.bundle"
    if not (bundle / "manifest.json").is_file():
        export_run(run_dir, bundle, eval_sets="clean:64", batch=None, overwrite=True, progress=False,
                   log=lambda s: None)  # fmt: skip
    row["bundle"] = str(bundle)
    if not args.no_tvm:
        t1 = time.perf_counter()
        art = compile_tvm(bundle, precision="fp32", batch=1, opt=args.tvm_opt, log=lambda s: None)
        row["tvm"] = {"compile_s": time.perf_counter() - t1, "pipeline": art.extra.get("pipeline"), "untuned": True}
    row["row_s"] = time.perf_counter() - t0
    row["latency"] = None
    return row


# ----------------------------------------------------------------------------------------------------------------
# output: table and plot


def _fmt(v: Any, f: str) -> str:
    return "-" if v is None else format(v, f)


def summarize(result: dict[str, Any]) -> str:
    """The README's Markdown table of a result."""
    head = ["dataset", "row", "params", "vs budget", "MACs", "clean", f"PGD-{EVAL_STEPS}", "max cond",
            "ORT b1 ms", "ORT b64 ms", "TVM b1 ms", "train s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['dataset']} | {r['label']} | failed: {r['error'][:80]} |" + " |" * (len(head) - 3))
            continue
        lat = r.get("latency") or {}
        train_s = _fmt(r["train_s"], ".0f") if r["train_s"] is not None else f"{r['convert_s']:.0f} (convert)"
        cells = [r["dataset"], r["label"], f"{r['params']:,}",
                 f"{r['budget_dev']:+.1%}" if r["budget_dev"] is not None else "-", f"{r['macs']:,}",
                 f"{r['clean']:.3f}", f"{r['robust']:.3f}", _fmt(r["max_cond"], ".3g"),
                 _fmt(lat.get("ort_b1_ms"), ".4f"), _fmt(lat.get("ort_b64_ms"), ".3f"),
                 _fmt(lat.get("tvm_b1_ms"), ".4f"), train_s]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Robust accuracy vs parameters (log x), one marker per family, one panel per dataset."""
    import io

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgesep._io import atomic_write_bytes

    datasets = list(dict.fromkeys(r["dataset"] for r in result["rows"]))
    if not datasets:
        return
    markers = {"dense-mlp": "o", "kron+cond": "s", "kron": "D", "condlr": "^", "tt": "v", "dense-cnn": "P",
               "gdws": "*"}  # fmt: skip
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets, strict=True):
        for r in (r for r in result["rows"] if r["dataset"] == ds and "error" not in r):
            ax.scatter(r["params"], r["robust"], marker=markers.get(r["label"], "x"), s=70, label=r["label"])
        if result.get("budgets", {}).get(ds):
            ax.axvline(result["budgets"][ds], color="grey", lw=0.8, ls="--", label="budget B")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the 2x10^4 ... labels overlap
        ax.set_xlabel("parameters")
        ax.set_ylabel(f"PGD-{EVAL_STEPS} robust accuracy (eps {EPS})")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "epochs": args.epochs, "max_train": args.max_train, "n_eval": args.n_eval, "seed": args.seed,
        "batch_size": args.batch_size, "eps_warmup_epochs": args.eps_warmup, "optimizer": "adam", "lr": 1e-3,
        "condlr_lr": args.condlr_lr, "tau": TAU,
        "lambda_c": args.lambda_c, "train_attack": f"pgd:linf:{EPS}:{TRAIN_STEPS}",
        "eval_attack": f"pgd:linf:{EPS}:{EVAL_STEPS}", "gdws_mac_budget": MAC_BUDGET,
        "gdws_alphas_n": args.gdws_alphas_n, "threads": args.threads, "rounds": args.rounds,
        "min_time_s": args.min_time, "tvm": None if args.no_tvm else {"target": "host", "opt": args.tvm_opt},
        "budget_rule": f"kron_mlp hidden {list(KRON_HIDDEN)} x2 total params = B; condlr/tt rank closest to B, "
                       f"within +-{TOLERANCE:.0%}",
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="holds <dataset>/ (not for digits)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/families.json"))
    ap.add_argument("--plot", type=Path, default=None, help="default: --out with .png")
    ap.add_argument("--work", type=Path, default=Path("runs/families"), help="run directories and bundles")
    ap.add_argument("--epochs", type=int, default=None, help="default 3 (--quick: 1)")
    ap.add_argument("--max-train", type=int, default=None, help="first N training images; default 8000 (quick 1000)")
    ap.add_argument("--n-eval", type=int, default=None, help="first N test images; default 500 (quick 100)")
    ap.add_argument("--quick", action="store_true", help="a ~3 min smoke run: small defaults, one TVM pipeline")
    ap.add_argument("--lambda-c", type=float, default=0.01, help="the condition term of the kron+cond row")
    ap.add_argument("--condlr-lr", type=float, default=0.2, help="CondLR (momentum SGD) learning rate")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--eps-warmup", type=int, default=None, help="epochs of linear eps ramp; default 2 (quick 0)")
    ap.add_argument("--gdws-alphas-n", type=int, default=None, help="training images for GDWS sensitivities")
    ap.add_argument("--gdws-bn-recalib", type=int, default=1000, help="images for BN recalibration (if BN)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads and ONNX Runtime intra-op threads")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved latency rounds; default 5 (quick 2)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per latency measurement")
    ap.add_argument("--tvm-opt", default=None, help="compile_tvm opt; default 'default' (quick: 'fused')")
    ap.add_argument("--no-tvm", action="store_true", help="skip the TVM build and latency")
    ap.add_argument("--rows", nargs="+", choices=LABELS, default=list(LABELS), help="a subset of the rows")
    ap.add_argument("--fresh", action="store_true", help="discard a result file written with other settings")
    ap.add_argument("--summarize", type=Path, default=None, help="print the Markdown table of a result and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        from edgesep.runs import read_json

        print(summarize(read_json(args.summarize)))
        return 0
    q = args.quick
    for name, full, quick in (("epochs", 3, 1), ("max_train", 8000, 1000), ("n_eval", 500, 100), ("rounds", 5, 2),
                              ("min_time", 0.2, 0.05), ("tvm_opt", "default", "fused"),
                              ("gdws_alphas_n", 256, 64), ("eps_warmup", 2, 0)):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    if "gdws" in args.rows and "dense-cnn" not in args.rows:
        raise ConfigError("the gdws row needs its parent: add dense-cnn to --rows")
    torch.set_num_threads(args.threads)
    plot_path = args.plot or args.out.with_suffix(".png")

    import onnxruntime as ort

    from edgesep.data import load_dataset
    from edgesep.runs import read_json, versions

    settings = _settings(args)
    result: dict[str, Any] = {
        "schema_version": 1, "benchmark": "families", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["benchmarks/families.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                        "versions": {**versions(), "onnxruntime": ort.__version__}},
        "settings": settings, "partial": True, "budgets": {}, "rows": [],
    }  # fmt: skip
    if args.out.is_file():
        old = read_json(args.out)
        if old.get("settings") == settings:
            result["rows"], result["budgets"] = old.get("rows", []), old.get("budgets", {})
            _log(f"resuming {args.out}: {len(result['rows'])} rows done")
        elif not args.fresh:
            raise ConfigError(
                f"{args.out} was written with other settings; pass --fresh to replace it, or another --out"
            )
    tag = f"e{args.epochs}-n{args.max_train}-b{args.batch_size}-w{args.eps_warmup}-s{args.seed}"
    t_start = time.perf_counter()
    for dataset in args.datasets:
        data_dir = None if dataset == "digits" else str(args.data_root / dataset)
        data = load_dataset(dataset, data_dir)
        budget, specs = plan(tuple(data.input_shape), data.num_classes, args.lambda_c)
        result["budgets"][dataset] = budget
        work = args.work / tag / dataset
        done = {r["label"] for r in result["rows"] if r["dataset"] == dataset}
        for label in args.rows:
            if label in done:
                continue
            try:
                row = measure_row(label, specs[label], dataset, data_dir, work, data, budget, args)
            except (RuntimeError, ValueError) as e:  # e.g. a diverged training run (non-finite weights)
                row = {"dataset": dataset, "label": label, "family": FAMILY[label], "error": f"{type(e).__name__}: {e}"}
                result["rows"].append(row)
                atomic_write_json(args.out, result)
                _log(f"{dataset:13s} {label:9s} FAILED: {row['error'][:200]}")
                continue
            result["rows"].append(row)
            atomic_write_json(args.out, result)
            _log(f"[{time.perf_counter() - t_start:6.0f}s] {dataset:13s} {label:9s} params {row['params']:>8,} "
                 f"MACs {row['macs']:>9,} clean {row['clean']:.3f} PGD-{EVAL_STEPS} {row['robust']:.3f} "
                 f"max cond {_fmt(row['max_cond'], '.3g')} ({row['row_s']:.0f}s)")  # fmt: skip
        rows = [r for r in result["rows"] if r["dataset"] == dataset and "error" not in r]
        if any(r["latency"] is None for r in rows):
            lat = time_dataset(rows, args)
            for r in rows:
                r["latency"] = t = lat[r["label"]]
                _log(
                    f"{dataset:13s} {r['label']:9s} ORT b1 {t['ort_b1_ms']:.4f} ms, b64 {t['ort_b64_ms']:.3f} ms, "
                    f"TVM b1 {_fmt(t.get('tvm_b1_ms'), '.4f')} ms"
                )
            atomic_write_json(args.out, result)
        plot(result, plot_path)
    result["partial"] = False
    result["total_s"] = time.perf_counter() - t_start
    atomic_write_json(args.out, result)
    plot(result, plot_path)
    _log(f"wrote {args.out} and {plot_path} ({result['total_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
