"""The `edgesep` command line. User errors print one line in red and exit 2, without a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from edgesep.errors import ConfigError, EdgesepError


class CheckFailedError(EdgesepError):
    """`edgesep check` found errors: exit non-zero so scripts and CI can gate on it."""


app = typer.Typer(
    name="edgesep",
    help="Robust, lightweight neural networks from training to edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out_console = Console()
err_console = Console(stderr=True)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="EDGESEP_DATA_DIR",
        help="Directory (or file) holding mnist / fashion_mnist / cifar10 in a standard format.",
    ),
]


def _log(line: str) -> None:
    err_console.print(line, highlight=False)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _parse_model_args(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are JSON when they parse as JSON (numbers, lists), else strings."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-arg expects key=value (e.g. hidden=[256,256]), got {item!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


@app.command("models")
def models_cmd(pattern: Annotated[str, typer.Argument(help="fnmatch pattern, e.g. 'kron*'")] = "*") -> None:
    """List registered models."""
    from edgesep.models import list_models

    for name in list_models(pattern):
        out_console.print(name)


@app.command("datasets")
def datasets_cmd() -> None:
    """List named datasets."""
    from edgesep.data import list_datasets

    for name in list_datasets():
        out_console.print(name)


@app.command("train")
def train_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run directory to create (or resume).")],
    model: Annotated[str, typer.Option(help="Registered model name (see `edgesep models`).")] = "kron_mlp",
    data: Annotated[str, typer.Option("--data", help="Dataset name (see `edgesep datasets`).")] = "digits",
    data_dir: DataDir = None,
    model_arg: Annotated[
        list[str] | None, typer.Option("--model-arg", help="Model keyword argument key=value (repeatable).")
    ] = None,
    epochs: int = 10,
    batch_size: int = 128,
    optimizer: Annotated[str, typer.Option(help="sgd | adam | condlr (robust low-rank layers)")] = "adam",
    lr: float = 1e-3,
    momentum: float = 0.9,
    tau: Annotated[float, typer.Option(help="condlr: bound on each low-rank layer's cond(S) (>= 1).")] = 1.0,
    rank_ratio: Annotated[float | None, typer.Option(help="Low-rank models: fraction of each rank removed.")] = None,
    weight_decay: float = 0.0,
    schedule: Annotated[str, typer.Option(help="cosine | step | constant")] = "cosine",
    adv: Annotated[str, typer.Option(help="none | pgd | fgsm (fast FGSM with random start)")] = "none",
    eps: float = 0.1,
    norm: Annotated[str, typer.Option(help="linf | l2")] = "linf",
    adv_steps: int = 7,
    adv_step_size: float | None = None,
    eps_warmup: Annotated[int, typer.Option(help="Epochs over which eps ramps up from 0.")] = 0,
    lambda_s: Annotated[float, typer.Option(help="Weight of the sparsity term on separable factors.")] = 0.0,
    lambda_c: Annotated[float, typer.Option(help="Weight of the condition-number term.")] = 0.0,
    sparsity: Annotated[str, typer.Option(help="l1 | log")] = "l1",
    condition: Annotated[str | None, typer.Option(help="logdet | gram | smooth_log_cond")] = None,
    prune: Annotated[float, typer.Option(help="Fraction of factor entries zeroed after training.")] = 0.0,
    seed: int = 0,
    max_train: Annotated[int | None, typer.Option(help="Use only the first N training images.")] = None,
    eval_n: int = 1000,
    eval_steps: int = 20,
    device: str = "cpu",
    resume: Annotated[bool, typer.Option(help="Continue the run stored in --out.")] = False,
) -> None:
    """Train a model (clean or adversarially) and write a run directory."""
    from edgesep.train import TrainConfig, train

    config = TrainConfig(
        model=model, model_kwargs=_parse_model_args(model_arg or []), dataset=data,
        data_dir=str(data_dir) if data_dir else None, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
        lr=lr, momentum=momentum, tau=tau, rank_ratio=rank_ratio, weight_decay=weight_decay, schedule=schedule,
        adv=adv, eps=eps, norm=norm,
        adv_steps=adv_steps, adv_step_size=adv_step_size, eps_warmup_epochs=eps_warmup, lambda_s=lambda_s,
        lambda_c=lambda_c, sparsity=sparsity, condition=condition, prune=prune, seed=seed, max_train=max_train,
        eval_n=eval_n, eval_steps=eval_steps, device=device,
    )  # fmt: skip
    m = train(config, out, resume=resume, log=_log)
    table = Table(title=f"{model} on {data} -> {out}")
    for col in ("clean acc", "robust acc", "params", "FC params", "nonzeros", "MACs", "max cond", "time s"):
        table.add_column(col, justify="right")
    conds = [r["condition_number"] for r in m["kron_layers"]]
    table.add_row(
        _fmt(m["clean_accuracy"]), _fmt(m["robust"][0]["accuracy"] if m["robust"] else None), _fmt(m["params"]),
        _fmt(m["fc_params"]), _fmt(m["nonzeros"]), _fmt(m["macs"]), _fmt(max(conds) if conds else None, 2),
        _fmt(m["train_time_s"], 1),
    )  # fmt: skip
    out_console.print(table)


@app.command("eval")
def eval_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory written by `edgesep train`.")],
    attack: Annotated[str, typer.Option(help="clean | fgsm | pgd | autoattack")] = "pgd",
    eps: float = 0.1,
    steps: Annotated[int, typer.Option(help="PGD steps.")] = 40,
    step_size: Annotated[float | None, typer.Option(help="PGD step size (default 2.5 eps / steps).")] = None,
    norm: Annotated[str, typer.Option(help="linf | l2")] = "linf",
    restarts: Annotated[int, typer.Option(help="PGD restarts.")] = 1,
    n: Annotated[int, typer.Option(help="Number of test images (from the start of the test split).")] = 2000,
    data_dir: DataDir = None,
    batch_size: int = 256,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result as JSON here.")] = None,
) -> None:
    """Clean and adversarial accuracy of a run on its dataset's test split."""
    import torch

    from edgesep._io import atomic_write_json
    from edgesep.attacks import AttackSpec
    from edgesep.data import load_dataset
    from edgesep.evaluate import evaluate
    from edgesep.runs import load_run

    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    model, config = load_run(run)
    stored_dir = config.get("train", {}).get("_data", {}).get("data_dir")
    data = load_dataset(config["dataset"], data_dir or stored_dir)
    from edgesep.data import eval_indices

    idx = eval_indices(len(data.y_test), n)  # a seeded subset, not the first n (cifar10_jpeg is sorted by class)
    x, y = torch.as_tensor(data.x_test[idx]), torch.as_tensor(data.y_test[idx])
    # only PGD takes steps, a step size and restarts
    pgd_args = {"steps": steps, "step_size": step_size, "restarts": restarts} if attack == "pgd" else {}
    specs = [] if attack == "clean" else [AttackSpec(name=attack, norm=norm, eps=eps, **pgd_args)]
    result = evaluate(model, x, y, specs, batch_size=batch_size, progress=sys.stderr.isatty())
    result = {"run": str(run), "model": config["model"], "dataset": config["dataset"], **result}
    table = Table(title=f"{config['model']} ({run}) on {len(y)} {config['dataset']} test images")
    table.add_column("attack")
    table.add_column("accuracy", justify="right")
    table.add_row("clean", _fmt(result["clean"]))
    for r in result["robust"]:
        table.add_row(f"{r['attack']} {r['norm']} eps={r['eps']} steps={r['steps']}", _fmt(r["accuracy"]))
    out_console.print(table)
    if json_out:
        atomic_write_json(json_out, result)
        _log(f"wrote {json_out}")


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option(help="Where the demo's runs, bundles, results and report go.")] = Path(
        "runs/demo"
    ),
    epochs: int = 30,
    eps: float = 0.1,
    device: Annotated[str, typer.Option(help="Device profile the bundles are benchmarked on.")] = "host",
    deploy: Annotated[bool, typer.Option(help="Export and quantize the models (needs the export extra).")] = True,
    bench: Annotated[bool, typer.Option(help="Compile, benchmark on --device and write the report.")] = True,
    square_queries: Annotated[int, typer.Option(help="Square attack queries against each engine (0: off).")] = 300,
    min_seconds: Annotated[float, typer.Option(help="Latency: seconds of batch-1 samples per artifact.")] = 2.0,
    min_runs: Annotated[int, typer.Option(help="Latency: at least this many batch-1 runs per artifact.")] = 300,
    max_eval: Annotated[int | None, typer.Option(help="Cap the images per eval set on the device.")] = None,
    tvm: Annotated[bool, typer.Option(help="Compile TVM libraries for the host and the device's target.")] = True,
) -> None:
    """The whole pipeline on bundled digits: adversarial training -> export -> INT8 -> compile -> bench -> report."""
    from edgesep.demo import run_demo

    rows = run_demo(out, epochs=epochs, eps=eps, log=_log)
    table = Table(title=f"edgesep demo: PGD adversarial training on digits (eps={eps})")
    for col in ("model", "params", "FC params", "MACs", "clean acc", "robust acc", "max cond", "train s"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for r in rows:
        table.add_row(
            f"{r['label']} ({r['model']})", _fmt(r["params"]), _fmt(r["fc_params"]), _fmt(r["macs"]),
            _fmt(r["clean_accuracy"]), _fmt(r["robust_accuracy"]), _fmt(r["max_condition_number"], 2),
            _fmt(r["train_time_s"], 1),
        )  # fmt: skip
    out_console.print(table)
    dense, sep = rows
    out_console.print(
        f"separable: {1 - sep['fc_params'] / dense['fc_params']:.1%} fewer FC parameters, "
        f"robust accuracy {sep['robust_accuracy'] - dense['robust_accuracy']:+.3f} vs dense "
        f"({rows[0]['attack']}, {rows[0]['eval_n']} test images); runs in {out}"
    )
    if not deploy:
        return
    try:
        import onnx  # noqa: F401  (the export extra)
    except ImportError:
        _log("skipping export and INT8: install the export extra (pip install -e '.[export]')")
        return
    from edgesep.demo import deploy_demo

    deployed = deploy_demo(rows, eps=eps, log=_log)
    table = Table(title="deployment: ONNX bundles, INT8 behind the accuracy gate")
    cols = ("model", "fp32 B", "int8 B", "clean fp32", "clean int8", "robust fp32", "robust int8", "gate")
    for col in cols:
        table.add_column(col, justify="left" if col in ("model", "gate") else "right")
    for d in deployed:
        table.add_row(
            d["label"], _fmt(d.get("size_fp32")), _fmt(d.get("size_int8")), _fmt(d.get("clean_fp32")),
            _fmt(d.get("clean_int8")), _fmt(d.get("robust_fp32")), _fmt(d.get("robust_int8")), d["gate"],
        )  # fmt: skip
    out_console.print(table)
    out_console.print(
        "robust = PGD crafted on the float torch model, transferred to the engine. Bundles: "
        + ", ".join(d["bundle"] for d in deployed)
    )
    if not bench:
        return
    from edgesep._cli_bench import print_summary
    from edgesep.demo import DemoBench, bench_demo

    settings = DemoBench(device=device, square_queries=square_queries, min_runs=min_runs, min_seconds=min_seconds,
                         max_eval=max_eval, tvm=tvm)  # fmt: skip
    res = bench_demo(deployed, out, settings, log=_log)
    print_summary(res["results"], f"on-device benchmark: {res['device']}")
    out_console.print(f"report: {res['report_html']} (and {res['report_md']}); result files in {out / 'results'}")


def _table(title: str | None, rows: list[list[str]], left: int = 1) -> Table:
    """A rich table from a header row and text rows; the first ``left`` columns are left-aligned."""
    from rich.markup import escape

    # cells such as "robust[pgd-linf-0.1-10]" would otherwise be read as rich markup tags and vanish
    table = Table(title=None if title is None else escape(title))
    for i, col in enumerate(rows[0]):
        table.add_column(escape(col), justify="left" if i < left else "right")
    for row in rows[1:]:
        table.add_row(*(escape(c) for c in row))
    return table


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


@app.command("export")
def export_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory written by `edgesep train`.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle directory to write, e.g. models/kron.bundle.")],
    eval_sets: Annotated[
        str,
        typer.Option(
            "--eval-sets",
            help="Comma-separated eval sets: 'clean:N' and attack specs with an optional '@N' count, e.g. "
            "'clean:1000,pgd:linf:0.1:40@1000' (N defaults to 1000).",
        ),
    ] = "clean:1000",
    batch: Annotated[int | None, typer.Option(help="Static batch size (default: a symbolic batch axis).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset: 17, 18 or 20.")] = 18,
    n_reference: Annotated[int, typer.Option(help="Reference inputs stored with their torch logits.")] = 16,
    data_dir: DataDir = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at --out.")] = False,
) -> None:
    """Export a run to a bundle: fp32 ONNX (checked against torch), eval sets, reference outputs, provenance."""
    from edgesep.export import export_run

    bundle = export_run(
        run, out, eval_sets=eval_sets, batch=batch, opset=opset, n_reference=n_reference, overwrite=overwrite,
        data_dir=data_dir, progress=sys.stderr.isatty(), log=_log,
    )  # fmt: skip
    prov = bundle.manifest.provenance
    exp, par = prov["export"], prov["parity"]
    before, after = exp["census_before"], exp["census_after"]
    census = [["op", "exported", "written"]]
    census += [[op, str(before.get(op, 0)), str(after.get(op, 0))] for op in sorted({*before, *after})]
    census.append(["total", str(sum(before.values())), str(sum(after.values()))])
    out_console.print(_table(f"ONNX op census (opset {exp['opset']})", census))
    out_console.print(
        f"parity with torch on {par['n']} images ({par['images']}): max abs err {par['max_abs_err']:.2e}, "
        f"max rel err {par['max_rel_err']:.2e}, top-1 agreement {100 * par['top1_agreement']:.2f}%",
        highlight=False,
        markup=False,
    )
    report = bundle.load_report("export")
    sets = [["eval set", "kind", "attack", "n", "torch fp32 top-1 %", "robust %"]]
    for r in report["eval_sets"]:
        sets.append(
            [r["id"], r["kind"], r["spec"], str(r["n"]), _pct(r["accuracy_torch_fp32"]),
             _pct(r["robust_accuracy_torch_fp32"])]
        )  # fmt: skip
    out_console.print(_table("eval sets (crafted on the float torch model)", sets, left=3))
    size = sum(f.size for f in bundle.manifest.files())
    out_console.print(f"bundle {bundle.name!r}: {bundle.root} ({size:,} bytes)", highlight=False, markup=False)


