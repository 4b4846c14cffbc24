"""`edgesep report`: Markdown / HTML reports with plots from result files.

The results are built here with the schema's own `new_result` (a small factory below): two models (dense_mlp,
kron_mlp), two precisions, two backends, three devices (host, an emulated arm64-qemu, rpi4), transferred PGD/FGSM
entries at several eps, query-only Square entries, raw latency samples, plus a partial and a failed run. Every
number the report shows is checked against a value computed here independently (numpy percentiles, counts).
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgesep.cli import main
from edgesep.devices._result import ResultError, latency_summary, new_result, validate_result
from edgesep.devices.report import build_report, pareto_front, report_rows, robust_accuracy
from edgesep.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PIL = pytest.importorskip("PIL.Image")

MODELS = {  # name -> (layers, params, macs)
    "dense_mlp": ("dense", 118_282, 117_760),
    "kron_mlp": ("kron", 6_250, 9_984),
}
DEVICES = {  # profile -> (arch, emulated, transport, base latency ms)
    "host": ("x86_64", False, "local", 0.08),
    "rpi4": ("aarch64", False, "ssh", 0.9),
    "arm64-qemu": ("aarch64", True, "local", 30.0),
}
N_EVAL = 400


def make_result(
    model: str,
    precision: str,
    backend: str,
    device: str,
    *,
    clean: int,
    adv: dict[float, int] | None = None,
    fgsm: dict[float, int] | None = None,
    square: dict[float, int] | None = None,
    lat_scale: float = 1.0,
    n_lat: int = 300,
    seed: int = 0,
    status: str = "complete",
    reason: str | None = None,
) -> dict:
    """A schema-valid result. Accuracy arguments are *correct counts* out of N_EVAL; latency is lognormal."""
    layers, params, macs = MODELS[model]
    arch, emulated, transport, base = DEVICES[device]
    r = new_result(
        bundle={"name": f"{model}.bundle", "manifest_sha256": "0" * 64, "model": model, "layers": layers,
                "params": params, "macs": macs},
        artifact={"id": f"{backend}-{precision}", "file": "model.onnx", "kind": "onnx" if backend == "onnxruntime"
                  else "tvm-lib", "precision": precision, "target": "host" if device == "host" else "rpi4",
                  "sha256": "1" * 64, "backend": backend, "selected_because": "test"},
        device={"profile": device, "arch": arch, "emulated": emulated, "transport": transport},
        environment={"hostname": f"{device}-box", "os": "Linux", "kernel": "6.1.0", "machine": arch, "python": "3.11.2",
                     "numpy": "1.26.4", "cpu_model": f"CPU of {device}", "cores": 4, "governor": "performance",
                     "clocks_mhz": [1800, 1800], "temperature_c": None, "jetson_power_mode": None,
                     "runtime": backend, "runtime_versions": {backend: "1.2.3" if backend == "tvm" else "1.20.1"},
                     "threads": 1},
        created="2026-11-22T22:30:00Z",
    )  # fmt: skip
    acc = r["accuracy"]
    if clean is not None:
        acc["clean"] = {"eval_set": "clean", "n": N_EVAL, "correct": clean, "accuracy": clean / N_EVAL}
    for attack, table in (("pgd", adv or {}), ("fgsm", fgsm or {})):
        for eps, correct in table.items():
            acc["adversarial"].append(
                {"eval_set": f"{attack}-{eps}", "mode": "transferred", "attack": attack, "norm": "linf", "eps": eps,
                 "steps": 20 if attack == "pgd" else None, "crafted_on": "torch-fp32", "n": N_EVAL,
                 "correct": correct, "accuracy": correct / N_EVAL}
            )  # fmt: skip
    for eps, correct in (square or {}).items():
        acc["query"].append(
            {"mode": "query-only", "attack": "square", "norm": "linf", "eps": eps, "queries": 500, "eval_set": "clean",
             "n": 100, "correct": correct, "accuracy": correct / 100, "clean_accuracy": clean / N_EVAL,
             "mean_queries": 123.0, "seed": 0}
        )  # fmt: skip
    r["numerics"] = {"reference": "onnxruntime-fp32", "n": 64, "max_abs": 3e-6 if precision == "fp32" else 0.02,
                     "max_rel": 1e-5, "top1_agreement": 1.0 if precision == "fp32" else 62 / 64}  # fmt: skip
    if n_lat:
        rng = random.Random(seed)
        raw = [base * lat_scale * rng.lognormvariate(0.0, 0.15) for _ in range(n_lat)]
        r["latency"] = {"batch": 1, "warmup": 20, "min_runs": n_lat, "min_seconds": 0.0, "raw_ms": raw,
                        **latency_summary(raw)}  # fmt: skip
        r["throughput"] = {"batch": 32, "n_batches": 50, "seconds": 1.0, "samples_per_s": 32_000 / (base * lat_scale)}
    r["stages_done"] = ["verify", "numerics", "clean", "adversarial", "latency", "throughput"]
    r["status"], r["partial_reason"] = status, reason
    r["finished"] = "2026-11-22T22:31:10Z"
    if emulated:
        r["notes"].append("emulated: latency is meaningless")
    return validate_result(r)


def fixture_results() -> dict[str, dict]:
    """file name -> result: the report's fixture set."""
    out: dict[str, dict] = {}
    seed = 0
    for device in ("host", "rpi4", "arm64-qemu"):
        for model in MODELS:
            dense = model == "dense_mlp"
            for precision in ("fp32", "int8"):
                for backend in ("onnxruntime", "tvm"):
                    if device == "arm64-qemu" and backend == "tvm":
                        continue
                    seed += 1
                    q = precision == "int8"
                    clean = (384 if dense else 376) - (4 if q else 0)
                    adv = {0.05: (300 if dense else 306) - (6 if q else 0),
                           0.1: (210 if dense else 226) - (8 if q else 0),
                           0.2: (80 if dense else 96) - (5 if q else 0)}  # fmt: skip
                    lat = (1.0 if dense else 0.45) * (0.7 if q else 1.0) * (1.3 if backend == "tvm" else 1.0)
                    out[f"{model}-{precision}-{backend}-{device}.json"] = make_result(
                        model, precision, backend, device, clean=clean, adv=adv,
                        fgsm={0.1: adv[0.1] + 30} if backend == "onnxruntime" else None,
                        square={0.1: 41 if dense else 47} if q else None, lat_scale=lat, seed=seed,
                    )  # fmt: skip
    # a partial run: interrupted after the clean stage and a short latency run; the fastest and most accurate point
    out["kron_mlp-fp32-onnxruntime-host-partial.json"] = make_result(
        "kron_mlp", "fp32", "onnxruntime", "host", clean=399, adv={0.1: 399}, lat_scale=0.05, n_lat=40, seed=99,
        status="partial", reason="interrupted (KeyboardInterrupt) during latency",
    )
    out["dense_mlp-int8-tvm-rpi4-failed.json"] = make_result(
        "dense_mlp", "int8", "tvm", "rpi4", clean=None, n_lat=0, status="failed",
        reason="artifact sha256 mismatch on the device",
    )
    return out


