"""MetaSchedule tuning for TVM builds: tune a bundle's ONNX for a target, store the database in the bundle, rebuild.

``tune_tvm(bundle, target, trials)`` imports the bundle's ONNX at a static batch (as ``compile_tvm`` does), runs
Relax's ``zero`` pipeline (legalize, fold constants, fuse), extracts one MetaSchedule task per fused TIR function,
searches schedules for them (evolutionary search, XGBoost cost model, every candidate built and *measured* on the
target), applies the best record of every task, builds the library, checks it against ONNX Runtime, times it
against ONNX Runtime on the same bundle, records the faster one as the winner for the target, and adds the library
to the bundle as the ``tvm-lib`` artifact (``model.<target>.so``, replacing an untuned build of that target).

How the search runs with the PyPI wheel (apache-tvm 0.27.0.post1, apache-tvm-ffi 0.1.14.post1; measured here):

- **Builder.** MetaSchedule's ``LocalBuilder`` starts fresh worker processes for every batch of candidates, and
  each one imports ``tvm.s_tir.tensor_intrin`` (25 s on an idle 2-core machine, over 120 s on a loaded one:
  15 s of it registers CUDA intrinsics) against a 30 s timeout, so every candidate failed. A CPU build needs no
  intrinsic registry: tensorization, when a schedule uses it, happens while scheduling, in this process. The
  default builder here (``builder="inproc"``) builds candidates **in this process** (``PyBuilder``: no worker
  start-up at all, LLVM codegen one candidate after the other; on 2 cores the runner is idle while building
  anyway). ``builder="pool"`` keeps MetaSchedule's ``LocalBuilder`` (parallel worker processes, crash
  isolation) with a build function that skips that import and a 120 s timeout; each batch then pays ~3-5 s of
  ``import tvm`` per worker. Measured on a dense 1024 MLP, 17 trials: in-process 30-43 s, pool 100 s.
- **Intrinsics in this process.** ``TuneContext`` imports ``tvm.s_tir.tensor_intrin`` (the x86 VNNI / AVX-512
  and ARM dot-product rules refer to registered intrinsics). ``_import_cpu_tensor_intrinsics`` registers only the
  CPU ones (``x86``, ``arm_cpu``: about 2.5 s) and marks the package imported; CUDA / ROCm / Hexagon intrinsics
  are then not registered in this process (nothing in edgesep needs them).
- **Runner.** Host targets: ``LocalRunner`` (one worker process, candidates timed with ``number`` x ``repeat``,
  ``min_repeat_ms``); its workers get ``TVM_NUM_THREADS`` = the target's ``num-cores``. Remote targets:
  ``RPCRunner``, through a tracker (``tracker=(host, port)``, ``key``) or directly to one server
  (``rpc=(host, port)``; MetaSchedule's runner only knows trackers, so a session function that connects directly
  is passed in). Candidates are cross-linked here (``aarch64-linux-gnu-gcc``) and measured **on the device**.
- **Threads.** ``num-cores`` is set in the target at tuning time (the host's core count, 4 for ``rpi4`` /
  ``rpi5``; a target dict without it is refused): MetaSchedule sizes its parallel loops by it. The library embeds
  it (``edgesep_num_threads``), and ``TvmRuntime`` starts TVM's thread pool with that many threads unless told
  otherwise: TVM's own default on x86 is half the logical cores (1 here), which would run a 2-core schedule on one.
- **Budget.** ``trials`` is the total number of candidates measured. MetaSchedule's gradient task scheduler
  gives every task one warm-up round, then spends each further round on the task whose weighted latency is
  still falling fastest: the anchor convolutions and matmuls, not a reshape or a mean that a few candidates
  settle. The round size is ``trials // (2 x tasks)`` (1 to 64), so the warm-up rounds take at most half the
  budget and every task gets one (the stock 64 per round would spend a small budget on the first tasks). The
  scheduler checks the budget between rounds, so it may measure up to one round more than ``trials``. An
  explicit ``max_trials_per_task`` caps each task instead (an equal split with ``ceil(trials / tasks)``: the
  behaviour before the gradient allocation, kept to compare). Tasks that get no trial (budget smaller than the
  task count, or every candidate failed) stay unscheduled (serial loop nests, correct but slow): they are listed
  in ``extra["tuning"]["untuned_tasks"]`` and in the log.
- **Database.** One MetaSchedule JSON database per (target, source model sha256), stored in the bundle as the
  report ``tuning-<target>-<sha256[:16]>`` (``reports/<name>.json``: hashed and verified with the bundle like
  every file; workloads and records as JSON, no pickle). Tuning again adds to it (the search starts from its best
  records); ``trials=0`` rebuilds from it without measuring anything. A batch size is a different workload, so
  batch 1 and 64 builds share one database.
- **The winner.** On the host (a build that runs here), tuned TVM and ONNX Runtime are timed interleaved on the
  same bundle at the build's batch (the same parity images). TVM becomes the recorded winner for the target
  (``extra["preferred_for"]``, with ``extra["preferred_reason"]``) only when it is ``PREFER_MARGIN`` (1.2x) faster;
  otherwise the fp32 ONNX artifact is recorded as the winner for the target, with the numbers. Either way the
  other artifacts lose the target from their ``preferred_for``. ``edgesep.runtimes.load`` picks the winner and
  ``Session.info()["selected_because"]`` quotes the reason. For a remote target the tuned library's latency is
  measured on the device (``time_evaluator``) but ONNX Runtime cannot be run over TVM RPC: no winner is recorded
  (measure both on the device). On an emulated device (``emulated=True``: qemu) every timing is meaningless
  (about 35x slower than real hardware, and shared with the host): they are recorded and printed as such.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import importlib
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgesep.errors import BackendMissingError, ConfigError, EdgesepError
from edgesep.runtimes import tvm as _tvm

if TYPE_CHECKING:
    from edgesep.bundle import Artifact, Bundle

__all__ = [
    "BUILDERS",
    "DB_SCHEMA",
    "PREFER_MARGIN",
    "TuningDatabaseMissingError",
    "load_tuning_database",
    "parse_address",
    "record_winner",
    "tune_tvm",
    "tuning_db_name",
]

BUILDERS: tuple[str, ...] = ("inproc", "pool")
DB_SCHEMA = "edgesep-tvm-tuning-db/1"
PREFER_MARGIN = _tvm.PREFER_MARGIN
NUM_THREADS_FN = "edgesep_num_threads"  # a Relax function in every tuned library: its target's num-cores
_POOL_BUILD_TIMEOUT_S = 120.0
_MAX_PER_ITER = 64

Log = _tvm.Log


class TuningDatabaseMissingError(EdgesepError):
    """``trials=0`` asks for a rebuild from a stored tuning database, and the bundle has none for that key."""


# ----------------------------------------------------------------------------------------------------------------
# helpers


def tuning_db_name(target_name: str, model_sha256: str) -> str:
    """The bundle report that holds the tuning database of a (target, source model) pair."""
    return f"tuning-{target_name}-{model_sha256[:16]}"


def parse_address(text: str | tuple[str, int], what: str = "--rpc") -> tuple[str, int]:
    """``"HOST:PORT"`` (or a ``(host, port)`` pair) -> ``(host, port)``.

    Raises:
        ConfigError: not HOST:PORT with a port in 1..65535.
    """
    if isinstance(text, tuple):
        host, port = text
    else:
        host, sep, port_s = str(text).rpartition(":")
        if not sep or not host or not port_s.isdigit():
            raise ConfigError(f"{what} must be HOST:PORT (e.g. 127.0.0.1:9190), got {text!r}")
        port = int(port_s)
    if not (0 < int(port) < 65536):
        raise ConfigError(f"{what} port must be in 1..65535, got {port}")
    return str(host), int(port)


def _import_cpu_tensor_intrinsics() -> None:
    """Register the x86 and ARM tensor intrinsics without the CUDA / ROCm / Hexagon ones (module docstring).

    ``tvm.s_tir.tensor_intrin``'s ``__init__`` imports every backend's intrinsics (25-120 s here, mostly CUDA);
    MetaSchedule's ``TuneContext`` imports the package for its side effect. The package object is created
    without running its ``__init__`` and its CPU submodules are imported, so that later import is a no-op.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    import tvm.s_tir

    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:  # another TVM layout: let TVM import it its own way
        return
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    try:
        for sub in ("x86", "arm_cpu"):
            importlib.import_module(f"{name}.{sub}")
    except BaseException:
        sys.modules.pop(name, None)
        raise
    tvm.s_tir.tensor_intrin = pkg


