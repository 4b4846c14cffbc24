"""Plot resnet20 GDWS accuracy against conv-MAC reduction from the benchmark JSONs (no measuring).

Reads ``results/gdws_accuracy.json`` (MEGO / LEGO / greedy, weighted and unweighted, with and without BN
recalibration), ``results/gdws_speed.json`` (the equal allocation) and the fine-tune results
(``gdws_finetune.json``, ``gdws_finetune_equal.json``); writes ``results/gdws_accuracy.png``. Files that are
missing are skipped.

    python benchmarks/plot_gdws.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.is_file() else None


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "gdws_accuracy.png")
    args = ap.parse_args(argv)
    fig, ax = plt.subplots(figsize=(8.5, 5.2), dpi=120)
    base = None
    acc = _load("gdws_accuracy.json")
    if acc:
        base = acc["base_accuracy"]
        for alloc, color in (("uniform", "tab:blue"), ("lego", "tab:orange"), ("greedy", "tab:green")):
            for weighted in (False, True):
                rows = sorted((r for r in acc["rows"] if r["allocation"] == alloc and r["weighted"] == weighted),
                              key=lambda r: r["conv_mac_reduction"])  # fmt: skip
                if not rows:
                    continue
                x = [r["conv_mac_reduction"] for r in rows]
                tag = f"{'MEGO/layer' if alloc == 'uniform' else alloc}{', α-weighted' if weighted else ''}"
                ls = "--" if weighted else "-"
                ax.plot(x, [r["accuracy_bn_recalib"] for r in rows], ls, color=color, marker="o", ms=4,
                        label=f"{tag} + BN recalib")  # fmt: skip
                if not weighted:
                    ax.plot(x, [r["accuracy"] for r in rows], ":", color=color, marker=".", alpha=0.6,
                            label=f"{tag}, post-training")  # fmt: skip
    speed = _load("gdws_speed.json")
    if speed and "accuracy" in speed:
        rows = sorted(speed["accuracy"]["rows"], key=lambda r: r["conv_mac_reduction"])
        x = [r["conv_mac_reduction"] for r in rows]
        ax.plot(x, [r["accuracy_bn_recalib"] for r in rows], "-", color="tab:purple", marker="s", ms=4,
                label="equal g (branches form) + BN recalib")  # fmt: skip
        ax.plot(x, [r["accuracy"] for r in rows], ":", color="tab:purple", marker=".", alpha=0.6,
                label="equal g, post-training")  # fmt: skip
        base = base or speed["accuracy"]["original"]
    fine_tuned = (
        ("gdws_finetune.json", "^", "MEGO/layer + BN + 2-epoch fine-tune (n=1000)"),
        ("gdws_finetune_equal.json", "*", "equal g + BN + 2-epoch fine-tune (full 10k)"),
    )
    for name, marker, label in fine_tuned:
        ft = _load(name)
        if ft and ft.get("rows"):
            rows = ft["rows"]
            ax.scatter([r["conv_mac_reduction"] for r in rows], [r["accuracy_fine_tuned"] for r in rows],
                       marker=marker, s=110, color="black", zorder=5, label=label)  # fmt: skip
    if base is not None:
        ax.axhline(base, color="gray", lw=1)
        ax.axhline(base - 0.01, color="gray", lw=1, ls="--")
        tr = ax.get_yaxis_transform()  # x in axes fraction, y in data
        ax.text(0.995, base + 0.006, f"original {base:.3f}", color="gray", fontsize=8, ha="right", transform=tr)
        ax.text(0.995, base - 0.03, "-1 point", color="gray", fontsize=8, ha="right", transform=tr)
    ax.axvline(2.0, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("conv-MAC reduction (x fewer)")
    ax.set_ylabel("clean accuracy (cifar10_jpeg)")
    ax.set_title("resnet20 GDWS: accuracy vs conv-MAC reduction")
    ax.set_ylim(0.0, 0.9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
