"""`edgesep convert`: post-training conversion of a run's dense layers (lowrank | tt | kron), registered on the main
typer app by `edgesep.cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgesep.errors import ConfigError

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the ``convert`` command to ``app``."""

    @app.command("convert")
    def convert_cmd(
        run: Annotated[Path, typer.Argument(help="Run directory written by `edgesep train` (or an earlier convert).")],
        to: Annotated[str, typer.Option("--to", help="Target family: lowrank | tt | kron.")],
        out: Annotated[Path, typer.Option("--out", help="New run directory to write (e.g. runs/NAME).")],
        rank_ratio: Annotated[
            float | None,
            typer.Option(help="lowrank: fraction of each layer's rank removed, r = ceil((1 - R) min(m, n))."),
        ] = None,
        rank: Annotated[
            int | None, typer.Option(help="lowrank: explicit rank (capped at each layer's full rank).")
        ] = None,
        factors: Annotated[int | None, typer.Option(help="kron: Kronecker factors per layer (default 2).")] = None,
        layers: Annotated[
            list[str] | None, typer.Option("--layers", help="Only layers matching this fnmatch pattern (repeatable).")
        ] = None,
        exclude: Annotated[
            list[str] | None, typer.Option("--exclude", help="Skip layers matching this pattern (repeatable).")
        ] = None,
        option: Annotated[
            list[str] | None,
            typer.Option("--option", help="Other converter option key=value (JSON values; repeatable), e.g. for tt."),
        ] = None,
        fine_tune_epochs: Annotated[
            int, typer.Option(help="Epochs of fine-tuning with the run's own training configuration (0: none).")
        ] = 0,
        optimizer: Annotated[str | None, typer.Option(help="Fine-tuning optimizer: sgd | adam | condlr.")] = None,
        lr: Annotated[float | None, typer.Option(help="Fine-tuning learning rate (default: the run's).")] = None,
        momentum: Annotated[float | None, typer.Option(help="Fine-tuning momentum (default: the run's).")] = None,
        tau: Annotated[float | None, typer.Option(help="condlr: the bound on cond(S) (>= 1).")] = None,
        data_dir: Annotated[
            Path | None, typer.Option("--data-dir", envvar="EDGESEP_DATA_DIR", help="Where the run's dataset lives.")
        ] = None,
    ) -> None:
        """Convert a run's dense layers to a structured family, optionally fine-tune, and write a new run."""
        from edgesep.cli import _fmt, _log, _parse_model_args, out_console
        from edgesep.convert import convert_run

        opts: dict[str, Any] = _parse_model_args(option or [])
        if to != "kron" and factors is not None:
            raise ConfigError("--factors is a kron option; use it with --to kron")
        if to == "kron" and (rank is not None or rank_ratio is not None):
            raise ConfigError("--rank / --rank-ratio do not apply to --to kron; use --factors N")
        for key, value in (("rank_ratio", rank_ratio), ("rank", rank), ("factors", factors)):
            if value is not None:
                opts[key] = value
        if layers:
            opts["layers"] = list(layers)
        if exclude:
            opts["exclude"] = list(exclude)
        given = (("optimizer", optimizer), ("lr", lr), ("momentum", momentum), ("tau", tau))
        overrides = {k: v for k, v in given if v is not None}
        m = convert_run(
            run, to, out, fine_tune_epochs=fine_tune_epochs, train_overrides=overrides,
            data_dir=str(data_dir) if data_dir else None, log=_log, **opts,
        )  # fmt: skip
        robust = m["robust"][0]["accuracy"] if m["robust"] else None
        conds = [r["condition_number"] for r in m.get("lowrank_layers", []) + m.get("kron_layers", [])]
        max_cond = _fmt(max(conds) if conds else None, 2)
        out_console.print(
            f"wrote {out}: {to}, params {_fmt(m['params'])}, MACs {_fmt(m['macs'])}, clean acc "
            f"{_fmt(m['clean_accuracy'])}, robust acc {_fmt(robust)}, max cond {max_cond}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