def write_results(folder: Path, results: dict[str, dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, r in results.items():
        (folder / name).write_text(json.dumps(r))
    return folder


@pytest.fixture(scope="module")
def fixtures() -> dict[str, dict]:
    return fixture_results()


@pytest.fixture(scope="module")
def report(tmp_path_factory, fixtures):
    """Both formats from one build: (info, md path, html path)."""
    tmp = tmp_path_factory.mktemp("report")
    results = write_results(tmp / "results", fixtures)
    (results / "not-a-result.json").write_text('{"kind": "something-else"}')  # skipped in a folder
    info = build_report([results], tmp / "out" / "report.md", title="Fixture report", formats=("md", "html"))
    return info, tmp / "out" / "report.md", tmp / "out" / "report.html"


def _key(r: dict) -> tuple[str, str, str, str]:
    dev = r["device"]["profile"] + (" (emulated)" if r["device"]["emulated"] else "")
    return r["bundle"]["model"], r["artifact"]["precision"], r["artifact"]["backend"], dev


def _md_tables(text: str) -> list[list[list[str]]]:
    """Every pipe table in a Markdown text, as rows of cells (the separator row dropped)."""
    tables, cur = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(c and set(c) <= {"-", ":"} for c in cells):
                cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    return tables


def _expected_row(r: dict) -> dict[str, str]:
    """The summary cells of one result, computed from the raw counts and samples (numpy percentiles)."""
    acc = r["accuracy"]
    exp = {}
    if acc["clean"]:
        exp["clean %"] = f"{100 * acc['clean']['correct'] / acc['clean']['n']:.2f}"
    for e in acc["adversarial"]:
        exp[f"{e['attack']} linf ε={e['eps']:g} %"] = f"{100 * e['correct'] / e['n']:.2f}"
    for e in acc["query"]:
        exp[f"square (query-only) linf ε={e['eps']:g} %"] = f"{100 * e['correct'] / e['n']:.2f} (500 q)"
    if r["latency"]:
        raw = np.asarray(r["latency"]["raw_ms"])
        for q in (50, 90, 99):
            exp[f"p{q} ms"] = f"{np.percentile(raw, q):.3f}"
    if r["numerics"]:
        exp["top-1 agree %"] = f"{100 * r['numerics']['top1_agreement']:.2f}"
    exp["params"] = f"{r['bundle']['params']:,}"
    return exp


# ------------------------------------------------------------------------------------------------------- Pareto
def _brute_front(points: list[tuple[float, float]]) -> list[int]:
    def dominates(q, p):
        return q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])

    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 6)), max_size=25))
