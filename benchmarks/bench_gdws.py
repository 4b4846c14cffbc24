"""GDWS post-training approximation: accuracy vs conv-MAC reduction, robust accuracy, latency per runtime.

Stages (each writes its JSON atomically after every row, so an interrupted run keeps what it measured):

- ``accuracy``: pretrained resnet20 on cifar10_jpeg; conv-MAC budgets x allocation (lego = common beta, the
  paper's LEGO; uniform = MEGO per layer; greedy = global) x weighted (PGD alphas) / unweighted, each with and
  without BatchNorm recalibration on a few hundred training images; the original model with recalibrated BN as
  the control. Clean accuracy on the first ``--n-test`` images of a seeded permutation of the test split,
  evaluated on the folded (dense) equivalent (same function, faster on CPU).
- ``robust``: pretrained convex_small (MNIST, robust-trained) PGD-40 eps 0.1 robust accuracy vs budget.
- ``latency``: resnet20 at one budget: per converted layer and for the whole network, the original dense conv vs
  the GDWS forms (gather / multiplier) in torch, ONNX Runtime and TVM (untuned host build), batch 1, all timed in
  one run (interleaved medians); the network with forms chosen per layer on ONNX Runtime (fold back to dense where
  GDWS is slower); speedup next to the MAC ratio.
- ``quant``: the resnet20 GDWS run exported and INT8-quantized behind the gate: what the gate found.

    nice python benchmarks/bench_gdws.py --stages accuracy robust latency quant --n-test 2000
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgesep._io import atomic_write_json
from edgesep.data import load_dataset
from edgesep.evaluate import accuracy, robust_accuracy
from edgesep.gdws import (
    _layer_onnx,
    choose_forms,
    compute_alphas,
    conv_shapes,
    convert_model,
    find_targets,
    fold_model,
    recalibrate_bn,
    shared_dir,
)
from edgesep.layers.gdws import GDWSConv2d
from edgesep.models import create_model
from edgesep.runs import versions

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_timing.py: helpers the scripts share
from _timing import ort_call, torch_call

RESULTS = Path(__file__).resolve().parent / "results"


def _env(threads: int) -> dict:
    return {"machine": platform.machine(), "processor": platform.processor(), "threads": threads,
            "versions": versions(), "note": "2 shared cores, other jobs running: latencies are noisy"}  # fmt: skip


def _save(path: Path, result: dict) -> None:
    atomic_write_json(path, result)


def _subset(data, n: int):
    idx = np.random.default_rng(0).permutation(len(data.y_test))[:n]
    return data.x_test[idx], data.y_test[idx]


def stage_accuracy(args, log) -> None:
    sh = shared_dir()
    model = create_model("resnet20", pretrained=str(sh / "models/akamaster_resnet_cifar10/resnet20.safetensors")).eval()
    data = load_dataset("cifar10", sh / "data/cifar10_jpeg")
    xe, ye = _subset(data, args.n_test)
    x_bn = data.x_train[-args.bn_n :]
    out = RESULTS / "gdws_accuracy.json"
    res = {"schema_version": 1, "benchmark": "gdws_accuracy", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "environment": _env(torch.get_num_threads()), "model": "resnet20 (akamaster, pretrained)",
           "dataset": "cifar10_jpeg", "n_test": len(ye), "alphas": {"n": args.alphas_n, "attack": args.alpha_attack},
           "bn_recalib_n": len(x_bn), "partial": True, "rows": []}  # fmt: skip
    t = time.perf_counter()
    res["base_accuracy"] = accuracy(model, xe, ye)
    ctrl = copy.deepcopy(model)
    recalibrate_bn(ctrl, x_bn)
    res["base_accuracy_bn_recalib"] = accuracy(ctrl, xe, ye)
    log(f"base {res['base_accuracy']:.4f}, base with recalibrated BN {res['base_accuracy_bn_recalib']:.4f}")
    targets, _ = find_targets(model)
    t = time.perf_counter()
    alphas = compute_alphas(model, data.x_train[: args.alphas_n], data.y_train[: args.alphas_n], targets,
                            attack=args.alpha_attack)  # fmt: skip
    res["alphas"]["seconds"] = round(time.perf_counter() - t, 1)
    _save(out, res)
    for budget in args.budgets:
        for alloc in args.allocations:
            for weighted in (False, True):
                new, rep = convert_model(model, (3, 32, 32), mac_budget=budget, allocation=alloc,
                                         alphas=alphas if weighted else None)  # fmt: skip
                folded = fold_model(new)
                row = {"mac_budget": budget, "allocation": alloc, "weighted": weighted,
                       "conv_mac_reduction": rep["conv_mac_reduction"],
                       "converted_mac_reduction": rep["converted_mac_reduction"],
                       "beta": rep.get("beta"), "G": [r["G"] for r in rep["layers"]],
                       "accuracy": accuracy(folded, xe, ye)}  # fmt: skip
                recalibrate_bn(folded, x_bn)
                row["accuracy_bn_recalib"] = accuracy(folded, xe, ye)
                res["rows"].append(row)
                _save(out, res)
                log(f"F={budget} {alloc:8s} weighted={weighted!s:5s} {row['conv_mac_reduction']:.2f}x: "
                    f"{row['accuracy']:.4f} / BN recalib {row['accuracy_bn_recalib']:.4f}")  # fmt: skip
    res["partial"] = False
    _save(out, res)


def stage_robust(args, log) -> None:
    from edgesep.attacks import parse

    sh = shared_dir()
    model = create_model("convex_small", pretrained=str(sh / "models/convex_adversarial/mnist.safetensors")).eval()
    data = load_dataset("mnist", sh / "data/mnist")
    xe, ye = _subset(data, args.n_robust)
    spec = parse("pgd:linf:0.1:40")
    out = RESULTS / "gdws_robust.json"
    res = {"schema_version": 1, "benchmark": "gdws_robust", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "environment": _env(torch.get_num_threads()), "model": "convex_small (Wong & Kolter MNIST, eps 0.1)",
           "attack": str(spec), "n_test": len(ye), "partial": True, "rows": []}  # fmt: skip
    torch.manual_seed(0)
    res["base"] = {"clean": accuracy(model, xe, ye), "robust": robust_accuracy(model, xe, ye, spec)}
    log(f"convex_small base {res['base']}")
    _save(out, res)
    alpha_cache = {}
    for skip_first in args.robust_skip_first:
        targets, _ = find_targets(model, skip_first=skip_first)
        alpha_cache[skip_first] = compute_alphas(model, data.x_train[: args.alphas_n], data.y_train[: args.alphas_n],
                                                 targets, attack="pgd:linf:0.1:20")  # fmt: skip
        for budget in args.robust_budgets:
            for weighted in (False, True):
                new, rep = convert_model(model, (1, 28, 28), mac_budget=budget, allocation="lego",
                                         skip_first=skip_first,
                                         alphas=alpha_cache[skip_first] if weighted else None)  # fmt: skip
                torch.manual_seed(0)
                row = {"mac_budget": budget, "skip_first": skip_first, "weighted": weighted,
                       "conv_mac_reduction": rep["conv_mac_reduction"], "G": [r["G"] for r in rep["layers"]],
                       "clean": accuracy(new, xe, ye), "robust": robust_accuracy(new, xe, ye, spec)}  # fmt: skip
                row["robust_drop_pp"] = 100 * (res["base"]["robust"] - row["robust"])
                res["rows"].append(row)
                _save(out, res)
                log(f"convex F={budget} skip_first={skip_first} w={weighted}: {row['conv_mac_reduction']:.2f}x "
                    f"clean {row['clean']:.4f} robust {row['robust']:.4f}")  # fmt: skip
    res["partial"] = False
    _save(out, res)


def _tvm_fn(onnx_bytes: bytes, shape: list[int]):
    import tvm

    from edgesep.runtimes.tvm import _build, _import_onnx, resolve_target

    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "m.onnx"
        p.write_bytes(onnx_bytes)
        import onnx

        name = onnx.load(str(p)).graph.input[0].name
        mod = _import_onnx(p, name, shape)
    _, _, tgt = resolve_target("host")
    ex = _build(mod, tgt, "fused")
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    x = tvm.runtime.tensor(np.random.rand(*shape).astype(np.float32))
    f = vm["main"]
    return lambda: f(x)


def _export_bytes(model, path: Path) -> bytes:
    from edgesep.export._onnx import export_onnx

    export_onnx(model, (3, 32, 32), path, batch=1)
    return path.read_bytes()


def stage_latency(args, log) -> None:
    from edgesep.runtimes.tvm import _interleaved_median_ms

    sh = shared_dir()
    model = create_model("resnet20", pretrained=str(sh / "models/akamaster_resnet_cifar10/resnet20.safetensors")).eval()
    new, rep = convert_model(model, (3, 32, 32), mac_budget=args.latency_budget, allocation="lego")
    shapes = conv_shapes(new, (3, 32, 32))
    out = RESULTS / "gdws_latency.json"
    res = {"schema_version": 1, "benchmark": "gdws_latency", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "environment": _env(args.threads), "model": "resnet20", "mac_budget": args.latency_budget,
           "conv_mac_reduction": rep["conv_mac_reduction"], "batch": 1, "partial": True, "layers": [],
           "network": {}}  # fmt: skip
    macs = {r["name"]: r for r in rep["layers"]}
    tvm_layers = set(args.tvm_layers)
    for name, m in new.named_modules():
        if not isinstance(m, GDWSConv2d):
            continue
        ins = [1, *shapes[name]["in"]]
        forms = ["dense", "gather"] + (["multiplier"] if m.uniform else [])
        fns = {}
        for f in forms:
            mod = m.to_conv() if f == "dense" else copy.deepcopy(m).set_form(f)
            fns[f"torch/{f}"] = torch_call(mod.eval(), ins)
            fns[f"ort/{f}"] = ort_call(_layer_onnx(m, f, ins[1:], 1), ins, args.threads)
            if name in tvm_layers:
                fns[f"tvm/{f}"] = _tvm_fn(_layer_onnx(m, f, ins[1:], 1), ins)
        ms = _interleaved_median_ms(fns)
        row = {"name": name, "in": ins, "G": m.num_kernels, "uniform": m.uniform,
               "mac_ratio": macs[name]["mac_reduction"], "ms": ms}  # fmt: skip
        for rt in ("torch", "ort", "tvm"):
            if f"{rt}/dense" in ms:
                best = min((f for f in forms if f != "dense"), key=lambda f, rt=rt: ms[f"{rt}/{f}"])
                row[f"{rt}_speedup_best_gdws"] = ms[f"{rt}/dense"] / ms[f"{rt}/{best}"]
        res["layers"].append(row)
        _save(out, res)
        log(f"{name}: mac ratio {row['mac_ratio']:.2f}, ORT speedup {row['ort_speedup_best_gdws']:.2f}, "
            f"torch {row['torch_speedup_best_gdws']:.2f}")  # fmt: skip
    # whole network: original, GDWS (every layer), GDWS with forms chosen on ONNX Runtime (fold-back)
    chosen, rows = choose_forms(copy.deepcopy(new), (3, 32, 32), "onnxruntime", repeat=30)
    res["network"]["chosen_on_onnxruntime"] = [{"name": r["name"], "chosen": r["chosen"]} for r in rows]
    nets = {"original": model, "gdws": new, "gdws_chosen": chosen}
    fns = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, net in nets.items():
            b = _export_bytes(net, Path(tmp) / f"{k}.onnx")
            fns[f"torch/{k}"] = torch_call(net, [1, 3, 32, 32])
            fns[f"ort/{k}"] = ort_call(b, [1, 3, 32, 32], args.threads)
            if not args.no_tvm:
                fns[f"tvm/{k}"] = _tvm_fn(b, [1, 3, 32, 32])
    ms = _interleaved_median_ms(fns)
    from edgesep.stats import count_macs

    res["network"]["ms"] = ms
    res["network"]["macs"] = {k: count_macs(v, (3, 32, 32)) for k, v in nets.items()}
    res["network"]["speedup"] = {
        f"{rt}/{k}": ms[f"{rt}/original"] / ms[f"{rt}/{k}"]
        for rt in ("torch", "ort", "tvm")
        for k in ("gdws", "gdws_chosen")
        if f"{rt}/original" in ms
    }
    res["partial"] = False
    _save(out, res)
    log(f"network ms {ms}; speedups {res['network']['speedup']}")


def stage_quant(args, log) -> None:
    from edgesep.export import export_run, quantize_bundle
    from edgesep.gdws import gdws_run

    out = RESULTS / "gdws_quant.json"
    res = {"schema_version": 1, "benchmark": "gdws_quant", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "environment": _env(torch.get_num_threads()), "partial": True}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "r20_gdws"
        m = gdws_run("resnet20", run, mac_budget=args.latency_budget, weighted=False, bn_recalib=args.bn_n,
                     eval_n=0, log=log)  # fmt: skip
        res["conv_mac_reduction"] = m["gdws"]["conv_mac_reduction"]
        bundle = Path(tmp) / "g.bundle"
        export_run(run, bundle, eval_sets=f"clean:{args.n_quant}", log=log)
        rep = quantize_bundle(bundle, calib=256, max_drop=100, max_robust_drop=100, log=log)
        d = rep.to_dict()
        res["gate"] = d["gate"]
        res["layers"] = [
            {k: ly[k] for k in ("node", "weight_shape", "weight_axis", "weight_scales", "weight_sqnr_db", "sqnr_db")}
            for ly in d["layers"]
        ]
        dw = [ly for ly in res["layers"] if ly["weight_shape"][1:] == [1, 3, 3]]
        pw = [ly for ly in res["layers"] if ly["weight_shape"][2:] == [1, 1]]
        res["summary"] = {
            "depthwise_sqnr_db_median": float(np.median([ly["sqnr_db"] for ly in dw])) if dw else None,
            "pointwise_sqnr_db_median": float(np.median([ly["sqnr_db"] for ly in pw])) if pw else None,
            "depthwise_weight_sqnr_db_median": float(np.median([ly["weight_sqnr_db"] for ly in dw])) if dw else None,
        }
    res["partial"] = False
    _save(out, res)
    log(f"quant gate {res['gate']}; {res['summary']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", nargs="+", default=["accuracy", "robust", "latency", "quant"])
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--n-robust", type=int, default=1000)
    ap.add_argument("--n-quant", type=int, default=1000)
    ap.add_argument("--alphas-n", type=int, default=256)
    ap.add_argument("--alpha-attack", default="pgd:linf:8/255:10")
    ap.add_argument("--bn-n", type=int, default=500)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.35])
    ap.add_argument("--robust-budgets", type=float, nargs="+", default=[0.7, 0.5, 0.4, 0.3])
    ap.add_argument("--robust-skip-first", type=lambda v: v == "true", nargs="+", default=[True])
    ap.add_argument("--allocations", nargs="+", default=["lego", "uniform", "greedy"])
    ap.add_argument("--latency-budget", type=float, default=0.5)
    ap.add_argument("--tvm-layers", nargs="*", default=["layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1"])
    ap.add_argument("--no-tvm", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)

    stages = {"accuracy": stage_accuracy, "robust": stage_robust, "latency": stage_latency, "quant": stage_quant}
    for s in args.stages:
        t = time.perf_counter()
        stages[s](args, log)
        log(f"stage {s}: {time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
