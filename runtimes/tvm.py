"""Apache TVM (0.27, Relax): compile a bundle's ONNX for a CPU target, run the library, locally or over RPC.

``compile_tvm`` imports the bundle's fp32 or int8 (QDQ) ONNX with the Relax frontend at a static batch, builds it
with a scheduling pipeline that needs no search, exports ``model.<target>.so`` (the aarch64 cross compiler for the
Raspberry Pi targets) and records it in the bundle as a ``tvm-lib`` artifact. ``TvmRuntime`` (backend ``"tvm"``)
runs such a library; ``run_rpc`` runs one on a ``tvm.rpc`` server with ``time_evaluator`` timings.

Choices (also in the README, "Compile (TVM)"):

- **Pipelines without search.** ``"unfused"`` is ``tvm.compile``'s own default (legalize every op to a TIR loop
  nest; no fusion), ``"fused"`` runs ``relax.get_pipeline("zero")`` first (legalize, fold constants, fuse
  elementwise ops into their producers), ``"dlight"`` is ``"fused"`` plus
  ``s_tir.dlight.ApplyDefaultSchedule(cpu.GEMV(), cpu.Reduction())`` (parallel, vectorized GEMV / reductions).
  None of them tiles a matmul or a convolution for the cache: every build is far slower than ONNX Runtime except on
  tiny Kronecker kernels, until tuned (``edgesep.runtimes.tvm_tune``). ``opt="default"`` builds all three for the
  host, checks each against ONNX Runtime, times each at the build's batch, and keeps the fastest correct one; the
  candidates' numbers go into the artifact's ``extra["pipeline_candidates"]``. Measured on this project's digits
  and MNIST MLP / Kronecker MLP / CNN (batch 1, x86, 2 cores; table in the README): ``"fused"`` won on every
  model (1.1-2x faster than ``"unfused"``) except a 1024-wide MLP, where ``"dlight"`` tied with it; ``"dlight"``
  was up to 2x slower on the CNNs and slower on the Kronecker MLPs.
- **Cross targets.** The choice for an ARM target is made on a host build of the same graph (a proxy: the library
  itself cannot run here); ``opt=`` overrides it. Its host numbers are labelled as such.
- **Static batch.** The library is built for one batch size (``batch``, default 1), recorded in ``extra`` and
  embedded in the library itself (a Relax function ``edgesep_io_shapes`` returning the input and output shapes
  as one int64 tensor ``[4, N, C, H, W, 2, N, classes]``),
  so ``TvmRuntime`` needs no side information. ``run`` splits a batch into chunks and zero-pads the last one.
- **Parity** before anything is written: the build's outputs vs ONNX Runtime on the same ONNX file, on up to
  ``PARITY_N`` images of the bundle's clean eval set. fp32: max relative error (max abs error / max abs output)
  <= 1e-4 and 100% top-1 agreement; int8: top-1 agreement >= 99% (ONNX Runtime runs int8 kernels, TVM runs the QDQ
  graph as float fake-quant). The numbers are in ``extra["parity"]``.
- **ONNX Runtime stays the default** wherever it is faster: ``extra["host_latency_ms"]`` holds both medians
  (numpy in, numpy out, the same batch) and ``extra["default_runtime"]`` names the faster one. For an int8 build
  the fp32 numbers are measured too (``tvm_fp32``, ``onnxruntime_fp32``), and ``extra["int8"]`` says which INT8 path
  is expected to win on the target: on ARM, ONNX Runtime's aarch64 int8 kernels (the bundle's ``model.int8.onnx``),
  to be confirmed by measuring on the device. Only a host fp32 build that beats ONNX Runtime by ``PREFER_MARGIN``
  (1.2x) is recorded as the winner ``extra["preferred_for"] = ["host"]``, which ``edgesep.runtimes.load`` then
  picks; the CLI says which runtime stays the default.

``TvmRuntime`` imports numpy and TVM only (lazily: ``BackendMissingError`` when TVM is absent). Compiling also needs
``onnx`` and ``onnxruntime`` (``edgesep[export]``). A TVM library is native code: loading one runs it. Load
libraries from verified bundles only, and never expose an RPC server beyond a trusted network: it executes
whatever it is sent.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edgesep.errors import (
    BackendMissingError,
    BundleContentError,
    BundleLookupError,
    ConfigError,
    EdgesepError,
    ShapeMismatchError,
    UnknownNameError,
)
from edgesep.runtimes._base import Runtime, register_backend

if TYPE_CHECKING:
    from edgesep.bundle import Artifact

__all__ = [
    "OPTS",
    "PARITY_N",
    "PIPELINES",
    "PREFER_MARGIN",
    "TARGETS",
    "CompilerMissingError",
    "TvmBuildError",
    "TvmRuntime",
    "compile_tvm",
    "elf_machine",
    "resolve_target",
    "run_rpc",
]

# the named targets; "host" is filled in at resolution time (this CPU's name and core count)
TARGETS: dict[str, dict[str, Any] | None] = {
    "host": None,
    "rpi4": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"], "num-cores": 4},
    "rpi5": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon"], "num-cores": 4},
}
PIPELINES: tuple[str, ...] = ("unfused", "fused", "dlight")
OPTS: tuple[str, ...] = ("default", *PIPELINES)
PRECISIONS: tuple[str, ...] = ("fp32", "int8")
PARITY_N = 256
FP32_RTOL = 1e-4
INT8_MIN_AGREEMENT = 0.99
PREFER_MARGIN = 1.2  # TVM must be this much faster than ONNX Runtime to become the recorded winner for "host"
IO_SHAPES_FN = "edgesep_io_shapes"  # a Relax function embedded in every library: its input and output shapes
_TIMING_SECONDS = 0.3  # per contender, split over rounds that interleave the contenders (shared, noisy CPUs)
_TIMING_ROUNDS = 3

# target arch -> (cross compiler, the Debian package that ships it)
_CROSS_COMPILERS: dict[str, tuple[str, str]] = {
    "aarch64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    "arm": ("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf"),
    "x86_64": ("x86_64-linux-gnu-gcc", "gcc-x86-64-linux-gnu"),
}
# ELF e_machine values (the ELF specification's registry)
_ELF_MACHINES: dict[int, str] = {3: "i386", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv"}

Log = Callable[[str], None]


class CompilerMissingError(BackendMissingError):
    """The C compiler (or cross compiler) that links a TVM library is not installed."""


class TvmBuildError(EdgesepError):
    """A TVM build that fails, or whose outputs disagree with ONNX Runtime beyond the tolerance."""


# ----------------------------------------------------------------------------------------------------------------
# TVM import and targets


def _import_tvm() -> Any:
    try:
        import tvm
        from tvm import relax  # noqa: F401  (fails on an install without Relax)
    except ImportError as e:
        raise BackendMissingError(
            f"the tvm backend needs Apache TVM (the apache-tvm wheel), which is not importable ({e}); "
            "pip install 'edgesep[tvm]'"
        ) from e
    return tvm


def _norm_arch(arch: str) -> str:
    arch = arch.lower()
    if arch in ("arm64", "aarch64"):
        return "aarch64"
    if arch.startswith(("arm", "thumb")):
        return "arm"
    if arch in ("amd64", "x86_64", "x86-64"):
        return "x86_64"
    return arch


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "target"


def resolve_target(target: str | Mapping[str, Any], name: str | None = None) -> tuple[str, dict[str, Any] | str, Any]:
    """Resolve a target to ``(name, spec, tvm.target.Target)``.

    Args:
        target: ``"host"`` (llvm for this CPU: its ``mcpu`` and ``num-cores``), ``"rpi4"`` (Cortex-A72),
            ``"rpi5"`` (Cortex-A76), a TVM tag (``"raspberry-pi/4b-aarch64"``; ``tvm.target.list_tags()``), a target
            dict (``{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}``) or that dict as JSON.
        name: the name the artifact gets (``model.<name>.so``, manifest ``target``); by default the target's own
            name, the tag with ``/`` replaced, or ``llvm-<arch>-<mcpu>`` for a dict.
    Returns:
        The name, the JSON-ready spec (dict, or the tag string) and the TVM Target.
    Raises:
        UnknownNameError: a string that is none of the above.
        ConfigError: a dict TVM refuses, or a target that is not an llvm (CPU) target.
        BackendMissingError: TVM is not installed.
    """
    tvm = _import_tvm()
    spec: dict[str, Any] | str
    if isinstance(target, str) and target.lstrip().startswith("{"):
        try:
            target = json.loads(target)
        except json.JSONDecodeError as e:
            raise ConfigError(f"target {target!r} starts with '{{' but is not JSON ({e})") from e
    if isinstance(target, Mapping):
        spec = json.loads(json.dumps(dict(target)))
        default_name = None
    elif target == "host":
        spec = {"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()), "num-cores": _HOST_CORES}
        default_name = "host"
    elif target in TARGETS:
        spec = dict(TARGETS[target] or {})
        default_name = target
    elif isinstance(target, str) and target in set(tvm.target.list_tags()):
        spec, default_name = target, _safe_name(target)
    else:
        raise UnknownNameError(
            "target",
            str(target),
            [*TARGETS, "any TVM tag (tvm.target.list_tags())", "a target dict as JSON"],
        )
    try:
        tgt = tvm.target.Target(spec)
    except Exception as e:
        raise ConfigError(
            f"TVM refuses target {spec!r} ({str(e).strip().splitlines()[0][:200]}); use a dict such as "
            "{'kind': 'llvm', 'mtriple': 'aarch64-linux-gnu', 'mcpu': 'cortex-a72'} or a tag"
        ) from e
    if tgt.kind.name != "llvm":
        raise ConfigError(f"target {spec!r} is a {tgt.kind.name} target; compile_tvm builds CPU (llvm) targets only")
    if default_name is None:
        triple = str(tgt.attrs.get("mtriple", "") or "")
        arch = _norm_arch(triple.split("-")[0]) if triple else _norm_arch(platform.machine())
        default_name = _safe_name(f"llvm-{arch}-{tgt.attrs.get('mcpu', '') or 'generic'}")
    name = default_name if name is None else name
    if _safe_name(name) != name:
        raise ConfigError(f"target name {name!r} must match [A-Za-z0-9_.-]+ (it becomes part of a file name)")
    return name, spec, tgt


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# taken at import, before TVM's thread pool can pin this thread to one core (it does when the pool starts)
_HOST_CORES = _cpu_count()


@contextlib.contextmanager
def _keep_affinity() -> Any:
    """Restore this thread's CPU affinity afterwards: starting TVM's thread pool pins the calling thread to core 0,
    which would also confine everything the caller runs later (and the threads it starts, e.g. ONNX Runtime's)."""
    try:
        saved = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        saved = None
    try:
        yield
    finally:
        if saved is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, saved)


