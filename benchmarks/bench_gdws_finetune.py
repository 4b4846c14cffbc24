"""GDWS + a short fine-tune (BEYOND the paper, which never retrains): does it close the gap at 2x fewer conv MACs?

The pretrained resnet20 (cifar10_jpeg) is converted post-training (``--allocation``: MEGO per layer by default,
or ``equal``: the same g for every channel of a layer, which runs as plain depthwise-separable branches;
unweighted, every conv but the first) at each ``--budgets`` conv-MAC fraction; BatchNorm statistics recalibrated
on ``--bn-n`` training images; then the GDWS network itself (its depthwise and 1x1 weights, not a folded dense
conv) is fine-tuned for ``--epochs`` on the first ``--max-train`` training images (SGD momentum 0.9, lr ``--lr``
cosine, weight decay 5e-4, random crop + flip). The original gets the same recipe as a control (``--no-control``
skips it). Clean accuracy on the seeded ``--n-test`` test subset (the same subset as ``bench_gdws.py``).

    python benchmarks/bench_gdws_finetune.py --out benchmarks/results/gdws_finetune.json
    python benchmarks/bench_gdws_finetune.py --allocation equal --budgets 0.53 --no-control \
        --out benchmarks/results/gdws_finetune_equal.json
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGESEP_SHARED", REPO.parent / "shared"))


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop (pad 4, reflect) + horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (n,), generator=g)
    dx = torch.randint(0, 9, (n,), generator=g)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def fine_tune(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, batch: int = 128,
              seed: int = 0, log=print) -> None:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(len(yt), generator=g)
        t0, tot = time.perf_counter(), 0.0
        for i in range(0, len(yt), batch):
            idx = perm[i : i + batch]
            loss = nn.functional.cross_entropy(model(_augment(xt[idx], g)), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss) * len(idx)
        log(f"  fine-tune epoch {ep + 1}/{epochs}: loss {tot / len(yt):.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()


def main(argv: list[str] | None = None) -> int:
    from edgesep._io import atomic_write_json
    from edgesep.data import eval_indices, load_dataset
    from edgesep.evaluate import accuracy
    from edgesep.gdws import convert_model, recalibrate_bn
    from edgesep.models import create_model
    from edgesep.runs import versions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gdws_finetune.json")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-train", type=int, default=10000)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--bn-n", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--allocation", default="uniform", help="uniform (MEGO per layer) or equal (same g per channel)")
    ap.add_argument("--no-control", action="store_true", help="skip fine-tuning the original (the control)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_dataset("cifar10", SHARED / "data/cifar10_jpeg")
    idx = eval_indices(len(data.y_test), args.n_test)
    xe, ye = data.x_test[idx], data.y_test[idx]
    xtr, ytr = data.x_train[: args.max_train], data.y_train[: args.max_train]
    x_bn = data.x_train[-args.bn_n :]
    pretrained = str(SHARED / "models/akamaster_resnet_cifar10/resnet20.safetensors")
    base = create_model("resnet20", pretrained=pretrained).eval()
    cmd = "python benchmarks/bench_gdws_finetune.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = {"schema_version": 1, "benchmark": "gdws_finetune", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": cmd,
           "environment": {"machine": platform.machine(), "threads": args.threads, "versions": versions(),
                           "note": "2 shared cores"},
           "beyond_the_paper": "fine-tuning is not part of the GDWS paper's post-training method",
           "recipe": {"epochs": args.epochs, "max_train": args.max_train, "lr": args.lr, "optimizer": "sgd m0.9 wd5e-4",
                      "augment": "crop+flip", "bn_recalib_n": args.bn_n},
           "n_test": len(ye), "partial": True, "rows": []}  # fmt: skip

    def save() -> None:
        atomic_write_json(args.out, res)

    ctrl = copy.deepcopy(base)
    t0 = time.perf_counter()
    res["original"] = {"accuracy": accuracy(base, xe, ye)}
    if not args.no_control:
        fine_tune(ctrl, xtr, ytr, epochs=args.epochs, lr=args.lr)
        res["original"]["accuracy_fine_tuned"] = accuracy(ctrl, xe, ye)
    res["original"]["seconds"] = round(time.perf_counter() - t0, 1)
    print("original", res["original"], flush=True)
    save()
    for budget in args.budgets:
        t0 = time.perf_counter()
        model, rep = convert_model(base, (3, 32, 32), mac_budget=budget, allocation=args.allocation)
        row = {"mac_budget": budget, "allocation": args.allocation, "conv_mac_reduction": rep["conv_mac_reduction"],
               "g_per_layer": {r["name"]: r["g_max"] for r in rep["layers"]},
               "accuracy": accuracy(model, xe, ye)}  # fmt: skip
        recalibrate_bn(model, x_bn)
        row["accuracy_bn_recalib"] = accuracy(model, xe, ye)
        fine_tune(model, xtr, ytr, epochs=args.epochs, lr=args.lr)
        row["accuracy_fine_tuned"] = accuracy(model, xe, ye)
        row["drop_vs_original_pts"] = round(100 * (res["original"]["accuracy"] - row["accuracy_fine_tuned"]), 2)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        res["rows"].append(row)
        print(row, flush=True)
        save()
    res["partial"] = False
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
