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
    optimizer: Annotated[str, typer.Option(help="sgd | adam")] = "adam",
    lr: float = 1e-3,
    momentum: float = 0.9,
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
        lr=lr, momentum=momentum, weight_decay=weight_decay, schedule=schedule, adv=adv, eps=eps, norm=norm,
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
    x, y = torch.as_tensor(data.x_test[:n]), torch.as_tensor(data.y_test[:n])
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
    out: Annotated[Path, typer.Option(help="Where the demo's run directories go.")] = Path("runs/demo"),
    epochs: int = 30,
    eps: float = 0.1,
) -> None:
    """Train a dense and a separable MLP adversarially on the bundled digits and compare them."""
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
