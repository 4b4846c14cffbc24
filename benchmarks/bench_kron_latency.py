"""Layer latency on this CPU: KronLinear vs the dense nn.Linear it replaces, side by side in one run.

For each (in, out) pair and batch size, the dense layer, KronLinear's eager path and KronLinear through the
``edgesep::kron_linear`` custom op are timed interleaved (torch.utils.benchmark, median of blocked runs), and the
measured speedup is written next to the MAC ratio. Results go to JSON after every row (atomically), so an
interrupted run keeps what it measured.

    python benchmarks/bench_kron_latency.py --out benchmarks/results/kron_latency.json
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils import benchmark

from edgesep._io import atomic_write_json
from edgesep.layers.kron import KronLinear, kron_linear
from edgesep.runs import versions

# (name, in_shape, out_shape)
CASES = [
    ("1024->1024 (32x32)", (32, 32), (32, 32)),
    ("3072->3072 (3,32,32)", (3, 32, 32), (3, 32, 32)),
    ("4096->4096 (64x64)", (64, 64), (64, 64)),
]


def _median_us(fn, x, min_run_time: float) -> float:
    t = benchmark.Timer(stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/kron_latency.json"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median over rounds is kept")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {
        "schema_version": 1,
        "benchmark": "kron_latency",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": {"machine": platform.machine(), "processor": platform.processor(), "threads": args.threads,
                        "versions": versions()},
        "partial": True,
        "rows": [],
    }  # fmt: skip
    for name, in_shape, out_shape in CASES:
        kron = KronLinear(in_shape, out_shape).eval()
        dense = kron.to_linear().eval()
        n_in = math.prod(in_shape)
        for batch in args.batches:
            x_kron = torch.randn(batch, *in_shape)
            x_dense = x_kron.reshape(batch, n_in)  # (B, n_1, ..., n_d) -> (B, N): the dense layer's input
            with torch.no_grad():
                torch.testing.assert_close(kron(x_kron).reshape(batch, -1), dense(x_dense), rtol=1e-4, atol=1e-4)
            factors, bias = list(kron.factors), kron.bias
            fns = {
                "dense": (dense, x_dense),
                "kron": (kron, x_kron),
                "kron_custom_op": (lambda x, f=factors, b=bias: kron_linear(x, f, b, use_op=True), x_kron),
            }
            times: dict[str, list[float]] = {k: [] for k in fns}
            with torch.no_grad():
                for _ in range(args.rounds):
                    for key, (fn, x) in fns.items():
                        times[key].append(_median_us(fn, x, args.min_run_time))
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            row = {
                "case": name,
                "in_shape": list(in_shape),
                "out_shape": list(out_shape),
                "batch": batch,
                "params": kron.num_params(),
                "dense_params": dense.weight.numel() + dense.bias.numel(),
                "macs": kron.macs(),
                "dense_macs": kron.dense_macs(),
                "mac_ratio": kron.dense_macs() / kron.macs(),
                "median_us": med,
                "rounds_us": times,
                "speedup": med["dense"] / med["kron"],
                "speedup_custom_op": med["dense"] / med["kron_custom_op"],
            }
            result["rows"].append(row)
            atomic_write_json(args.out, result)
            print(
                f"{name:24s} batch {batch:3d}: dense {med['dense']:9.1f} us  kron {med['kron']:8.1f} us  "
                f"(op {med['kron_custom_op']:8.1f} us)  speedup {row['speedup']:6.2f}x  MAC ratio "
                f"{row['mac_ratio']:6.1f}x",
                file=sys.stderr,
            )
    result["partial"] = False
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
