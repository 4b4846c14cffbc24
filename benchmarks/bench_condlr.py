"""CondLR at small scale (issue 8 §1): does conditioning recover the robustness that plain low-rank training loses?

LeNet-5 on MNIST: the dense ``lenet5`` (momentum SGD), ``lowrank_lenet5`` trained with plain momentum SGD
("vanilla": U, S, V free) and with CondLR at tau 1, 1.1, 1.5, at rank ratios 0.5 and 0.8 (the fraction of each
layer's rank removed). All clean training, same data order, same schedule. Evaluation on the first N test
images: clean, FGSM (L-inf) accuracy over eps 0 .. 0.06, and PGD (L-inf, random start). Rows are written to JSON
after every model (atomically): an interrupted run keeps what it measured.

    nice python benchmarks/bench_condlr.py --data-root ../shared/data --max-train 30000 --epochs 5 --n-pgd 500 \
        --seeds 0 --out benchmarks/results/condlr.json
    python benchmarks/bench_condlr.py --summarize benchmarks/results/condlr*.json   # the README table
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgesep._io import atomic_write_json
from edgesep.attacks import AttackSpec
from edgesep.data import load_dataset
from edgesep.evaluate import evaluate
from edgesep.runs import load_run, versions
from edgesep.train import TrainConfig, train

FGSM_EPS = [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06]


def variants(ratios: list[float], taus: list[float]) -> list[tuple[str, dict]]:
    """(label, TrainConfig overrides) in run order."""
    out = [("dense", {"model": "lenet5", "optimizer": "sgd"})]
    for r in ratios:
        base = {"model": "lowrank_lenet5", "rank_ratio": r}
        out.append((f"lowrank-{r:g}/vanilla", {**base, "optimizer": "sgd"}))
        for tau in taus:
            out.append((f"lowrank-{r:g}/condlr-tau{tau:g}", {**base, "optimizer": "condlr", "tau": tau}))
    return out


def dense_conds(model: torch.nn.Module) -> dict[str, float]:
    """cond of every dense Linear / Conv2d weight as the matrix (m, n), over its min(m, n) singular values."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear | torch.nn.Conv2d):
            sv = torch.linalg.svdvals(mod.weight.detach().double().reshape(mod.weight.shape[0], -1))
            out[name] = (sv[0] / sv[-1]).item() if sv[-1] > 0 else float("inf")
    return out