def _tvm_threads(tvm: Any) -> int:
    """TVM's runtime thread count (starting the thread pool if needed) without leaving this thread pinned."""
    with _keep_affinity():
        return int(tvm.runtime.num_threads())


def _target_arch(tgt: Any) -> str:
    triple = str(tgt.attrs.get("mtriple", "") or "")
    return _norm_arch(triple.split("-")[0]) if triple else _norm_arch(platform.machine())


def _compiler_for(tgt: Any, cc: str | None) -> str | None:
    """The compiler that links the library: None (TVM's default) for this machine's arch, else a cross compiler.

    Raises:
        CompilerMissingError: naming the Debian package to install.
        ConfigError: an arch without a known cross compiler (pass ``cc``).
    """
    arch, here = _target_arch(tgt), _norm_arch(platform.machine())
    if cc is not None:
        if shutil.which(cc) is None:
            raise CompilerMissingError(f"compiler {cc!r} (cc=) is not on PATH; install it or pass another")
        return cc
    if arch == here:
        if not any(shutil.which(c) for c in ("g++", "gcc", "clang", "cc")):
            raise CompilerMissingError(
                "TVM links its libraries with the system C compiler and none is installed (g++, gcc, clang, cc); "
                "apt-get install gcc"
            )
        return None
    if arch not in _CROSS_COMPILERS:
        raise ConfigError(f"no known cross compiler for {arch} targets on this {here} machine; pass cc=")
    compiler, package = _CROSS_COMPILERS[arch]
    if shutil.which(compiler) is None:
        raise CompilerMissingError(
            f"cross-compiling for {arch} needs {compiler}, which is not installed: apt-get install {package} "
            f"(Debian/Ubuntu package {package})"
        )
    return compiler


