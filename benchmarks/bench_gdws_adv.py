"""GDWS on an adversarially trained CIFAR-10 CNN of the project's (issue 7 §5): robust accuracy preserved?

No GPU was lent to this work, so the CNN is a small one trained on the CPU: ``cnn_small`` with 32/64 channels on the
first ``--max-train`` cifar10_jpeg training images, PGD-7 adversarial training at eps 8/255. Then every conv
(``--include-first``: the network has only two) is replaced by its GDWS approximation, without retraining, at conv-MAC
budgets (MEGO per layer, unweighted and PGD-weighted), with and without BatchNorm recalibration (this CNN has none:
the column is omitted), and evaluated: clean and PGD-10 (eps 8/255) accuracy on the first ``--n-test`` test images.

    python benchmarks/bench_gdws_adv.py --out benchmarks/results/gdws_adv.json

Writes JSON atomically after every row ("partial": true until done); a finished training run is reused.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGESEP_SHARED", REPO.parent / "shared"))


def main(argv: list[str] | None = None) -> int:
    from edgesep._io import atomic_write_json
    from edgesep.attacks import parse as parse_attack
    from edgesep.data import load_dataset
    from edgesep.evaluate import accuracy, robust_accuracy
    from edgesep.gdws import compute_alphas, convert_model, find_targets, fold_model
    from edgesep.runs import load_run, versions
    from edgesep.stats import count_macs
    from edgesep.train import TrainConfig, train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gdws_adv.json")
    ap.add_argument("--run", type=Path, default=REPO / "runs/bench_gdws_adv/cnn")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--max-train", type=int, default=10000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--alphas-n", type=int, default=64)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.35, 0.25])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    eps, attack = 8 / 255, "pgd:linf:8/255:10"
    data = load_dataset("cifar10", SHARED / "data/cifar10_jpeg")
    result = {"schema_version": 1, "benchmark": "gdws_adv", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": "python benchmarks/bench_gdws_adv.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "environment": {"machine": platform.machine(), "threads": args.threads, "versions": versions(),
                              "note": "2 shared cores; CPU-trained small CNN (no GPU lent)"},
              "model": "cnn_small(channels=(32, 64)), PGD-7 eps 8/255 adversarial training",
              "attack": attack, "n_test": args.n_test, "partial": True, "rows": []}  # fmt: skip

    def save() -> None:
        atomic_write_json(args.out, result)

    if not (args.run / "model.safetensors").is_file():
        config = TrainConfig(model="cnn_small", model_kwargs={"channels": [32, 64]}, dataset="cifar10",
                             data_dir=str(SHARED / "data/cifar10_jpeg"), epochs=args.epochs, batch_size=128,
                             optimizer="adam", lr=2e-3, schedule="cosine", adv="pgd", eps=eps, adv_steps=7,
                             adv_step_size=2 / 255, eps_warmup_epochs=1, max_train=args.max_train, eval_n=500,
                             eval_steps=10)  # fmt: skip
        t0 = time.perf_counter()
        train(config, args.run, progress=False, log=lambda s: print(s, flush=True))
        result["train_seconds"] = round(time.perf_counter() - t0, 1)
    model, config = load_run(args.run)
    result["training"] = {k: config.get(k) for k in ("epochs", "max_train", "adv", "eps", "adv_steps", "lr")}
    from edgesep.data import eval_indices

    idx = eval_indices(len(data.y_test), args.n_test)  # seeded subset: cifar10_jpeg's test split is sorted by class
    x_test, y_test = data.x_test[idx], data.y_test[idx]
    x_tr, y_tr = data.x_train[: args.alphas_n], data.y_train[: args.alphas_n]
    shape = tuple(data.x_test.shape[1:])
    spec = parse_attack(attack)

    def evaluate(m: torch.nn.Module) -> tuple[float, float]:
        m = fold_model(m).eval()  # the same function at dense-conv speed
        return (accuracy(m, x_test, y_test), robust_accuracy(m, x_test, y_test, spec))

    base_macs = count_macs(model, shape)
    clean0, robust0 = evaluate(model)
    result["base"] = {"clean": clean0, "robust": robust0, "macs": base_macs}
    print(f"original: clean {clean0:.3f} robust {robust0:.3f}", flush=True)
    save()
    layers, _ = find_targets(model, skip_first=False)
    alphas = compute_alphas(model, x_tr, y_tr, layers, attack=attack)
    for weighted in (False, True):
        for budget in args.budgets:
            t0 = time.perf_counter()
            conv, report = convert_model(model, shape, mac_budget=budget, alphas=alphas if weighted else None,
                                         allocation="uniform", skip_first=False)  # fmt: skip
            clean, robust = evaluate(conv)
            row = {"weighted": weighted, "mac_budget": budget, "conv_mac_reduction": report["conv_mac_reduction"],
                   "total_macs": count_macs(conv, shape), "clean": clean, "robust": robust,
                   "clean_drop_pts": round(100 * (clean0 - clean), 2),
                   "robust_drop_pts": round(100 * (robust0 - robust), 2),
                   "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            result["rows"].append(row)
            print(row, flush=True)
            save()
    within = [r for r in result["rows"] if r["robust_drop_pts"] <= 1.0]
    result["best_within_1pt"] = max(within, key=lambda r: r["conv_mac_reduction"] or 0) if within else None
    result["partial"] = False
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
