"""`edgesep report`: result files -> one Markdown or self-contained HTML report; registered by `edgesep.cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register"]


def report_cmd(
    results: Annotated[
        list[Path], typer.Argument(help="Result JSON files, or folders of them (what `edgesep bench --out` wrote).")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="report.html (one self-contained file) or report.md (+ report_files/*.png beside it)."
        ),
    ],
    title: Annotated[str | None, typer.Option("--title", help="The report's title.")] = None,
    eps: Annotated[
        float | None,
        typer.Option(
            "--eps", help="The eps of 'robust accuracy' in the Pareto plot and comparisons (default: the largest "
            "eps every complete result was attacked at)."
        ),
    ] = None,
) -> None:
    """Tables and plots (accuracy-latency Pareto front, accuracy vs eps, latency ECDF) from benchmark results."""
    from edgesep.cli import out_console
    from edgesep.devices.report import build_report

    info = build_report(results, out, title=title, eps=eps)

    def say(line: str) -> None:
        out_console.print(line, highlight=False, markup=False, soft_wrap=True)

    states = ", ".join(f"{info[s]} {s}" for s in ("complete", "partial", "failed") if info[s])
    plots = ", ".join(info["plots"]) or "none"
    say(f"wrote {info['files'][-1]}: {info['results']} result(s) ({states}); plots: {plots}")
    if info["eps"] is not None:
        for dev, labels in info["pareto"]["robust"].items():
            say(f"Pareto-optimal on {dev} (latency vs robust accuracy at eps={info['eps']:g}): {', '.join(labels)}")


def register(app: typer.Typer) -> None:
    """Add the `report` command to the main app."""
    app.command("report")(report_cmd)