def _build_candidate(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule's ``default_build`` without its ``import tvm.s_tir.tensor_intrin`` (not needed to build)."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from tvm.tirx import build as tvm_build

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _export_candidate(rt_mod: Any, cc: str | None = None) -> str:
    """Link a candidate into a shared library (cross-linked with ``cc`` for a remote device); returns its path."""
    path = os.path.join(tempfile.mkdtemp(prefix="edgesep-ms-"), "candidate.so")
    rt_mod.export_library(path, **({} if cc is None else {"cc": cc}))
    return path


def _set_threads(n: int) -> None:
    """Runner worker initializer: TVM's thread pool in the worker gets the target's core count."""
    os.environ["TVM_NUM_THREADS"] = str(n)


def _connect_direct(config: Any, *, host: str, port: int, timeout: float) -> Any:
    """An RPC session straight to one server (MetaSchedule's ``RPCRunner`` otherwise needs a tracker)."""
    from tvm import rpc

    return rpc.connect(host, port, session_timeout=timeout)


def _make_builder(kind: str, cc: str | None, workers: int) -> Any:
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, LocalBuilder, PyBuilder

    if kind == "pool":
        return LocalBuilder(
            max_workers=workers,
            timeout_sec=_POOL_BUILD_TIMEOUT_S,
            f_build=_build_candidate,
            f_export=functools.partial(_export_candidate, cc=cc),
        )

    @derived_object
    class InProcessBuilder(PyBuilder):
        """Builds each candidate in this process, one after the other; a failure is that candidate's result."""

        def build(self, build_inputs: list[Any]) -> list[Any]:
            out = []
            for bi in build_inputs:
                try:
                    with _tvm._keep_affinity():
                        path = _export_candidate(_build_candidate(bi.mod, bi.target, None), cc)
                    out.append(BuilderResult(path, None))
                except Exception as e:  # a candidate that does not build is a failed trial, not a failed tuning
                    out.append(BuilderResult(None, f"InProcessBuilder: {type(e).__name__}: {str(e)[:2000]}"))
            return out

    return InProcessBuilder()


def _make_runner(
    *,
    rpc: tuple[str, int] | None,
    tracker: tuple[str, int] | None,
    key: str | None,
    threads: int,
    number: int,
    repeat: int,
    min_repeat_ms: int,
    timeout: float,
) -> Any:
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, LocalRunner, RPCConfig, RPCRunner

    ev = EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms, enable_cpu_cache_flush=False)
    if rpc is None and tracker is None:
        init = functools.partial(_set_threads, threads)
        return LocalRunner(evaluator_config=ev, timeout_sec=timeout, initializer=init)
    if tracker is not None:
        cfg = RPCConfig(tracker_host=tracker[0], tracker_port=tracker[1], tracker_key=key,
                        session_timeout_sec=int(timeout))  # fmt: skip
        return RPCRunner(rpc_config=cfg, evaluator_config=ev, max_workers=1)
    assert rpc is not None
    # RPCConfig insists on tracker fields; with f_create_session they are never used
    cfg = RPCConfig(tracker_host=rpc[0], tracker_port=rpc[1], tracker_key=key or "direct",
                    session_timeout_sec=int(timeout))  # fmt: skip
    connect = functools.partial(_connect_direct, host=rpc[0], port=rpc[1], timeout=timeout)
    return RPCRunner(rpc_config=cfg, evaluator_config=ev, max_workers=1, f_create_session=connect)


