"""Reports from result files: one Markdown or one self-contained HTML file with tables and plots.

``build_report(paths, out)`` reads any number of result files (``edgesep.devices._result``), and writes:

1. a summary table, one row per result (model, layers, params, MACs, precision, backend, target, device, clean
   accuracy, transferred adversarial accuracy per attack and eps, query-only Square accuracy, numerics, latency
   p50/p90/p99, throughput, status with the reason of a partial or failed run);
2. plots (matplotlib, Agg; no display): accuracy vs p50 latency with the Pareto front of each device, accuracy vs
   eps per model/precision (transferred solid, query-only dashed, eps 0 = clean), and the latency ECDF per result
   with p50/p90/p99 marked;
3. the environment of each device (CPU, cores, governor, clocks, runtime versions, ...) and notes;
4. comparison rows: separable vs dense on the same device/backend/precision (params, MACs and latency ratios,
   accuracy drops).

Conventions:

- Accuracies are fractions in [0, 1] in the results and percent (two decimals) in the report; latency is in ms.
- **Robust accuracy** at an eps is the worst (lowest) accuracy that any attack reached at that eps, transferred or
  query-only. The headline eps (Pareto plot, comparisons) is the one given, else the largest eps that every
  complete result was attacked at, else the eps most results have.
- Failed results appear in the table (with their reason) and in no plot; partial results are drawn hollow and are
  never on a Pareto front. Emulated devices' latency is meaningless: they are left out of the Pareto plot (a
  legend entry says how many), and their latency ECDF gets its own panel.
- ``.md`` writes its PNGs into ``<stem>_files/`` beside it (the folder is written to a temp folder, then renamed);
  ``.html`` is one file with the PNGs inline (base64) and a small inline stylesheet. Every file is written
  atomically.

No torch; matplotlib is imported only to draw.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from edgesep._io import atomic_write_bytes
from edgesep.devices._result import ResultError, load_results
from edgesep.errors import ConfigError

__all__ = [
    "FORMATS",
    "ReportRow",
    "build_report",
    "comparison_table",
    "environment_tables",
    "pareto_front",
    "report_rows",
    "robust_accuracy",
    "summary_table",
]

FORMATS: tuple[str, ...] = ("md", "html")
_DPI = 100  # figures are sized in inches for 100 px/inch: readable at 100% zoom
_ENV_FIELDS = (
    ("cpu_model", "CPU"), ("cores", "cores"), ("governor", "governor"), ("clocks_mhz", "clocks (MHz)"),
    ("temperature_c", "temperature (°C)"), ("jetson_power_mode", "Jetson power mode"), ("threads", "threads"),
    ("runtime", "runtime"), ("os", "OS"), ("kernel", "kernel"), ("machine", "machine"), ("hostname", "hostname"),
    ("python", "python"), ("numpy", "numpy"),
)  # fmt: skip


@dataclass
class ReportRow:
    """One result, flattened for the report. Accuracies are fractions; latencies ms; ``None`` = not measured."""

    path: Path
    model: str
    layers: str | None
    params: int | None
    macs: int | None
    precision: str
    backend: str
    target: str
    device: str  # the profile (or the arch when there is none), "(emulated)" appended when emulated
    emulated: bool
    status: str
    reason: str | None
    clean: float | None
    adversarial: list[dict[str, Any]] = field(default_factory=list)  # transferred entries, as in the result
    query: list[dict[str, Any]] = field(default_factory=list)  # query-only entries, as in the result
    numerics: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    throughput: dict[str, Any] | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """``model/precision/backend@device``: how plots and notes name a result."""
        return f"{self.model}/{self.precision}/{self.backend}@{self.device}"

    @property
    def p50(self) -> float | None:
        return None if self.latency is None else float(self.latency["p50"])

    @property
    def plotted(self) -> bool:
        """Failed results are never drawn; partial ones are (hollow)."""
        return self.status != "failed"


# ----------------------------------------------------------------------------------------------------------- rows
def _layers(bundle: Mapping[str, Any]) -> str | None:
    v = bundle.get("layers")
    if isinstance(v, str) and v:
        return v
    if isinstance(v, list):  # a provenance-style list of separable layers: empty means dense
        return "kron" if v else "dense"
    return None


def _device(dev: Mapping[str, Any]) -> str:
    name = dev.get("profile") or dev.get("arch") or "unknown"
    return f"{name} (emulated)" if dev.get("emulated") else str(name)


def report_rows(results: Iterable[tuple[Path, Mapping[str, Any]]]) -> list[ReportRow]:
    """Flatten validated results (``load_results``' pairs) into report rows, in the given order."""
    rows = []
    for path, r in results:
        b, a, d, acc = r["bundle"], r["artifact"], r["device"], r["accuracy"]
        clean = acc.get("clean")
        rows.append(
            ReportRow(
                path=Path(path), model=str(b.get("model") or b.get("name") or "?"), layers=_layers(b),
                params=b.get("params"), macs=b.get("macs"), precision=str(a["precision"]), backend=str(a["backend"]),
                target=str(a["target"]), device=_device(d), emulated=bool(d.get("emulated")), status=r["status"],
                reason=r["partial_reason"], clean=None if clean is None else float(clean["accuracy"]),
                adversarial=list(acc["adversarial"]), query=list(acc["query"]), numerics=r["numerics"],
                latency=r["latency"], throughput=r["throughput"], environment=dict(r["environment"] or {}),
                notes=[str(n) for n in r["notes"]],
            )
        )  # fmt: skip
    return rows


def _eps_key(eps: float) -> float:
    return round(float(eps), 6)


def robust_accuracy(row: ReportRow, eps: float) -> float | None:
    """The lowest accuracy any attack (transferred or query-only) reached on ``row`` at ``eps``; None if untested."""
    accs = [float(e["accuracy"]) for e in row.adversarial + row.query if _eps_key(e["eps"]) == _eps_key(eps)]
    return min(accs) if accs else None


def _attack_eps(row: ReportRow) -> set[float]:
    return {_eps_key(e["eps"]) for e in row.adversarial + row.query if e["eps"] > 0}


def _headline_eps(rows: Sequence[ReportRow], eps: float | None) -> float | None:
    if eps is not None:
        return _eps_key(eps)
    complete = [r for r in rows if r.status == "complete" and _attack_eps(r)] or [r for r in rows if _attack_eps(r)]
    if not complete:
        return None
    common = set.intersection(*(_attack_eps(r) for r in complete))
    if common:
        return max(common)
    counts = Counter(e for r in complete for e in _attack_eps(r))
    return max(counts, key=lambda e: (counts[e], e))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the Pareto-optimal points when x is minimized (latency) and y maximized (accuracy).

    A point is optimal when no other point is at least as good in both and strictly better in one; exact
    duplicates of an optimal point are all optimal. A sweep over x: O(n log n).
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    best = -math.inf  # the highest y among points with a strictly smaller x
    front: list[int] = []
    i = 0
    while i < len(order):
        x = points[order[i]][0]
        group = [order[i]]
        while i + 1 < len(order) and points[order[i + 1]][0] == x:
            i += 1
            group.append(order[i])
        top = points[group[0]][1]  # sorted by -y inside the group: the first has the group's highest y
        if top > best:
            front += [j for j in group if points[j][1] == top]
            best = top
        i += 1
    return sorted(front)


# ---------------------------------------------------------------------------------------------------- formatting
def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _int(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else "-"


def _eps_txt(eps: float) -> str:
    return f"{eps:g}"


def _status(row: ReportRow) -> str:
    return row.status if row.status == "complete" else f"{row.status}: {row.reason}"


def _adv_columns(rows: Sequence[ReportRow]) -> list[tuple[str, str, float]]:
    """(attack, norm, eps) of every transferred entry in any result, sorted."""
    return sorted({(str(e["attack"]), str(e["norm"]), _eps_key(e["eps"])) for r in rows for e in r.adversarial})


def _query_columns(rows: Sequence[ReportRow]) -> list[tuple[str, str, float]]:
    return sorted({(str(e["attack"]), str(e["norm"]), _eps_key(e["eps"])) for r in rows for e in r.query})


def _worst(entries: Iterable[Mapping[str, Any]], key: tuple[str, str, float]) -> Mapping[str, Any] | None:
    hits = [e for e in entries if (str(e["attack"]), str(e["norm"]), _eps_key(e["eps"])) == key]
    return min(hits, key=lambda e: e["accuracy"]) if hits else None


def summary_table(rows: Sequence[ReportRow]) -> list[list[str]]:
    """The summary table as text cells: a header row, then one row per result (accuracies in %, latency in ms)."""
    adv, qry = _adv_columns(rows), _query_columns(rows)
    head = ["model", "layers", "params", "MACs", "precision", "backend", "target", "device", "clean %"]
    head += [f"{a} {n} ε={_eps_txt(e)} %" for a, n, e in adv]
    head += [f"{a} (query-only) {n} ε={_eps_txt(e)} %" for a, n, e in qry]
    head += ["top-1 agree %", "max abs err", "p50 ms", "p90 ms", "p99 ms", "throughput /s", "status"]
    out = [head]
    for r in rows:
        cells = [r.model, r.layers or "-", _int(r.params), _int(r.macs), r.precision, r.backend, r.target, r.device,
                 _pct(r.clean)]  # fmt: skip
        for key in adv:
            e = _worst(r.adversarial, key)
            cells.append("-" if e is None else _pct(e["accuracy"]))
        for key in qry:
            e = _worst(r.query, key)
            cells.append("-" if e is None else f"{_pct(e['accuracy'])} ({e['queries']} q)")
        num, lat, thr = r.numerics, r.latency, r.throughput
        cells += [
            "-" if num is None else _pct(num["top1_agreement"]),
            "-" if num is None else f"{num['max_abs']:.2e}",
            *(("-",) * 3 if lat is None else (_ms(lat["p50"]), _ms(lat["p90"]), _ms(lat["p99"]))),
            "-" if thr is None else f"{thr['samples_per_s']:,.0f}",
            _status(r),
        ]
        out.append(cells)
    return out


def comparison_table(rows: Sequence[ReportRow], eps: float | None) -> list[list[str]]:
    """Separable vs dense on the same device, backend, precision and target (complete results only).

    Ratios are separable / dense; drops are dense minus separable, in percentage points (positive: the separable
    model is less accurate). Latency ratios of emulated devices are left out (meaningless).
    """
    robust_head = "robust drop pp" if eps is None else f"robust drop pp (ε={_eps_txt(eps)})"
    head = ["device", "backend", "precision", "separable", "dense", "params ratio", "MACs ratio", "p50 ratio",
            "clean drop pp", robust_head]  # fmt: skip
    out = [head]
    groups: dict[tuple[str, str, str, str], list[ReportRow]] = {}
    for r in rows:
        if r.status == "complete" and r.layers is not None:
            groups.setdefault((r.device, r.backend, r.precision, r.target), []).append(r)

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None or b == 0 else f"{a / b:.3f}"

    def drop(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None else f"{100 * (a - b):+.2f}"

    for (device, backend, precision, _target), members in sorted(groups.items(), key=lambda kv: kv[0]):
        dense = [m for m in members if m.layers == "dense"]
        for s in (m for m in members if m.layers != "dense"):
            for d in dense:
                rob = (None, None) if eps is None else (robust_accuracy(d, eps), robust_accuracy(s, eps))
                lat = "- (emulated)" if s.emulated else ratio(s.p50, d.p50)
                out.append(
                    [device, backend, precision, f"{s.model} ({s.layers})", d.model, ratio(s.params, d.params),
                     ratio(s.macs, d.macs), lat, drop(d.clean, s.clean), drop(*rob)]
                )  # fmt: skip
    return out


def _env_value(v: Any) -> str:
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={_env_value(x)}" for k, x in v.items())
    if isinstance(v, list | tuple):
        return "/".join(_env_value(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def environment_tables(rows: Sequence[ReportRow]) -> dict[str, list[list[str]]]:
    """Per device: a [field, value] table; values that differ between a device's results are joined with ' | '.

    Fields that no result on that device could read (null everywhere) are left out.
    """
    by_dev: dict[str, list[ReportRow]] = {}
    for r in rows:
        by_dev.setdefault(r.device, []).append(r)
    out = {}
    for dev, members in by_dev.items():
        table = [["field", "value"]]
        for key, name in _ENV_FIELDS:
            vals = list(dict.fromkeys(_env_value(m.environment[key]) for m in members
                                      if m.environment.get(key) is not None))  # fmt: skip
            if vals:
                table.append([name, " | ".join(vals)])
        versions: dict[str, list[str]] = {}
        for m in members:
            for k, v in (m.environment.get("runtime_versions") or {}).items():
                if v is not None and str(v) not in versions.setdefault(str(k), []):
                    versions[str(k)].append(str(v))
        for k, vs in sorted(versions.items()):
            table.append([f"{k} version", " | ".join(vs)])
        out[dev] = table
    return out


def _notes(rows: Sequence[ReportRow], eps: float | None) -> list[str]:
    notes = []
    if eps is not None:
        notes.append(
            f"Robust accuracy (Pareto plot, comparisons) = the lowest accuracy any attack reached at ε={_eps_txt(eps)} "
            "(transferred from the float model, or query-only Square against the engine)."
        )
    emulated = sorted({r.device for r in rows if r.emulated})
    if emulated:
        notes.append(
            f"{', '.join(emulated)}: emulated under qemu, latency and throughput are meaningless (correctness only); "
            "left out of the Pareto plot."
        )
    for r in rows:
        if r.status != "complete":
            what = "not plotted" if r.status == "failed" else "drawn hollow, never on a Pareto front"
            notes.append(f"{r.label} ({r.path.name}): {r.status} ({r.reason}); {what}.")
    seen = set()
    for r in rows:
        for n in r.notes:
            if (r.device, n) not in seen:
                seen.add((r.device, n))
                notes.append(f"{r.device}: {n}")
    return notes


# ---------------------------------------------------------------------------------------------------------- plots
@dataclass
class _Plot:
    name: str  # file stem
    title: str
    caption: str
    png: bytes
    size: tuple[int, int]  # pixels (width, height)


def _figure(w: float, h: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("matplotlib draws the report's plots: pip install 'edgesep[train]'") from None
    fig = Figure(figsize=(w, h), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot, no global state: the Agg canvas measures text for the label placement
    return fig


def _png(fig) -> tuple[bytes, tuple[int, int]]:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    w, h = fig.get_size_inches() * _DPI  # constrained layout keeps the figure size: no bbox_inches="tight"
    return buf.getvalue(), (round(w), round(h))


def _palette(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


_BACKEND_SHORT = {"onnxruntime": "ORT", "tvm": "TVM", "tensorrt": "TRT"}
_BACKEND_MARKER = {"onnxruntime": "o", "tvm": "D", "tensorrt": "^"}
_BACKEND_STYLE = {"onnxruntime": "-", "tvm": "--", "tensorrt": ":"}
_ATTACK_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def _config(r: ReportRow) -> str:
    return f"{r.model} / {r.precision}"


def _short(r: ReportRow) -> str:
    return f"{r.model} {r.precision} {_BACKEND_SHORT.get(r.backend, r.backend)}"


def _log_axis(ax, axis: str = "x") -> None:
    """Plain numbers on a log axis (0.05, 0.1, 0.2 rather than 5x10^-2); 2 and 5 labeled too when it spans little."""
    from matplotlib.ticker import FuncFormatter

    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    span = math.log10(hi / lo) if lo > 0 and hi > 0 else math.inf
    keep = (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0) if span < 0.6 else (2.0, 5.0) if span < 1.6 else ()

    def minor(v: float, _pos: int) -> str:
        if v <= 0:
            return ""
        mant = round(v / 10 ** math.floor(math.log10(v)), 6)
        return f"{v:g}" if mant in keep else ""

    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    target.set_minor_formatter(FuncFormatter(minor))


# label offsets in points, tried in order: beside, above/below, then further out (with a leader line)
_LABEL_SPOTS = [(6, 2, "left", "bottom"), (6, -2, "left", "top"), (-6, 2, "right", "bottom"),
                (-6, -2, "right", "top"), (0, 8, "center", "bottom"), (0, -8, "center", "top"),
                (8, 13, "left", "bottom"), (8, -13, "left", "top"), (-8, 13, "right", "bottom"),
                (-8, -13, "right", "top"), (0, 22, "center", "bottom"), (0, -22, "center", "top"),
                (14, 26, "left", "bottom"), (14, -26, "left", "top"), (-14, 26, "right", "bottom"),
                (-14, -26, "right", "top"), (0, 36, "center", "bottom"), (0, -36, "center", "top")]  # fmt: skip


def _place_labels(fig, panels: Sequence[tuple[Any, Sequence[tuple[float, float, str]]]]) -> None:
    """Label points in each (axes, [(x, y, text)]) without overlaps where possible.

    The layout is settled once (the figure drawn without rendering); labels stay out of the layout after that.
    """
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    for ax, items in panels:
        _place_axes_labels(fig, ax, items, renderer)


def _place_axes_labels(fig, ax, items: Sequence[tuple[float, float, str]], renderer, fontsize: float = 8.0) -> None:
    """Greedy: each label takes the first free spot of ``_LABEL_SPOTS`` (else the least overlapping one)."""
    from matplotlib.font_manager import FontProperties

    font = FontProperties(size=fontsize)
    px = fig.dpi / 72.0
    frame = ax.get_window_extent()
    anchors = [tuple(ax.transData.transform((x, y))) for x, y, _ in items]
    taken = [(ax_ - 5 * px, ay - 5 * px, ax_ + 5 * px, ay + 5 * px) for ax_, ay in anchors]  # the markers

    def overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    for (x, y, text), (ax_, ay) in zip(items, anchors, strict=True):
        w, h, _ = renderer.get_text_width_height_descent(text, font, ismath=False)
        best: tuple[float, tuple[int, int, str, str], tuple[float, ...]] | None = None
        for spot in _LABEL_SPOTS:
            dx, dy, ha, va = spot
            ox, oy = ax_ + dx * px, ay + dy * px
            x0 = ox if ha == "left" else ox - w if ha == "right" else ox - w / 2
            y0 = oy if va == "bottom" else oy - h
            box = (x0, y0, x0 + w, y0 + h)
            inside = (box[2] - box[0]) * (box[3] - box[1]) - overlap(box, frame.extents)
            cost = sum(overlap(box, t) for t in taken) + 2 * inside
            if best is None or cost < best[0]:
                best = (cost, spot, box)
            if cost == 0:
                break
        assert best is not None
        (dx, dy, ha, va), box = best[1], best[2]
        taken.append(box)
        far = abs(dy) > 10
        leader = {"arrowstyle": "-", "color": "0.55", "lw": 0.6} if far else None
        ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
                          color="0.15", arrowprops=leader)  # fmt: skip
        ann.set_in_layout(False)


def _pareto_plot(rows: Sequence[ReportRow], eps: float | None) -> _Plot | None:
    from matplotlib.lines import Line2D

    pts = [r for r in rows if r.plotted and not r.emulated and r.p50 is not None and r.p50 > 0]
    n_emulated = sum(1 for r in rows if r.plotted and r.emulated and r.p50 is not None)
    if not pts:
        return None
    devices = list(dict.fromkeys(r.device for r in pts))
    configs = list(dict.fromkeys(_config(r) for r in pts))
    color = dict(zip(configs, _palette(len(configs)), strict=True))
    metrics: list[tuple[str, Any]] = [("clean accuracy (%)", lambda r: r.clean)]
    if eps is not None:
        metrics.insert(0, (f"robust accuracy at ε={_eps_txt(eps)} (%)", lambda r: robust_accuracy(r, eps)))
    fig = _figure(max(4.8 * len(devices), 6.4) + 2.9, 3.9 * len(metrics) + 0.7)
    axes = fig.subplots(len(metrics), len(devices), sharex="col", squeeze=False)
    labels: dict[tuple[int, int], list[tuple[float, float, str]]] = {}
    for i, (ylabel, metric) in enumerate(metrics):
        for j, dev in enumerate(devices):
            ax = axes[i][j]
            members = [r for r in pts if r.device == dev and metric(r) is not None]
            done = [r for r in members if r.status == "complete"]
            front = sorted((done[k] for k in pareto_front([(r.p50, metric(r)) for r in done])), key=lambda r: r.p50)
            if front:  # ringed and joined: a one-point front shows too
                ax.plot([r.p50 for r in front], [100 * metric(r) for r in front], linestyle="--", color="0.35",
                        linewidth=1.1, marker="o", markersize=15, markerfacecolor="none", markeredgecolor="0.35",
                        markeredgewidth=1.0, zorder=1)  # fmt: skip
            for r in members:
                c = color[_config(r)]
                ax.plot(r.p50, 100 * metric(r), linestyle="none", marker=_BACKEND_MARKER.get(r.backend, "s"),
                        markersize=8, color=c, markerfacecolor="none" if r.status != "complete" else c,
                        markeredgewidth=1.6, zorder=3)  # fmt: skip
            ax.set_xscale("log")
            ax.margins(x=0.25, y=0.2)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(dev if i == 0 else f"{dev} (clean)", fontsize=10)
            if i == len(metrics) - 1:
                ax.set_xlabel("p50 latency, batch 1 (ms, log)")
            if j == 0:
                ax.set_ylabel(ylabel)
            front_ids = {id(r) for r in front}
            order = sorted(members, key=lambda r: id(r) not in front_ids)  # the front's labels get the best spots
            labels[(i, j)] = [(r.p50, 100 * metric(r), _short(r)) for r in order]
    handles = [Line2D([], [], color=color[c], marker="o", linestyle="none", markersize=8, label=c) for c in configs]
    for backend in dict.fromkeys(r.backend for r in pts):
        handles.append(Line2D([], [], color="0.3", marker=_BACKEND_MARKER.get(backend, "s"), linestyle="none",
                              markerfacecolor="none", markersize=8, label=backend))  # fmt: skip
    handles.append(Line2D([], [], color="0.35", linestyle="--", marker="o", markersize=11, markerfacecolor="none",
                          label="Pareto front\n(complete runs)"))  # fmt: skip
    if any(r.status != "complete" for r in pts):
        handles.append(Line2D([], [], color="0.3", marker="o", markerfacecolor="none", linestyle="none",
                              label="hollow: partial run"))  # fmt: skip
    if n_emulated:
        handles.append(Line2D([], [], linestyle="none",
                              label=f"not shown: {n_emulated} emulated\nresult(s), latency\nmeaningless"))  # fmt: skip
    fig.legend(handles=handles, loc="outside right upper", fontsize=8.5, title="model / precision, backend",
               title_fontsize=9)  # fmt: skip
    fig.suptitle("Accuracy vs latency per device (up and left is better)", fontsize=12)
    for row in axes:
        for ax in row:
            _log_axis(ax)
    _place_labels(fig, [(axes[i][j], items) for (i, j), items in labels.items()])
    png, size = _png(fig)
    caption = (
        "One panel per device (columns) and accuracy (rows); x: median latency at batch 1 (log scale). The dashed "
        "line joins the Pareto-optimal complete results: no other result on that device is both faster and more "
        "accurate."
    )
    if n_emulated:
        caption += f" {n_emulated} emulated result(s) are left out: their latency is meaningless."
    return _Plot("pareto", "Accuracy vs latency", caption, png, size)


def _eps_plot(rows: Sequence[ReportRow]) -> _Plot | None:
    from matplotlib import rc_context
    from matplotlib.lines import Line2D

    pts = [r for r in rows if r.plotted and (r.adversarial or r.query)]
    if not pts:
        return None
    groups = list(dict.fromkeys((r.model, r.precision) for r in pts))
    series_keys = list(dict.fromkeys(f"{r.backend}@{r.device}" for r in pts))
    color = dict(zip(series_keys, _palette(len(series_keys)), strict=True))
    attacks = list(dict.fromkeys(f"{e['attack']} {e['norm']}" for r in pts for e in r.adversarial + r.query))
    marker = {a: _ATTACK_MARKERS[i % len(_ATTACK_MARKERS)] for i, a in enumerate(attacks)}
    ncols = min(len(groups), 2 if len(groups) <= 4 else 3)
    nrows = math.ceil(len(groups) / ncols)
    fig = _figure(max(4.3 * ncols, 6.0) + 3.1, 3.3 * nrows + 0.7)
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    nested: list[int] = []  # how many results share each drawn curve
    for k, (model, precision) in enumerate(groups):
        ax = axes[k // ncols][k % ncols]
        curves: list[tuple[str, str, str, bool, tuple[tuple[float, float], ...]]] = []
        for r in (r for r in pts if (r.model, r.precision) == (model, precision)):
            for entries, style in ((r.adversarial, "-"), (r.query, "--")):  # transferred solid, query-only dashed
                for attack in dict.fromkeys(f"{e['attack']} {e['norm']}" for e in entries):
                    by_eps: dict[float, float] = {}
                    for e in entries:
                        if f"{e['attack']} {e['norm']}" == attack:  # the worst of repeated entries at one eps
                            k_eps = _eps_key(e["eps"])
                            by_eps[k_eps] = min(by_eps.get(k_eps, 1.0), float(e["accuracy"]))
                    if r.clean is not None and 0.0 not in by_eps:
                        by_eps[0.0] = r.clean
                    curve = tuple((x, round(100 * by_eps[x], 9)) for x in sorted(by_eps))
                    curves.append((f"{r.backend}@{r.device}", attack, style, r.status != "complete", curve))
        # results whose curves coincide (the same artifact on several devices) are drawn as nested bands, widest
        # first, so that every colour stays visible
        same = Counter((a, s, c) for _, a, s, _, c in curves)
        nested.extend(same.values())
        drawn: Counter = Counter()
        for key, attack, style, hollow, curve in curves:
            n_same = same[(attack, style, curve)]
            rank = n_same - 1 - drawn[(attack, style, curve)]
            drawn[(attack, style, curve)] += 1
            c = color[key]
            with rc_context({"lines.scale_dashes": False}):  # nested dashed bands keep one dash pattern
                ax.plot([p[0] for p in curve], [p[1] for p in curve], linestyle=style, marker=marker[attack], color=c,
                        markerfacecolor="none" if hollow else c, linewidth=1.5 + 1.3 * rank, markersize=5 + 1.9 * rank,
                        solid_capstyle="butt", zorder=2 + n_same - rank,
                        **({"dashes": (9, 5)} if style == "--" else {}))  # fmt: skip
        ax.set_title(f"{model} / {precision}", fontsize=10)
        ticks = sorted({p[0] for *_, c in curves for p in c})
        if len(ticks) <= 8:  # ticks at the measured budgets
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.grid(True, alpha=0.3)
        ax.set_ylim(-3, 103)
        ax.set_xlabel("ε (L-inf, pixels in [0, 1])")
        ax.xaxis.set_tick_params(labelbottom=True)
        if k % ncols == 0:
            ax.set_ylabel("accuracy (%)")
    for k in range(len(groups), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    handles = [Line2D([], [], color=color[s], linewidth=3, label=s) for s in series_keys]
    handles += [Line2D([], [], color="0.3", linestyle="-", label="transferred"),
                Line2D([], [], color="0.3", linestyle="--", label="query-only\n(on the engine)")]  # fmt: skip
    handles += [Line2D([], [], color="0.3", marker=marker[a], linestyle="none", label=a) for a in attacks]
    if any(r.status != "complete" for r in pts):
        handles.append(Line2D([], [], color="0.3", marker="o", markerfacecolor="none", linestyle="none",
                              label="hollow: partial run"))  # fmt: skip
    if any(n > 1 for n in nested):
        handles.append(Line2D([], [], linestyle="none", label="nested bands: results\nwith identical accuracy"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8.5, title="backend@device / mode / attack",
               title_fontsize=9)  # fmt: skip
    fig.suptitle("Accuracy vs attack budget ε per model / precision (ε = 0: clean)", fontsize=12)
    png, size = _png(fig)
    caption = (
        "Solid: adversarial examples crafted on the float model and replayed on the engine (transferred); dashed: "
        "a query-only Square attack run against the engine itself. ε = 0 is the clean accuracy. Results with the "
        "same accuracies are drawn as nested coloured bands."
    )
    return _Plot("accuracy_vs_eps", "Robust accuracy vs ε", caption, png, size)


def _latency_plot(rows: Sequence[ReportRow]) -> _Plot | None:
    from matplotlib.lines import Line2D

    pts = [r for r in rows if r.plotted and r.latency is not None and r.latency["raw_ms"]]
    if not pts:
        return None
    devices = sorted(dict.fromkeys(r.device for r in pts), key=lambda d: any(r.emulated for r in pts if r.device == d))
    configs = list(dict.fromkeys(_config(r) for r in pts))
    color = dict(zip(configs, _palette(len(configs)), strict=True))
    ncols = min(len(devices), 3)
    nrows = math.ceil(len(devices) / ncols)
    fig = _figure(max(4.6 * ncols, 6.2) + 2.9, 3.5 * nrows + 0.7)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    for k, dev in enumerate(devices):
        ax = axes[k // ncols][k % ncols]
        emulated = False
        members = [r for r in pts if r.device == dev]
        # the axis ends at 2x the slowest p99: a few huge outliers (a preempted call) would squash the body
        lo = min(min(r.latency["raw_ms"]) for r in members)
        hi = 2.0 * max(float(r.latency["p99"]) for r in members)
        off = [(r, [v for v in r.latency["raw_ms"] if v > hi]) for r in members]
        off = [(r, v) for r, v in off if v]
        for r in members:
            emulated = r.emulated
            xs = sorted(float(v) for v in r.latency["raw_ms"])
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            c = color[_config(r)]
            partial = r.status != "complete"
            ax.step(xs, ys, where="post", color=c, linewidth=1.5, linestyle=_BACKEND_STYLE.get(r.backend, "-."),
                    alpha=0.45 if partial else 1.0)  # fmt: skip
            for q, m in ((50, "o"), (90, "s"), (99, "^")):
                face = "none" if partial else c
                ax.plot(r.latency[f"p{q}"], q / 100, marker=m, color=c, markersize=6, linestyle="none",
                        markeredgewidth=0.6, markeredgecolor="black", markerfacecolor=face)  # fmt: skip
        ax.set_xscale("log")
        if lo > 0 and hi > lo:
            ax.set_xlim(lo / 1.25, hi)
        if off:
            n_off = sum(len(v) for _, v in off)
            worst = max(max(v) for _, v in off)
            ax.text(0.98, 0.04, f"off the right edge: {n_off} sample(s) > {hi:.3g} ms\n(slowest {worst:.3g} ms)",
                    transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color="0.3",
                    bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.8"})  # fmt: skip
        ax.set_title(f"{dev}: timing meaningless" if emulated else dev, fontsize=10)
        ax.set_xlabel("latency per call, batch 1 (ms, log)")
        if k % ncols == 0:
            ax.set_ylabel("fraction of calls ≤ latency")
        ax.set_ylim(0, 1.03)
        ax.grid(True, which="both", alpha=0.3)
        _log_axis(ax)
    for k in range(len(devices), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    handles = [Line2D([], [], color=color[c], linewidth=2.5, label=c) for c in configs]
    handles += [Line2D([], [], color="0.3", linestyle=_BACKEND_STYLE.get(b, "-."), label=b)
                for b in dict.fromkeys(r.backend for r in pts)]  # fmt: skip
    handles += [Line2D([], [], color="0.6", marker=m, markeredgecolor="black", linestyle="none", label=f"p{q}")
                for q, m in ((50, "o"), (90, "s"), (99, "^"))]  # fmt: skip
    if any(r.status != "complete" for r in pts):
        handles.append(Line2D([], [], color="0.3", alpha=0.45, marker="o", markerfacecolor="none",
                              label="faded, hollow: partial run"))  # fmt: skip
    fig.legend(handles=handles, loc="outside right upper", fontsize=8.5, title="model / precision, backend",
               title_fontsize=9)  # fmt: skip
    fig.suptitle("Latency distribution per device (ECDF, batch 1)", fontsize=12)
    png, size = _png(fig)
    caption = (
        "Empirical CDF of every latency sample at batch 1, one panel per device; markers: p50 (circle), p90 "
        "(square), p99 (triangle). Each x axis ends at twice the panel's slowest p99 (slower outliers are counted "
        "in the panel). Emulated devices' timings are shown for completeness only."
    )
    return _Plot("latency_ecdf", "Latency distribution", caption, png, size)


# --------------------------------------------------------------------------------------------------------- output
def _md_cell(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


_NUM_RE = re.compile(r"^(-|[-+]?[\d,]*\.?\d+(e[-+]?\d+)?( \(\d+ q\))?|- \(emulated\))$")


def _numeric_columns(table: list[list[str]]) -> list[bool]:
    """Columns whose body cells are all numbers (or "-"): right-aligned."""
    head, *body = table
    return [bool(body) and all(_NUM_RE.match(row[i]) for row in body) for i in range(len(head))]


def _md_table(table: list[list[str]]) -> list[str]:
    head, *body = table
    align = "|" + "".join("---:|" if num else "---|" for num in _numeric_columns(table))
    lines = ["| " + " | ".join(_md_cell(c) for c in head) + " |", align]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
    return lines


def _html_table(table: list[list[str]], cls: str, row_classes: Sequence[str] | None = None) -> str:
    """An HTML table (escaped); numeric columns carry class "num" (right-aligned), rows the given classes."""
    head, *body = table
    num = _numeric_columns(table)

    def cells(row: list[str], tag: str) -> str:
        return "".join(
            f'<{tag} class="num">{html.escape(c)}</{tag}>' if n else f"<{tag}>{html.escape(c)}</{tag}>"
            for c, n in zip(row, num, strict=True)
        )

    classes = list(row_classes or [""] * len(body))
    trs = [(f'<tr class="{k}">' if k else "<tr>") + cells(row, "td") + "</tr>" for row, k in zip(body, classes,
           strict=True)]  # fmt: skip
    return (
        f'<div class="scroll"><table class="{cls}">\n<thead><tr>{cells(head, "th")}</tr></thead>\n<tbody>\n'
        + "\n".join(trs)
        + "\n</tbody></table></div>"
    )


_UNITS = "Accuracies in %; latency at batch 1 in ms; throughput in samples/s at the throughput batch."
_ROW_COLOURS = "Rows of partial runs are yellow, failed runs red (the reason is in the status column)."
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5rem auto; max-width: 1500px;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; white-space: nowrap; }
th { background: #f0f0f0; } tr:nth-child(even) td { background: #fafafa; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.partial td { background: #fff6d9; } tr.failed td { background: #fde4e1; }
table.env td:last-child { white-space: normal; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #555; max-width: 1100px; }
.meta { color: #666; font-size: 0.85rem; }
"""


def _sections(rows: Sequence[ReportRow], eps: float | None) -> dict[str, Any]:
    return {
        "summary": summary_table(rows),
        "statuses": ["" if r.status == "complete" else r.status for r in rows],
        "comparison": comparison_table(rows, eps),
        "environment": environment_tables(rows),
        "notes": _notes(rows, eps),
    }


def _meta(rows: Sequence[ReportRow], sources: Sequence[Path]) -> str:
    counts = Counter(r.status for r in rows)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = ", ".join(f"{counts[s]} {s}" for s in ("complete", "partial", "failed") if counts[s])
    return f"{len(rows)} result(s) ({parts}) from {', '.join(str(s) for s in sources)}; generated {when}."


def _render_md(title: str, meta: str, sec: Mapping[str, Any], plots: Sequence[_Plot], folder: str) -> str:
    lines = [f"# {title}", "", meta, "", "## Summary", "", *_md_table(sec["summary"]), ""]
    lines += [_UNITS, ""]
    if plots:
        lines += ["## Plots", ""]
        for p in plots:
            lines += [f"### {p.title}", "", f"![{p.title}]({quote(folder)}/{p.name}.png)", "", p.caption, ""]
    lines += ["## Separable vs dense", ""]
    if len(sec["comparison"]) > 1:
        lines += [*_md_table(sec["comparison"]), ""]
        lines += ["Ratios: separable / dense; drops: dense minus separable, in percentage points.", ""]
    else:
        lines += ["No separable and dense results on the same device, backend and precision.", ""]
    lines += ["## Environment", ""]
    for dev, table in sec["environment"].items():
        lines += [f"### {dev}", ""]
        lines += [*_md_table(table), ""] if len(table) > 1 else ["Nothing readable was recorded.", ""]
    if sec["notes"]:
        lines += ["## Notes", "", *(f"- {_md_cell(n)}" for n in sec["notes"]), ""]
    return "\n".join(lines)


def _render_html(title: str, meta: str, sec: Mapping[str, Any], plots: Sequence[_Plot]) -> str:
    e = html.escape
    units = f"{_UNITS} {_ROW_COLOURS}"
    body = [f"<h1>{e(title)}</h1>", f'<p class="meta">{e(meta)}</p>', "<h2>Summary</h2>",
            _html_table(sec["summary"], "summary", sec["statuses"]), f"<p>{e(units)}</p>"]  # fmt: skip
    if plots:
        body.append("<h2>Plots</h2>")
        for p in plots:
            b64 = base64.b64encode(p.png).decode("ascii")
            body.append(
                f'<figure id="{p.name}"><img src="data:image/png;base64,{b64}" alt="{e(p.title)}" '
                f'width="{p.size[0]}" height="{p.size[1]}"><figcaption>{e(p.caption)}</figcaption></figure>'
            )
    body.append("<h2>Separable vs dense</h2>")
    if len(sec["comparison"]) > 1:
        body.append(_html_table(sec["comparison"], "comparison"))
        body.append("<p>Ratios: separable / dense; drops: dense minus separable, in percentage points.</p>")
    else:
        body.append("<p>No separable and dense results on the same device, backend and precision.</p>")
    body.append("<h2>Environment</h2>")
    for dev, table in sec["environment"].items():
        body.append(f"<h3>{e(dev)}</h3>")
        body.append(_html_table(table, "env") if len(table) > 1 else "<p>Nothing readable was recorded.</p>")
    if sec["notes"]:
        body.append("<h2>Notes</h2>\n<ul>" + "".join(f"<li>{e(n)}</li>" for n in sec["notes"]) + "</ul>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _check_plot_dir(dest: Path) -> None:
    """Only a folder of PNGs (an earlier report's plots) is ever replaced."""
    if dest.exists() and (not dest.is_dir() or any(p.suffix != ".png" or not p.is_file() for p in dest.iterdir())):
        raise ConfigError(f"{dest} exists and holds more than report plots; move it away or pick another --out")


def _write_dir_atomic(dest: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` into a temp folder beside ``dest``, then swap it in; an old folder of PNGs is replaced."""
    _check_plot_dir(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700: the folder is published as-is
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dest.exists():
            os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _formats(out: Path, formats: Iterable[str] | None) -> list[tuple[str, Path]]:
    if formats is None:
        fmt = out.suffix.lower().lstrip(".")
        if fmt not in FORMATS:
            raise ConfigError(f"--out {out}: the suffix picks the format: use a .html or .md file name")
        return [(fmt, out)]
    fmts = [str(f).lower().lstrip(".") for f in formats]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise ConfigError(f"report formats must be among {list(FORMATS)}, got {list(formats)}")
    return [(f, out.with_suffix(f".{f}")) for f in dict.fromkeys(fmts)]


def build_report(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    title: str | None = None,
    formats: Iterable[str] | None = None,
    eps: float | None = None,
) -> dict[str, Any]:
    """Write a report of the result files (and folders of them) in ``paths`` to ``out``.

    Args:
        paths: result JSON files, or folders (``*.json`` inside and ``*/*.json``), as ``load_results`` reads them.
        out: ``report.html`` (one self-contained file) or ``report.md`` (+ ``report_files/*.png``).
        title: the report's title (default: "edgesep report").
        formats: None: the suffix of ``out`` decides; else any of ``("md", "html")``, each written to ``out`` with
            that suffix.
        eps: the headline eps for robust accuracy (default: see the module docstring).

    Returns:
        ``{"files": [written paths], "results", "complete", "partial", "failed", "eps", "plots": [names],
        "pareto": {"robust"|"clean": {device: [labels on the front]}}, "summary", "comparison"}`` (tables as text
        cells, header first).

    Raises:
        ResultError: no result file found, or an invalid one (the message names the file).
        ConfigError: an unknown output suffix or format.
    """
    out = Path(out)
    targets = _formats(out, formats)  # before reading anything: a bad --out fails fast
    for fmt, path in targets:
        if fmt == "md":
            _check_plot_dir(path.parent / f"{path.stem}_files")
    sources = [Path(p) for p in paths]
    if not sources:
        raise ResultError("no result files given; pass result files or the folder `edgesep bench` wrote")
    results = load_results(sources)
    if not results:
        where = ", ".join(str(s) for s in sources)
        raise ResultError(f"no edgesep result files in {where}; run `edgesep bench` first")
    # measured devices first, then by device, model, precision, backend: rows of one device stay together
    rows = sorted(report_rows(results), key=lambda r: (r.emulated, r.device, r.model, r.precision, r.backend))
    head_eps = _headline_eps(rows, eps)
    sec = _sections(rows, head_eps)
    plots = [p for p in (_pareto_plot(rows, head_eps), _eps_plot(rows), _latency_plot(rows)) if p is not None]
    title = title or "edgesep report"
    meta = _meta(rows, sources)
    written: list[Path] = []
    for fmt, path in targets:
        if fmt == "md":
            folder = f"{path.stem}_files"
            if plots:
                _write_dir_atomic(path.parent / folder, {f"{p.name}.png": p.png for p in plots})
                written += [path.parent / folder / f"{p.name}.png" for p in plots]
            atomic_write_bytes(path, _render_md(title, meta, sec, plots, folder).encode("utf-8"))
        else:
            atomic_write_bytes(path, _render_html(title, meta, sec, plots).encode("utf-8"))
        written.append(path)
    counts = Counter(r.status for r in rows)
    pareto: dict[str, dict[str, list[str]]] = {"robust": {}, "clean": {}}
    for kind, metric in (("robust", lambda r: None if head_eps is None else robust_accuracy(r, head_eps)),
                         ("clean", lambda r: r.clean)):  # fmt: skip
        for dev in dict.fromkeys(r.device for r in rows if not r.emulated):
            pts = [r for r in rows if r.device == dev and r.status == "complete" and r.p50 is not None
                   and metric(r) is not None]  # fmt: skip
            if pts:
                pareto[kind][dev] = [pts[i].label for i in pareto_front([(r.p50, metric(r)) for r in pts])]
    return {
        "files": written, "results": len(rows), "complete": counts["complete"], "partial": counts["partial"],
        "failed": counts["failed"], "eps": head_eps, "plots": [p.name for p in plots], "pareto": pareto,
        "summary": sec["summary"], "comparison": sec["comparison"],
    }  # fmt: skip
