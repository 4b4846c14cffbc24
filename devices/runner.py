"""The on-device runner: ``python -m edgesep.devices.runner BUNDLE --out result.json [--artifact ID] ...``.

numpy + the runtime only (no torch, onnx, typer or rich: a device has none of them). It measures one bundle
artifact on the machine it runs on and writes one result file (schema: ``devices/_result.py``), stage by stage:

1. ``verify``: every file of the bundle against its sha256 (``Bundle.verify``; ``--no-verify`` skips this, the
   artifact's own sha256 is still checked on the bytes loaded), then the artifact is loaded
   (``edgesep.runtimes.load``). The bundle, artifact, device and environment blocks are filled in.
2. ``numerics``: the bundle's reference inputs through the engine against the reference logits stored at export
   (``reference.npz``: the float model's logits, which the export held ONNX Runtime fp32 to within 1e-4 relative):
   max abs error, max relative error (relative to the largest reference logit) and top-1 agreement.
3. ``clean``: top-1 accuracy on the bundle's first clean eval set (``--max-eval`` caps n: the first n images).
4. ``adversarial``: each adversarial eval set (crafted white-box on the float model at export) replayed on the
   engine: mode ``transferred``.
5. ``square`` (only with ``--square-queries N`` > 0): a query-only L-inf Square attack against the engine itself
   on the first ``--square-n`` clean images; eps defaults to the eps of the first L-inf adversarial eval set.
6. ``latency``: batch 1 (the first clean image): ``--warmup`` untimed runs, then timed runs until at least
   ``--min-runs`` runs *and* ``--min-seconds`` seconds (defaults 1000 and 30 s: whichever takes longer), capped at
   ``--max-runs``; every sample is kept (``raw_ms``). Timed on the backend's ``Runtime.run`` (the Session's input
   checks are not part of the engine's latency) or on a given engine's ``run``.
7. ``throughput``: batches of ``--throughput-batch`` images run back to back for ``--throughput-seconds``.

The result is written atomically after every stage and every ``FLUSH_SECONDS`` during latency, with status
``partial`` until the end, then ``complete``. SIGINT / SIGTERM write what was measured (latency samples included)
as ``partial`` with ``partial_reason`` "interrupted during <stage>" and exit 130 / 143. A user error (an
``EdgesepError``) writes status ``failed`` with the message, once the result has started (after the artifact was
selected), prints one line on stderr and exits 2; a bundle without the requested artifact exits 2 with the
bundle's artifact listing before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import math
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgesep._io import atomic_write_json
from edgesep.bundle import Bundle, open_bundle
from edgesep.devices._env import looks_emulated, probe_environment
from edgesep.devices._result import STAGES, latency_summary, new_result
from edgesep.errors import ConfigError, EdgesepError

__all__ = ["DEFAULT_STAGES", "FLUSH_SECONDS", "Engine", "build_parser", "main", "run_benchmark"]

Log = Callable[[str], None]
DEFAULT_STAGES: tuple[str, ...] = STAGES
FLUSH_SECONDS = 2.0  # the result file is rewritten at least this often while latency samples accumulate
EVAL_BATCH = 256  # accuracy stages run the engine on chunks of this many images (bounded memory)
# what reference.npz holds: the float torch model's logits, written at export after ONNX Runtime fp32 was held to
# them within 1e-4 relative (export parity), so they stand for the ONNX Runtime fp32 reference of the design
REFERENCE_LABEL = "torch-fp32"
DEFAULT_MAX_RUNS = 100_000  # cap on latency samples: ~1 MB of JSON; a 20 us engine would do 1.5 M runs in 30 s


class Engine(Protocol):
    """What the runner drives: logits for a float32 NCHW batch in [0, 1], and a JSON-ready description."""

    def run(self, x: np.ndarray) -> np.ndarray: ...

    def info(self) -> dict[str, Any]: ...


class _Interrupted(BaseException):
    """Raised from the runner's signal handlers (SIGINT, SIGTERM) to stop the current stage."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold SIGINT / SIGTERM while the result file is written (the main thread only), so a signal cannot interrupt
    the write itself; a signal that arrives meanwhile is delivered right after."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _Recorder:
    """The result being filled in, the stage in progress, and atomic writes of it."""

    def __init__(self, result: dict[str, Any], out: Path, log: Log):
        self.result, self.out, self.log = result, out, log
        self.stage = "verify"
        self.raw_ms: list[float] = []
        self.latency_meta: dict[str, Any] | None = None

    def write(self) -> None:
        self.sync_latency()
        self.result["finished"] = _now()
        with _signals_blocked():
            atomic_write_json(self.out, self.result)

    def sync_latency(self) -> None:
        """Put the latency samples taken so far into the result (nothing while none has been taken)."""
        if self.latency_meta is not None and self.raw_ms:
            summary = latency_summary(self.raw_ms)
            self.result["latency"] = {**self.latency_meta, "raw_ms": list(self.raw_ms), **summary}

    def done(self, stage: str) -> None:
        self.result["stages_done"].append(stage)
        self.write()

    def note(self, text: str) -> None:
        self.result["notes"].append(text)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _layers_label(layers: object) -> str | None:
    """``provenance.layers`` as a short label: ``dense`` (no separable layer) or ``kron(N)`` (N Kronecker layers)."""
    if isinstance(layers, str):
        return layers
    if isinstance(layers, list):
        return f"kron({len(layers)})" if layers else "dense"
    return None