def _progress_callback(log: Log, task_names: Sequence[str], every_s: float = 10.0) -> Any:
    """A MeasureCallback that logs trials and the best time per task, at most every ``every_s`` seconds."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        def __init__(self) -> None:
            super().__init__()
            self.trials = [0] * len(task_names)
            self.best = [math.inf] * len(task_names)
            self.failed = [0] * len(task_names)
            self.t0 = self.last = time.perf_counter()

        def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any, builder_results: Any,
                  runner_results: Any) -> None:  # fmt: skip
            for b, r in zip(builder_results, runner_results, strict=False):
                self.trials[task_id] += 1
                if b.error_msg is not None or r.error_msg is not None or not r.run_secs:
                    self.failed[task_id] += 1
                    continue
                secs = float(np.mean([float(s) for s in r.run_secs]))
                self.best[task_id] = min(self.best[task_id], secs)
            now = time.perf_counter()
            if now - self.last >= every_s:
                self.last = now
                done = sum(self.trials)
                best = self.best[task_id]
                log(
                    f"  tuning: {done} trials in {now - self.t0:.0f} s; task {task_names[task_id]}: "
                    f"{self.trials[task_id]} trials, best {'-' if best == math.inf else f'{best * 1e6:.1f} us'}"
                )

    return Progress()


# ----------------------------------------------------------------------------------------------------------------
# the database in the bundle


def _jsonl(path: Path) -> list[Any]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: Sequence[Any]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def load_tuning_database(bundle: Bundle, target_name: str, model_sha256: str) -> dict[str, Any] | None:
    """The stored tuning database of (target, model) as its JSON object, or None.

    Raises:
        BundleContentError: the report exists but is not a tuning database of this schema.
    """
    from edgesep.errors import BundleContentError

    name = tuning_db_name(target_name, model_sha256)
    if name not in bundle.manifest.reports:
        return None
    db = bundle.load_report(name)
    if not isinstance(db, dict) or db.get("schema") != DB_SCHEMA or db.get("model_sha256") != model_sha256:
        raise BundleContentError(
            f"report {name!r} of bundle {bundle.name!r} is not a {DB_SCHEMA} tuning database for model "
            f"{model_sha256[:16]}; delete it from the manifest or tune again with a fresh bundle"
        )
    if not isinstance(db.get("workloads"), list) or not isinstance(db.get("records"), list):
        raise BundleContentError(f"report {name!r}: 'workloads' and 'records' must be lists")
    return db


def _best_records(records: list[Any], keep: int) -> list[Any]:
    """At most ``keep`` fastest valid records per workload (failed candidates are dropped: they teach nothing
    that the cost model needs across sessions and make up most of a long search's records)."""

    def secs(r: Any) -> float:
        run = r[1][1] if isinstance(r, list) and len(r) > 1 and isinstance(r[1], list) and len(r[1]) > 1 else None
        if not isinstance(run, list) or not run:
            return math.inf
        v = float(np.mean([float(s) for s in run]))
        return v if v < 1e9 else math.inf  # MetaSchedule writes 1e10 s for a failed run

    by_wl: dict[Any, list[Any]] = {}
    for r in records:
        if secs(r) < math.inf:
            by_wl.setdefault(r[0], []).append(r)
    out = []
    for rs in by_wl.values():
        out.extend(sorted(rs, key=secs)[:keep])
    return out


# ----------------------------------------------------------------------------------------------------------------
# the winner


def record_winner(bundle: Bundle, target: str, winner_id: str, reason: str, measured: Mapping[str, Any]) -> None:
    """Record ``winner_id`` as the artifact ``edgesep.runtimes.load`` runs for ``target``; others lose ``target``.

    Writes ``extra["preferred_for"]`` (adding ``target``), ``extra["preferred_reason"]`` and
    ``extra["winner_measured"]`` on the winner, and removes ``target`` (and its reason) from every other artifact.
    """
    from edgesep.runtimes._load import PREFERRED_KEY

    for a in bundle.manifest.artifacts:
        pref = [t for t in (a.extra.get(PREFERRED_KEY) or []) if isinstance(t, str)]
        if a.id == winner_id:
            new = {**a.extra, PREFERRED_KEY: sorted({*pref, target}), "preferred_reason": reason,
                   "winner_measured": dict(measured)}  # fmt: skip
        elif target in pref:
            new = {k: v for k, v in a.extra.items() if k not in ("preferred_reason", "winner_measured")}
            rest = [t for t in pref if t != target]
            if rest:
                new[PREFERRED_KEY] = rest
            else:
                new.pop(PREFERRED_KEY, None)
        else:
            continue
        bundle.set_artifact_extra(a.id, new)


# ----------------------------------------------------------------------------------------------------------------
# running the tuned library


def _with_num_threads(mod: Any, n: int) -> Any:
    """Add ``NUM_THREADS_FN``: a Relax function returning the int64 tensor ``[n]`` (the target's num-cores)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    with bb.function(NUM_THREADS_FN, []):
        bb.emit_func_output(relax.const(np.array([n], dtype=np.int64)))
    mod[NUM_THREADS_FN] = bb.get()[NUM_THREADS_FN]
    return mod


def _connect(rpc: tuple[str, int] | None, tracker: tuple[str, int] | None, key: str | None, timeout: float) -> Any:
    from tvm import rpc as tvm_rpc

    try:
        if tracker is not None:
            return tvm_rpc.connect_tracker(*tracker).request(key, session_timeout=timeout)
        assert rpc is not None
        return tvm_rpc.connect(rpc[0], rpc[1], key=key or "", session_timeout=timeout)
    except Exception as e:
        where = f"tracker {tracker[0]}:{tracker[1]} (key {key!r})" if tracker else f"server {rpc[0]}:{rpc[1]}"  # type: ignore[index]
        raise ConfigError(
            f"cannot reach the TVM RPC {where} ({type(e).__name__}: {str(e)[:200]}); start `python -m "
            "tvm.exec.rpc_server` on the device (with --tracker HOST:PORT --key K for a tracker)"
        ) from e


def _run_remote(lib: Path, session: Any, x: np.ndarray, in_shape: Sequence[int], n_classes: int,
                number: int, repeat: int) -> tuple[np.ndarray, list[float]]:  # fmt: skip
    """Upload a library to an RPC session, run ``x`` (static-batch chunks), time ``main`` on the device (ms)."""
    import tvm
    from tvm import relax

    from edgesep._io import sha256_file

    name = f"edgesep-{sha256_file(lib)[:16]}.so"
    session.upload(str(lib), target=name)
    dev = session.cpu()
    vm = relax.VirtualMachine(session.load_module(name), dev)
    runner = _tvm._VmRunner(vm, in_shape, n_classes, dev)
    out = runner(x)
    first = _tvm._chunks(x, in_shape[0])[0][0]
    res = vm.time_evaluator("main", dev, number=number, repeat=repeat)(tvm.runtime.tensor(first, dev))
    return out, [float(r) * 1e3 for r in res.results]


def _task_table(db: Any, tasks: Sequence[Any], tgt: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Per task: name, weight (occurrences), FLOPs, valid records, best µs and GFLOP/s; and the untuned tasks.

    Looked up by workload, so a database that also holds other batches' workloads is fine.
    """
    from tvm.s_tir.analysis import estimate_tir_flops

    rows: list[dict[str, Any]] = []
    untuned: list[str] = []
    for tk in tasks:
        tmod = tk.dispatched[0]
        flops = float(estimate_tir_flops(tmod))
        known = db.has_workload(tmod)
        best = db.query_tuning_record(tmod, tgt, tk.task_name) if known else None
        n_rec = len(db.get_top_k(db.commit_workload(tmod), 1 << 30)) if known else 0
        row: dict[str, Any] = {"name": tk.task_name, "weight": int(tk.weight), "flops": flops, "valid_records": n_rec}
        if best is None or not best.run_secs:
            untuned.append(tk.task_name)
            row.update(best_us=None, gflops=None)
        else:
            us = float(np.mean([float(s) for s in best.run_secs])) * 1e6
            row.update(best_us=round(us, 3), gflops=round(flops / us / 1e3, 3) if us > 0 else None)
        rows.append(row)
    return rows, untuned


# ----------------------------------------------------------------------------------------------------------------
# tuning


def tune_tvm(
    bundle_path: str | os.PathLike,
    target: str | Mapping[str, Any] = "host",
    trials: int = 64,
    *,
    precision: str = "fp32",
    batch: int = 1,
    target_name: str | None = None,
    cc: str | None = None,
    rpc: str | tuple[str, int] | None = None,
    tracker: str | tuple[str, int] | None = None,
    key: str | None = None,
    emulated: bool = False,
    builder: str = "inproc",
    max_trials_per_task: int | None = None,
    number: int | None = None,
    repeat: int | None = None,
    min_repeat_ms: int | None = None,
    runner_timeout_s: float | None = None,
    seed: int = 0,
    population: int | None = None,
    keep_records: int = 32,
    log: Log | None = None,
) -> Artifact:
    """Tune a bundle's ONNX with MetaSchedule for a CPU target and add the tuned library to the bundle.

    Args:
        bundle_path: a bundle directory (the library and the tuning database are written into it).
        target: as for ``compile_tvm`` (``"host"``, ``"rpi4"``, ``"rpi5"``, a TVM tag or a target dict); it must
            have ``num-cores`` (the named targets do; the host's is this machine's core count).
        trials: total candidates to measure (0: rebuild from the stored database, measuring nothing).
        precision: ``"fp32"`` or ``"int8"`` (the QDQ model, run by TVM as float fake-quant).
        batch: the static batch the library is built and tuned for.
        target_name: the artifact's target name (default: see ``resolve_target``).
        cc: compiler that links the library and the candidates (default: system, or the cross compiler).
        rpc: ``"HOST:PORT"`` of a TVM RPC server on the device: candidates are measured there.
        tracker: ``"HOST:PORT"`` of a TVM RPC tracker (with ``key``): candidates go to a device of that key.
        key: the device key on the tracker (required with ``tracker``).
        emulated: the RPC device is an emulator (qemu): timings are recorded as meaningless, no winner.
        builder: ``"inproc"`` (default: build candidates in this process) or ``"pool"`` (worker processes).
        max_trials_per_task: per-task cap (default none: the gradient scheduler allocates, see Budget above).
        number, repeat, min_repeat_ms: how each candidate is timed (defaults: 3, 1, 40 ms on the host; 1, 1, 0
            on an emulated device).
        runner_timeout_s: per-candidate run timeout (default 60 s; 600 s on an emulated device).
        seed: search seed.
        population: the evolutionary search's population per round (default 512, MetaSchedule's own; 128 when
            a task gets fewer than 64 trials: sampling and evolving 512 schedules costs more than measuring a few).
        keep_records: stored records per workload (the fastest; failed candidates are not stored).
        log: callable taking one line (default: stderr).
    Returns:
        The ``tvm-lib`` Artifact (id ``tvm-lib-<precision>-<target>``) with ``extra["tuned"] = True`` and
        ``extra["tuning"]``: tasks (name, FLOPs, trials, best µs, GFLOP/s), untuned tasks, trials, minutes,
        builder, runner, database report name; plus parity, latencies and the winner.
    Raises:
        ConfigError: bad arguments, a target without ``num-cores``, a remote target without ``rpc``/``tracker``.
        TuningDatabaseMissingError: ``trials=0`` and no stored database for (target, model).
        BackendMissingError: TVM, xgboost, onnx or onnxruntime missing. CompilerMissingError: no (cross) compiler.
        BundleError: the bundle does not verify or lacks the ONNX of that precision.
        TvmBuildError: the tuned build disagrees with ONNX Runtime.
    """
    t_start = time.perf_counter()
    log = log or _tvm._stderr_log
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise ConfigError(f"trials must be an integer >= 0 (0 rebuilds from the stored database), got {trials!r}")
    if precision not in _tvm.PRECISIONS:
        raise ConfigError(f"precision must be one of {list(_tvm.PRECISIONS)} for TVM, got {precision!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be an integer >= 1, got {batch!r}")
    if builder not in BUILDERS:
        raise ConfigError(f"builder must be one of {list(BUILDERS)}, got {builder!r}")
    if max_trials_per_task is not None and (not isinstance(max_trials_per_task, int) or max_trials_per_task < 1):
        raise ConfigError(f"max_trials_per_task must be an integer >= 1, got {max_trials_per_task!r}")
    rpc_addr = None if rpc is None else parse_address(rpc, "--rpc")
    tracker_addr = None if tracker is None else parse_address(tracker, "--tracker")
    if rpc_addr and tracker_addr:
        raise ConfigError("pass either --rpc HOST:PORT (one server) or --tracker HOST:PORT --key K, not both")
    if tracker_addr and not key:
        raise ConfigError("--tracker needs --key: the device key the servers registered with")
    remote = rpc_addr is not None or tracker_addr is not None
    if emulated and not remote:
        raise ConfigError("emulated=True describes an RPC device; pass rpc= or tracker= as well")

    tvm = _tvm._import_tvm()
    name, spec, tgt = _tvm.resolve_target(target, target_name)
    if "num-cores" not in tgt.attrs or int(tgt.attrs["num-cores"]) < 1:
        raise ConfigError(
            f"target {spec!r} has no num-cores: MetaSchedule sizes its parallel loops by it; add it to the target "
            'dict, e.g. {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55", "num-cores": 4}'
        )
    cores = int(tgt.attrs["num-cores"])
    here = _tvm._norm_arch(platform.machine())
    arch = _tvm._target_arch(tgt)
    if arch != here and not remote:
        raise ConfigError(
            f"tuning for {name} ({arch}) measures every candidate on the device: pass rpc='HOST:PORT' "
            "(--rpc) of a TVM RPC server there, or tracker= and key= (--tracker, --key)"
        )
    compiler = _tvm._compiler_for(tgt, cc)
    if trials > 0 and importlib.util.find_spec("xgboost") is None:
        raise BackendMissingError(
            "MetaSchedule's cost model needs xgboost, which is not installed; pip install 'edgesep[tvm]' "
            "(it pulls xgboost-cpu)"
        )
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendMissingError(
            f"tune_tvm checks the build against ONNX Runtime ({e}); pip install 'edgesep[export]'"
        ) from e
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    bundle, src = _tvm.open_source(bundle_path, precision, batch, "tune")
    m = bundle.manifest
    dims = list(m.input.shape)
    db_name = tuning_db_name(name, src.sha256)
    stored = load_tuning_database(bundle, name, src.sha256)
    if trials == 0 and stored is None:
        raise TuningDatabaseMissingError(
            f"bundle {m.name!r} has no tuning database for target {name} and {src.file} (sha256 "
            f"{src.sha256[:16]}...; report {db_name}); tune first with trials > 0 (--tune-trials N)"
        )
    in_shape = [batch, *(int(d) for d in dims[1:])]
    n_classes = len(m.classes)
    out_shape = [batch, n_classes]
    where = "emulated device (timings meaningless)" if emulated else ("device over RPC" if remote else "this host")
    log(
        f"tuning {src.file} ({precision}) for {name} ({json.dumps(spec)}) at batch {batch}: "
        + (f"{trials} trials measured on {where}" if trials else f"rebuild from the stored database {db_name}")
        + f"; TVM {tvm.__version__}"
    )
    if not remote and "TVM_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(cores)  # before this process's TVM thread pool starts (timing below)

    t = time.perf_counter()
    mod = _tvm._import_onnx(bundle.path_of(src), m.input.name, in_shape)
    mod = _with_num_threads(_tvm._with_io_shapes(mod, in_shape, out_shape), cores)
    with tgt:
        mod = relax.get_pipeline("zero")(mod)
    tasks = ms.relax_integration.extract_tasks(mod, tgt)
    task_names = [tk.task_name for tk in tasks]
    log(f"  {len(tasks)} tasks: {', '.join(task_names)} ({time.perf_counter() - t:.1f} s)")

    tune_s = 0.0
    with tempfile.TemporaryDirectory(prefix="edgesep-tune-") as tmp:
        wd = Path(tmp)
        wl_path, rec_path = wd / "database_workload.json", wd / "database_tuning_record.json"
        _write_jsonl(wl_path, [] if stored is None else stored["workloads"])
        _write_jsonl(rec_path, [] if stored is None else stored["records"])
        db = ms.database.JSONDatabase(path_workload=str(wl_path), path_tuning_record=str(rec_path))
        n_before = len(db)
        n_tasks = max(len(tasks), 1)
        if max_trials_per_task:
            per_task, per_iter = max_trials_per_task, min(max_trials_per_task, _MAX_PER_ITER)
        else:  # gradient allocation: one warm-up round per task within half the budget, the rest where it pays
            per_task = max(trials, 1)
            per_iter = max(1, min(_MAX_PER_ITER, trials // (2 * n_tasks) if trials >= 2 * n_tasks else 1))
        if trials > 0 and tasks:
            t = time.perf_counter()
            _import_cpu_tensor_intrinsics()
            log(f"  CPU tensor intrinsics registered ({time.perf_counter() - t:.1f} s)")
            ev = {
                "number": number or (1 if emulated else 3),
                "repeat": repeat or 1,
                "min_repeat_ms": min_repeat_ms if min_repeat_ms is not None else (0 if emulated else 40),
            }
            runner = _make_runner(
                rpc=rpc_addr, tracker=tracker_addr, key=key, threads=cores,
                timeout=runner_timeout_s or (600.0 if emulated else 60.0), **ev,
            )  # fmt: skip
            bld = _make_builder(builder, compiler, workers=_tvm._HOST_CORES)
            pop = population or (512 if min(per_task, trials / n_tasks) >= _MAX_PER_ITER else 128)
            strategy = ms.search_strategy.EvolutionarySearch(population_size=pop)
            with _isolated_ms_logging():  # MetaSchedule's loggers, configured and undone here
                ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                    tasks, str(wd), strategy=strategy, num_threads=_tvm._HOST_CORES, seed=seed
                )
                callbacks = [*ms.measure_callback.MeasureCallback.create("default"),
                             _progress_callback(log, task_names)]  # fmt: skip
                log(
                    f"  searching: {trials} trials, "
                    + (f"at most {per_task} per task" if max_trials_per_task else "allocated by the gradient scheduler")
                    + f", {per_iter} per round; builder {builder}, runner {'RPC' if remote else 'local'} ({ev})"
                )
                t = time.perf_counter()
                with _tvm._keep_affinity(), _quiet_tvm_logging():
                    ms.tune_tasks(
                        tasks=ctxs, task_weights=weights, work_dir=str(wd), max_trials_global=trials,
                        max_trials_per_task=per_task, num_trials_per_iter=per_iter, builder=bld,
                        runner=runner, database=db, cost_model="xgb", measure_callbacks=callbacks,
                    )  # fmt: skip
                tune_s = time.perf_counter() - t
            with contextlib.suppress(Exception):
                runner.pool.shutdown()  # its worker processes; the builder's die with each batch
        workloads, records = _jsonl(wl_path), _jsonl(rec_path)

        task_rows, untuned = _task_table(db, tasks, tgt)
        if untuned:
            log(
                f"  WARNING: {len(untuned)} of {len(tasks)} tasks have no tuning record and stay unscheduled "
                f"(serial loop nests): {', '.join(untuned)}; give more trials (at least one per task)"
            )

        t = time.perf_counter()
        with tgt, db:
            mod_t = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        with _tvm._keep_affinity():
            ex = tvm.compile(mod_t, target=tgt)
        build_s = time.perf_counter() - t
        n_new = len(db) - n_before

    # parity (and the host timing) against ONNX Runtime on the same file
    x_par, par_source = _tvm._parity_inputs(bundle, _tvm.PARITY_N)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(bundle.path_of(src)), so, providers=["CPUExecutionProvider"])
    ref = np.concatenate([sess.run(None, {m.input.name: c})[0][:n] for c, n in _tvm._chunks(x_par, batch)])
    x_time = _tvm._chunks(x_par, batch)[0][0]
    with tempfile.TemporaryDirectory(prefix="edgesep-tvm-") as tmp:
        lib = _tvm._export_library(ex, Path(tmp), name, precision, compiler)
        file = lib.name
        latency: dict[str, Any]
        if remote:
            session = _connect(rpc_addr, tracker_addr, key, 600.0 if emulated else 120.0)
            n_par = min(len(x_par), 16 * batch if emulated else len(x_par))  # qemu: about 35x slower
            got, dev_ms = _run_remote(lib, session, x_par[:n_par], in_shape, n_classes,
                                      number=1 if emulated else 10, repeat=3)  # fmt: skip
            ref_used = ref[:n_par]
            latency = {
                "tvm_on_device_ms": float(np.median(dev_ms)),
                "results_ms": dev_ms,
                "method": "time_evaluator on the device over RPC (no network in the numbers)",
                "onnxruntime": None,
                "note": "ONNX Runtime cannot run over TVM RPC: measure it on the device (edgesep bench there)",
            }
            if emulated:
                latency["meaningless"] = "emulated device (qemu-user, ~35x slower than hardware, shared host CPU)"
        else:
            with _tvm._keep_affinity():
                vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
                runner_local = _tvm._VmRunner(vm, in_shape, n_classes, tvm.cpu())
                got = runner_local(x_par)
                lat = _tvm._interleaved_median_ms(
                    {
                        "tvm": lambda: runner_local.one(x_time),
                        "onnxruntime": lambda: sess.run(None, {m.input.name: x_time})[0],
                    }
                )
            ref_used = ref
            latency = {
                "tvm": lat["tvm"],
                "onnxruntime": lat["onnxruntime"],
                "batch": batch,
                "measured_on": platform.machine(),
                "method": "median wall time per call, numpy in -> numpy out, interleaved rounds",
                "tvm_threads": _tvm._tvm_threads(tvm),
                "onnxruntime_threads": "default (intra_op_num_threads=0)",
            }
        par = _tvm._parity(ref_used, got, precision)
        if not par["ok"]:
            raise _tvm.TvmBuildError(
                f"the tuned build of {src.file} for {name} disagrees with ONNX Runtime: max rel error "
                f"{par['max_rel_err']:.2e}, top-1 agreement {100 * par['top1_agreement']:.2f}% (gate: {par['gate']}); "
                "report the model (a schedule changed the numerics)"
            )
        minutes = (time.perf_counter() - t_start) / 60
        history = [] if stored is None else list(stored.get("history", []))
        history.append({
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "trials": trials,
            "batch": batch, "precision": precision, "search_minutes": round(tune_s / 60, 3), "builder": builder,
            "runner": "rpc" if remote else "local", "emulated": emulated, "new_records": n_new,
        })  # fmt: skip
        db_obj = {
            "schema": DB_SCHEMA,
            "target_name": name,
            "target": spec,
            "target_str": str(tgt),
            "model_file": src.file,
            "model_sha256": src.sha256,
            "tvm_version": str(tvm.__version__),
            "format": "MetaSchedule JSONDatabase: one entry per line of database_workload.json / "
            "database_tuning_record.json (records point to workloads by index)",
            "workloads": workloads,
            "records": _best_records(records, keep_records) if trials > 0 else records,
            "history": history,
        }
        # records point into the workload list by index: keep the list whole, prune records only
        db_ref = bundle.add_report(db_name, db_obj)
        tuning = {
            "trials": trials,
            "allocation": "per-task cap" if max_trials_per_task else "gradient",
            "trials_per_task_max": per_task if max_trials_per_task else None,
            "trials_per_round": per_iter,
            "search_s": round(tune_s, 2),
            "new_records": n_new,
            "tasks": task_rows,
            "untuned_tasks": untuned,
            "builder": builder,
            "runner": ("rpc-tracker" if tracker_addr else "rpc") if remote else "local",
            "emulated": emulated,
            "database": {
                "report": db_name,
                "file": db_ref.file,
                "sha256": db_ref.sha256,
                "records": len(db_obj["records"]),
                "workloads": len(workloads),
            },
            "num_cores": cores,
            "rebuilt_from_database": trials == 0,
        }
        extra: dict[str, Any] = {
            "tvm_version": str(tvm.__version__),
            "target": spec,
            "target_str": str(tgt),
            "arch": _tvm.elf_machine(lib) or arch,
            "cc": compiler or "system default",
            "batch": batch,
            "input_name": m.input.name,
            "input_shape": in_shape,
            "output_shape": out_shape,
            "pipeline": "metaschedule",
            "opt": "tuned",
            "scheduled": not untuned,
            "tuned": True,
            "tuning": tuning,
            "num_threads": cores,
            "source_artifact": {"id": src.id, "file": src.file, "sha256": src.sha256},
            "parity": {**par, "vs": f"onnxruntime {ort.__version__} on {src.file}", "inputs": par_source},
            ("host_latency_ms" if not remote else "device_latency_ms"): latency,
            "build_s": round(build_s, 3),
            "minutes": round(minutes, 3),
        }
        if not remote:
            tvm_wins = latency["tvm"] * PREFER_MARGIN <= latency["onnxruntime"]
            extra["default_runtime"] = "tvm" if tvm_wins else "onnxruntime"
        art = bundle.add_artifact(lib, file, "tvm-lib", precision, target=name, extra=extra)

    if not remote and precision == "fp32":
        tvm_ms, ort_ms = latency["tvm"], latency["onnxruntime"]
        measured = {
            "tvm_ms": tvm_ms,
            "onnxruntime_ms": ort_ms,
            "batch": batch,
            "margin": PREFER_MARGIN,
            "tvm_artifact": art.id,
            "onnxruntime_artifact": src.id,
            "tvm_threads": latency["tvm_threads"],
        }
        if tvm_ms * PREFER_MARGIN <= ort_ms:
            winner, why = art.id, (
                f"tuned TVM {tvm_ms:.4f} ms vs ONNX Runtime {ort_ms:.4f} ms at batch {batch} on {name} "
                f"({ort_ms / tvm_ms:.2f}x faster, >= the {PREFER_MARGIN}x margin)"
            )
        else:
            winner, why = src.id, (
                f"ONNX Runtime {ort_ms:.4f} ms vs tuned TVM {tvm_ms:.4f} ms at batch {batch} on {name}"
                + (
                    f" (TVM {ort_ms / tvm_ms:.2f}x faster, under the {PREFER_MARGIN}x margin)"
                    if tvm_ms < ort_ms
                    else f" ({tvm_ms / ort_ms:.2f}x faster than TVM)"
                )
            )
        record_winner(bundle, name, winner, why, measured)
        art = bundle.artifact(id=art.id)
        log(f"  winner for {name}: {winner} ({why})")
    elif remote:
        d = latency["tvm_on_device_ms"]
        log(
            f"  tuned library on the device: {d:.4f} ms per batch of {batch}"
            + (" -- MEANINGLESS: emulated device (qemu), correctness only" if emulated else "")
            + "; no winner recorded (ONNX Runtime must be measured on the device)"
        )
    log(
        f"added {file} ({art.size:,} bytes, {extra['arch']}) to {bundle.root.name} in {minutes:.1f} min: "
        f"{len(tasks) - len(untuned)}/{len(tasks)} tasks tuned, parity max rel err {par['max_rel_err']:.1e}"
    )
    return art


@contextlib.contextmanager
def _isolated_ms_logging() -> Any:
    """MetaSchedule configures its loggers with ``logging.config.dictConfig``, listing the handlers already on the
    ``tvm.s_tir.meta_schedule`` logger by name; a handler someone else attached there (a name of None) makes that
    fail (``'NoneType' object has no attribute 'format'``), and its file handlers point into the tuning work dir,
    which is deleted afterwards. So: detach foreign handlers for the search, then close MetaSchedule's own (the
    global and per-task file handlers) and give the foreign ones back."""
    import logging

    name = "tvm.s_tir.meta_schedule"
    lg = logging.getLogger(name)
    foreign = [h for h in lg.handlers if not (h.get_name() or "").startswith(name)]
    for h in lg.handlers[:]:
        lg.removeHandler(h)
    try:
        yield
    finally:
        loggers = [lg] + [
            logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict) if n.startswith(name + ".logging.")
        ]
        for logger in loggers:
            for h in logger.handlers[:]:
                logger.removeHandler(h)
                with contextlib.suppress(Exception):
                    h.close()
        for h in foreign:
            lg.addHandler(h)


@contextlib.contextmanager
def _quiet_tvm_logging() -> Any:
    """MetaSchedule logs every round's task table at INFO; keep it in its work-dir files, not on the console."""
    import logging

    lg = logging.getLogger("tvm.s_tir.meta_schedule")
    old = lg.level
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(old)
