"""Tensor-train layers and models on this CPU: peers, forwards, and the small-scale protocol.

Sections (each row is written to the JSON atomically as soon as it is measured, so an interrupted run keeps what
it measured; ``--only`` picks sections):

- ``linear``: TTLinear vs tensorly-torch's ``FactorizedLinear(factorization="blocktt")`` at the same modes and
  ranks, side by side: parameters, TT-SVD reconstruction error of one dense weight (ours ``TTLinear.from_dense``,
  theirs ``FactorizedLinear.from_linear``, which calls tensorly's ``tensor_train_matrix``) and latency (batch 1
  and 64) next to the dense nn.Linear. The dense weight is synthetic with a decaying TT spectrum (a TT-rank-16
  matrix plus 10% Gaussian noise), so errors differ from rank to rank.
- ``conv``: TTConv2d "reconstruct" vs "factorized" vs the dense nn.Conv2d at the paper's layers (64->64 at 32x32,
  128->128 at 8x8, ranks 16 and 4), plus tensorly-torch's own TT conv (``FactorizedConv(factorization="tt")``, a TT
  of the 4-D kernel without channel modes, at the rank giving about the same parameters), and the kernel error of
  TT-SVD ours vs tensorly-torch ``BlockTT.from_matrix`` of the same matrix.
- ``mnist``: tt_mlp (784 = 4x7x4x7 -> 1024 = 4x8x8x4, rank 8) and its dense twin mlp(hidden=[1024]) on MNIST,
  clean and PGD adversarial training (eps 0.1), clean and PGD-20 robust accuracy.
- ``cifar``: tt_convnet and its dense twin garipov_convnet on cifar10_jpeg, clean training on a subset for a few
  epochs (CPU time): compression ratio and accuracy, nowhere near the paper's numbers.

    nice python benchmarks/bench_tt.py --out benchmarks/results/tt.json --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

from edgesep._io import atomic_write_json
from edgesep.layers.tt import TTConv2d, TTLinear, tt_matrix_dense
from edgesep.runs import versions


def _median_us(fn, x, min_run_time: float) -> float:
    t = benchmark.Timer(stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e6


def _interleaved(fns: dict, x, min_run_time: float, rounds: int) -> dict[str, float]:
    got: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(rounds):
            for k, fn in fns.items():
                got[k].append(_median_us(fn, x, min_run_time))
    return {k: sorted(v)[len(v) // 2] for k, v in got.items()}


def _synthetic_weight(out_modes, in_modes, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = len(out_modes)
    ranks = (1, *([rank] * (d - 1)), 1)
    cores = [torch.randn(ranks[k], m, n, ranks[k + 1], generator=g, dtype=torch.float64)
             for k, (m, n) in enumerate(zip(out_modes, in_modes, strict=True))]  # fmt: skip
    w = tt_matrix_dense(cores)
    w = w / w.norm()
    return (w + noise * torch.randn(w.shape, generator=g, dtype=torch.float64) / math.sqrt(w.numel())).float()


def bench_linear(result, save, args) -> None:
    import tltorch

    in_modes, out_modes = (4, 7, 4, 7), (4, 8, 8, 4)
    w = _synthetic_weight(out_modes, in_modes, 16, 0.1)
    dense = nn.Linear(784, 1024)
    with torch.no_grad():
        dense.weight.copy_(w)
    for r in args.ranks:
        ours = TTLinear.from_dense(dense, in_modes, out_modes, r)
        with contextlib.redirect_stdout(io.StringIO()):
            peer = tltorch.FactorizedLinear.from_linear(
                dense, auto_tensorize=False, in_tensorized_features=in_modes, out_tensorized_features=out_modes,
                factorization="blocktt", rank=[1, r, r, r, 1], implementation="factorized",
            )  # fmt: skip
        peer_rec = tltorch.FactorizedLinear(in_modes, out_modes, factorization="blocktt", rank=[1, r, r, r, 1],
                                            implementation="reconstructed")  # fmt: skip
        peer_rec.load_state_dict(peer.state_dict())
        peer_err = ((peer.weight.to_matrix() - w).norm() / w.norm()).item()
        row = {
            "section": "linear", "modes": f"{in_modes}->{out_modes}", "rank": r,
            "params": {"ours": ours.num_params(), "tltorch": sum(p.numel() for p in peer.parameters()),
                       "dense": dense.weight.numel() + dense.bias.numel()},
            "macs": {"ours": ours.macs(), "dense": 784 * 1024},
            "rel_error": {"ours": ours.approx_error, "tltorch": peer_err},
            "latency_us": {},
        }  # fmt: skip
        for b in args.batches:
            x = torch.randn(b, 784)
            row["latency_us"][f"batch{b}"] = _interleaved(
                {"dense": dense, "ours": ours, "tltorch_factorized": peer, "tltorch_reconstructed": peer_rec},
                x, args.min_run_time, args.rounds,
            )  # fmt: skip
        result["rows"].append(row)
        save()
        print(f"linear rank {r}: {row['params']} err {row['rel_error']} lat {row['latency_us']}", file=sys.stderr)


def bench_conv(result, save, args) -> None:
    import tltorch

    cases = [("64->64 @32x32", (4, 4, 4), (4, 4, 4), 32), ("128->128 @8x8", (4, 8, 4), (4, 8, 4), 8)]
    for name, n_modes, m_modes, hw in cases:
        cin, cout = math.prod(n_modes), math.prod(m_modes)
        dense = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        for r in (16, 4):
            tt = TTConv2d(n_modes, m_modes, 3, (r, r, r, 1), padding=1, bias=False)
            rec = TTConv2d(n_modes, m_modes, 3, (r, r, r, 1), padding=1, bias=False, forward="reconstruct")
            fac = TTConv2d(n_modes, m_modes, 3, (r, r, r, 1), padding=1, bias=False, forward="factorized")
            rec.load_state_dict(tt.state_dict())
            fac.load_state_dict(tt.state_dict())
            # tltorch's TT conv (a TT of the (C_in, k, k, C_out) kernel) at about the same parameter count
            best = None
            for rr in range(1, 65):
                with contextlib.redirect_stdout(io.StringIO()):
                    p = tltorch.FactorizedConv(cin, cout, 3, order=2, padding=1, factorization="tt",
                                               rank=[1, rr, rr, rr, 1], implementation="factorized")  # fmt: skip
                n = sum(q.numel() for q in p.parameters())
                if best is None or abs(n - tt.num_params()) < abs(best[1] - tt.num_params()):
                    best = (rr, n, p)
            rr, n_peer, peer = best
            # kernel TT-SVD error of the dense conv's (random) kernel: ours vs tltorch BlockTT.from_matrix
            ours_fd = TTConv2d.from_dense(dense, n_modes, m_modes, (r, r, r))
            mat = dense.weight.detach().permute(0, 2, 3, 1).reshape(cout, -1)
            with contextlib.redirect_stdout(io.StringIO()):
                # BlockTT.from_matrix passes an argument tensorly rejects (tltorch 0.5): call from_tensor directly
                shape = ((1, *m_modes), (9, *n_modes))
                bt = tltorch.BlockTT.from_tensor(mat.reshape(*shape[0], *shape[1]), shape, [1, min(r, 9), r, r, 1])
            row = {
                "section": "conv", "layer": name, "ranks": list(tt.ranks),
                "params": {"ours": tt.num_params(), "dense": dense.weight.numel(),
                           "tltorch_tt_conv": n_peer, "tltorch_tt_conv_rank": rr},
                "macs": {"reconstruct": tt.macs((hw, hw), "reconstruct"),
                         "factorized": tt.macs((hw, hw), "factorized")},
                "kernel_rel_error_random_kernel": {
                    "ours": ours_fd.approx_error,
                    "tltorch_blocktt": ((bt.to_matrix() - mat).norm() / mat.norm()).item(),
                    "ranks_ours": list(ours_fd.ranks),
                },
                "latency_us": {},
            }  # fmt: skip
            for b in args.conv_batches:
                x = torch.randn(b, cin, hw, hw)
                row["latency_us"][f"batch{b}"] = _interleaved(
                    {"dense": dense, "reconstruct": rec, "factorized": fac, "tltorch_tt_conv": peer},
                    x, args.min_run_time, args.rounds,
                )  # fmt: skip
            result["rows"].append(row)
            save()
            print(f"conv {name} r{r}: {row['params']} lat {row['latency_us']}", file=sys.stderr)


def _train_row(section, model, model_kwargs, dataset, data_dir, args, **train_kw) -> dict:
    from edgesep.models import create_model
    from edgesep.models.tt import tt_compression
    from edgesep.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(model=model, model_kwargs=model_kwargs, dataset=dataset, data_dir=data_dir, **train_kw)
        t0 = time.perf_counter()
        metrics = train(cfg, Path(tmp) / "run", log=lambda line: print(f"  {model}: {line}", file=sys.stderr))
        wall = time.perf_counter() - t0
    from edgesep.data import load_dataset

    data = load_dataset(dataset, data_dir)
    m = create_model(model, in_shape=list(data.input_shape), num_classes=10, **model_kwargs)
    return {
        "section": section, "model": model, "model_kwargs": model_kwargs, "dataset": dataset,
        "train": {k: v for k, v in cfg.to_dict()["_data"].items() if k in
                  ("epochs", "batch_size", "optimizer", "lr", "adv", "eps", "adv_steps", "max_train", "eval_n",
                   "eval_steps")},
        "params": metrics["params"], "macs": metrics["macs"], "compression": tt_compression(m),
        "clean_accuracy": metrics["clean_accuracy"],
        "robust": [{"attack": r.get("attack"), "eps": r.get("eps"), "steps": r.get("steps"),
                    "accuracy": r.get("accuracy")} for r in metrics["robust"]],
        "train_time_s": metrics["train_time_s"], "wall_s": wall,
    }  # fmt: skip


def bench_mnist(result, save, args) -> None:
    common = {"epochs": args.mnist_epochs, "batch_size": 128, "lr": 1e-3, "eps": 0.1, "max_train": args.mnist_train,
              "eval_n": args.eval_n, "eval_steps": 20}  # fmt: skip
    for model, kwargs in (("tt_mlp", {}), ("mlp", {"hidden": [1024]})):
        for adv in ("none", "pgd"):
            extra = {"adv": adv, "adv_steps": 5} if adv == "pgd" else {"adv": "none"}
            row = _train_row("mnist", model, kwargs, "mnist", args.mnist_dir, args, **common, **extra)
            result["rows"].append(row)
            save()
            print(f"mnist {model} {adv}: clean {row['clean_accuracy']} robust {row['robust']}", file=sys.stderr)


def bench_cifar(result, save, args) -> None:
    common = {"epochs": args.cifar_epochs, "batch_size": 64, "lr": 1e-3, "eps": 2 / 255, "adv": "none",
              "max_train": args.cifar_train, "eval_n": args.cifar_eval_n, "eval_steps": 5}  # fmt: skip
    for model in ("tt_convnet", "garipov_convnet"):
        row = _train_row("cifar", model, {}, "cifar10", args.cifar_dir, args, **common)
        result["rows"].append(row)
        save()
        print(f"cifar {model}: clean {row['clean_accuracy']} robust {row['robust']}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/tt.json"))
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    ap.add_argument("--only", nargs="+", default=["linear", "conv", "mnist", "cifar"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the latency sections")
    ap.add_argument("--train-threads", type=int, default=2, help="torch threads for the training sections")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--conv-batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--min-run-time", type=float, default=0.3, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median over rounds is kept")
    ap.add_argument("--mnist-epochs", type=int, default=2)
    ap.add_argument("--mnist-train", type=int, default=20000)
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--cifar-epochs", type=int, default=2)
    ap.add_argument("--cifar-train", type=int, default=1000)
    ap.add_argument("--cifar-eval-n", type=int, default=300)
    args = ap.parse_args(argv)
    args.mnist_dir = str(args.data_dir / "mnist")
    args.cifar_dir = str(args.data_dir / "cifar10_jpeg")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {
        "schema_version": 1,
        "benchmark": "tt",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python benchmarks/bench_tt.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": {"machine": platform.machine(), "processor": platform.processor(), "threads": args.threads,
                        "train_threads": args.train_threads, "versions": versions(),
                        "note": "2 shared cores, other jobs running: latencies are noisy"},
        "partial": True,
        "rows": [],
    }  # fmt: skip

    def save() -> None:
        atomic_write_json(args.out, result)

    sections = {"linear": bench_linear, "conv": bench_conv, "mnist": bench_mnist, "cifar": bench_cifar}
    for name in args.only:
        torch.set_num_threads(args.train_threads if name in ("mnist", "cifar") else args.threads)
        t0 = time.perf_counter()
        sections[name](result, save, args)
        result.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
        save()
    result["partial"] = False
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