def test_pareto_front_matches_brute_force(pts):
    # small integer grids: many ties in x, in y and exact duplicates
    points = [(float(x), float(y)) for x, y in pts]
    assert pareto_front(points) == _brute_front(points)


def test_pareto_front_examples():
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 0.5)]) == [0]
    # (2, .9) and (1, .5) trade off; (3, .8) is dominated by (2, .9); the duplicate (1, .5) is kept
    assert pareto_front([(2.0, 0.9), (3.0, 0.8), (1.0, 0.5), (1.0, 0.5), (1.0, 0.4)]) == [0, 2, 3]


def test_report_pareto_is_brute_force_per_device(report, fixtures):
    info, _, _ = report
    assert info["eps"] == 0.2  # the largest eps every complete result was attacked at

    def robust(r):
        at = [e["correct"] / e["n"] for e in r["accuracy"]["adversarial"] + r["accuracy"]["query"] if e["eps"] == 0.2]
        return min(at) if at else None

    def clean(r):
        return r["accuracy"]["clean"]["correct"] / r["accuracy"]["clean"]["n"]

    complete = [r for r in fixtures.values() if r["status"] == "complete" and not r["device"]["emulated"]]
    for kind, metric in (("robust", robust), ("clean", clean)):
        assert set(info["pareto"][kind]) == {"host", "rpi4"}  # emulated timing is never on a front
        for dev in ("host", "rpi4"):
            members = [r for r in complete if r["device"]["profile"] == dev]
            pts = [(float(np.percentile(r["latency"]["raw_ms"], 50)), metric(r)) for r in members]
            want = ["{}/{}/{}@{}".format(*_key(members[i])) for i in _brute_front(pts)]
            assert sorted(info["pareto"][kind][dev]) == sorted(want) and want
    # the partial host run is faster and more accurate than everything: were it counted, it alone would be the
    # clean front; partial runs are never on a front
    partial = fixtures["kron_mlp-fp32-onnxruntime-host-partial.json"]
    host = [r for r in complete if r["device"]["profile"] == "host"] + [partial]
    pts = [(float(np.percentile(r["latency"]["raw_ms"], 50)), clean(r)) for r in host]
    assert _brute_front(pts) == [len(host) - 1]
    assert len(info["pareto"]["clean"]["host"]) >= 1


