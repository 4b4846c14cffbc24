"""Export + simplify + quantize wall time, file sizes fp32 vs int8, and ONNX Runtime CPU latency fp32 vs int8 at
batch 1 and 64, for a dense and a separable MLP, side by side in one run.

Takes trained run directories (e.g. from bench_accuracy.py) so calibration and the accuracy figures are real:

    python benchmarks/bench_export.py --runs runs/bench_accuracy/mnist-dense-e10 \
        runs/bench_accuracy/mnist-kron-wide+cond-e10 --out benchmarks/results/export.json

Latency: all four sessions (2 models x fp32/int8) are timed interleaved in rounds, median per round, the median
over rounds kept. The JSON is rewritten after every model (atomically), so an interrupted run keeps its rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from edgesep._io import atomic_write_json
from edgesep.data import load_dataset
from edgesep.export import export_onnx, quantize_onnx
from edgesep.runs import load_run, versions
from edgesep.stats import model_stats


def _session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _time_ms(sess: ort.InferenceSession, x: np.ndarray, min_time: float) -> float:
    name = sess.get_inputs()[0].name
    for _ in range(5):
        sess.run(None, {name: x})
    samples = []
    t_end = time.perf_counter() + min_time
    while time.perf_counter() < t_end or len(samples) < 10:
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        samples.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(samples))


def _accuracy(sess: ort.InferenceSession, x: np.ndarray, y: np.ndarray) -> float:
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i : i + 256]})[0].argmax(1) for i in range(0, len(x), 256)])
    return float((pred == y).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="trained run directories")
    ap.add_argument("--data-dir", type=Path, default=None, help="override the runs' data directory")
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--eval-n", type=int, default=2000)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per latency measurement")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/export.json"))
    args = ap.parse_args(argv)

    result = {
        "schema_version": 1,
        "benchmark": "export",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": {"threads": args.threads, "versions": {**versions(), "onnxruntime": ort.__version__}},
        "partial": True,
        "models": [],
        "latency": [],
    }
    work = Path(tempfile.mkdtemp(prefix="edgesep-bench-export-"))
    sessions = {}
    for run in args.runs:
        model, config = load_run(run)
        data_dir = args.data_dir or config["train"]["_data"].get("data_dir")
        data = load_dataset(config["dataset"], data_dir)
        shape = tuple(config["input_shape"])
        fp32, int8 = work / f"{run.name}.onnx", work / f"{run.name}.int8.onnx"
        t0 = time.perf_counter()
        rep = export_onnx(model, shape, fp32)
        t_export = time.perf_counter() - t0
        x_eval, y_eval = data.x_test[: args.eval_n], data.y_test[: args.eval_n]
        t0 = time.perf_counter()
        q = quantize_onnx(fp32, int8, calib_x=data.x_train[: args.calib], eval_clean=(x_eval, y_eval),
                          max_drop=100.0, max_robust_drop=100.0)  # fmt: skip
        t_quant = time.perf_counter() - t0
        stats = model_stats(model, shape)
        s32, s8 = _session(fp32, args.threads), _session(int8, args.threads)
        with torch.no_grad():
            torch_acc = float((model(torch.as_tensor(x_eval)).argmax(1).numpy() == y_eval).mean())
        row = {
            "run": str(run),
            "model": config["model"],
            "fc_params": stats["fc_params"],
            "macs": stats["macs"],
            "export_s": t_export,  # torch.export + ONNX translation + onnxsim + checks
            "quantize_s": t_quant,  # pre-process + calibration + QDQ + gate + SQNR
            "census": rep.census_after,
            "quantization": q.to_dict(),
            "size_fp32": fp32.stat().st_size,
            "size_int8": int8.stat().st_size,
            "accuracy": {"torch": torch_acc, "ort_fp32": _accuracy(s32, x_eval, y_eval),
                         "ort_int8": _accuracy(s8, x_eval, y_eval)},
        }  # fmt: skip
        result["models"].append(row)
        atomic_write_json(args.out, result)
        sessions[run.name] = (s32, s8, shape)
        print(f"{run.name}: export {t_export:.1f}s quantize {t_quant:.1f}s, {row['size_fp32']:,} -> "
              f"{row['size_int8']:,} B, acc {row['accuracy']}", file=sys.stderr)  # fmt: skip

    rng = np.random.default_rng(0)
    for batch in args.batches:
        times: dict[str, list[float]] = {}
        inputs = {name: rng.random((batch, *shape), dtype=np.float32) for name, (_, _, shape) in sessions.items()}
        for _ in range(args.rounds):
            for name, (s32, s8, _) in sessions.items():
                for prec, sess in (("fp32", s32), ("int8", s8)):
                    times.setdefault(f"{name}|{prec}", []).append(_time_ms(sess, inputs[name], args.min_time))
        for key, v in times.items():
            name, prec = key.split("|")
            result["latency"].append({"run": name, "precision": prec, "batch": batch, "median_ms": float(np.median(v)),
                                      "rounds_ms": v})  # fmt: skip
            print(f"batch {batch:3d} {name:32s} {prec}: {np.median(v):.4f} ms", file=sys.stderr)
        atomic_write_json(args.out, result)
    result["partial"] = False
    atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
