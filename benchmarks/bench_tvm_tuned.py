"""MetaSchedule-tuned TVM vs ONNX Runtime on this CPU (issue 6, section 4), with the latency-vs-trials curve.

Models (random weights: this measures speed; fp32, input pixels in [0, 1]):

- ``dense_mlp``: flatten 1x32x32 -> Linear 1024->1024 + ReLU -> Linear 1024->10,
- ``kron_mlp``: the same with the hidden layer a ``KronLinear`` (32x32) -> (32x32) (16x fewer MACs),
- ``cnn_small``: the registry's small CNN (1x28x28, channels 16, 32, dense head),
- ``dense3x3`` / ``gdws3x3``: a dense 3x3 conv 64->64 on 64x32x32 vs the depthwise (x2 multiplier) + 1x1 block
  that replaces it, each followed by global average pooling and Linear 64->10,
- ``resnet20``: the registry's CIFAR ResNet-20 (3x32x32).

Each model is exported once (symbolic batch), and for each batch (1 and 64) a copy of the bundle is tuned with
``edgesep.runtimes.tvm_tune.tune_tvm`` in cumulative steps (``--steps 16,48``: 16 trials, then 32 more that
start from the stored database). After every step the tuned library and ONNX Runtime are timed interleaved on the
same bundle (``tune_tvm``'s own measurement: median per call, numpy in/out, TVM with the target's num-cores
threads, ORT with its default threads) -- that is the latency-vs-trials curve. GFLOP/s = the FLOPs TVM counts for
the model's kernels (``estimate_tir_flops`` summed over tasks) / time, next to the fp32 matmul peak measured in
the same run (torch, 2048^3, best of 5). Per step the per-task table (best µs, GFLOP/s, records) is kept, so the
kernel where TVM loses is in the JSON. The JSON is rewritten after every step (atomically): an interrupted run
keeps what it measured.

    nice python benchmarks/bench_tvm_tuned.py --out benchmarks/results/tvm_tuned.json
    nice python benchmarks/bench_tvm_tuned.py --models dense_mlp,gdws3x3 --batches 1 --steps 8,24
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgesep._io import atomic_write_json
from edgesep.bundle import create_bundle
from edgesep.export import export_onnx
from edgesep.runs import versions
from edgesep.runtimes.tvm_tune import tune_tvm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_timing.py: helpers the scripts share
from _timing import matmul_peak_gflops

MODELS = ("dense_mlp", "kron_mlp", "cnn_small", "dense3x3", "gdws3x3", "resnet20")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Head(nn.Sequential):
    """conv block -> global average pool -> Linear(C, 10)."""

    def __init__(self, block: nn.Module, c: int):
        super().__init__(block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A model and its per-sample input shape (C, H, W)."""
    torch.manual_seed(0)
    if name == "dense_mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)), (1, 32, 32)
    if name == "kron_mlp":
        from edgesep.layers.kron import KronLinear

        # (B, 1, 32, 32) -> (B, 32, 32) -> KronLinear -> (B, 32, 32) -> (B, 1024) -> (B, 10)
        return nn.Sequential(
            nn.Flatten(1, 2), KronLinear((32, 32), (32, 32)), nn.ReLU(), nn.Flatten(), nn.Linear(1024, 10)
        ), (1, 32, 32)
    if name == "cnn_small":
        from edgesep.models import create_model

        return create_model("cnn_small"), (1, 28, 28)
    if name == "dense3x3":
        return _Head(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()), 64), (64, 32, 32)
    if name == "gdws3x3":
        block = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1, groups=64), nn.Conv2d(128, 64, 1), nn.ReLU())
        return _Head(block, 64), (64, 32, 32)
    if name == "resnet20":
        from edgesep.models import create_model

        return create_model("resnet20"), (3, 32, 32)
    raise SystemExit(f"unknown model {name!r}; one of {', '.join(MODELS)}")


def make_bundle(name: str, root: Path) -> Path:
    model, shape = build(name)
    model.eval()
    onnx_path = root / f"{name}.onnx"
    export_onnx(model, shape, onnx_path)
    b = create_bundle(
        root / f"{name}.bundle",
        name=name,
        input_spec={"name": "input", "shape": ["batch", *shape]},
        output_spec={"name": "logits", "shape": ["batch", 10]},
        classes=[str(i) for i in range(10)],
        provenance={"model": name, "weights": "random (torch.manual_seed(0)): a speed benchmark"},
    )
    b.add_artifact(onnx_path, "model.onnx", "onnx", "fp32")
    return b.root