def test_robust_accuracy_is_the_worst_attack(fixtures):
    (row,) = [r for r in report_rows([(Path(k), v) for k, v in fixtures.items()])
              if r.path.name == "dense_mlp-int8-onnxruntime-host.json"]  # fmt: skip
    # at 0.1: pgd 202, fgsm 232 (of 400) and square 41 (of 100): the worst is square
    assert robust_accuracy(row, 0.1) == pytest.approx(41 / 100)
    assert robust_accuracy(row, 0.05) == pytest.approx(294 / 400)
    assert robust_accuracy(row, 0.3) is None


# ----------------------------------------------------------------------------------------------------- Markdown
def test_markdown_summary_numbers(report, fixtures):
    info, md, _ = report
    text = md.read_text()
    assert text.startswith("# Fixture report")
    tables = _md_tables(text)
    summary = tables[0]
    head, body = summary[0], summary[1:]
    assert len(body) == len(fixtures)  # one row per result, failed and partial included; not-a-result skipped
    col = {h: i for i, h in enumerate(head)}
    rows = {(c[col["model"]], c[col["precision"]], c[col["backend"]], c[col["device"]]): c for c in body}
    assert len(rows) == len(body) - 2  # unique but for the failed and the partial run beside their complete twins
    checked = 0
    for name, r in fixtures.items():
        matches = [c for c in body if (c[col["model"]], c[col["precision"]], c[col["backend"]], c[col["device"]])
                   == _key(r) and c[col["status"]].startswith(r["status"])]  # fmt: skip
        assert len(matches) == 1, name
        cells = matches[0]
        for h, want in _expected_row(r).items():
            assert cells[col[h]] == want, (name, h)
            checked += 1
        if r["status"] != "complete":
            assert r["partial_reason"] in cells[col["status"]]
    assert checked > 200
    assert rows[("kron_mlp", "int8", "onnxruntime", "arm64-qemu (emulated)")][col["layers"]] == "kron"
    # the failed run: nothing measured
    (failed,) = [c for c in body if c[col["status"]].startswith("failed")]
    assert failed[col["clean %"]] == "-" and failed[col["p50 ms"]] == "-"
    # the same tables come back in the returned info
    assert info["summary"][0] == head and len(info["summary"]) == len(summary)


def test_markdown_comparison_rows(report, fixtures):
    _, md, _ = report
    comp = next(t for t in _md_tables(md.read_text()) if t[0][:3] == ["device", "backend", "precision"])
    head, body = comp[0], comp[1:]
    col = {h: i for i, h in enumerate(head)}
    # one pair per complete (device, backend, precision): host and rpi4 2 x 2, the emulated device 1 x 2 (no tvm)
    assert len(body) == 2 * 2 + 2 * 2 + 2
    assert [c[:3] for c in body] == sorted(c[:3] for c in body)
    for cells in body:
        dev, backend, precision = cells[0], cells[1], cells[2]
        base = dev.replace(" (emulated)", "")
        k = fixtures[f"kron_mlp-{precision}-{backend}-{base}.json"]
        d = fixtures[f"dense_mlp-{precision}-{backend}-{base}.json"]
        assert cells[col["params ratio"]] == f"{6_250 / 118_282:.3f}"
        assert cells[col["MACs ratio"]] == f"{9_984 / 117_760:.3f}"
        if "emulated" in dev:
            assert cells[col["p50 ratio"]] == "- (emulated)"
        else:
            ratio = np.percentile(k["latency"]["raw_ms"], 50) / np.percentile(d["latency"]["raw_ms"], 50)
            assert float(cells[col["p50 ratio"]]) == pytest.approx(ratio, abs=6e-4)
        clean_drop = 100 * (d["accuracy"]["clean"]["correct"] - k["accuracy"]["clean"]["correct"]) / N_EVAL
        assert float(cells[col["clean drop pp"]]) == pytest.approx(clean_drop, abs=6e-3)
        rob = [100 * min(e["correct"] / e["n"] for e in r["accuracy"]["adversarial"] + r["accuracy"]["query"]
                         if e["eps"] == 0.2) for r in (d, k)]  # fmt: skip
        assert float(cells[col["robust drop pp (ε=0.2)"]]) == pytest.approx(rob[0] - rob[1], abs=6e-3)