def summarize(paths: list[Path]) -> str:
    """A Markdown table of the rows of one or more result files: mean over the seeds present (and their count)."""
    import json
    from collections import defaultdict

    rows: dict[str, list[dict]] = defaultdict(list)
    for p in paths:
        for r in json.loads(Path(p).read_text())["rows"]:
            rows[r["label"]].append(r)
    eps = [f"{e:g}" for e in FGSM_EPS if e > 0]
    pgd_eps = sorted({k for rs in rows.values() for r in rs for k in r["pgd"]}, key=float)
    head = ["model", "params", "seeds", "clean"] + [f"FGSM {e}" for e in eps] + [f"PGD {e}" for e in pgd_eps]
    lines = ["| " + " | ".join([*head, "max cond (low-rank layers)"]) + " |", "|" + "---|" * (len(head) + 1)]
    for label, rs in rows.items():

        def mean(get, rs=rs):
            return sum(get(r) for r in rs) / len(rs)

        conds = [r["max_cond"] for r in rs if r["max_cond"] is not None]
        cells = [label, f"{rs[0]['params']:,}", str(len(rs)), f"{mean(lambda r: r['clean']):.3f}"]
        cells += [f"{mean(lambda r, e=e: r['fgsm'][e]):.3f}" for e in eps]
        cells += [f"{mean(lambda r, e=e: r['pgd'][e]):.3f}" for e in pgd_eps]
        cells.append(f"{max(conds):.3g}" if conds else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summarize", nargs="+", type=Path, help="print a Markdown table of these result files, exit")
    ap.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.8])
    ap.add_argument("--taus", nargs="+", type=float, default=[1.0, 1.1, 1.5])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--max-train", type=int, default=30000, help="first N training images")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--n-eval", type=int, default=1000, help="test images for clean and FGSM accuracy")
    ap.add_argument("--n-pgd", type=int, default=500, help="test images for PGD")
    ap.add_argument("--pgd-eps", nargs="+", type=float, default=[0.03, 0.06])
    ap.add_argument("--pgd-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs-dir", type=Path, default=None, help="keep the run directories here (default: temp)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/condlr.json"))
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    torch.set_num_threads(args.threads)

    data_dir = args.data_root / "mnist"
    data = load_dataset("mnist", data_dir)
    x_test, y_test = torch.as_tensor(data.x_test), torch.as_tensor(data.y_test)
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="bench_condlr_"))
    result = {
        "protocol": {
            "dataset": "mnist",
            "train_images": args.max_train,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "schedule": "cosine",
            "momentum": 0.9,
            "training": "clean (no adversarial training)",
            "n_eval": args.n_eval,
            "n_pgd": args.n_pgd,
            "fgsm_eps": FGSM_EPS,
            "pgd": {"eps": args.pgd_eps, "steps": args.pgd_steps, "step_size": "2.5 eps / steps", "random_start": True},
            "seeds": args.seeds,
            "threads": args.threads,
        },
        "versions": versions(),
        "rows": [],
    }
    for seed in args.seeds:
        for label, over in variants(args.ratios, args.taus):
            t0 = time.perf_counter()
            cfg = TrainConfig(
                dataset="mnist", data_dir=str(data_dir), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                momentum=0.9, schedule="cosine", eps=0.0, eval_n=0, max_train=args.max_train, seed=seed, **over,
            )  # fmt: skip
            run = runs_dir / f"{label.replace('/', '_')}_s{seed}"
            tag = label
            m = train(cfg, run, progress=False, log=lambda s, tag=tag: print(f"  [{tag}] {s}", file=sys.stderr))
            train_s = time.perf_counter() - t0
            model, _ = load_run(run)
            fgsm = evaluate(
                model, x_test[: args.n_eval], y_test[: args.n_eval],
                [AttackSpec(name="fgsm", norm="linf", eps=e) for e in FGSM_EPS if e > 0],
            )  # fmt: skip
            pgd = evaluate(
                model, x_test[: args.n_pgd], y_test[: args.n_pgd],
                [AttackSpec(name="pgd", norm="linf", eps=e, steps=args.pgd_steps) for e in args.pgd_eps],
            )  # fmt: skip
            lr_rows = m.get("lowrank_layers", [])
            fgsm_row = {"0": fgsm["clean"], **{f"{r['eps']:g}": r["accuracy"] for r in fgsm["robust"]}}
            row = {
                "label": label,
                "seed": seed,
                **{k: v for k, v in over.items() if k != "model"},
                "model": over["model"],
                "params": m["params"],
                "clean": fgsm["clean"],
                "fgsm": fgsm_row,
                "pgd": {f"{r['eps']:g}": r["accuracy"] for r in pgd["robust"]},
                "max_cond": max((r["condition_number"] for r in lr_rows), default=None),
                "layers": [
                    {k: r[k] for k in ("name", "rank", "cond_s", "condition_number", "orth_error_U", "orth_error_V")}
                    for r in lr_rows
                ],
                "dense_layer_cond": dense_conds(model),
                "final_train_loss": m["history"][-1]["loss"],
                "time_s": time.perf_counter() - t0,
                "train_s": train_s,
            }
            result["rows"].append(row)
            atomic_write_json(args.out, result)
            fg = " ".join(f"{v:.3f}" for v in row["fgsm"].values())
            pg = " ".join(f"{v:.3f}" for v in row["pgd"].values())
            mc = "-" if row["max_cond"] is None else f"{row['max_cond']:.3g}"
            print(f"{label:28s} s{seed} params {row['params']:6d} fgsm {fg} | pgd {pg} | max cond {mc} "
                  f"({row['time_s']:.0f}s)", flush=True)  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