def elf_machine(path: str | os.PathLike) -> str | None:
    """The architecture of an ELF file (``"x86_64"``, ``"aarch64"``, ...) from its header; None if not ELF."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "little" if head[5] == 1 else "big"
    code = int.from_bytes(head[18:20], order)
    return _ELF_MACHINES.get(code, f"e_machine={code}")


# ----------------------------------------------------------------------------------------------------------------
# building


def _import_onnx(model_path: Path, input_name: str, shape: list[int]) -> Any:
    """ONNX -> Relax IRModule at a static input shape, with the I/O shapes function added."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    model = onnx.load(str(model_path))
    out = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out):
        warnings.simplefilter("ignore")
        mod = from_onnx(model, shape_dict={input_name: shape}, dtype_dict={input_name: "float32"})
    return mod


def _with_io_shapes(mod: Any, in_shape: Sequence[int], out_shape: Sequence[int]) -> Any:
    """Add ``IO_SHAPES_FN``: a Relax function returning the int64 tensor ``[rank_in, *in_shape, rank_out,
    *out_shape]``. A tensor, not a tuple of shapes: a tensor also comes back through RPC (``.numpy()``)."""
    from tvm import relax

    code = np.array([len(in_shape), *in_shape, len(out_shape), *out_shape], dtype=np.int64)
    bb = relax.BlockBuilder()
    with bb.function(IO_SHAPES_FN, []):
        bb.emit_func_output(relax.const(code))
    mod[IO_SHAPES_FN] = bb.get()[IO_SHAPES_FN]
    return mod


def _export_library(ex: Any, folder: Path, name: str, precision: str, compiler: str | None) -> Path:
    """Link a built executable into ``folder/model.<name>[.<precision>].so`` (the bundle's file name for it).

    Raises:
        TvmBuildError: the compiler / linker failed.
    """
    file = f"model.{name}.so" if precision == "fp32" else f"model.{name}.{precision}.so"
    lib = folder / file
    try:
        ex.export_library(str(lib), **({} if compiler is None else {"cc": compiler}))
    except Exception as e:
        raise TvmBuildError(f"linking {file} with {compiler or 'the system compiler'} failed: {e}") from e
    return lib


def _build(mod: Any, tgt: Any, pipeline: str) -> Any:
    """``tvm.compile`` with one of ``PIPELINES``; returns the VM executable."""
    import tvm
    from tvm import relax

    if pipeline not in PIPELINES:
        raise ConfigError(f"unknown pipeline {pipeline!r}; one of {list(PIPELINES)}")
    if pipeline != "unfused":
        with tgt:
            mod = relax.get_pipeline("zero")(mod)
            if pipeline == "dlight":
                from tvm.s_tir import dlight as dl

                mod = dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())(mod)
    return tvm.compile(mod, target=tgt)


def _chunks(x: np.ndarray, batch: int) -> list[tuple[np.ndarray, int]]:
    """Split (N, ...) into static-batch chunks, zero-padding the last; returns (chunk, valid rows) pairs."""
    out = []
    for i in range(0, x.shape[0], batch):
        c = x[i : i + batch]
        n = c.shape[0]
        if n < batch:
            c = np.concatenate([c, np.zeros((batch - n, *x.shape[1:]), x.dtype)])
        out.append((np.ascontiguousarray(c), n))
    return out


