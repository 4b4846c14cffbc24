"""`edgesep bench`: deploy a bundle to a device profile, run the on-device runner, collect and summarize results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["print_summary", "register"]


def print_summary(paths: list[Path], title: str) -> None:
    """The terminal table of result files (one row per artifact and device)."""
    from rich.markup import escape
    from rich.table import Table

    from edgesep.cli import _fmt, out_console
    from edgesep.devices.harness import summarize

    rows = summarize(paths)
    table = Table(title=escape(title))
    cols = ("bundle", "artifact", "backend", "device", "status", "clean", "transferred", "square", "top-1 agree",
            "p50 ms", "p99 ms", "samples/s")  # fmt: skip
    for c in cols:
        # fold, never truncate: on a narrow terminal an ellipsis would hide the artifact ids and numbers
        table.add_column(c, justify="left" if c in ("bundle", "artifact", "backend", "device", "status") else "right",
                         overflow="fold")  # fmt: skip
    for r in rows:
        dev = f"{r['device']} (emulated)" if r["emulated"] else str(r["device"])
        table.add_row(
            escape(str(r["bundle"])),
            escape(r["artifact"]), r["backend"], escape(dev), r["status"], _fmt(r["clean"]), _fmt(r["transferred"]),
            _fmt(r["square"]), _fmt(r["top1_agreement"]), _fmt(r["p50_ms"], 3), _fmt(r["p99_ms"], 3),
            _fmt(r["throughput"], 0),
        )  # fmt: skip
    out_console.print(table)
    attacks = {a for r in rows for a in (r["transferred_attack"], r["square_attack"]) if a}
    if attacks:
        out_console.print(
            "transferred = adversarial examples crafted white-box on the float model, replayed on the engine; "
            "square = query-only attack run against the engine itself (" + "; ".join(sorted(attacks)) + ")"
        )
    for r in rows:
        why = r.get("selected_because") or ""
        if why and not why.startswith(("--all", "asked for")):
            out_console.print(f"{escape(r['artifact'])} ran because: {escape(why)}")
    if any(r["emulated"] for r in rows):
        out_console.print("emulated device: latency numbers are meaningless (qemu-user); accuracy and numerics hold")


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(
        bundle: Annotated[Path, typer.Argument(help="The bundle (directory or .tar) to benchmark.")],
        device: Annotated[str, typer.Option("--device", "-d", help="Device profile id or .toml path.")] = "host",
        out: Annotated[Path, typer.Option(help="Folder for the result JSON files.")] = Path("results"),
        artifact: Annotated[
            str | None, typer.Option(help="One artifact id (default: per precision, the recorded winner there).")
        ] = None,
        all_artifacts: Annotated[
            bool,
            typer.Option(
                "--all",
                help="Run every artifact built for the device's target (default: per precision, the one an app "
                "deploys there: the recorded winner, else the profile's runtime; each choice is printed with why).",
            ),
        ] = False,
        square_queries: Annotated[
            int, typer.Option(help="Query-only Square attack against the engine on the device (0: off).")
        ] = 0,
        square_n: Annotated[int, typer.Option(help="Images the Square attack runs on.")] = 100,
        square_eps: Annotated[
            float | None, typer.Option(help="Square attack L-inf eps (default: the bundle's first L-inf eval set).")
        ] = None,
        min_runs: Annotated[int, typer.Option(help="Latency: at least this many batch-1 runs ...")] = 1000,
        min_seconds: Annotated[float, typer.Option(help="... and at least this many seconds.")] = 30.0,
        throughput_batch: Annotated[int, typer.Option(help="Batch size of the throughput measurement.")] = 64,
        max_eval: Annotated[int | None, typer.Option(help="Cap the images per eval set.")] = None,
        threads: Annotated[int | None, typer.Option(help="Runtime threads on the device.")] = None,
        trust_new_host: Annotated[
            bool, typer.Option(help="ssh: accept and record an unknown host key (prints its fingerprint).")
        ] = False,
        force: Annotated[bool, typer.Option(help="Re-measure complete results too.")] = False,
    ) -> None:
        """Deploy a bundle to a device, run clean/adversarial accuracy, Square and latency there, collect results."""
        from edgesep.cli import _log
        from edgesep.devices.harness import BenchOptions, bench

        options = BenchOptions(
            min_runs=min_runs, min_seconds=min_seconds, throughput_batch=throughput_batch,
            square_queries=square_queries, square_n=square_n, square_eps=square_eps, max_eval=max_eval,
            threads=threads,
        )  # fmt: skip
        paths = bench(bundle, device, out, artifact_id=artifact, select="all" if all_artifacts else "winner",
                      options=options, trust_new_host=trust_new_host, force=force, log=_log)  # fmt: skip
        print_summary(paths, f"edgesep bench: {bundle.name} on {device}")
        _log(f"results in {out}; turn them into a report with `edgesep report {out} --out report.html`")