@app.command("quantize")
def quantize_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory written by `edgesep export`.")],
    calib: Annotated[int, typer.Option(help="Calibration images (the first N of the training split).")] = 512,
    method: Annotated[str, typer.Option(help="Calibration: minmax | entropy | percentile.")] = "minmax",
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Keep nodes fp32 whose name or op type matches (fnmatch; repeatable)."),
    ] = None,
    auto_exclude: Annotated[
        bool, typer.Option(help="On a failed gate, keep the lowest-SQNR layers fp32 one by one.")
    ] = False,
    max_drop: Annotated[float, typer.Option(help="Largest clean top-1 drop, percentage points.")] = 1.0,
    max_robust_drop: Annotated[
        float, typer.Option(help="Largest top-1 drop on each adversarial eval set, percentage points.")
    ] = 2.0,
    data_dir: DataDir = None,
) -> None:
    """Quantize a bundle's fp32 ONNX to INT8 (QDQ) and add it only if it passes the accuracy gate."""
    from edgesep.errors import AccuracyGateError
    from edgesep.export import quantize_bundle

    try:
        report = quantize_bundle(
            bundle, calib=calib, method=method, exclude=tuple(exclude or ()), auto_exclude=auto_exclude,
            max_drop=max_drop, max_robust_drop=max_robust_drop, data_dir=data_dir, log=_log,
        )  # fmt: skip
    except AccuracyGateError as e:
        if e.report is not None:  # show what was measured, then the one-line error
            _print_quant_report(e.report)
        raise
    _print_quant_report(report)
    out_console.print(f"added model.int8.onnx to {bundle}", highlight=False, markup=False)


