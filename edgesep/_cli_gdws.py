"""`edgesep gdws`: post-training GDWS approximation of a run or a pretrained model, registered by `edgesep.cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgesep.errors import ConfigError

__all__ = ["register"]


def gdws_cmd(
    source: Annotated[
        str,
        typer.Argument(
            metavar="RUN_OR_MODEL",
            help="A run directory, or a registered model with pretrained weights (resnet20, resnet32, convex_small).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Run directory to write (e.g. runs/resnet20_gdws).")],
    beta: Annotated[
        float | None, typer.Option(help="LEGO: weighted squared-error bound per layer (the paper's beta).")
    ] = None,
    mac_budget: Annotated[
        float | None,
        typer.Option(help="Keep at most this fraction of the converted convs' MACs (0.5 = 2x fewer), in (0, 1]."),
    ] = None,
    allocation: Annotated[
        str,
        typer.Option(
            help="With --mac-budget: lego (common beta), uniform (MEGO per layer), greedy (global) or equal (the "
            "same g for every channel of a layer: runs as plain depthwise-separable branches, the fastest form on "
            "CPUs)."
        ),
    ] = "lego",
    alphas: Annotated[int, typer.Option("--alphas", help="Training images for the PGD sensitivity weights.")] = 256,
    unweighted: Annotated[bool, typer.Option("--unweighted", help="alpha = 1 (plain Frobenius error).")] = False,
    alpha_attack: Annotated[
        str | None,
        typer.Option(help="Attack for the alphas (default pgd:linf:8/255:10 for RGB, pgd:linf:0.1:20 otherwise)."),
    ] = None,
    skip_first: Annotated[
        bool, typer.Option("--skip-first/--include-first", help="Leave the model's first conv dense.")
    ] = True,
    bn_recalib: Annotated[
        int, typer.Option(help="Recalibrate BatchNorm statistics on this many training images (0: off).")
    ] = 0,
    choose_form: Annotated[
        str | None,
        typer.Option(
            help="torch | onnxruntime: time each layer's forms there; fold back to dense where GDWS is slower."
        ),
    ] = None,
    choose_batch: Annotated[
        int, typer.Option(help="With --choose-form: the batch the forms are timed at (the batch you will run).")
    ] = 1,
    eval_n: Annotated[int, typer.Option(help="Test images for clean accuracy before/after (0: skip).")] = 1000,
    pretrained: Annotated[
        str | None, typer.Option(help="Checkpoint (.safetensors) for a model name; default: the shared one.")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset of a model name (default: the checkpoint's).")] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", envvar="EDGESEP_DATA_DIR", help="Where the dataset lives.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run at --out.")] = False,
) -> None:
    """Replace every K x K conv by its optimal GDWS approximation (no retraining) and write a run directory."""
    from edgesep.cli import _log, _table, out_console
    from edgesep.gdws import gdws_run

    if (beta is None) == (mac_budget is None):
        raise ConfigError("give exactly one of --beta B (LEGO error bound) or --mac-budget F (fraction of conv MACs)")
    if choose_form not in (None, "none", "torch", "onnxruntime"):
        raise ConfigError(f"--choose-form must be torch, onnxruntime or none, got {choose_form!r}")
    metrics = gdws_run(
        source,
        out,
        beta=beta,
        mac_budget=mac_budget,
        allocation=allocation,
        alphas_n=alphas,
        weighted=not unweighted,
        alpha_attack=alpha_attack,
        skip_first=skip_first,
        bn_recalib=bn_recalib,
        choose_form=None if choose_form == "none" else choose_form,
        choose_batch=choose_batch,
        eval_n=eval_n,
        pretrained=pretrained,
        dataset=dataset,
        data_dir=None if data_dir is None else str(data_dir),
        overwrite=overwrite,
        log=_log,
    )
    rep = metrics["gdws"]
    rows = [
        ["layer", "C -> M", "K", "G", "g min/mean/max", "dropped ch", "MACs before", "after", "x", "rel. err", "form"]
    ]
    forms = {r["name"]: r["chosen"] for r in rep.get("forms", {}).get("layers", [])}
    for r in rep["layers"]:
        rows.append(
            [
                r["name"],
                f"{r['in_channels']} -> {r['out_channels']}",
                "x".join(map(str, r["kernel_size"])),
                str(r["G"]),
                f"{r['g_min']}/{r['g_mean']:.2f}/{r['g_max']}",
                str(r["channels_dropped"]),
                f"{r['macs_before']:,}",
                f"{r['macs_after']:,}",
                f"{r['mac_reduction']:.2f}",
                f"{r['relative_error']:.3f}",
                forms.get(r["name"], r["form"]),
            ]
        )
    out_console.print(_table(f"GDWS ({rep['method']}, {'weighted' if rep['weighted'] else 'unweighted'})", rows))
    for s in rep["skipped"]:
        out_console.print(f"kept dense: {s['name']} ({s['reason']})", highlight=False)
    for w in rep["warnings"]:
        out_console.print(f"warning: {w}", style="yellow", highlight=False)
    line = (
        f"conv MACs {rep['conv_macs_before']:,} -> {rep['conv_macs_after']:,} ({rep['conv_mac_reduction']:.2f}x fewer; "
        f"converted layers {rep['converted_mac_reduction']:.2f}x)"
    )
    if "clean_accuracy" in metrics:
        a = metrics["clean_accuracy"]
        line += f"; clean accuracy on {a['n']} test images {a['before']:.4f} -> {a['after']:.4f}"
    out_console.print(line, highlight=False, soft_wrap=True)
    _log(f"wrote {out} (load it with edgesep.runs.load_run; export it with `edgesep export {out} --out NAME.bundle`)")


def register(app: typer.Typer) -> None:
    app.command("gdws")(gdws_cmd)