def _vm_output(out: Any) -> Any:
    """The first output of a VM call (a tensor, or the first of a tuple)."""
    return out if hasattr(out, "numpy") else out[0]


class _VmRunner:
    """Calls a VM's ``main`` on numpy batches of any size: static-batch chunks copied into one preallocated input
    tensor (allocating a tensor per call costs more than a small model's whole forward pass), outputs copied out."""

    def __init__(self, vm: Any, in_shape: Sequence[int], n_classes: int, dev: Any):
        import tvm

        self._f = vm["main"]
        self.in_shape, self.n_classes = list(in_shape), n_classes
        self._buf = tvm.runtime.empty(tuple(self.in_shape), "float32", dev)

    def one(self, chunk: np.ndarray) -> np.ndarray:
        """One static-shape batch in, its logits out."""
        self._buf.copyfrom(chunk)
        return _vm_output(self._f(self._buf)).numpy()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 0:
            return np.zeros((0, self.n_classes), np.float32)
        parts = [self.one(chunk)[:n] for chunk, n in _chunks(x, self.in_shape[0])]
        return np.concatenate(parts).astype(np.float32, copy=False)


def _parity(ref: np.ndarray, got: np.ndarray, precision: str) -> dict[str, Any]:
    """Max abs / relative error and top-1 agreement of ``got`` vs ``ref``, and whether it passes the gate."""
    err = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 1.0
    rel = err / max(scale, 1e-12)
    agree = float(np.mean(got.argmax(1) == ref.argmax(1))) if ref.size else 1.0
    ok = (rel <= FP32_RTOL and agree == 1.0) if precision == "fp32" else agree >= INT8_MIN_AGREEMENT
    return {
        "n": int(ref.shape[0]),
        "max_abs_err": err,
        "max_rel_err": rel,
        "top1_agreement": agree,
        "ok": bool(ok),
        "gate": "max_rel_err <= 1e-4 and top-1 agreement 100%" if precision == "fp32" else "top-1 agreement >= 99%",
    }


