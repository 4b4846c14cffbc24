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


def _say(line: str, style: str | None = None) -> None:
    """One line on the console as given: no rich markup or highlighting (paths and numbers stay verbatim)."""
    from edgesep.cli import out_console

    out_console.print(line, style=style, highlight=False, markup=False, soft_wrap=True)


def _say_added(bundle: Path, art: Any) -> None:
    """The first line of every compile: which artifact was added to the bundle."""
    _say(
        f"added {art.file} to {bundle}: artifact {art.id} (kind {art.kind}, precision {art.precision}, target "
        f"{art.target}, {art.extra['arch']}), {art.size:,} bytes, sha256 {art.sha256}",
        style="bold",
    )


def _compile_tvm(bundle: Path, target: str, precision: str, batch: int, opt: str, cc: str | None) -> None:
    from edgesep.cli import _log, _table, out_console
    from edgesep.runtimes.tvm import compile_tvm

    art = compile_tvm(bundle, target=target, precision=precision, batch=batch, opt=opt, cc=cc, log=_log)
    x = art.extra

    _say_added(bundle, art)
    _say(f"TVM {x['tvm_version']}, pipeline {x['pipeline']}, static batch {x['batch']}, input {x['input_shape']}")
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
    _say(
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
        _say(
            f"ONNX Runtime stays the default runtime for this bundle ({art.precision}): it is {ratio:.1f}x faster "
            f"than this TVM build {where} ({h['onnxruntime']:.4f} vs {h['tvm']:.4f} ms). The TVM library is untuned "
            "(no MetaSchedule search yet).",
            style="bold yellow",
        )
    else:
        _say(
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
            _say(
                f"INT8: TVM runs the QDQ graph as float fake-quant; measured here the faster INT8 path is "
                f"{q['winner_measured']} (ONNX Runtime runs {alt['file']} with int8 kernels); fastest of all four "
                f"runs: {q['fastest_overall']}."
            )
        else:
            _say(
                f"INT8 on {art.target}: TVM runs the QDQ graph as float fake-quant; expected winner: "
                f"{q['expected_winner']} with {alt['file']} (artifact {alt['artifact']}, int8 kernels). "
                f"{q['must_measure_on_device']}."
            )


def _tune_tvm(
    bundle: Path,
    target: str,
    precision: str,
    batch: int,
    trials: int,
    cc: str | None,
    rpc: str | None,
    tracker: str | None,
    key: str | None,
    emulated: bool,
    builder: str,
) -> None:
    from edgesep.cli import _log, _table, out_console
    from edgesep.runtimes.tvm_tune import tune_tvm

    art = tune_tvm(
        bundle, target, trials, precision=precision, batch=batch, cc=cc, rpc=rpc, tracker=tracker, key=key,
        emulated=emulated, builder=builder, log=_log,
    )  # fmt: skip
    x, tu = art.extra, art.extra["tuning"]

    _say_added(bundle, art)
    how = "rebuilt from the stored database" if tu["rebuilt_from_database"] else f"{tu['trials']} trials"
    _say(
        f"TVM {x['tvm_version']}, MetaSchedule ({how}; builder {tu['builder']}, runner {tu['runner']}), static "
        f"batch {x['batch']}, num-cores {tu['num_cores']}, {x['minutes']:.1f} min; database: report "
        f"{tu['database']['report']} ({tu['database']['records']} records, {tu['database']['workloads']} workloads)"
    )
    rows = [["task", "MFLOP", "records", "best us", "GFLOP/s"]]
    for t in tu["tasks"]:
        tuned = t["best_us"] is not None
        best = f"{t['best_us']:.2f}" if tuned else "UNTUNED"
        gflops = f"{t['gflops']:.2f}" if tuned else "-"
        rows.append([t["name"], f"{t['flops'] / 1e6:.3f}", str(t["valid_records"]), best, gflops])
    out_console.print(_table("tasks (best measured candidate of each)", rows, left=1))
    if tu["untuned_tasks"]:
        _say(
            f"{len(tu['untuned_tasks'])} task(s) have no tuning record and run unscheduled (serial loop nests): "
            f"{', '.join(tu['untuned_tasks'])}. Tune with more --tune-trials (at least one per task).",
            style="bold yellow",
        )
    par = x["parity"]
    _say(
        f"parity vs {par['vs']} on {par['n']} images ({par['inputs']}): max abs error {par['max_abs_err']:.2e}, "
        f"max rel error {par['max_rel_err']:.2e}, top-1 agreement {100 * par['top1_agreement']:.2f}% "
        f"(gate: {par['gate']})"
    )
    if "device_latency_ms" in x:
        d = x["device_latency_ms"]
        _say(f"tuned TVM on the device: {d['tvm_on_device_ms']:.4f} ms per batch of {x['batch']} ({d['method']}).")
        if d.get("meaningless"):
            _say(
                f"These timings are MEANINGLESS: {d['meaningless']}. The emulated device checks correctness only.",
                style="bold yellow",
            )
        _say(f"No winner recorded for {art.target}: {d['note']}.")
        return
    h = x["host_latency_ms"]
    lat = [["runtime", "ms"], ["TVM (tuned)", f"{h['tvm']:.4f}"], ["ONNX Runtime", f"{h['onnxruntime']:.4f}"]]
    out_console.print(_table(f"host latency, batch {h['batch']}, median per call, TVM {h['tvm_threads']} threads", lat))
    from edgesep.bundle import open_bundle

    with open_bundle(bundle, verify=False) as b:
        winner = next((a for a in b.manifest.artifacts if art.target in (a.extra.get("preferred_for") or [])), None)
    if winner is not None:
        style = "bold green" if winner.kind == "tvm-lib" else "bold yellow"
        _say(
            f"recorded winner for {art.target}: {winner.id} ({winner.extra.get('preferred_reason')}); "
            "edgesep.runtimes.load picks it.",
            style=style,
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
        tune_trials: Annotated[
            int | None,
            typer.Option(
                help="tvm: tune with MetaSchedule, measuring N candidates in total (0: rebuild from the tuning "
                "database stored in the bundle for this target and model). Without it: no-search pipelines.",
                min=0,
            ),
        ] = None,
        rpc: Annotated[
            str | None, typer.Option(help="Tune on a device: HOST:PORT of a TVM RPC server there (trusted network).")
        ] = None,
        tracker: Annotated[
            str | None, typer.Option(help="Tune on a device through a TVM RPC tracker: HOST:PORT (with --key).")
        ] = None,
        key: Annotated[str | None, typer.Option(help="Device key on the RPC tracker.")] = None,
        emulated: Annotated[
            bool, typer.Option(help="The RPC device is emulated (qemu): its timings are meaningless, no winner.")
        ] = False,
        tune_builder: Annotated[
            str, typer.Option(help="inproc (build candidates in this process) | pool (worker processes).")
        ] = "inproc",
    ) -> None:
        """Compile a bundle for a backend and target; prints the artifact, its sha256 and TVM vs ONNX Runtime."""
        if backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        tuning_opts = tune_trials is not None or rpc or tracker or key or emulated
        if tuning_opts and (backend != "tvm" or tune_trials is None):
            raise ConfigError(
                "--rpc, --tracker, --key and --emulated tune a TVM build: add --backend tvm --tune-trials N"
            )
        if backend == "tvm" and tune_trials is not None:
            if opt != "default":
                raise ConfigError("--opt picks a no-search pipeline; it does not combine with --tune-trials")
            _tune_tvm(bundle, target, precision or "fp32", 1 if batch is None else batch, tune_trials, cc, rpc,
                      tracker, key, emulated, tune_builder)  # fmt: skip
        elif backend == "tvm":
            _compile_tvm(bundle, target, precision or "fp32", 1 if batch is None else batch, opt, cc)
        else:
            _compile_tensorrt(bundle, precision, batch)