def _bundle_block(bundle: Bundle) -> dict[str, Any]:
    prov = bundle.manifest.provenance

    def count(key: str) -> int | None:
        v = prov.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    return {
        "name": bundle.name,
        "manifest_sha256": _sha256_file(bundle.root / "manifest.json"),
        "model": prov.get("model") if isinstance(prov.get("model"), str) else None,
        "layers": _layers_label(prov.get("layers")),
        "params": count("params"),
        "macs": count("macs"),
    }


def _predict(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = EVAL_BATCH) -> np.ndarray:
    """Top-1 classes (N,) of ``x`` (N, C, H, W), run in chunks of ``batch``."""
    preds = [np.asarray(run(x[i : i + batch])).argmax(axis=1) for i in range(0, len(x), batch)]
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def _logits(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = EVAL_BATCH) -> np.ndarray:
    return np.concatenate([np.asarray(run(x[i : i + batch]), dtype=np.float32) for i in range(0, len(x), batch)])


def _static_batch(info: dict[str, Any]) -> int | None:
    """The batch an artifact is built for, when it is static (ORT: ``static_batch``; TVM: ``batch``)."""
    for key in ("static_batch", "batch"):
        v = info.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _check_int(name: str, v: object, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {v!r}")
    return v


def _check_num(name: str, v: object, minimum: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < minimum:
        raise ConfigError(f"--{name.replace('_', '-')} must be a number >= {minimum:g}, got {v!r}")
    return float(v)


def _parse_stages(stages: str | Sequence[str] | None) -> tuple[str, ...]:
    if stages is None:
        return DEFAULT_STAGES
    items = [s.strip() for s in stages.split(",")] if isinstance(stages, str) else [str(s).strip() for s in stages]
    items = [s for s in items if s]
    bad = [s for s in items if s not in STAGES]
    if bad or not items:
        raise ConfigError(
            f"--stages {','.join(items) or '(empty)'}: unknown stage(s) {bad}; choose from {','.join(STAGES)}"
        )
    return tuple(s for s in STAGES if s in items or s == "verify")  # verify always runs: it loads the engine


def run_benchmark(
    bundle_path: str | Path,
    out: str | Path,
    *,
    artifact_id: str | None = None,
    backend: str | None = None,
    precision: str | None = None,
    target: str | None = None,
    profile_id: str | None = None,
    min_runs: int = 1000,
    min_seconds: float = 30.0,
    max_runs: int = DEFAULT_MAX_RUNS,
    warmup: int = 20,
    throughput_batch: int = 64,
    throughput_seconds: float = 5.0,
    square_queries: int = 0,
    square_n: int = 100,
    square_eps: float | None = None,
    seed: int = 0,
    threads: int | None = None,
    max_eval: int | None = None,
    verify: bool = True,
    stages: str | Sequence[str] | None = None,
    emulated: bool | None = None,
    transport: str = "local",
    engine: Engine | None = None,
    device: dict[str, Any] | None = None,
    log: Log | None = print,
) -> dict[str, Any]:
    """Measure one bundle artifact here and write the result file ``out`` (see the module docstring).

    Args:
        bundle_path: a bundle directory (or a ``.tar`` of one).
        out: the result JSON to write (atomically, after every stage).
        artifact_id, backend, precision, target: which artifact (``edgesep.runtimes.select_artifact`` rules).
        profile_id: the device profile's id, recorded in the result's device block.
        min_runs, min_seconds, max_runs, warmup: latency at batch 1: ``warmup`` untimed runs, then samples until
            ``>= min_runs`` and ``>= min_seconds``, stopping at ``max_runs`` samples in any case.
        throughput_batch, throughput_seconds: the throughput stage's batch and duration.
        square_queries, square_n, square_eps, seed: the query-only Square attack (``square_queries`` 0: off); eps
            None takes the eps of the first L-inf adversarial eval set.
        threads: the runtime's intra-op threads (None: its default).
        max_eval: evaluate at most this many images of each eval set (None: all).
        verify: check every bundle file's sha256 first.
        stages: the stages to run (a comma-separated string or a list; default all); ``verify`` always runs.
        emulated: whether this machine is emulated (None: detect qemu-user from /proc/cpuinfo).
        transport: how the host reached this machine (``local``, ``ssh``, ``tvm-rpc``), for the device block.
        engine: drive this object (``run(x) -> logits``, ``info() -> dict``) instead of loading the artifact, e.g. a
            TVM RPC session to a device; the artifact is still selected from the bundle for the result's blocks.
        device: overrides of the device block (``profile``, ``arch``, ``emulated``, ``transport``).
        log: one progress line per stage (None: silent).
    Returns:
        The result dict, as written.
    Raises:
        ConfigError: bad settings (nothing written). BundleError / BundleLookupError: the bundle cannot be opened or
        has no such artifact (nothing written). Any EdgesepError after the result started: written as ``failed``
        first, then raised. KeyboardInterrupt: written as ``partial`` first, then raised.
    """
    log = log or (lambda _line: None)
    min_runs = _check_int("min_runs", min_runs, 1)
    max_runs = _check_int("max_runs", max_runs, 1)
    if max_runs < min_runs:
        raise ConfigError(f"--max-runs {max_runs} is below --min-runs {min_runs}; raise --max-runs")
    min_seconds = _check_num("min_seconds", min_seconds, 0.0)
    warmup = _check_int("warmup", warmup, 0)
    throughput_batch = _check_int("throughput_batch", throughput_batch, 1)
    throughput_seconds = _check_num("throughput_seconds", throughput_seconds, 0.0)
    square_queries = _check_int("square_queries", square_queries, 0)
    square_n = _check_int("square_n", square_n, 1)
    seed = _check_int("seed", seed, 0)
    if max_eval is not None:
        max_eval = _check_int("max_eval", max_eval, 1)
    if threads is not None:
        threads = _check_int("threads", threads, 1)
    if square_eps is not None:
        square_eps = _check_num("square_eps", square_eps, 0.0)
    todo = _parse_stages(stages)
    if square_queries == 0:
        todo = tuple(s for s in todo if s != "square")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; pass the result file's path, e.g. {out / 'result.json'}")

    from edgesep.runtimes import load, select_artifact  # numpy-only; imported here to keep `--help` instant

    created = _now()
    bundle = open_bundle(bundle_path, verify=False)  # verified below, as the first stage
    with bundle:
        sel = select_artifact(bundle, backend, target, precision, artifact_id=artifact_id)
        art = sel.artifact
        clean_sets = [e for e in bundle.manifest.eval_sets if e.kind == "clean"]
        adv_sets = [e for e in bundle.manifest.eval_sets if e.kind == "adversarial"]
        if "square" in todo:
            if not clean_sets:
                raise ConfigError(f"bundle {bundle.name!r} has no clean eval set for the Square attack; re-export it "
                                  "with one (--eval-sets clean:N,...) or drop --square-queries")  # fmt: skip
            if square_eps is None:
                linf = next((e for e in adv_sets if (e.norm or "").lower() == "linf"), None)
                if linf is None or linf.eps is None:
                    raise ConfigError(
                        f"bundle {bundle.name!r} has no L-inf adversarial eval set to take the Square attack's eps "
                        "from; pass --square-eps EPS (pixels in [0, 1], e.g. 0.1)"
                    )
                square_eps = float(linf.eps)
        machine = platform.machine()
        emulated = looks_emulated() if emulated is None else bool(emulated)
        dev = {"profile": profile_id, "arch": machine, "emulated": emulated, "transport": transport, **(device or {})}
        artifact_block = {"id": art.id, "file": art.file, "kind": art.kind, "precision": art.precision,
                          "target": art.target, "sha256": art.sha256, "backend": sel.backend,
                          "selected_because": sel.reason}  # fmt: skip
        result = new_result(bundle=_bundle_block(bundle), artifact=artifact_block, device=dev,
                            environment=probe_environment(sel.backend, threads), created=created)  # fmt: skip
        rec = _Recorder(result, out, log)
        if dev.get("emulated"):
            rec.note("emulated: latency and throughput are meaningless (qemu-user, ~35x slower than native)")
        session = None
        try:
            rec.write()
            # ---- 1. verify and load
            if verify:
                files = bundle.verify()
                log(f"verify: {len(files)} bundle files match their sha256")
            else:
                rec.note(
                    "bundle files not verified (--no-verify); the artifact's sha256 was checked on the bytes loaded"
                )
            if engine is None:
                session = load(bundle, sel.backend, artifact_id=art.id, threads=threads, verify=False)
                eng: Engine = session
                timed: Callable[[np.ndarray], np.ndarray] = session.runtime.run
            else:
                eng, timed = engine, engine.run
                rec.note("engine given by the caller (e.g. TVM RPC): its run() was measured")
            info = dict(eng.info())
            env = result["environment"]
            env["runtime"] = info.get("backend") or sel.backend
            rt_threads = info.get("threads")
            env["threads"] = rt_threads if isinstance(rt_threads, int) and not isinstance(rt_threads, bool) else threads
            log(f"artifact: {art.id} on {env['runtime']} ({sel.reason})")
            rec.done("verify")

            # ---- 2. numerics
            if "numerics" in todo:
                rec.stage = "numerics"
                if bundle.manifest.reference is None:
                    rec.note("numerics: the bundle has no reference outputs (reference.npz); skipped")
                else:
                    x_ref, ref = bundle.load_reference()
                    got = _logits(eng.run, x_ref)
                    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
                    scale = float(np.abs(ref).max())
                    max_abs = float(diff.max()) if np.all(np.isfinite(got)) else float("inf")
                    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
                    result["numerics"] = {
                        "reference": REFERENCE_LABEL,
                        "n": len(x_ref),
                        "max_abs": max_abs if math.isfinite(max_abs) else None,
                        "max_rel": max_rel if math.isfinite(max_rel) else None,
                        "top1_agreement": float(np.mean(got.argmax(axis=1) == ref.argmax(axis=1))),
                    }
                    nm = result["numerics"]
                    log(f"numerics: {len(x_ref)} reference inputs, max abs {max_abs:.3g}, max rel {max_rel:.3g}, "
                        f"top-1 agreement {100 * nm['top1_agreement']:.1f}%")  # fmt: skip
                rec.done("numerics")

            def accuracy(set_id: str) -> tuple[int, int]:
                x, y = bundle.load_eval_set(set_id)
                if max_eval is not None:
                    x, y = x[:max_eval], y[:max_eval]
                return len(y), int(np.sum(_predict(eng.run, x) == y))

            # ---- 3. clean
            if "clean" in todo:
                rec.stage = "clean"
                if not clean_sets:
                    rec.note("clean: the bundle has no clean eval set; skipped")
                else:
                    e = clean_sets[0]
                    n, correct = accuracy(e.id)
                    result["accuracy"]["clean"] = {"eval_set": e.id, "n": n, "correct": correct,
                                                   "accuracy": correct / n}  # fmt: skip
                    log(f"clean: {e.id} {correct}/{n} = {100 * correct / n:.2f}%")
                rec.done("clean")

            # ---- 4. adversarial (transferred)
            if "adversarial" in todo:
                rec.stage = "adversarial"
                for e in adv_sets:
                    n, correct = accuracy(e.id)
                    result["accuracy"]["adversarial"].append({
                        "eval_set": e.id, "mode": "transferred", "attack": e.attack, "norm": e.norm, "eps": e.eps,
                        "steps": e.steps, "crafted_on": e.crafted_on, "n": n, "correct": correct,
                        "accuracy": correct / n,
                    })  # fmt: skip
                    log(f"adversarial: {e.id} (crafted on {e.crafted_on}) {correct}/{n} = {100 * correct / n:.2f}%")
                    rec.write()
                if not adv_sets:
                    rec.note("adversarial: the bundle has no adversarial eval set; skipped")
                rec.done("adversarial")

            # ---- 5. square (query-only, against this engine)
            if "square" in todo:
                rec.stage = "square"
                from edgesep.attacks.square import square_attack

                e = clean_sets[0]
                x, y = bundle.load_eval_set(e.id)
                x, y = x[:square_n], y[:square_n]
                assert square_eps is not None  # set above whenever "square" is in todo
                clean_acc = float(np.mean(_predict(eng.run, x) == y))
                t0 = time.perf_counter()
                sq = square_attack(eng.run, x, y, square_eps, n_queries=square_queries, seed=seed)
                n = len(y)
                correct = int(n - np.count_nonzero(sq.success))
                result["accuracy"]["query"].append({
                    "mode": "query-only", "attack": "square", "norm": "linf", "eps": square_eps,
                    "queries": square_queries, "eval_set": e.id, "n": n, "correct": correct, "accuracy": correct / n,
                    "clean_accuracy": clean_acc, "mean_queries": float(np.mean(sq.queries)), "seed": seed,
                })  # fmt: skip
                took = time.perf_counter() - t0
                log(f"square: eps {square_eps:g}, {square_queries} queries, {n} images: {correct}/{n} = "
                    f"{100 * correct / n:.2f}% (clean {100 * clean_acc:.2f}%, {took:.1f} s)")  # fmt: skip
                rec.done("square")

            # the inputs of the timing stages: real images (first clean set, else the reference inputs)
            if "latency" in todo or "throughput" in todo:
                if clean_sets:
                    x_time = bundle.load_eval_set(clean_sets[0].id)[0]
                elif bundle.manifest.reference is not None:
                    x_time = bundle.load_reference()[0]
                else:
                    raise ConfigError(f"bundle {bundle.name!r} has neither a clean eval set nor reference inputs to "
                                      "time the engine on; re-export it")  # fmt: skip

            # ---- 6. latency at batch 1
            if "latency" in todo:
                rec.stage = "latency"
                x1 = np.ascontiguousarray(x_time[:1])
                for _ in range(warmup):
                    timed(x1)
                rec.latency_meta = {"batch": 1, "warmup": warmup, "min_runs": min_runs, "min_seconds": min_seconds}
                raw = rec.raw_ms
                clock = time.perf_counter_ns
                start = time.perf_counter()
                next_flush = start + FLUSH_SECONDS
                while True:
                    t = clock()
                    timed(x1)
                    raw.append((clock() - t) / 1e6)
                    now = time.perf_counter()
                    if len(raw) >= max_runs or (len(raw) >= min_runs and now - start >= min_seconds):
                        break
                    if now >= next_flush:
                        rec.write()
                        next_flush = time.perf_counter() + FLUSH_SECONDS
                took = time.perf_counter() - start
                if took < min_seconds:
                    rec.note(f"latency: stopped at --max-runs {max_runs} samples after {took:.1f} s "
                             f"(< --min-seconds {min_seconds:g})")  # fmt: skip
                rec.sync_latency()
                lat = result["latency"]
                log(f"latency: batch 1, {lat['n']} runs in {took:.1f} s: p50 {lat['p50']:.4f} ms, "
                    f"p90 {lat['p90']:.4f} ms, p99 {lat['p99']:.4f} ms")  # fmt: skip
                rec.done("latency")

            # ---- 7. throughput
            if "throughput" in todo:
                rec.stage = "throughput"
                b = throughput_batch
                reps = -(-b // len(x_time))
                xb = np.ascontiguousarray(np.concatenate([x_time] * reps)[:b])  # (b, C, H, W)
                static = _static_batch(info)
                if static is not None and static != b:
                    rec.note(f"throughput: the artifact has a static batch of {static}; each batch of {b} ran as "
                             f"{-(-b // static)} run(s) of {static} (the runtime chunks and zero-pads)")  # fmt: skip
                timed(xb)  # warm-up at this batch size (allocations)
                n_batches = 0
                start = time.perf_counter()
                while True:
                    timed(xb)
                    n_batches += 1
                    took = time.perf_counter() - start
                    if took >= throughput_seconds:
                        break
                result["throughput"] = {"batch": b, "n_batches": n_batches, "seconds": took,
                                        "samples_per_s": n_batches * b / took if took > 0 else None}  # fmt: skip
                log(f"throughput: batch {b}, {n_batches} batches in {took:.1f} s: "
                    f"{n_batches * b / took:.1f} samples/s")  # fmt: skip
                rec.done("throughput")

            result["status"], result["partial_reason"] = "complete", None
            rec.write()
            log(f"result: {out} (complete)")
            return result
        except (KeyboardInterrupt, _Interrupted) as e:
            what = "SIGINT" if isinstance(e, KeyboardInterrupt) else str(e)
            result["status"], result["partial_reason"] = "partial", f"interrupted during {rec.stage} ({what})"
            rec.write()
            log(f"interrupted during {rec.stage}: partial result in {out}")
            e.result_path = out  # type: ignore[union-attr]  # main() says where the partial result is
            raise
        except EdgesepError as e:
            result["status"], result["partial_reason"] = "failed", f"{rec.stage}: {_one_line(e)}"
            rec.write()
            raise
        except Exception as e:  # a bug or a runtime's own error: recorded, then raised with its traceback
            result["status"] = "failed"
            result["partial_reason"] = f"{rec.stage}: {type(e).__name__}: {_one_line(e)}"
            rec.write()
            raise
        finally:
            if session is not None:
                session.close()


def build_parser() -> argparse.ArgumentParser:
    """The runner's command line (argparse: devices have no typer)."""
    p = argparse.ArgumentParser(
        prog="python -m edgesep.devices.runner",
        description="Measure one bundle artifact on this machine (hashes, numerics, clean / transferred / "
        "query-only accuracy, latency, throughput) and write a result JSON.",
    )
    p.add_argument("bundle", help="the bundle directory (or .tar)")
    p.add_argument("--out", required=True, help="the result JSON to write (atomically, after every stage)")
    p.add_argument("--artifact", dest="artifact_id", help="the artifact id (default: the selection rules)")
    p.add_argument("--backend", choices=["onnxruntime", "tvm", "tensorrt"], help="keep artifacts of this backend")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], help="keep artifacts of this precision")
    p.add_argument("--target", help="the target this machine is (host, rpi4, ...; default: host)")
    p.add_argument("--profile-id", help="the device profile's id, recorded in the result")
    p.add_argument(
        "--transport",
        default="local",
        choices=["local", "ssh", "tvm-rpc"],
        help="how the host reached this machine, recorded in the result (default: local)",
    )
    p.add_argument(
        "--emulated",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mark the machine as emulated (default: detect qemu-user)",
    )
    p.add_argument("--min-runs", type=int, default=1000, help="latency: at least this many runs (default 1000)")
    p.add_argument("--min-seconds", type=float, default=30.0, help="latency: for at least this long (default 30)")
    p.add_argument(
        "--max-runs",
        type=int,
        default=DEFAULT_MAX_RUNS,
        help=f"latency: never more runs than this (default {DEFAULT_MAX_RUNS})",
    )
    p.add_argument("--warmup", type=int, default=20, help="latency: untimed runs first (default 20)")
    p.add_argument("--throughput-batch", type=int, default=64, help="throughput batch (default 64)")
    p.add_argument("--throughput-seconds", type=float, default=5.0, help="throughput duration (default 5)")
    p.add_argument("--square-queries", type=int, default=0, help="Square attack query budget (default 0: off)")
    p.add_argument("--square-n", type=int, default=100, help="Square attack: first N clean images (default 100)")
    p.add_argument("--square-eps", type=float, help="Square attack L-inf eps (default: the first L-inf eval set's)")
    p.add_argument("--seed", type=int, default=0, help="Square attack seed (default 0)")
    p.add_argument("--threads", type=int, help="the runtime's intra-op threads (default: its own)")
    p.add_argument("--max-eval", type=int, help="evaluate at most N images per eval set")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the bundle's sha256 check")
    p.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 complete; 2 a user error (one line on stderr); 130 / 143 interrupted (partial result kept)."""
    args = build_parser().parse_args(argv)
    log: Log = (lambda _line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))

    def on_signal(signum: int, _frame: object) -> None:
        raise _Interrupted(signum)

    in_main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        run_benchmark(
            args.bundle, args.out, artifact_id=args.artifact_id, backend=args.backend, precision=args.precision,
            target=args.target, profile_id=args.profile_id, min_runs=args.min_runs, min_seconds=args.min_seconds,
            max_runs=args.max_runs, warmup=args.warmup, throughput_batch=args.throughput_batch,
            throughput_seconds=args.throughput_seconds, square_queries=args.square_queries, square_n=args.square_n,
            square_eps=args.square_eps, seed=args.seed, threads=args.threads, max_eval=args.max_eval,
            verify=args.verify, stages=args.stages, emulated=args.emulated, transport=args.transport, log=log,
        )  # fmt: skip
    except _Interrupted as e:
        where = getattr(e, "result_path", None)
        kept = f"; what was measured is in {where} (status partial)" if where else " before the result started"
        print(f"edgesep runner: interrupted by {e}{kept}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        return 130
    except EdgesepError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 0


if __name__ == "__main__":
    sys.exit(main())
