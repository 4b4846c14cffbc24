"""GDWS that pays on a CPU: resnet20 with equal-g allocations in the "branches" form vs the original (issue 7, §4/§5).

Post-training GDWS networks were slower than the original in ONNX Runtime at half the MACs. Two reasons, both
measured here: (1) a depthwise conv with channel multiplier > 1 or with a channel count that is not a multiple of
the SIMD block goes through ONNX Runtime's generic grouped-conv path (15 GFLOP/s, memory-bound), and the gathered
G-channel intermediate (2-4x the input) is written and read once more; (2) per-channel (ragged) allocations need
that gather. The ``equal`` allocation (the same g for every channel of a layer) in the ``branches`` form runs
each layer as g plain depthwise-separable branches (multiplier-1 depthwise: ONNX Runtime's blocked NCHWc kernel;
each Add fuses into the next 1x1 conv).

Stages, all on the pretrained resnet20 (akamaster) and cifar10_jpeg:

- ``accuracy``: clean accuracy on the seeded ``--n-test`` subset (the same as ``bench_gdws.py``) of the equal-g
  networks at each ``--budgets`` conv-MAC fraction, post-training and after BatchNorm recalibration on the last
  ``--bn-n`` training images (evaluated folded back to dense convs: the same function).
- ``latency``: the whole network, original vs GDWS in each form (gather / multiplier / branches) for the equal
  allocation at ``--latency-budget``, and the MEGO-per-layer (ragged, gather) network at the same budget, at
  batch 1 and 64, in torch and ONNX Runtime (interleaved medians, one run); plus every converted layer alone
  (dense vs each form) on ONNX Runtime at both batches: the MAC ratio next to the measured speedup.

    python benchmarks/bench_gdws_speed.py --out benchmarks/results/gdws_speed.json
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgesep._io import atomic_write_json
from edgesep.data import eval_indices, load_dataset
from edgesep.evaluate import accuracy
from edgesep.gdws import _layer_onnx, conv_shapes, convert_model, fold_model, recalibrate_bn, shared_dir
from edgesep.layers.gdws import GDWSConv2d
from edgesep.models import create_model
from edgesep.runs import versions
from edgesep.runtimes.tvm import _interleaved_median_ms
from edgesep.stats import count_macs

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_timing.py: helpers the scripts share
from _timing import ort_call, torch_call

REPO = Path(__file__).resolve().parents[1]


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _onnx_bytes(model, batch: int, tmp: Path, name: str) -> bytes:
    from edgesep.export._onnx import export_onnx

    path = tmp / f"{name}-b{batch}.onnx"
    export_onnx(model, (3, 32, 32), path, batch=batch)
    return path.read_bytes()


def _forms(net: torch.nn.Module, form: str) -> torch.nn.Module:
    out = copy.deepcopy(net)
    for m in out.modules():
        if isinstance(m, GDWSConv2d):
            m.set_form(form)
    return out


def stage_accuracy(args, base, res, save) -> None:
    data = load_dataset("cifar10", shared_dir() / "data/cifar10_jpeg")
    idx = eval_indices(len(data.y_test), args.n_test)
    xe, ye = data.x_test[idx], data.y_test[idx]
    x_bn = data.x_train[-args.bn_n :]
    res["accuracy"] = {"n_test": len(ye), "bn_recalib_n": len(x_bn), "original": accuracy(base, xe, ye), "rows": []}
    for b in args.budgets:
        net, rep = convert_model(base, (3, 32, 32), mac_budget=b, allocation="equal")
        row = {"mac_budget": b, "conv_mac_reduction": rep["conv_mac_reduction"],
               "g": {r["name"]: r["g_min"] for r in rep["layers"]},
               "accuracy": accuracy(fold_model(net), xe, ye)}  # fmt: skip
        recalibrate_bn(net, x_bn)
        row["accuracy_bn_recalib"] = accuracy(fold_model(net), xe, ye)
        res["accuracy"]["rows"].append(row)
        save()
        _log(f"equal F={b}: {row['conv_mac_reduction']:.2f}x, {row['accuracy']:.3f} -> BN "
             f"{row['accuracy_bn_recalib']:.3f}")


def stage_latency(args, base, res, save) -> None:
    eq, rep_eq = convert_model(base, (3, 32, 32), mac_budget=args.latency_budget, allocation="equal")
    mego, rep_mego = convert_model(base, (3, 32, 32), mac_budget=args.latency_budget, allocation="uniform")
    nets = {
        "original": base,
        "equal/branches": _forms(eq, "branches"),
        "equal/multiplier": _forms(eq, "multiplier"),
        "equal/gather": _forms(eq, "gather"),
        "mego/gather": mego,  # ragged g per channel: the gather form
    }
    lat = res["latency"] = {
        "mac_budget": args.latency_budget, "threads": args.threads,
        "conv_mac_reduction": {"equal": rep_eq["conv_mac_reduction"], "mego": rep_mego["conv_mac_reduction"]},
        "macs": {k: count_macs(v, (3, 32, 32)) for k, v in nets.items()},
        "g_equal": {r["name"]: r["g_min"] for r in rep_eq["layers"]}, "network": {}, "layers": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batches:
            fns = {}
            for k, net in nets.items():
                shape = [batch, 3, 32, 32]
                fns[f"ort/{k}"] = ort_call(_onnx_bytes(net, batch, Path(tmp), k.replace("/", "-")), shape, args.threads)
                if not args.no_torch:
                    fns[f"torch/{k}"] = torch_call(net, shape)
            ms = _interleaved_median_ms(fns)
            speed = {k: ms[k.split("/")[0] + "/original"] / v for k, v in ms.items() if not k.endswith("/original")}
            lat["network"][str(batch)] = {"ms": ms, "speedup_vs_original": speed}
            save()
            _log(f"batch {batch}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))
            _log("   speedup vs original: " + ", ".join(f"{k} {v:.2f}x" for k, v in speed.items()))
    shapes = conv_shapes(eq, (3, 32, 32))
    macs = {r["name"]: r["mac_reduction"] for r in rep_eq["layers"]}
    seen = set()
    for name, m in eq.named_modules():
        if not isinstance(m, GDWSConv2d):
            continue
        key = (tuple(shapes[name]["in"]), m.out_channels, m.stride, m.g[0])
        if key in seen:  # resnet20 repeats each layer shape; time each distinct one
            continue
        seen.add(key)
        row = {"name": name, "in": shapes[name]["in"], "out_channels": m.out_channels, "g": m.g[0],
               "mac_ratio": macs[name], "ms": {}, "speedup_vs_dense": {}}  # fmt: skip
        for batch in args.batches:
            ins = [batch, *shapes[name]["in"]]
            fns = {f: ort_call(_layer_onnx(m, f, ins[1:], batch), ins, args.threads)
                   for f in ("dense", "gather", "multiplier", "branches")}  # fmt: skip
            ms = _interleaved_median_ms(fns)
            row["ms"][str(batch)] = ms
            row["speedup_vs_dense"][str(batch)] = {f: ms["dense"] / v for f, v in ms.items() if f != "dense"}
        lat["layers"].append(row)
        save()
        _log(f"{name} {row['in']} g={row['g']} mac {row['mac_ratio']:.2f}x: {row['speedup_vs_dense']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gdws_speed.json")
    ap.add_argument("--stages", nargs="+", default=["accuracy", "latency"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.5, 0.53, 0.6, 0.7])
    ap.add_argument("--latency-budget", type=float, default=0.53)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--bn-n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--no-torch", action="store_true", help="time ONNX Runtime only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = create_model(
        "resnet20", pretrained=str(shared_dir() / "models/akamaster_resnet_cifar10/resnet20.safetensors")
    ).eval()
    res = {"schema_version": 1, "benchmark": "gdws_speed", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": "python benchmarks/bench_gdws_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "environment": {"machine": platform.machine(), "processor": platform.processor(), "threads": args.threads,
                           "load_avg_at_start": os.getloadavg(), "versions": versions()},
           "partial": True}  # fmt: skip

    def save() -> None:
        atomic_write_json(args.out, res)

    save()
    if "accuracy" in args.stages:
        stage_accuracy(args, base, res, save)
    if "latency" in args.stages:
        stage_latency(args, base, res, save)
    res["partial"] = False
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
