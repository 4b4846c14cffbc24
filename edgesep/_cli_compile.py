"""`edgesep` commands for the compile stage, registered on the main typer app by `edgesep.cli`."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from edgesep.errors import ConfigError

__all__ = ["BACKENDS", "register"]

BACKENDS = ("tvm", "tensorrt")


def _compile_tvm(bundle: Path, target: str, precision: str, batch: int, opt: str, cc: str | None) -> None:
    from edgesep.cli import _log, _table, out_console
    from edgesep.runtimes.tvm import compile_tvm

    art = compile_tvm(bundle, target=target, precision=precision, batch=batch, opt=opt, cc=cc, log=_log)
    x = art.extra

    def say(line: str, style: str | None = None) -> None:
        out_console.print(line, style=style, highlight=False, markup=False, soft_wrap=True)

    say(
        f"added {art.file} to {bundle}: artifact {art.id} (kind {art.kind}, precision {art.precision}, target "
        f"{art.target}, {x['arch']}), {art.size:,} bytes, sha256 {art.sha256}",
        style="bold",
    )
    say(f"TVM {x['tvm_version']}, pipeline {x['pipeline']}, static batch {x['batch']}, input {x['input_shape']}")
    cands = [["pipeline", "parity", "host latency ms", "build s"]]
    for name, r in x["pipeline_candidates"].items():
        par = r.get("parity")
        state = "build failed" if par is None else ("ok" if par["ok"] else "WRONG")
        lat = r.get("latency_ms")
        cands.append(
            [name + (" (chosen)" if name == x["pipeline"] else ""), state, "-" if lat is None else f"{lat:.4f}",
             "-" if "build_s" not in r else f"{r['build_s']:.2f}"]
        )  # fmt: skip
    out_console.print(_table(f"no-search pipelines, batch {x['batch']} (opt={x['opt']})", cands, left=2))
    par = x["parity"]
    say(
        f"parity vs {par['vs']} on {par['n']} images ({par['inputs']}): max abs error {par['max_abs_err']:.2e}, "
        f"max rel error {par['max_rel_err']:.2e}, top-1 agreement {100 * par['top1_agreement']:.2f}% "
        f"(gate: {par['gate']})"
    )
    h = x["host_latency_ms"]
    lat = [["runtime", f"{art.precision} ms"] + (["fp32 ms"] if "tvm_fp32" in h else [])]
    lat.append(["TVM (untuned)", f"{h['tvm']:.4f}"] + ([f"{h['tvm_fp32']:.4f}"] if "tvm_fp32" in h else []))
    lat.append(
        ["ONNX Runtime", f"{h['onnxruntime']:.4f}"]
        + ([f"{h['onnxruntime_fp32']:.4f}"] if "onnxruntime_fp32" in h else [])
    )
    out_console.print(_table(f"host latency, batch {h['batch']}, median per call ({h['measured_on']})", lat))
    ratio = h["tvm"] / h["onnxruntime"] if h["onnxruntime"] > 0 else float("inf")
    where = "on this host" if art.target == "host" else f"on this host (a proxy for {art.target}: measure there)"
    if x["default_runtime"] == "onnxruntime":
        say(
            f"ONNX Runtime stays the default runtime for this bundle ({art.precision}): it is {ratio:.1f}x faster "
            f"than this TVM build {where} ({h['onnxruntime']:.4f} vs {h['tvm']:.4f} ms). The TVM library is untuned "
            "(no MetaSchedule search yet).",
            style="bold yellow",
        )
    else:
        say(
            f"TVM is faster than ONNX Runtime ({art.precision}) {where} ({h['tvm']:.4f} vs {h['onnxruntime']:.4f} "
            f"ms, {1 / ratio:.1f}x): the TVM library is a deployment candidate for {art.target}"
            + (
                " and is recorded as the winner for it (edgesep.runtimes.load picks it)."
                if "preferred_for" in x
                else "."
            ),
            style="bold green",
        )
    if "int8" in x:
        q = x["int8"]
        alt = q["alternative"]
        if q.get("measured_here"):
            say(
                f"INT8: TVM runs the QDQ graph as float fake-quant; measured here the faster INT8 path is "
                f"{q['winner_measured']} (ONNX Runtime runs {alt['file']} with int8 kernels); fastest of all four "
                f"runs: {q['fastest_overall']}."
            )
        else:
            say(
                f"INT8 on {art.target}: TVM runs the QDQ graph as float fake-quant; expected winner: "
                f"{q['expected_winner']} with {alt['file']} (artifact {alt['artifact']}, int8 kernels). "
                f"{q['must_measure_on_device']}."
            )


def _compile_tensorrt(bundle: Path, precision: str | None, batch: int | None) -> None:
    from edgesep.cli import out_console

    try:
        mod = importlib.import_module("edgesep.runtimes.tensorrt")
    except ImportError:
        mod = None
    prepare = getattr(mod, "prepare_tensorrt", None)
    if prepare is None:
        raise ConfigError(
            "--backend tensorrt is not available in this edgesep (edgesep.runtimes.tensorrt.prepare_tensorrt is "
            "missing); use --backend tvm, or build the engine on the Jetson"
        )
    offered = {k: v for k, v in (("precision", precision), ("batch", batch)) if v is not None}  # else its defaults
    params = inspect.signature(prepare).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if takes_any or k in params}
    result: Any = prepare(bundle, **kwargs)
    if all(hasattr(result, k) for k in ("id", "file", "size", "sha256")):  # an Artifact
        line = f"added {result.file} to {bundle}: artifact {result.id}, {result.size:,} bytes, sha256 {result.sha256}"
    else:
        line = f"tensorrt: {result!r}"
    out_console.print(line, highlight=False, markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""

    @app.command("compile")
    def compile_cmd(
        bundle: Annotated[Path, typer.Argument(help="Bundle directory (the library is written into it).")],
        backend: Annotated[str, typer.Option(help="tvm | tensorrt")] = "tvm",
        target: Annotated[
            str,
            typer.Option(
                help="host | rpi4 | rpi5, a TVM tag (e.g. raspberry-pi/4b-aarch64) or a target dict as JSON "
                '(\'{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}\').'
            ),
        ] = "host",
        precision: Annotated[
            str | None,
            typer.Option(
                help="tvm: fp32 (default) | int8 (the QDQ model, run as float fake-quant); tensorrt: its own default."
            ),
        ] = None,
        batch: Annotated[int | None, typer.Option(help="Static batch size of the build (tvm default: 1).")] = None,
        opt: Annotated[
            str,
            typer.Option(
                help="TVM pipeline: default (build unfused, fused and dlight; keep the fastest correct one on this "
                "host) | unfused | fused | dlight."
            ),
        ] = "default",
        cc: Annotated[
            str | None, typer.Option(help="Compiler that links the library (default: system or cross compiler).")
        ] = None,
    ) -> None:
        """Compile a bundle for a backend and target; prints the artifact, its sha256 and TVM vs ONNX Runtime."""
        if backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "tvm":
            _compile_tvm(bundle, target, precision or "fp32", 1 if batch is None else batch, opt, cc)
        else:
            _compile_tensorrt(bundle, precision, batch)