def test_markdown_images_and_environment(report):
    info, md, _ = report
    text = md.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 3 == len(info["plots"])
    for link in links:
        assert link.startswith("report_files/")
        png = md.parent / link
        with PIL.open(png) as im:
            im.verify()
        with PIL.open(png) as im:
            assert im.format == "PNG" and 800 <= im.width <= 2000 and 300 <= im.height <= 1500
            # a real plot: many colours, not a blank canvas
            assert len(im.convert("RGB").getcolors(1 << 20)) > 50
    assert sorted(p.name for p in (md.parent / "report_files").iterdir()) == sorted(Path(x).name for x in links)
    # environment per device, the emulated one marked, runtime versions listed; null fields left out
    assert "### arm64-qemu (emulated)" in text and "### rpi4" in text
    assert "| CPU | CPU of rpi4 |" in text and "| tvm version | 1.2.3 |" in text
    assert "Jetson power mode" not in text
    assert "| clocks (MHz) | 1800/1800 |" in text
    # notes: the robust definition, emulated timing, the partial and failed reasons
    assert "meaningless" in text and "artifact sha256 mismatch on the device" in text
    assert "interrupted (KeyboardInterrupt) during latency" in text
    # nothing half-written left beside the report
    assert not [p for p in md.parent.iterdir() if p.name.startswith(".")]


