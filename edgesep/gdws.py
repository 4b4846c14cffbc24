"""GDWS at network level: sensitivity weights from PGD, conversion of every K x K conv, BN recalibration, the
choice of deployment form by measured latency, and GDWS run directories.

A GDWS run directory stores the *base* model (``model`` + ``model_kwargs``) and, in ``config["transforms"]``, a
``{"kind": "gdws", "layers": [{"name", "g", "form"}, ...]}`` entry: ``edgesep.runs.load_run`` rebuilds the base
model, replaces each named conv by a ``GDWSConv2d`` of that allocation and form (``form: "dense"`` keeps the conv:
the layer was folded back because GDWS was not faster there) and loads the weights strictly. This module registers
the transform kind ``"gdws"`` on import.

Choices (see docs/gdws.md):

- **alpha** (per layer l and input channel c), as in the paper's reference code: on N training images moved by PGD
  (model in eval mode), for the predicted class t and every other class j with margin d_j = z_t - z_j,
  alpha_{l,c} = mean over images of sum_j ||d d_j / d W_{l,c}||_F^2 / (2 d_j^2 M_l K_l^2). Per-image gradients
  come from ``torch.func`` (vmap of jacrev). ``alphas=None`` is the unweighted variant (alpha = 1).
- **Budgets**: ``beta`` runs LEGO in every converted layer with the same bound (the paper's Algorithm 3).
  ``mac_budget`` F keeps at most F times the MACs of the converted convs, allocated by ``allocation``:
  ``"lego"`` (bisection on a common beta: the paper's construction hitting a complexity target), ``"uniform"``
  (MEGO per layer, each layer F of its MACs), ``"greedy"`` (one global ranking of every kernel by
  alpha s^2 / MACs-per-kernel) or ``"equal"`` (every channel of a layer gets the same g, the largest whose MACs
  fit F of the layer's: the top-g singular triplets of every channel, optimal under that constraint; not optimal
  in error, but the layer then runs as g plain depthwise-separable branches, the form CPUs run fastest).
- **Which convs**: every ``nn.Conv2d`` with a kernel larger than 1 x 1 and groups = 1, except the first conv of
  the model (``skip_first``; it has 1-3 input channels, nothing to gain); grouped / depthwise convs are skipped
  and listed with the reason.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from edgesep._config import SerializableConfig, register_config
from edgesep.errors import CheckpointError, ConfigError
from edgesep.layers.gdws import GDWSConv2d, channel_svd, gdws_error, lego, mego
from edgesep.runs import register_transform

__all__ = [
    "ALLOCATIONS",
    "PRETRAINED",
    "GdwsConfig",
    "PretrainedSource",
    "apply_gdws_spec",
    "choose_forms",
    "compute_alphas",
    "conv_shapes",
    "convert_model",
    "find_targets",
    "fold_model",
    "gdws_run",
    "gdws_spec",
    "recalibrate_bn",
]

ALLOCATIONS = ("lego", "uniform", "greedy", "equal")
TRANSFORM_KIND = "gdws"

# registered model name -> (checkpoint below <shared>/models, dataset, dataset directory below <shared>/data)
PRETRAINED: dict[str, tuple[str, str, str]] = {
    "resnet20": ("akamaster_resnet_cifar10/resnet20.safetensors", "cifar10", "cifar10_jpeg"),
    "resnet32": ("akamaster_resnet_cifar10/resnet32.safetensors", "cifar10", "cifar10_jpeg"),
    "convex_small": ("convex_adversarial/mnist.safetensors", "mnist", "mnist"),
}


def shared_dir() -> Path:
    """$EDGESEP_SHARED, else ``shared/`` beside the checkout (as the tests and CI lay it out)."""
    env = os.environ.get("EDGESEP_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


# ----------------------------------------------------------------------------------------------------------------
# which convs, and their shapes


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise CheckpointError(f"the model has no layer {name!r}; was the GDWS spec written for another model?") from e


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def find_targets(model: nn.Module, *, skip_first: bool = True) -> tuple[list[str], list[dict[str, str]]]:
    """(names of the convs to convert, [{"name", "reason"}] of the convs left as they are)."""
    targets, skipped, first = [], [], True
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        if first and skip_first:
            skipped.append({"name": name, "reason": "first conv (skip_first)"})
        elif math.prod(m.kernel_size) == 1:
            skipped.append({"name": name, "reason": "1x1 conv (nothing to separate)"})
        elif m.groups != 1:
            kind = "depthwise" if m.groups == m.in_channels else "grouped"
            skipped.append({"name": name, "reason": f"{kind} conv (groups={m.groups}): GDWS needs groups=1"})
        else:
            targets.append(name)
        first = False
    return targets, skipped


def conv_shapes(model: nn.Module, input_shape: Sequence[int]) -> dict[str, dict[str, list[int]]]:
    """{conv name: {"in": [C, H, W], "out": [M, H', W']}} from one forward pass on zeros (eval mode, restored)."""
    shapes: dict[str, dict[str, list[int]]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | GDWSConv2d):

            def hook(mod: nn.Module, inp: Any, out: Tensor, name: str = name) -> None:
                shapes[name] = {"in": list(inp[0].shape[1:]), "out": list(out.shape[1:])}

            hooks.append(m.register_forward_hook(hook))
    p = next(model.parameters())
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        for m, t in flags:
            m.training = t
    return shapes


# ----------------------------------------------------------------------------------------------------------------
# sensitivity weights


def compute_alphas(
    model: nn.Module,
    x: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    layers: Sequence[str],
    *,
    attack: str | None = "pgd:linf:8/255:10",
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Per layer and input channel sensitivity weights alpha (see the module docstring), on adversarial inputs.

    Runs in eval mode (the caller's train/eval flags are restored; BatchNorm uses its running statistics) with
    torch's RNG forked (seeded with ``seed`` for the PGD random start).

    Args:
        model: classifier on pixels in [0, 1].
        x, y: images (N, C, H, W) in [0, 1] and labels (N,), e.g. the first N training images.
        layers: names of the nn.Conv2d layers to weigh.
        attack: an ``edgesep.attacks.parse`` spec for the images the gradients are taken at; None or "clean":
            the clean images.
        batch_size: images per vectorized Jacobian (memory: batch * classes * conv weights floats).
    Returns:
        {layer name: alpha (C,) float64 on the CPU}.
    """
    from torch.func import functional_call, jacrev, vmap

    from edgesep.attacks import parse
    from edgesep.attacks._torch import eval_mode, prepare_inputs
    from edgesep.evaluate import run_attack

    for name in layers:
        if not isinstance(_get(model, name), nn.Conv2d):
            raise ConfigError(
                f"alphas are computed for nn.Conv2d layers; {name!r} is {type(_get(model, name)).__name__}"
            )
    x, y = prepare_inputs(model, x, y)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    keys = [f"{n}.weight" for n in layers]
    sums = {k: torch.zeros(params[k].shape[1], dtype=torch.float64) for k in keys}

    def logits_of(tw: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, ({**params, **tw}, buffers), (xi[None],))[0]  # (1, ...) -> (classes,)

    jac_fn = vmap(jacrev(logits_of), in_dims=(None, 0))
    with eval_mode(model), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if attack and attack != "clean":
            spec = parse(attack)
            x = torch.cat([run_attack(model, x[i : i + 256], y[i : i + 256], spec) for i in range(0, len(y), 256)])
        for i in range(0, len(y), batch_size):
            xb = x[i : i + batch_size].detach()
            with torch.no_grad():
                z = model(xb)  # (B, classes)
            top = z.argmax(1)
            margin = z.gather(1, top[:, None]) - z  # (B, classes), 0 at the top class
            ok = margin > 1e-12  # j != top (and no exact ties)
            jac = jac_fn({k: params[k] for k in keys}, xb)  # {k: (B, classes, M, C, K1, K2)}
            for k in keys:
                j = jac[k]
                m, _, k1, k2 = params[k].shape
                jt = j[torch.arange(len(top)), top][:, None]  # (B, 1, M, C, K1, K2)
                sq = (jt - j).pow(2).sum(dim=(2, 4, 5)).double()  # (B, classes, C)
                denom = 2 * margin.double().clamp_min(1e-12) ** 2 * (m * k1 * k2)  # (B, classes)
                sums[k] += ((sq / denom[..., None]) * ok[..., None]).sum(dim=(0, 1)).cpu()
    return {n: sums[k] / len(y) for n, k in zip(layers, keys, strict=True)}