def _interleaved_median_ms(fns: Mapping[str, Callable[[], Any]]) -> dict[str, float]:
    """Median latency (ms) of each callable, measured in interleaved rounds so that load spikes hit all alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # warm up: first-call allocations, page faults
        for _ in range(3):
            f()
    per_round = _TIMING_SECONDS / _TIMING_ROUNDS
    for _ in range(_TIMING_ROUNDS):
        for k, f in fns.items():
            end = time.perf_counter() + per_round
            n = 0
            while n < 5 or (time.perf_counter() < end and n < 2000):
                t = time.perf_counter()
                f()
                samples[k].append(time.perf_counter() - t)
                n += 1
    return {k: round(float(np.median(v)) * 1e3, 5) for k, v in samples.items()}


def _stderr_log(line: str) -> None:
    print(line, file=sys.stderr)


def _parity_inputs(bundle: Any, n: int) -> tuple[np.ndarray, str]:
    """Up to ``n`` images of the first clean eval set (else the reference inputs), and where they came from."""
    for e in bundle.manifest.eval_sets:
        if e.kind == "clean":
            x, _ = bundle.load_eval_set(e.id)
            return np.ascontiguousarray(x[:n]), f"eval set {e.id!r}"
    if bundle.manifest.reference is not None:
        x, _ = bundle.load_reference()
        return np.ascontiguousarray(x[:n]), "reference inputs"
    shape = [int(d) for d in bundle.manifest.input.shape[1:]]
    rng = np.random.default_rng(0)
    return rng.random((min(n, 64), *shape), dtype=np.float32), "uniform random images (the bundle has no eval set)"


def open_source(bundle_path: str | os.PathLike, precision: str, batch: int, action: str) -> tuple[Any, Artifact]:
    """Open a bundle for writing a TVM library into it and find the ONNX artifact it is built from.

    ``action`` names the step in messages ("compile", "tune"). Raises BundleError (the bundle does not verify or is
    a tar), BundleLookupError (no ONNX artifact of that precision: says how to add one), ConfigError (the ONNX has a
    static batch other than ``batch``).
    """
    from edgesep.bundle import open_bundle_for_writing

    bundle = open_bundle_for_writing(bundle_path, action, deep_onnx=True)
    try:
        src = bundle.artifact(kind="onnx", precision=precision)
    except BundleLookupError as e:
        hint = "; add it with `edgesep quantize`" if precision == "int8" else ""
        raise BundleLookupError(f"{e}{hint}") from e
    m = bundle.manifest
    dims = list(m.input.shape)
    if isinstance(dims[0], int) and dims[0] != batch:
        raise ConfigError(
            f"bundle {m.name!r} was exported with a static batch of {dims[0]}; {action} with batch={dims[0]} or "
            "re-export with a symbolic batch"
        )
    return bundle, src


def compile_tvm(
    bundle_path: str | os.PathLike,
    *,
    target: str | Mapping[str, Any] = "host",
    precision: str = "fp32",
    batch: int = 1,
    opt: str = "default",
    target_name: str | None = None,
    cc: str | None = None,
    log: Log | None = None,
) -> Artifact:
    """Compile a bundle's ONNX artifact with TVM for a CPU target and add the library to the bundle.

    Args:
        bundle_path: a bundle directory (not a tar: the library is written into it).
        target: ``"host"``, ``"rpi4"``, ``"rpi5"``, a TVM tag or a target dict; see ``resolve_target``.
        precision: ``"fp32"`` (``model.onnx``) or ``"int8"`` (the QDQ ``model.int8.onnx``, run as float
            fake-quant by TVM).
        batch: the static batch the library is built for.
        opt: ``"default"`` (build every pipeline of ``PIPELINES`` for the host, keep the fastest that passes
            parity) or one pipeline by name.
        target_name: the artifact's target name (default: see ``resolve_target``).
        cc: the compiler that links the library (default: the system compiler for this machine's arch, the
            matching cross compiler, e.g. ``aarch64-linux-gnu-gcc``, for another).
        log: callable taking one line of text (default: print to stderr).
    Returns:
        The recorded Artifact: kind ``tvm-lib``, file ``model.<target>.so`` (``model.<target>.int8.so`` for int8),
        id ``tvm-lib-<precision>-<target>`` (an earlier one is replaced), and ``extra`` with tvm_version, target,
        batch, pipeline, input_shape, parity, host_latency_ms, default_runtime and more.
    Raises:
        UnknownNameError: an unknown target. ConfigError: a bad precision, batch, opt or target.
        CompilerMissingError: the (cross) compiler is not installed (the message names the Debian package).
        BackendMissingError: TVM, onnx or onnxruntime is not installed.
        BundleError: the bundle does not verify, is a tar, or lacks an ONNX artifact of that precision.
        TvmBuildError: no pipeline builds, or none matches ONNX Runtime.
    """
    t_start = time.perf_counter()
    log = log or _stderr_log
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {list(PRECISIONS)} for TVM, got {precision!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be an integer >= 1, got {batch!r}")
    if opt not in OPTS:
        raise ConfigError(f"opt must be one of {list(OPTS)}, got {opt!r}")
    tvm = _import_tvm()
    name, spec, tgt = resolve_target(target, target_name)
    compiler = _compiler_for(tgt, cc)  # before any work: a missing cross compiler fails in a second
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
    except ImportError as e:
        raise BackendMissingError(
            f"compile_tvm imports ONNX and checks the build against ONNX Runtime ({e}); pip install 'edgesep[export]'"
        ) from e

    bundle, src = open_source(bundle_path, precision, batch, "compile")
    m = bundle.manifest
    dims = list(m.input.shape)
    in_shape = [batch, *(int(d) for d in dims[1:])]
    n_classes = len(m.classes)
    out_shape = [batch, n_classes]
    here = _norm_arch(platform.machine())
    native = _target_arch(tgt) == here and name == "host"
    host_tgt = tgt if native else resolve_target("host")[2]
    log(
        f"compiling {src.file} ({precision}) for {name} ({json.dumps(spec)}) at batch {batch}; TVM {tvm.__version__}"
        + ("" if native else "; pipeline choice, parity and latency on a host build of the same graph")
    )

    t = time.perf_counter()
    mod = _with_io_shapes(_import_onnx(bundle.path_of(src), m.input.name, in_shape), in_shape, out_shape)
    import_s = time.perf_counter() - t

    x_par, par_source = _parity_inputs(bundle, PARITY_N)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(bundle.path_of(src)), so, providers=["CPUExecutionProvider"])
    ref = np.concatenate([sess.run(None, {m.input.name: c})[0][:n] for c, n in _chunks(x_par, batch)])

    from tvm import relax

    dev = tvm.cpu()
    x_time = _chunks(x_par, batch)[0][0]
    candidates = list(PIPELINES) if opt == "default" else [opt]
    results: dict[str, dict[str, Any]] = {}
    built: dict[str, Any] = {}
    for p in candidates:
        t = time.perf_counter()
        try:
            with _keep_affinity():  # a parallel loop (dlight) starts TVM's thread pool, which pins this thread
                ex = _build(mod, host_tgt, p)
                runner = _VmRunner(relax.VirtualMachine(ex, dev), in_shape, n_classes, dev)
                got = runner(x_par)
        except Exception as e:  # a pipeline that cannot build this graph is skipped, with the reason
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            results[p] = {"ok": False, "error": f"{type(e).__name__}: {first}"}
            log(f"  pipeline {p}: build failed ({results[p]['error']})")
            continue
        par = _parity(ref, got, precision)
        results[p] = {"ok": par["ok"], "build_s": round(time.perf_counter() - t, 3), "parity": par}
        if par["ok"]:
            built[p] = (ex, runner)
        else:
            log(f"  pipeline {p}: outputs differ from ONNX Runtime ({par['max_rel_err']:.2e} rel, "
                f"{100 * par['top1_agreement']:.2f}% top-1); not used")  # fmt: skip
    if not built:
        raise TvmBuildError(
            f"no TVM pipeline of {candidates} produced a correct build of {src.file}: "
            + "; ".join(f"{p}: {r.get('error') or r['parity']}" for p, r in results.items())
            + ". Try another --opt, or report the model (an op is lowered incorrectly)"
        )

    def _tvm_call(runner: _VmRunner) -> Callable[[], Any]:
        return lambda: runner.one(x_time)

    def _ort_call(s: Any) -> Callable[[], Any]:
        return lambda: s.run(None, {m.input.name: x_time})[0]

    if len(built) > 1:
        log(f"  timing {len(built)} pipelines at batch {batch} (interleaved, {_TIMING_SECONDS:.1f} s each)")
        with _keep_affinity():
            lat = _interleaved_median_ms({p: _tvm_call(r) for p, (_, r) in built.items()})
        for p in built:
            results[p]["latency_ms"] = lat[p]
        chosen = min(built, key=lambda p: lat[p])
    else:
        chosen = next(iter(built))

    # the reported numbers: the chosen build vs ONNX Runtime on the same file, interleaved
    contenders: dict[str, Callable[[], Any]] = {"tvm": _tvm_call(built[chosen][1]), "onnxruntime": _ort_call(sess)}
    if precision == "int8":  # TVM runs QDQ as float fake-quant: compare with the fp32 graph on both runtimes
        fp32_art = bundle.artifact(kind="onnx", precision="fp32")
        fp32_path = bundle.path_of(fp32_art)
        fp32_mod = _with_io_shapes(_import_onnx(fp32_path, m.input.name, in_shape), in_shape, out_shape)
        with _keep_affinity():
            runner32 = _VmRunner(
                relax.VirtualMachine(_build(fp32_mod, host_tgt, chosen), dev), in_shape, n_classes, dev
            )
            runner32.one(x_time)
        contenders["tvm_fp32"] = _tvm_call(runner32)
        fp32_sess = ort.InferenceSession(str(fp32_path), so, providers=["CPUExecutionProvider"])
        contenders["onnxruntime_fp32"] = _ort_call(fp32_sess)
    with _keep_affinity():
        lat = _interleaved_median_ms(contenders)
    results[chosen].setdefault("latency_ms", lat["tvm"])
    for p, r in results.items():
        state = "build failed" if "error" in r else f"{r['latency_ms']:.4f} ms" if r["ok"] else "wrong outputs"
        log(f"  pipeline {p}: {state}" + ("  <- chosen" if p == chosen else ""))

    t = time.perf_counter()
    ex = built[chosen][0] if native else _build(mod, tgt, chosen)
    with tempfile.TemporaryDirectory(prefix="edgesep-tvm-") as tmp:
        lib = _export_library(ex, Path(tmp), name, precision, compiler)
        file = lib.name
        target_build_s = time.perf_counter() - t
        elf = elf_machine(lib)

        tvm_ms, ort_ms = lat["tvm"], lat["onnxruntime"]
        default_runtime = "onnxruntime" if ort_ms <= tvm_ms else "tvm"
        host_lat: dict[str, Any] = {
            "tvm": tvm_ms,
            "onnxruntime": ort_ms,
            "batch": batch,
            "measured_on": platform.machine()
            + ("" if native else f" (a host build with the same pipeline; the {name} library cannot run here)"),
            "method": "median wall time per call, numpy in -> numpy out, interleaved rounds",
            "tvm_threads": _tvm_threads(tvm),
            "onnxruntime_threads": "default (intra_op_num_threads=0)",
        }
        if precision == "int8":
            host_lat["tvm_fp32"] = lat["tvm_fp32"]
            host_lat["onnxruntime_fp32"] = lat["onnxruntime_fp32"]
        extra: dict[str, Any] = {
            "tvm_version": str(tvm.__version__),
            "target": spec,
            "target_str": str(tgt),
            "arch": elf or _target_arch(tgt),
            "cc": compiler or "system default",
            "batch": batch,
            "input_name": m.input.name,
            "input_shape": in_shape,
            "output_shape": out_shape,
            "pipeline": chosen,
            "opt": opt,
            "pipeline_candidates": results,
            "scheduled": chosen == "dlight",
            "tuned": False,
            "source_artifact": {"id": src.id, "file": src.file, "sha256": src.sha256},
            "parity": {
                **results[chosen]["parity"],
                "vs": f"onnxruntime {ort.__version__} on {src.file}",
                "inputs": par_source,
            },
            "host_latency_ms": host_lat,
            "default_runtime": default_runtime,
            "build_s": round(import_s + target_build_s + sum(r.get("build_s", 0.0) for r in results.values()), 3),
        }
        if precision == "int8":
            extra["int8"] = _int8_note(bundle, name, _target_arch(tgt), native, host_lat)
        if native and precision == "fp32" and tvm_ms * PREFER_MARGIN <= ort_ms:
            # the recorded winner that edgesep.runtimes.load picks for this machine (PREFERRED_KEY); only fp32,
            # only with a clear margin on a build measured where it runs: int8 must never become a silent default
            from edgesep.runtimes._load import PREFERRED_KEY

            extra[PREFERRED_KEY] = ["host"]
        art = bundle.add_artifact(lib, file, "tvm-lib", precision, target=name, extra=extra)
    log(
        f"added {file} ({art.size:,} bytes, {extra['arch']}) to {bundle.root.name} in "
        f"{time.perf_counter() - t_start:.1f} s: pipeline {chosen}, host latency TVM {tvm_ms:.4f} ms vs "
        f"ONNX Runtime {ort_ms:.4f} ms at batch {batch}"
    )
    return art


def _int8_note(bundle: Any, name: str, arch: str, native: bool, host_lat: Mapping[str, Any]) -> dict[str, Any]:
    """Which INT8 path is expected to win on the target, and what was measured."""
    ort_int8 = bundle.artifact(kind="onnx", precision="int8")
    note: dict[str, Any] = {
        "tvm_executes": "float fake-quant: TVM 0.27's Relax frontend lowers QuantizeLinear/DequantizeLinear to float "
        "ops, so the int8 library computes in float32 (no int8 kernels)",
        "alternative": {"artifact": ort_int8.id, "file": ort_int8.file, "runtime": "onnxruntime"},
    }
    if native:
        faster = "onnxruntime" if host_lat["onnxruntime"] <= host_lat["tvm"] else "tvm"
        runs = {"tvm int8": "tvm", "onnxruntime int8": "onnxruntime", "tvm fp32": "tvm_fp32",
                "onnxruntime fp32": "onnxruntime_fp32"}  # fmt: skip
        timed = {k: host_lat[v] for k, v in runs.items() if host_lat.get(v) is not None}
        note.update(winner_measured=faster, measured_here=True, fastest_overall=min(timed, key=timed.__getitem__))
    else:
        note.update(
            expected_winner="onnxruntime",
            reason=f"ONNX Runtime has {arch} int8 kernels (QLinear/QDQ fused MatMul and Conv on NEON, and sdot where "
            f"the CPU has it) for {ort_int8.file}; TVM runs the same graph in float and, untuned, unscheduled",
            measured_here=False,
            must_measure_on_device=f"measure both on the {name} device before choosing (the host cannot run them)",
        )
    return note


# ----------------------------------------------------------------------------------------------------------------
# running


def _io_shapes(vm: Any) -> tuple[list[int], list[int]] | None:
    """The (input, output) shapes embedded by ``compile_tvm``; None for a library without them."""
    try:
        f = vm[IO_SHAPES_FN]
    except Exception:  # a library built elsewhere
        return None
    out = f()
    if not hasattr(out, "numpy"):  # an older layout of the function: treat as absent
        return None
    code = [int(v) for v in out.numpy()]
    n_in = code[0]
    return code[1 : 1 + n_in], code[2 + n_in : 2 + n_in + code[1 + n_in]]


def _embedded_threads(vm: Any) -> int | None:
    """The thread count a tuned library was scheduled for (its ``edgesep_num_threads``); None if it has none."""
    try:
        f = vm["edgesep_num_threads"]
    except Exception:  # an untuned library, or one built elsewhere
        return None
    out = f()
    return int(out.numpy()[0]) if hasattr(out, "numpy") else None


def _check_batch(x: Any, in_shape: Sequence[int]) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.float32:
        if not np.issubdtype(x.dtype, np.floating):
            raise ConfigError(f"input must be float32 pixels in [0, 1], got dtype {x.dtype}")
        x = x.astype(np.float32)
    if x.ndim != len(in_shape) or tuple(x.shape[1:]) != tuple(in_shape[1:]):
        raise ShapeMismatchError(f"input has shape {x.shape}; expected (N, {', '.join(map(str, in_shape[1:]))})")
    return np.ascontiguousarray(x)


@register_backend
class TvmRuntime(Runtime):
    """A TVM library (``model.<target>.so``, artifact kind ``tvm-lib``) on this machine's CPU, through the Relax VM.

    Args:
        path: the library, already hash-verified by the caller when it comes from a bundle (it is native code).
        precision: the artifact's precision (informational: the library computes in float32).
        target: the artifact's target name.
        threads: TVM runtime threads (``TVM_NUM_THREADS``; takes effect only before TVM's thread pool starts in
            this process). ``info()`` reports the count in use.
        input_name: the graph's input name (informational: the VM takes positional inputs).
        input_shape: the static input shape, for a library without the embedded ``edgesep_io_shapes``.
    Raises:
        BackendMissingError: TVM is not installed.
        BundleContentError: the file is not a library for this machine's architecture, or cannot be loaded.
    """

    name: ClassVar[str] = "tvm"

    @classmethod
    def available(cls) -> bool:
        try:
            return importlib.util.find_spec("tvm") is not None
        except (ImportError, ValueError):
            return False

    @classmethod
    def version(cls) -> str | None:
        for dist in ("apache-tvm", "tvm"):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                return importlib.metadata.version(dist)
        return None

    def __init__(
        self,
        path: str | Path,
        *,
        precision: str,
        target: str = "any",
        threads: int | None = None,
        input_name: str = "input",
        input_shape: Sequence[int] | None = None,
        **options: Any,
    ):
        if threads is not None:
            os.environ.setdefault("TVM_NUM_THREADS", str(int(threads)))
        tvm = _import_tvm()
        from tvm import relax

        self.path = Path(path)
        self.precision, self.target, self.input_name = precision, target, input_name
        self.threads_requested = threads
        arch = elf_machine(self.path) if self.path.is_file() else None
        here = _norm_arch(platform.machine())
        if arch is not None and arch != here:
            raise BundleContentError(
                f"{self.path.name} is a library for {arch}; this machine is {here}. Run it on the {arch} device, or "
                "through a TVM RPC server there (edgesep.runtimes.tvm.run_rpc)"
            )
        try:
            self._lib = tvm.runtime.load_module(str(self.path))
            self._dev = tvm.cpu()
            self._vm = relax.VirtualMachine(self._lib, self._dev)
        except Exception as e:
            raise BundleContentError(f"{self.path}: not a loadable TVM Relax library ({type(e).__name__}: {e})") from e
        # a tuned library carries its target's num-cores (edgesep.runtimes.tvm_tune): start TVM's thread pool with
        # that many threads (its own x86 default is half the logical cores) unless the caller or the environment
        # chose; effective only if the pool has not started yet in this process (info() reports what runs)
        self.threads_from_library = _embedded_threads(self._vm)
        if threads is None and self.threads_from_library and "TVM_NUM_THREADS" not in os.environ:
            os.environ["TVM_NUM_THREADS"] = str(self.threads_from_library)
        shapes = _io_shapes(self._vm)
        if shapes is None:
            if input_shape is None:
                raise ConfigError(
                    f"{self.path.name} carries no {IO_SHAPES_FN} (not built by edgesep.runtimes.tvm.compile_tvm); "
                    "pass input_shape=[batch, C, H, W]"
                )
            self.input_shape, self.output_shape = [int(d) for d in input_shape], None
        else:
            self.input_shape, self.output_shape = shapes
        self.batch = self.input_shape[0]
        self._tvm = tvm
        self._runner = _VmRunner(
            self._vm, self.input_shape, self.output_shape[-1] if self.output_shape else 0, self._dev
        )
        self._lock = threading.Lock()  # one preallocated input tensor: one call at a time

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, classes) float32; any N (chunks of the library's static batch, the last zero-padded)."""
        x = _check_batch(x, self.input_shape)
        with self._lock:
            return self._runner(x)

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "version": self.version(),
            "precision": self.precision,
            "target": self.target,
            "threads": _tvm_threads(self._tvm),
            "threads_requested": self.threads_requested,
            "threads_from_library": self.threads_from_library,
            "batch": self.batch,
            "input_shape": list(self.input_shape),
            "output_shape": None if self.output_shape is None else list(self.output_shape),
            "library": str(self.path),
            "arch": _norm_arch(platform.machine()),
        }

    def close(self) -> None:
        self._runner = self._vm = self._lib = None


