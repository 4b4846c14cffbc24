"""Runtime latency on this CPU: torch eager vs ONNX Runtime vs TVM, fp32 and int8, side by side in one run.

For each trained run (a dense MLP, a separable Kronecker MLP and a small CNN by default) the run is exported once
to a bundle with a symbolic batch (``export_run``), quantized to ORT static QDQ INT8 (``quantize_bundle``, gate
off: this measures speed), and TVM libraries are compiled per static batch size (``compile_tvm``, fp32 and the
fake-quant build of the QDQ model) into a copy of the bundle per batch. Then every contender of a (model, batch)
is timed interleaved in rounds (median per measurement, the median over rounds kept):

- torch eager (fp32 only; ``torch.no_grad``),
- ONNX Runtime fp32 and int8 (``edgesep.runtimes.load(..., backend="onnxruntime", threads=N)``),
- TVM fp32 and int8 (``edgesep.runtimes.load(..., backend="tvm")``; TVM's own thread count, recorded).

ONNX Runtime and TVM are timed through ``Session.run`` (the deployed API: input checks included, a few µs);
torch is called directly. Achieved GFLOP/s = 2 * MACs * batch / time, next to the fp32 matmul peak measured in the
same run (torch, 2048x2048 @ 2048x2048, N threads, best of a few). The JSON is rewritten after every row
(atomically), so an interrupted run keeps what it measured.

    python benchmarks/bench_runtimes.py --out benchmarks/results/runtimes.json
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from edgesep._io import atomic_write_json
from edgesep.export import export_run, quantize_bundle
from edgesep.runs import load_run, versions
from edgesep.runtimes import load
from edgesep.runtimes.tvm import compile_tvm
from edgesep.stats import model_stats

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_timing.py: helpers the scripts share
from _timing import matmul_peak_gflops, time_ms

DEFAULT_RUNS = [
    Path("runs/bench_accuracy/mnist-dense-e10"),
    Path("runs/bench_accuracy/mnist-kron-wide+cond-e10"),
    Path("runs/bench_accuracy/mnist-cnn-dense-e5"),
]
CONTENDERS = [("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("tvm", "fp32"), ("tvm", "int8")]


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextmanager
def _paused(pids: list[int]):
    """SIGSTOP other processes (e.g. a training run sharing the CPU) while timing; always SIGCONT them afterwards."""
    stopped = []
    try:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            except ProcessLookupError:
                _log(f"pid {pid} not running; not paused")
        yield
    finally:
        for pid in stopped:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, nargs="+", default=DEFAULT_RUNS, help="trained run directories")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--threads", type=int, default=2, help="torch threads and ONNX Runtime intra-op threads")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median over rounds is kept")
    ap.add_argument("--min-time", type=float, default=0.25, help="seconds per measurement")
    ap.add_argument("--tvm-opt", default="default", help="compile_tvm opt: default (best of its pipelines) or one")
    ap.add_argument("--pause-pid", type=int, nargs="*", default=[], help="processes to SIGSTOP while timing")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/runtimes.json"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="edgesep-bench-runtimes-"))
    result: dict[str, Any] = {
        "schema_version": 1,
        "benchmark": "runtimes",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "environment": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                        "threads": {"torch": args.threads, "onnxruntime_intra_op": args.threads},
                        "versions": {**versions(), "onnxruntime": ort.__version__}},
        "settings": {"rounds": args.rounds, "min_time_s": args.min_time, "tvm_opt": args.tvm_opt},
        "matmul_peak_gflops": None,
        "partial": True,
        "models": [],
        "rows": [],
    }  # fmt: skip
    try:
        # --- build: export once (symbolic batch), quantize, compile TVM per static batch into a bundle copy ---
        models = []
        for run in args.runs:
            model, config = load_run(run)
            shape = tuple(config["input_shape"])
            macs = int(model_stats(model, shape)["macs"])
            base = work / f"{run.name}.bundle"
            t0 = time.perf_counter()
            export_run(run, base, eval_sets="clean:256", batch=None, progress=False, log=lambda _: None)
            t_export = time.perf_counter() - t0
            t0 = time.perf_counter()
            quantize_bundle(base, max_drop=100, max_robust_drop=100, log=lambda _: None)
            t_quant = time.perf_counter() - t0
            per_batch, tvm_info = {}, {}
            for batch in args.batches:
                bundle = work / f"{run.name}.b{batch}.bundle"
                shutil.copytree(base, bundle)
                for prec in ("fp32", "int8"):
                    t0 = time.perf_counter()
                    art = compile_tvm(bundle, precision=prec, batch=batch, opt=args.tvm_opt, log=lambda _: None)
                    tvm_info[f"{prec}-b{batch}"] = {
                        "compile_s": time.perf_counter() - t0,
                        "pipeline": art.extra.get("pipeline"),
                        "compile_tvm_host_latency_ms": art.extra.get("host_latency_ms"),
                    }
                per_batch[batch] = bundle
            info = {"run": str(run), "name": run.name, "model": config["model"], "input_shape": list(shape),
                    "macs": macs, "export_s": t_export, "quantize_s": t_quant, "tvm": tvm_info}  # fmt: skip
            result["models"].append(info)
            atomic_write_json(args.out, result)
            _log(f"{run.name}: {macs:,} MACs; export {t_export:.1f}s, quantize {t_quant:.1f}s, TVM "
                 + ", ".join(f"{k} {v['pipeline']} {v['compile_s']:.0f}s" for k, v in tvm_info.items()))  # fmt: skip
            models.append((run.name, model, shape, macs, per_batch))

        # --- time: per (model, batch), all contenders interleaved in rounds ---
        rng = np.random.default_rng(0)
        with _paused(args.pause_pid):
            result["matmul_peak_gflops"] = matmul_peak_gflops(args.threads)
            _log(f"fp32 matmul peak (torch 2048^3, {args.threads} threads): {result['matmul_peak_gflops']:.1f} GFLOP/s")
            for name, model, shape, macs, per_batch in models:
                for batch in args.batches:
                    x = rng.random((batch, *shape), dtype=np.float32)
                    xt = torch.from_numpy(x)
                    bundle = per_batch[batch]
                    fns: dict[tuple[str, str], Callable[[], Any]] = {}
                    infos: dict[str, Any] = {}
                    for backend, prec in CONTENDERS:
                        if backend == "torch":
                            fns[(backend, prec)] = lambda m=model, t=xt: m(t)
                            continue
                        threads = args.threads if backend == "onnxruntime" else None
                        sess = load(bundle, backend=backend, precision=prec, threads=threads)
                        fns[(backend, prec)] = lambda s=sess, a=x: s.run(a)
                        infos[f"{backend}-{prec}"] = sess.info()
                    with torch.no_grad():
                        ref = model(xt).numpy()
                        agree = {f"{b}-{p}": float((np.asarray(fn()).argmax(1) == ref.argmax(1)).mean())
                                 for (b, p), fn in fns.items()}  # fmt: skip
                        times: dict[tuple[str, str], list[float]] = {k: [] for k in fns}
                        for _ in range(args.rounds):
                            for key, fn in fns.items():
                                times[key].append(time_ms(fn, args.min_time))
                    med = {k: float(np.median(v)) for k, v in times.items()}
                    base_ms = med[("onnxruntime", "fp32")]
                    for (backend, prec), ms in med.items():
                        row = {
                            "model": name,
                            "batch": batch,
                            "backend": backend,
                            "precision": prec,
                            "median_ms": ms,
                            "rounds_ms": times[(backend, prec)],
                            "gflops": 2 * macs * batch / (ms * 1e-3) / 1e9,
                            "speed_vs_ort_fp32": base_ms / ms,
                            "top1_agreement_vs_torch": agree[f"{backend}-{prec}"],
                            "threads": args.threads
                            if backend != "tvm"
                            else infos.get(f"{backend}-{prec}", {}).get("threads"),
                        }
                        result["rows"].append(row)
                        _log(f"{name:28s} b{batch:<3d} {backend:12s} {prec}: {ms:9.4f} ms {row['gflops']:7.2f} "
                             f"GFLOP/s  {row['speed_vs_ort_fp32']:7.3f}x ORT fp32")  # fmt: skip
                    atomic_write_json(args.out, result)
        result["partial"] = False
        atomic_write_json(args.out, result)
        _log(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