def _print_quant_report(report: Any) -> None:
    rows = report.rows()
    status = "passed" if report.passed else "FAILED"
    out_console.print(
        f"INT8 QDQ, {report.method}, {'per-channel' if report.per_channel else 'per-tensor'} weights, calibration "
        f"on {report.calib_n} training images: gate {status} after {report.attempts} attempt(s)",
        highlight=False,
        markup=False,
    )
    out_console.print(_table("accuracy: fp32 vs int8 (ONNX Runtime)", rows["gate"]))
    out_console.print(_table("per-layer SQNR", rows["layers"], left=2))
    kept = ", ".join(report.kept_fp32) or "none"
    excluded = ", ".join(report.excluded) or "none"
    out_console.print(
        f"kept in fp32: {kept} (auto), {excluded} (--exclude); size {report.size_fp32:,} -> {report.size_int8:,} "
        f"bytes ({report.compression:.2f}x)",
        highlight=False,
        markup=False,
    )


@app.command("inspect")
def inspect_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory or .tar.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Verify a bundle and summarize it: specs, artifacts, eval sets, provenance, op census, size."""
    from edgesep.export import inspect_bundle

    info = inspect_bundle(bundle)
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    inp, outp, prov = info["input"], info["output"], info["provenance"]
    out_console.print(
        f"bundle {info['name']!r} at {info['path']}: verified (every file's sha256 matches the manifest)\n"
        f"schema {info['schema_version']}, written by edgesep {info['edgesep_version']} on {info['created']}",
        highlight=False,
        markup=False,
    )
    out_console.print(
        f"input {inp['name']} {inp['shape']} {inp['dtype']} in {inp.get('range')} -> output {outp['name']} "
        f"{outp['shape']}, {len(info['classes'])} classes",
        highlight=False,
        markup=False,
    )
    out_console.print(
        f"provenance: {prov['model']} on {prov['dataset']}, {_fmt(prov['params'])} params "
        f"({_fmt(prov['fc_params'])} FC), {_fmt(prov['macs'])} MACs, opset {_fmt(prov['opset'])}, "
        f"checkpoint sha256 {str(prov['checkpoint_sha256'])[:12]}",
        highlight=False,
        markup=False,
    )
    arts = [["id", "file", "kind", "precision", "target", "size", "sha256"]]
    for a in info["artifacts"]:
        arts.append([a["id"], a["file"], a["kind"], a["precision"], a["target"], f"{a['size']:,}", a["sha256"][:12]])
    out_console.print(_table("artifacts", arts, left=5))
    sets = [["id", "kind", "attack", "norm", "eps", "steps", "crafted on", "n", "torch fp32 top-1 %"]]
    for e in info["eval_sets"]:
        sets.append(
            [e["id"], e["kind"], _fmt(e["attack"]), _fmt(e["norm"]), "-" if e["eps"] is None else f"{e['eps']:g}",
             _fmt(e["steps"]), _fmt(e["crafted_on"]), str(e["n"]), _pct(e["accuracy_torch_fp32"])]
        )  # fmt: skip
    out_console.print(_table("eval sets", sets, left=7))
    if info["quantization"]:
        q = info["quantization"]
        gate = [["metric", "n", "fp32 %", "int8 %", "drop pp", "ok"]]
        for r in q["gate"]:
            gate.append(
                [r["metric"], str(r["n"]), _pct(r["fp32"]), _pct(r["int8"]), f"{r['drop_pp']:.2f}",
                 "yes" if r["ok"] else "NO"]
            )  # fmt: skip
        out_console.print(_table(f"int8 gate ({q['method']})", gate))
    census = info["op_census"]
    if census:
        ids = list(census)
        ops = sorted({op for c in census.values() for op in c})
        rows = [["op", *ids]] + [[op, *(str(census[i].get(op, 0)) for i in ids)] for op in ops]
        rows.append(["total", *(str(sum(census[i].values())) for i in ids)])
        out_console.print(_table("op census", rows))
    elif census is None:
        out_console.print("op census skipped: onnx is not installed", highlight=False, markup=False)
    ref = info["reference"]
    out_console.print(
        f"reference: {ref['n'] if ref else 0} inputs with fp32 logits; reports: {', '.join(info['reports']) or 'none'}",
        highlight=False,
        markup=False,
    )
    out_console.print(f"total size {info['total_size']:,} bytes", highlight=False, markup=False)


@app.command("check")
def check_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (or .tar).")],
    for_: Annotated[str, typer.Option("--for", help="tensorrt | tvm")] = "tensorrt",
    artifact: Annotated[str | None, typer.Option(help="Artifact id (default: every ONNX artifact).")] = None,
    trt_version: Annotated[str, typer.Option(help="TensorRT version to check against (JetPack 6: 10.3).")] = "10.3",
    tvm_target: Annotated[str, typer.Option(help="TVM target kind for the dry run.")] = "llvm",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the reports as JSON here.")] = None,
) -> None:
    """Offline check of a bundle's ONNX artifacts against TensorRT's operator support or a TVM import dry run."""
    from rich.markup import escape

    from edgesep._io import atomic_write_json
    from edgesep.export import check_bundle

    if for_ not in ("tensorrt", "tvm"):
        raise ConfigError(f"--for must be tensorrt or tvm, got {for_!r}")
    reports = check_bundle(bundle, for_, artifact_id=artifact, trt_version=trt_version, tvm_target=tvm_target)
    for report in reports:
        head, *rest = report.lines()
        style = "green" if report.ok else "bold red"
        out_console.print(f"[{style}]{escape(head)}[/]")
        for line in rest:
            out_console.print(escape(line), highlight=False)
    if json_out:
        atomic_write_json(json_out, [r.to_dict() for r in reports])
        _log(f"wrote {json_out}")
    failing = [r.artifact or r.model for r in reports if not r.ok]
    if failing:
        raise CheckFailedError(f"{', '.join(map(str, failing))} would fail on {for_}; see the errors above")


# commands that live in their own modules (one per pipeline stage)
from edgesep import _cli_bench, _cli_compile, _cli_convert, _cli_device, _cli_gdws, _cli_report  # noqa: E402

_cli_compile.register(app)
_cli_device.register(app)
_cli_gdws.register(app)
_cli_convert.register(app)
_cli_report.register(app)
_cli_bench.register(app)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: typed user errors become one red line and exit code 2."""
    try:
        app(args=argv, prog_name="edgesep")
    except SystemExit as e:  # typer's own exit: usage errors (2), --help (0)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except EdgesepError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