def test_markdown_rerun_replaces_plot_folder(tmp_path, fixtures):
    results = write_results(tmp_path / "r", {k: v for k, v in fixtures.items() if k.endswith("-onnxruntime-host.json")})
    out = tmp_path / "rep.md"
    (tmp_path / "rep_files").mkdir()
    (tmp_path / "rep_files" / "stale.png").write_bytes(b"old")
    info = build_report([results], out)
    assert info["partial"] == info["failed"] == 0 and info["results"] == 4
    assert sorted(p.name for p in (tmp_path / "rep_files").iterdir()) == sorted(f"{p}.png" for p in info["plots"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "rep.md", "rep_files"]
    # a folder that holds anything but plots is never replaced
    (tmp_path / "rep_files" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds more than report plots"):
        build_report([results], out)
    assert (tmp_path / "rep_files" / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------------------------- HTML
def test_html_is_valid_and_self_contained(report, fixtures):
    html5lib = pytest.importorskip("html5lib")
    _, _, page = report
    text = page.read_text()
    parser = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False)
    doc = parser.parse(text)  # raises on any parse error
    imgs = doc.findall(".//img")
    assert len(imgs) == 3
    for img in imgs:
        src = img.get("src")
        assert src.startswith("data:image/png;base64,")
        with PIL.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))) as im:
            assert im.format == "PNG" and (im.width, im.height) == (int(img.get("width")), int(img.get("height")))
    assert "http://" not in text and "https://" not in text and "<script" not in text  # nothing external
    tables = doc.findall(".//table")
    assert len(tables) == 2 + 3  # summary, comparison, one environment table per device
    summary = tables[0]
    head = ["".join(th.itertext()) for th in summary.find("thead").iter("th")]
    col = {h: i for i, h in enumerate(head)}
    body = [["".join(td.itertext()) for td in tr.iter("td")] for tr in summary.find("tbody").iter("tr")]
    assert len(body) == len(fixtures)
    for r in fixtures.values():
        cells = next(c for c in body if (c[col["model"]], c[col["precision"]], c[col["backend"]], c[col["device"]])
                     == _key(r) and c[col["status"]].startswith(r["status"]))  # fmt: skip
        for h, want in _expected_row(r).items():
            assert cells[col[h]] == want


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_html_renders_in_headless_chromium(report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary (Debian: apt-get install -y chromium) for the headless-browser check")
    _, _, page = report
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    shot = tmp_path / "shot.png"
    # one browser start: the DOM after parsing (and layout) on stdout, and a screenshot of the first 2200 px
    res = subprocess.run([*args, "--window-size=1400,2200", "--hide-scrollbars", f"--screenshot={shot}", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=90)  # fmt: skip
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    dom = res.stdout
    assert dom.count("<table") == 5 and dom.count('src="data:image/png;base64,') == 3
    assert "Fixture report" in dom and "arm64-qemu (emulated)" in dom and "<figcaption>" in dom
    with PIL.open(shot) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert rgb.shape[:2] == (2200, 1400)
    non_white = (rgb.min(axis=2) < 235).mean()
    assert non_white > 0.02, f"screenshot is nearly blank ({non_white:.2%} non-white pixels)"
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 100  # text, table rules and the plots' colours


# ------------------------------------------------------------------------------------------ partial and failed
def test_only_partial_and_failed(tmp_path, fixtures):
    results = write_results(tmp_path / "r", {k: v for k, v in fixtures.items() if "partial" in k or "failed" in k})
    info = build_report([results], tmp_path / "x.html")
    assert (info["partial"], info["failed"], info["complete"]) == (1, 1, 0)
    assert info["pareto"]["clean"] == {} and info["pareto"]["robust"] == {}
    text = (tmp_path / "x.html").read_text()
    assert "artifact sha256 mismatch on the device" in text
    # the partial run is still drawn (hollow), the failed one nowhere: an ECDF with only the partial run's samples
    assert "latency_ecdf" in info["plots"]
    assert "No separable and dense results" in text


# ---------------------------------------------------------------------------------------------------------- CLI
def test_cli_writes_report(tmp_path, fixtures, capsys):
    results = write_results(tmp_path / "r", {k: v for k, v in fixtures.items() if ("rpi4" in k and "tvm" not in k)
                                              or "failed" in k})  # fmt: skip
    out = tmp_path / "rep.html"
    assert main(["report", str(results), "--out", str(out), "--title", "rpi4 only", "--eps", "0.1"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}" in said and "1 failed" in said and "Pareto-optimal on rpi4" in said and "eps=0.1" in said
    assert "<title>rpi4 only</title>" in out.read_text()


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("empty", r"no edgesep result files in .*empty; run `edgesep bench` first"),
        ("invalid", r"bad\.json: missing field"),
        ("suffix", r"use a \.html or \.md file name"),
        ("missing", r"nope: no such file or directory"),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, fixtures, case, pattern):
    (tmp_path / "empty").mkdir()
    ok = write_results(tmp_path / "ok", {"a.json": next(iter(fixtures.values()))})
    bad = dict(next(iter(fixtures.values())))
    del bad["latency"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    arg, out = {"empty": (tmp_path / "empty", "r.md"), "invalid": (tmp_path / "bad.json", "r.md"),
                "suffix": (ok, "r.pdf"), "missing": (tmp_path / "nope", "r.html")}[case]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "edgesep", "report", str(arg), "--out", str(tmp_path / out)],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "COLUMNS": "400"})  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    assert not (tmp_path / out).exists() and not (tmp_path / "r_files").exists()


def test_api_errors(tmp_path):
    with pytest.raises(ResultError, match="no edgesep result files"):
        build_report([tmp_path], tmp_path / "r.md")
    with pytest.raises(ConfigError, match="formats must be among"):
        build_report([tmp_path], tmp_path / "r.md", formats=("pdf",))


def test_import_needs_neither_torch_nor_matplotlib():
    code = (
        "import sys; import edgesep.devices.report; "
        "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]; assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