def summarize(paths: list[Path]) -> str:
    """A Markdown table of the rows of result files: the speed ratio next to the slowest kernel and its trials."""
    import json

    lines = [
        "| model | batch | trials (tasks) | load | TVM ms | ORT ms | TVM / ORT speed | TVM GFLOP/s (peak) | "
        "slowest TVM kernel: µs, GFLOP/s, trials on it | kernels sum ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        d = json.loads(Path(path).read_text())
        for r in d["rows"]:
            k = r["slowest_task"]
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['trials_total']} ({r['tasks']}) | {r.get('load_avg', 0):.1f} | "
                f"{r['tvm_ms']:.4g} | {r['onnxruntime_ms']:.4g} | {r['speed_vs_ort']:.2f}x | "
                f"{r['tvm_gflops']:.1f} ({d['matmul_peak_gflops']:.0f}) | `{k['name']}` x{k['weight']}: "
                f"{k['best_us']:.1f}, {k['gflops']:.1f}, {k['valid_records']} | {r['kernel_sum_ms']:.4g} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/tvm_tuned.json"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--steps", default="16,48", help="cumulative trial budgets per (model, batch)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the tuned bundles here (default: a temp dir)")
    ap.add_argument("--cores", type=int, default=None,
                    help="num-cores of the host target (default: all; 1 = a single-threaded library, no thread pool)")
    ap.add_argument("--summarize", type=Path, nargs="+", default=None,
                    help="print a Markdown table of these result files and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    models = [m for m in args.models.split(",") if m]
    batches = [int(b) for b in args.batches.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    threads = len(os.sched_getaffinity(0))
    load = os.getloadavg()
    result: dict[str, Any] = {
        "benchmark": "bench_tvm_tuned",
        "schema": 1,
        "host": {"machine": platform.machine(), "processor": platform.processor(), "cores": threads},
        "versions": versions(),
        "load_avg_at_start": load,
        "contention_note": (
            "the CPU is shared with other jobs while this runs (load average at start "
            f"{load[0]:.1f} on {threads} cores): absolute times and the peak are noisy; TVM and ONNX Runtime are "
            "timed interleaved, so their ratio is the robust number"
        ),
        "matmul_peak_gflops": round(matmul_peak_gflops(threads), 1),
        "steps": steps,
        "rows": [],
    }
    torch.set_num_threads(1)  # the tuning search and the timings below are not torch's
    atomic_write_json(args.out, result)
    target: Any = "host"
    if args.cores:
        import tvm

        target = {"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()), "num-cores": args.cores}
    result["target"] = target
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-tvm-tuned-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in models:
        base = make_bundle(name, work / "src")
        for batch in batches:
            b = Path(shutil.copytree(base, work / f"{name}-b{batch}.bundle", dirs_exist_ok=True))
            done = 0
            for total in steps:
                t0 = time.perf_counter()
                _log(f"== {name} batch {batch}: tuning to {total} trials ({total - done} more)")
                art = tune_tvm(b, target, total - done, batch=batch, target_name="host", log=_log)
                x = art.extra
                tu, h = x["tuning"], x["host_latency_ms"]
                flops = sum(t["flops"] * t["weight"] for t in tu["tasks"])
                slowest = max(
                    (t for t in tu["tasks"] if t["best_us"] is not None), key=lambda t: t["best_us"] * t["weight"]
                )
                kernel_ms = sum((t["best_us"] or 0.0) * t["weight"] for t in tu["tasks"]) / 1e3
                row = {
                    "model": name,
                    "batch": batch,
                    "trials_total": total,
                    "trials_step": total - done,
                    "tasks": len(tu["tasks"]),
                    "untuned_tasks": tu["untuned_tasks"],
                    "step_minutes": round((time.perf_counter() - t0) / 60, 2),
                    "search_s": tu["search_s"],
                    "tvm_ms": h["tvm"],
                    "onnxruntime_ms": h["onnxruntime"],
                    "speed_vs_ort": round(h["onnxruntime"] / h["tvm"], 3),
                    "tvm_threads": h["tvm_threads"],
                    "flops_per_call": flops,
                    "tvm_gflops": round(flops / h["tvm"] / 1e6, 2),
                    "ort_gflops": round(flops / h["onnxruntime"] / 1e6, 2),
                    "slowest_task": slowest,
                    # the tuned kernels' own best times, summed: with every task tuned, an end-to-end TVM time far
                    # above this was measured while a core was taken (TVM's thread pool waits for its slowest
                    # thread): a contention artefact. Untuned tasks (serial loop nests) are not in the sum.
                    "kernel_sum_ms": round(kernel_ms, 4),
                    "contention_suspect": not tu["untuned_tasks"] and h["tvm"] > 3 * kernel_ms,
                    "task_table": tu["tasks"],
                    "winner": "tvm" if x.get("preferred_for") else "onnxruntime",
                    "load_avg": os.getloadavg()[0],
                }
                result["rows"].append(row)
                atomic_write_json(args.out, result)
                _log(
                    f"   {name} b{batch} @ {total} trials: TVM {h['tvm']:.4f} ms vs ORT {h['onnxruntime']:.4f} ms "
                    f"({row['speed_vs_ort']:.2f}x), {row['tvm_gflops']} GFLOP/s; slowest task {slowest['name']}"
                )
                done = total
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