def run_rpc(
    lib_path: str | os.PathLike,
    host: str,
    port: int,
    x: np.ndarray,
    *,
    number: int = 10,
    repeat: int = 3,
    key: str = "",
    session_timeout: float = 60.0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Run a TVM library on a ``tvm.rpc`` server: upload, load, run ``x``, and time ``main`` on the device.

    The server (``python -m tvm.exec.rpc_server --host ADDR --port PORT`` on the device) executes whatever it is
    sent: run it on a trusted network only, bound to the interface you mean.

    Args:
        lib_path: a library built for the server's architecture (e.g. ``model.rpi4.so``).
        host, port: the server's address.
        x: float32 images (N, C, H, W); any N (static-batch chunks, the last zero-padded).
        number, repeat: ``time_evaluator`` settings: each of ``repeat`` measurements averages ``number`` calls of
            ``main`` on one batch, timed on the device (no network in the numbers).
        key: the server's key, if it was started with one.
        session_timeout: seconds the RPC session may stay open.
    Returns:
        ``(logits, timings)``: logits (N, classes) float32, and ``{"results_ms": [...], "median_ms", "mean_ms",
        "min_ms", "number", "repeat", "batch", "server"}``.
    Raises:
        BackendMissingError: TVM is not installed. ConfigError: the server cannot be reached.
        ShapeMismatchError: ``x`` does not fit the library.
    """
    tvm = _import_tvm()
    from tvm import relax, rpc

    if number < 1 or repeat < 1:
        raise ConfigError(f"number and repeat must be >= 1, got {number} and {repeat}")
    path = Path(lib_path)
    if not path.is_file():
        raise ConfigError(f"{path} is not a file; pass the path of a compiled TVM library")
    try:
        remote = rpc.connect(host, int(port), key=key, session_timeout=session_timeout)
    except Exception as e:
        raise ConfigError(
            f"cannot reach a TVM RPC server at {host}:{port} ({type(e).__name__}: {str(e)[:200]}); start one on the "
            f"device with `python -m tvm.exec.rpc_server --host ADDR --port {port}`"
        ) from e
    from edgesep._io import sha256_file

    remote_name = f"edgesep-{sha256_file(path)[:16]}.so"  # content-addressed: a stale upload cannot be picked up
    remote.upload(str(path), target=remote_name)
    rlib = remote.load_module(remote_name)
    dev = remote.cpu()
    vm = relax.VirtualMachine(rlib, dev)
    shapes = _io_shapes(vm)
    if shapes is None:
        raise ConfigError(f"{path.name} carries no {IO_SHAPES_FN}; build it with edgesep.runtimes.tvm.compile_tvm")
    in_shape, out_shape = shapes
    x = _check_batch(x, in_shape)
    runner = _VmRunner(vm, in_shape, out_shape[-1], dev)
    logits = runner(x)
    first = _chunks(x, in_shape[0])[0][0] if x.shape[0] else np.zeros(in_shape, np.float32)
    res = vm.time_evaluator("main", dev, number=number, repeat=repeat)(tvm.runtime.tensor(first, dev))
    results_ms = [float(r) * 1e3 for r in res.results]
    timings = {
        "results_ms": results_ms,
        "median_ms": float(np.median(results_ms)),
        "mean_ms": float(np.mean(results_ms)),
        "min_ms": float(np.min(results_ms)),
        "number": number,
        "repeat": repeat,
        "batch": in_shape[0],
        "server": f"{host}:{port}",
    }
    return logits, timings