# ----------------------------------------------------------------------------------------------------------------
# conversion


@dataclass
class _Layer:
    name: str
    conv: nn.Conv2d
    svd: Any
    scores: Tensor  # (C, r)
    alpha: Tensor | None
    out_hw: tuple[int, int]

    @property
    def cost(self) -> int:
        """MACs per kernel on one sample: (K^2 + M) H' W'."""
        return (math.prod(self.conv.kernel_size) + self.conv.out_channels) * math.prod(self.out_hw)

    @property
    def dense_macs(self) -> int:
        c = self.conv
        return c.out_channels * c.in_channels * math.prod(c.kernel_size) * math.prod(self.out_hw)


def _allocate(
    layers: list[_Layer], beta: float | None, mac_budget: float | None, allocation: str, min_keep: int
) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Per layer g for the budget; also what was done (the common beta found by bisection, ...)."""
    info: dict[str, Any] = {}
    if beta is not None:
        info["forced"] = [ly.name for ly in layers if float(ly.scores.sum()) <= beta]
        return {ly.name: lego(ly.scores, beta, min_keep=min_keep) for ly in layers}, info
    total = sum(ly.dense_macs for ly in layers)
    budget = mac_budget * total
    if allocation == "uniform":
        info["forced"] = [ly.name for ly in layers if int(mac_budget * ly.dense_macs // ly.cost) < min_keep]
        return {
            ly.name: mego(ly.scores, int(mac_budget * ly.dense_macs // ly.cost), min_keep=min_keep) for ly in layers
        }, info
    if allocation == "equal":
        gs, forced = {}, []
        for ly in layers:
            c, r = ly.scores.shape
            g = min(int(mac_budget * ly.dense_macs // (ly.cost * c)), r)
            if g < 1:
                forced.append(ly.name)
                g = 1  # one kernel per channel (DWS) is the least an equal allocation keeps
            gs[ly.name] = [g] * c
        info["forced"] = forced
        return gs, info
    if allocation == "greedy":
        g = {ly.name: [0] * ly.scores.shape[0] for ly in layers}
        items = []  # (value per MAC, layer index, channel, kernel index)
        spent = 0
        for li, ly in enumerate(layers):
            order = torch.argsort(ly.scores.reshape(-1), descending=True, stable=True)[:min_keep].tolist()
            r = ly.scores.shape[1]
            for f in order:  # the must-keep kernels first
                g[ly.name][f // r] += 1
                spent += ly.cost
            flat = ly.scores.reshape(-1).tolist()
            items += [(flat[c * r + i] / ly.cost, li, c, i) for c in range(ly.scores.shape[0]) for i in range(r)]
        items.sort(key=lambda t: (-t[0], t[3]))
        for _, li, c, i in items:
            ly = layers[li]
            if i != g[ly.name][c]:  # only extends a channel's prefix (true for ties broken by i)
                continue
            if spent + ly.cost > budget:
                continue
            g[ly.name][c] += 1
            spent += ly.cost
        info["forced"] = [ly.name for ly in layers if spent > budget or sum(g[ly.name]) == min_keep]
        return g, info

    # lego: the smallest common beta whose allocation fits the budget (G is non-increasing in beta)
    def macs_at(b: float) -> tuple[int, dict[str, list[int]]]:
        gs = {ly.name: lego(ly.scores, b, min_keep=min_keep) for ly in layers}
        return sum(sum(gs[ly.name]) * ly.cost for ly in layers), gs

    # the allocation only changes where beta crosses a layer's running sum of its ascending scores: search those
    cands = sorted({0.0} | {float(v) for ly in layers for v in torch.cumsum(ly.scores.reshape(-1).sort().values, 0)})
    lo, hi = 0, len(cands) - 1
    if macs_at(cands[hi])[0] > budget:
        lo = hi  # even min_keep kernels per layer exceed the budget: the smallest allocation there is
    while lo < hi:
        mid = (lo + hi) // 2
        if macs_at(cands[mid])[0] <= budget:
            hi = mid
        else:
            lo = mid + 1
    best = macs_at(cands[lo])[1]
    info["beta"] = cands[lo]
    info["forced"] = [ly.name for ly in layers if float(ly.scores.sum()) <= cands[lo]]
    return best, info


def convert_model(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    beta: float | None = None,
    mac_budget: float | None = None,
    alphas: dict[str, Tensor] | None = None,
    allocation: str = "lego",
    skip_first: bool = True,
    min_keep: int = 1,
    form: str = "auto",
    layers: Sequence[str] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` with its K x K convs replaced by their optimal GDWS approximations, and a report.

    Args:
        model: the model (left unchanged).
        input_shape: (C, H, W) of one input (for the MAC counts).
        beta: LEGO in every converted layer with this weighted squared-error bound; or
        mac_budget: keep at most this fraction (0, 1] of the converted convs' MACs (``allocation`` says how).
        alphas: {layer: (C,)} sensitivity weights (``compute_alphas``); None: unweighted (alpha = 1).
        allocation: "lego", "uniform" or "greedy" (only with mac_budget).
        skip_first: leave the model's first conv dense.
        min_keep: kernels kept at least per layer (>= 1); a layer forced up to it is listed in ``warnings``.
        form: deployment form of every GDWS layer ("auto": branches when a layer's g_c are all equal, else gather).
        layers: convert only these convs (default: ``find_targets``).
    Returns:
        (converted model in the input model's train/eval mode, JSON-ready report).
    Raises:
        ConfigError: not exactly one of beta / mac_budget, a bad value, alphas missing for a layer.
    """
    if (beta is None) == (mac_budget is None):
        raise ConfigError("give exactly one budget: beta (LEGO error bound) or mac_budget (fraction of the MACs)")
    if beta is not None and (not math.isfinite(beta) or beta < 0):
        raise ConfigError(f"beta must be a finite number >= 0, got {beta}")
    if mac_budget is not None and not 0 < mac_budget <= 1:
        raise ConfigError(f"mac_budget is the fraction of the conv MACs to keep, in (0, 1]; got {mac_budget}")
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"unknown allocation {allocation!r}; use one of {', '.join(ALLOCATIONS)}")
    if min_keep < 1:
        raise ConfigError("min_keep must be >= 1: a GDWS layer needs at least one kernel")
    targets, skipped = find_targets(model, skip_first=skip_first)
    if layers is not None:
        unknown = sorted(set(layers) - set(targets))
        if unknown:
            raise ConfigError(f"cannot convert {unknown}: convertible convs are {targets}")
        skipped += [{"name": n, "reason": "not selected"} for n in targets if n not in layers]
        targets = [n for n in targets if n in layers]
    if not targets:
        raise ConfigError("the model has no conv to convert (K x K, groups=1, not the first one with skip_first)")
    if alphas is not None:
        missing = [n for n in targets if n not in alphas]
        if missing:
            raise ConfigError(f"alphas are missing for {missing}; compute them for every converted layer")
    shapes = conv_shapes(model, input_shape)
    info_layers = []
    for n in targets:
        conv = _get(model, n)
        svd = channel_svd(conv.weight)
        a = None if alphas is None else alphas[n]
        info_layers.append(_Layer(n, conv, svd, svd.scores(a), a, tuple(shapes[n]["out"][1:])))
    gs, alloc_info = _allocate(info_layers, beta, mac_budget, allocation, min_keep)
    alloc_forced = set(alloc_info.pop("forced", []))

    new = copy.deepcopy(model)
    rows, warnings = [], []
    all_convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    conv_macs_before = sum(
        m.out_channels * (m.in_channels // m.groups) * math.prod(m.kernel_size) * math.prod(shapes[n]["out"][1:])
        for n, m in all_convs.items()
        if n in shapes
    )
    saved = 0
    for ly in info_layers:
        g = gs[ly.name]
        layer = GDWSConv2d.from_conv(ly.conv, g, form=form, svd=ly.svd)
        layer.train(ly.conv.training)
        _set(new, ly.name, layer)
        w = ly.conv.weight.detach().double()
        err_w = gdws_error(ly.svd.s, g, ly.alpha)
        err_u = gdws_error(ly.svd.s, g)
        rel = math.sqrt(err_u) / max(float(w.norm()), 1e-30)
        forced = ly.name in alloc_forced
        if forced:
            warnings.append(
                f"{ly.name}: the budget would keep no kernel in this layer; kept {sum(g)} (min_keep={min_keep}), "
                f"weighted error {err_w:.3g}"
            )
        macs = sum(g) * ly.cost
        saved += ly.dense_macs - macs
        gt = torch.as_tensor(g)
        rows.append(
            {
                "name": ly.name,
                "in_channels": ly.conv.in_channels,
                "out_channels": ly.conv.out_channels,
                "kernel_size": list(ly.conv.kernel_size),
                "stride": list(ly.conv.stride),
                "out_hw": list(ly.out_hw),
                "rank_bound": ly.svd.rank_bound,
                "G": int(sum(g)),
                "g": g,
                "g_min": int(gt.min()),
                "g_mean": float(gt.float().mean()),
                "g_max": int(gt.max()),
                "channels_dropped": int((gt == 0).sum()),
                "form": layer.form,
                "macs_before": ly.dense_macs,
                "macs_after": macs,
                "mac_reduction": ly.dense_macs / macs,
                "weighted_error": err_w,
                "frobenius_error": err_u,
                "relative_error": rel,
                "forced_min_keep": forced,
            }
        )
    converted_before = sum(ly.dense_macs for ly in info_layers)
    converted_after = sum(r["macs_after"] for r in rows)
    report = {
        "method": "lego" if beta is not None else f"mac_budget/{allocation}",
        "beta": beta,
        "mac_budget": mac_budget,
        "allocation": None if beta is not None else allocation,
        "weighted": alphas is not None,
        "skip_first": skip_first,
        "min_keep": min_keep,
        **alloc_info,
        "layers": rows,
        "skipped": skipped,
        "warnings": warnings,
        "converted_macs_before": converted_before,
        "converted_macs_after": converted_after,
        "converted_mac_reduction": converted_before / max(converted_after, 1),
        "conv_macs_before": conv_macs_before,
        "conv_macs_after": conv_macs_before - saved,
        "conv_mac_reduction": conv_macs_before / max(conv_macs_before - saved, 1),
    }
    return new, report


def fold_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every GDWSConv2d folded back into its equivalent dense conv: the same function
    (up to float rounding), evaluated at dense-conv speed (for accuracy sweeps; torch's depthwise kernels are slow)."""
    new = copy.deepcopy(model)
    for name, m in list(new.named_modules()):
        if isinstance(m, GDWSConv2d):
            _set(new, name, m.to_conv().train(m.training))
    return new


# ----------------------------------------------------------------------------------------------------------------
# the transform (run directories)


def gdws_spec(model: nn.Module, extra: dict[str, Any] | None = None, folded: Sequence[dict[str, Any]] = ()) -> dict:
    """The ``config["transforms"]`` entry for a converted model: every GDWSConv2d's name, g and form, plus the
    layers folded back to dense (``folded``: [{"name", "g"}], form "dense")."""
    layers = [
        {"name": n, "g": list(m.g), "form": m.form} for n, m in model.named_modules() if isinstance(m, GDWSConv2d)
    ]
    layers += [{"name": f["name"], "g": list(f["g"]), "form": "dense"} for f in folded]
    return {"kind": TRANSFORM_KIND, "version": 1, "layers": layers, **(extra or {})}


def apply_gdws_spec(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Rebuild the structure of a GDWS run: replace each listed conv by an (uninitialized) GDWSConv2d of its
    allocation and form; "dense" layers stay convs (folded back). The weights are loaded afterwards."""
    if spec.get("version", 1) != 1:
        raise CheckpointError(f"GDWS transform version {spec.get('version')} is not supported (this edgesep reads 1)")
    layers = spec.get("layers")
    if not isinstance(layers, list):
        raise CheckpointError("GDWS transform has no 'layers' list; re-create the run with `edgesep gdws`")
    for entry in layers:
        name, g, form = entry.get("name"), entry.get("g"), entry.get("form", "auto")
        conv = _get(model, name)
        if not isinstance(conv, nn.Conv2d):
            raise CheckpointError(f"GDWS transform: {name!r} is a {type(conv).__name__}, not the nn.Conv2d expected")
        if form == "dense":
            continue
        layer = GDWSConv2d.like(conv, g, form)
        layer.train(conv.training)
        _set(model, name, layer)
    return model


register_transform(TRANSFORM_KIND, apply_gdws_spec)


# ----------------------------------------------------------------------------------------------------------------
# BatchNorm recalibration


def recalibrate_bn(model: nn.Module, x: Tensor | np.ndarray, *, batch_size: int = 128) -> int:
    """Re-estimate every BatchNorm's running mean / variance on ``x`` (no gradients, no weight change).

    The statistics are reset and averaged over all batches (momentum None: a cumulative mean); only the
    BatchNorm layers run in train mode, everything else (dropout) in eval mode; the caller's flags and momenta are
    restored. Returns the number of BatchNorm layers recalibrated (0: nothing to do).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    p = next(model.parameters())
    x = torch.as_tensor(x, dtype=p.dtype, device=p.device)
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in bns]
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(x[i : i + batch_size])
    finally:
        for m, t in flags:
            m.training = t
        for m, mom in momenta:
            m.momentum = mom
    return len(bns)


# ----------------------------------------------------------------------------------------------------------------
# deployment form by measured latency


def _layer_onnx(layer: nn.Module, form: str, in_shape: Sequence[int], batch: int) -> bytes:
    """A one-layer ONNX graph (opset 18) of ``layer`` in ``form`` ("dense", "gather", "multiplier" or "branches")."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def arr(t: Tensor) -> np.ndarray:
        return t.detach().cpu().float().numpy()

    if isinstance(layer.padding, str):
        raise ConfigError("string padding is not supported by the one-layer ONNX timing graphs; time with torch")
    k1, k2 = layer.kernel_size
    ph, pw = layer.padding
    conv_attrs = {
        "kernel_shape": [k1, k2],
        "strides": list(layer.stride),
        "pads": [ph, pw, ph, pw],
        "dilations": list(layer.dilation),
    }
    inits, nodes = [], []
    if form == "dense":
        w = arr(layer.dense_weight() if isinstance(layer, GDWSConv2d) else layer.weight)
        inits.append(numpy_helper.from_array(w, "w"))
        ins = ["x", "w"]
        if layer.bias is not None:
            inits.append(numpy_helper.from_array(arr(layer.bias), "b"))
            ins.append("b")
        nodes.append(helper.make_node("Conv", ins, ["y"], **conv_attrs))
    elif form == "branches":
        from edgesep.layers.gdws import gdws_branches

        dw, pw = arr(layer.dw_weight), arr(layer.pw_weight)
        prev = None
        for i, (chans, pos) in enumerate(gdws_branches(layer.g)):
            src = "x"
            if chans is not None:
                inits.append(numpy_helper.from_array(np.asarray(chans, dtype=np.int64), f"idx{i}"))
                nodes.append(helper.make_node("Gather", ["x", f"idx{i}"], [f"x{i}"], axis=1))
                src = f"x{i}"
            inits.append(numpy_helper.from_array(dw[pos], f"dw{i}"))
            inits.append(numpy_helper.from_array(pw[:, pos], f"pw{i}"))
            nodes.append(helper.make_node("Conv", [src, f"dw{i}"], [f"t{i}"], group=len(pos), **conv_attrs))
            ins = [f"t{i}", f"pw{i}"]
            if i == 0 and layer.bias is not None:
                inits.append(numpy_helper.from_array(arr(layer.bias), "b"))
                ins.append("b")
            nodes.append(helper.make_node("Conv", ins, [f"u{i}"], kernel_shape=[1, 1]))
            if prev is not None:
                nodes.append(helper.make_node("Add", [prev, f"u{i}"], [f"s{i}"]))
                prev = f"s{i}"
            else:
                prev = f"u{i}"
        nodes.append(helper.make_node("Identity", [prev], ["y"]))
    else:
        src = "x"
        if form == "gather":
            inits.append(numpy_helper.from_array(layer.index.cpu().numpy().astype(np.int64), "idx"))
            nodes.append(helper.make_node("Gather", ["x", "idx"], ["xg"], axis=1))
            src, groups = "xg", layer.num_kernels
        else:
            groups = layer.in_channels
        inits.append(numpy_helper.from_array(arr(layer.dw_weight), "dw"))
        inits.append(numpy_helper.from_array(arr(layer.pw_weight), "pw"))
        nodes.append(helper.make_node("Conv", [src, "dw"], ["t"], group=groups, **conv_attrs))
        ins = ["t", "pw"]
        if layer.bias is not None:
            inits.append(numpy_helper.from_array(arr(layer.bias), "b"))
            ins.append("b")
        nodes.append(helper.make_node("Conv", ins, ["y"], kernel_shape=[1, 1]))
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *in_shape])],
        [
            helper.make_tensor_value_info(
                "y", TensorProto.FLOAT, [batch, layer.out_channels, *layer.out_hw(in_shape[1:])]
            )
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _median_ms(fn: Callable[[], Any], *, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def layer_timers(
    layer: GDWSConv2d, in_shape: Sequence[int], runtime: str, *, batch: int = 1, threads: int | None = None
) -> dict[str, Callable[[], Any]]:
    """{form: zero-argument callable running the layer once} for "dense" (folded) and the GDWS forms available."""
    forms = ["dense", "gather", "branches"] + (["multiplier"] if layer.uniform else [])
    x = torch.rand(batch, *in_shape)
    fns: dict[str, Callable[[], Any]] = {}
    if runtime == "torch":
        for f in forms:
            mod = layer.to_conv() if f == "dense" else copy.deepcopy(layer).set_form(f)
            mod.eval()

            def run(mod: nn.Module = mod) -> Any:
                with torch.no_grad():
                    return mod(x)

            fns[f] = run
    elif runtime == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        xn = x.numpy()
        for f in forms:
            sess = ort.InferenceSession(
                _layer_onnx(layer, f, in_shape, batch), opts, providers=["CPUExecutionProvider"]
            )

            def run(sess: Any = sess) -> Any:
                return sess.run(None, {"x": xn})

            fns[f] = run
    else:
        raise ConfigError(f"choose forms for runtime 'torch' or 'onnxruntime', got {runtime!r}")
    return fns


def choose_forms(
    model: nn.Module,
    input_shape: Sequence[int],
    runtime: str = "onnxruntime",
    *,
    batch: int = 1,
    repeat: int = 50,
    warmup: int = 5,
    margin: float = 1.0,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Time every GDWSConv2d of ``model`` alone in each form and against its folded dense conv on ``runtime``;
    keep the fastest form, folding a layer back to a dense conv where no GDWS form beats it (never deploy a form
    slower than the dense conv). Modifies ``model`` in place.

    ``margin`` > 1 asks a GDWS form to be that many times faster than dense before it is kept.
    Returns (model, one row per layer: {name, ms per form, chosen, speedup of the chosen form vs dense}).
    """
    shapes = conv_shapes(model, input_shape)
    rows = []
    for name, m in list(model.named_modules()):
        if not isinstance(m, GDWSConv2d):
            continue
        fns = layer_timers(m, shapes[name]["in"], runtime, batch=batch)
        ms = {f: _median_ms(fn, warmup=warmup, repeat=repeat) for f, fn in fns.items()}
        best = min((f for f in ms if f != "dense"), key=ms.__getitem__)
        chosen = best if ms[best] * margin < ms["dense"] else "dense"
        if chosen == "dense":
            _set(model, name, m.to_conv().train(m.training))
        else:
            m.set_form(chosen)
        rows.append(
            {"name": name, "g": list(m.g), "ms": ms, "chosen": chosen, "speedup_vs_dense": ms["dense"] / ms[chosen]}
        )
    return model, rows


# ----------------------------------------------------------------------------------------------------------------
# run directories


@register_config
@dataclass(frozen=True)
class PretrainedSource(SerializableConfig):
    """Where a GDWS run's base model came from when it was not trained by edgesep (a pretrained checkpoint);
    stored as the run's ``train`` entry so the export / quantize stages find the dataset (``data_dir``)."""

    model: str
    checkpoint: str
    checkpoint_sha256: str
    dataset: str
    data_dir: str | None = None


@register_config
@dataclass(frozen=True)
class GdwsConfig(SerializableConfig):
    """How a GDWS run was made (stored in its config.json)."""

    source: str
    beta: float | None = None
    mac_budget: float | None = None
    allocation: str = "lego"
    alphas_n: int = 256
    weighted: bool = True
    alpha_attack: str | None = "pgd:linf:8/255:10"
    skip_first: bool = True
    min_keep: int = 1
    bn_recalib: int = 0
    choose_form: str | None = None
    choose_batch: int = 1
    eval_n: int = 1000
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _load_source(
    source: str, *, pretrained: str | None, dataset: str | None, data_dir: str | None
) -> tuple[nn.Module, dict[str, Any]]:
    """(model, base config) from a run directory or a registered model name with pretrained weights."""
    from edgesep._io import sha256_file
    from edgesep.models import create_model, list_models
    from edgesep.runs import load_run

    if Path(source).is_dir():
        model, config = load_run(source)
        config = copy.deepcopy(config)
        if data_dir is not None:
            config["gdws_data_dir"] = str(data_dir)
        return model, config
    if source not in list_models():
        raise ConfigError(f"{source!r} is neither a run directory nor a registered model; give a run dir or one of "
                          f"{sorted(PRETRAINED)} (with --pretrained PATH for other models)")  # fmt: skip
    known = PRETRAINED.get(source)
    if pretrained is None and known is None:
        raise ConfigError(f"model {source!r} has no known pretrained checkpoint; pass --pretrained PATH.safetensors")
    ckpt = Path(pretrained) if pretrained else shared_dir() / "models" / known[0]
    ds = dataset or (known[1] if known else None)
    if ds is None:
        raise ConfigError(f"which dataset is {source!r} for? pass --dataset")
    ddir = data_dir or (str(shared_dir() / "data" / known[2]) if known and ds == known[1] else None)
    model = create_model(source, pretrained=str(ckpt))
    kwargs: dict[str, Any] = {}
    from edgesep.data import load_dataset

    data = load_dataset(ds, ddir)
    norm = getattr(model, "normalize", None)
    config = {
        "model": source,
        "model_kwargs": kwargs,
        "dataset": ds,
        "input_shape": list(data.input_shape),
        "classes": list(data.classes),
        "normalization": None
        if norm is None
        else {"mean": norm.mean.flatten().tolist(), "std": norm.std.flatten().tolist(), "inside_model": True},
        "train": PretrainedSource(source, str(ckpt), sha256_file(ckpt), ds, ddir).to_dict(),
    }
    return model.eval(), config


def _data_dir_of(config: dict[str, Any]) -> str | None:
    if config.get("gdws_data_dir"):
        return config["gdws_data_dir"]
    train = config.get("train")
    if isinstance(train, dict):
        data = train.get("_data", train)
        if isinstance(data, dict) and isinstance(data.get("data_dir"), str):
            return data["data_dir"]
    return None


def gdws_run(
    source: str,
    out: str | os.PathLike,
    *,
    beta: float | None = None,
    mac_budget: float | None = None,
    allocation: str = "lego",
    alphas_n: int = 256,
    weighted: bool = True,
    alpha_attack: str | None = None,
    skip_first: bool = True,
    min_keep: int = 1,
    bn_recalib: int = 0,
    choose_form: str | None = None,
    choose_batch: int = 1,
    eval_n: int = 1000,
    pretrained: str | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Convert a run or a pretrained model to GDWS and write a run directory; returns its metrics.

    Args:
        source: a run directory, or a registered model name with a known pretrained checkpoint (``PRETRAINED``) or
            ``pretrained``.
        out: the run directory to write (refused if it holds a run, unless ``overwrite``).
        beta, mac_budget, allocation, skip_first, min_keep: as in ``convert_model``.
        alphas_n: training images for the sensitivity weights (``weighted``); their PGD attack ``alpha_attack``
            (default eps 8/255, 10 steps for 3-channel inputs, 0.1 / 20 steps otherwise).
        bn_recalib: recalibrate BatchNorm statistics on this many training images after the conversion (0: off).
        choose_form: "torch" / "onnxruntime": time each layer's forms there, fold back to dense where GDWS is slower.
        choose_batch: the batch the forms are timed at (GDWS pays at batch 64 on ONNX Runtime where it does not at
            batch 1: time at the batch the model will run at).
        eval_n: test images for the clean accuracy before and after (a fixed seeded permutation; 0: skip).
    """
    from edgesep import runs
    from edgesep.data import load_dataset
    from edgesep.evaluate import accuracy
    from edgesep.stats import model_stats

    out = Path(out)
    if (out / runs.CONFIG_FILE).exists() and not overwrite:
        raise ConfigError(f"{out} already holds a run; pass --overwrite or another --out")
    if choose_batch < 1:
        raise ConfigError(f"choose_batch must be >= 1, got {choose_batch}")
    if alphas_n < 1 and weighted:
        raise ConfigError("alphas_n must be >= 1 for weighted GDWS (or use unweighted)")
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        model, config = _load_source(source, pretrained=pretrained, dataset=dataset, data_dir=data_dir)
    ddir = _data_dir_of(config)
    data = load_dataset(config["dataset"], ddir)
    input_shape = tuple(config["input_shape"])
    if alpha_attack is None:
        alpha_attack = "pgd:linf:8/255:10" if input_shape[0] == 3 else "pgd:linf:0.1:20"
    targets, _ = find_targets(model, skip_first=skip_first)
    alphas = None
    if weighted:
        n = min(alphas_n, len(data.y_train))
        log(f"alphas: {len(targets)} layers, {n} training images under {alpha_attack}")
        alphas = compute_alphas(model, data.x_train[:n], data.y_train[:n], targets, attack=alpha_attack, seed=seed)
    new, report = convert_model(
        model, input_shape, beta=beta, mac_budget=mac_budget, alphas=alphas, allocation=allocation,
        skip_first=skip_first, min_keep=min_keep,
    )  # fmt: skip
    for w in report["warnings"]:
        log(f"warning: {w}")
    if bn_recalib > 0:
        n = min(bn_recalib, len(data.x_train))
        k = recalibrate_bn(new, data.x_train[-n:])  # the last images: disjoint from the alpha images
        report["bn_recalib"] = {"n": n, "layers": k, "images": f"last {n} of the training split"}
    folded: list[dict[str, Any]] = []
    if choose_form:
        g_of = {n: list(m.g) for n, m in new.named_modules() if isinstance(m, GDWSConv2d)}
        new, rows = choose_forms(new, input_shape, choose_form, batch=choose_batch)
        folded = [{"name": r["name"], "g": g_of[r["name"]]} for r in rows if r["chosen"] == "dense"]
        report["forms"] = {"runtime": choose_form, "batch": choose_batch, "layers": rows}
    metrics: dict[str, Any] = {"gdws": report}
    if eval_n > 0:
        idx = np.random.default_rng(0).permutation(len(data.y_test))[: min(eval_n, len(data.y_test))]
        xe, ye = data.x_test[idx], data.y_test[idx]
        metrics["clean_accuracy"] = {
            "n": len(idx),
            "before": accuracy(model, xe, ye),
            "after": accuracy(fold_model(new), xe, ye),
        }
    st_before, st_after = model_stats(model, input_shape), model_stats(new, input_shape)
    metrics["params"] = {"before": st_before["params"], "after": st_after["params"]}
    metrics["macs"] = {"before": st_before["macs"], "after": st_after["macs"]}
    gcfg = GdwsConfig(
        source=str(source), beta=beta, mac_budget=mac_budget, allocation=allocation, alphas_n=alphas_n,
        weighted=weighted, alpha_attack=alpha_attack if weighted else None, skip_first=skip_first,
        min_keep=min_keep, bn_recalib=bn_recalib, choose_form=choose_form, choose_batch=choose_batch, eval_n=eval_n,
        seed=seed,
    )  # fmt: skip
    spec = gdws_spec(new, {"beta": beta, "mac_budget": mac_budget, "weighted": weighted}, folded)
    config = {k: v for k, v in config.items() if k != "gdws_data_dir"}
    if ddir is not None and _data_dir_of(config) is None:
        config["train"] = {**config.get("train", {}), "data_dir": ddir}
    config["transforms"] = [*config.get("transforms", []), spec]
    config["gdws"] = gcfg.to_dict()
    config["versions"] = runs.versions()
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    out.mkdir(parents=True, exist_ok=True)
    runs.save_weights(out / runs.MODEL_FILE, new.state_dict())
    runs.write_config(out, config)
    runs.write_metrics(out, metrics)
    if alphas is not None:
        runs.save_weights(out / "alphas.safetensors", {k: v.float() for k, v in alphas.items()})
    return metrics
