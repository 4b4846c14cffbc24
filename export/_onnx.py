"""torch -> ONNX: export with the Kronecker lowering, check, simplify, write atomically; parity with ONNX Runtime.

The exported graph takes float32 pixels in [0, 1], NCHW (or whatever per-sample shape the model takes) with a
symbolic batch axis by default; normalization is a module inside the model, so it is exported with it.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from edgesep.errors import ConfigError, EdgesepError, ShapeMismatchError
from edgesep.export import _graph
from edgesep.export._lowering import SUPPORTED_OPSETS, translation_table
from edgesep.layers.kron import KronLinear

__all__ = ["ExportReport", "export_onnx", "parity"]

# torchlib (the exporter's aten translations) is written against opset 18: lower targets are exported at 18
# and converted with onnx's version converter, which is what torch.onnx.export itself does for them.
_NATIVE_OPSET = 18
_BATCH_DIM = "batch"
_EXAMPLE_BATCH = 2  # torch.export specializes sizes 0 and 1; trace a dynamic batch with 2


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What ``export_onnx`` wrote, and what the graph holds.

    Attributes:
        path: the .onnx file.
        opset: default-domain opset of the file.
        dynamic_batch: the batch axis is symbolic (``"batch"``); else it is ``input_shape[0]``.
        input_name, input_shape, output_name, output_shape: the graph's single input and output; symbolic dims
            are strings.
        census_before: ``{op_type: count}`` of the exporter's raw graph (no optimization: each factor still
            behind its ``Transpose``).
        census_after: the same for the written graph (exporter optimizer, version conversion, onnxsim).
        simplified: whether onnxsim ran.
        num_initializers: initializers in the written graph.
        largest_initializer: name of the largest stored weight (initializer or Constant).
        largest_initializer_elems: its element count.
        max_param_elems: element count of the torch model's largest parameter or buffer (the re-densify bound).
        file_size: bytes.
        sha256: of the file.
        kron_layers: per ``KronLinear`` (by module path): ``in_shape``, ``out_shape``, ``ops`` (``{op_type:
            count}`` in the written graph) and ``matmul_weights`` (shape (n_k, m_k) of each MatMul's right
            initializer, in graph order: last factor first).
    """

    path: str
    opset: int
    dynamic_batch: bool
    input_name: str
    input_shape: list[int | str]
    output_name: str
    output_shape: list[int | str]
    census_before: dict[str, int]
    census_after: dict[str, int]
    simplified: bool
    num_initializers: int
    largest_initializer: str
    largest_initializer_elems: int
    max_param_elems: int
    file_size: int
    sha256: str
    kron_layers: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (plain str / int / bool / list / dict)."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore its training flags afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, f in flags.items():
            m.training = f


def _check_options(input_shape: Sequence[int], opset: int, batch: int | None) -> tuple[int, ...]:
    if isinstance(opset, bool) or opset not in SUPPORTED_OPSETS:
        raise ConfigError(f"unsupported ONNX opset {opset!r}; pick one of {list(SUPPORTED_OPSETS)}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ConfigError(f"batch must be None (symbolic batch axis) or a positive int, got {batch!r}")
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise ConfigError(f"input_shape must be a per-sample shape like (1, 28, 28), got {input_shape!r}")
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"input_shape must be a per-sample shape like (1, 28, 28), got {input_shape!r}") from e
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(
            f"input_shape must be a non-empty per-sample shape of positive ints (no batch axis), e.g. (1, 28, 28); "
            f"got {input_shape!r}"
        )
    return shape


def _max_param_elems(model: nn.Module) -> int:
    sizes = [t.numel() for t in model.parameters()] + [t.numel() for t in model.buffers()]
    return max(sizes, default=0)


def _name_scopes(node: onnx.NodeProto) -> list[str] | None:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            with contextlib.suppress(ValueError, SyntaxError):
                scopes = ast.literal_eval(p.value)
                if isinstance(scopes, list):
                    return [str(s) for s in scopes]
    return None


def _kron_node_layers(model: onnx.ModelProto, kron_paths: set[str]) -> dict[str, str]:
    """Node name -> path of the KronLinear module it was exported from (the exporter's name-scope metadata)."""
    owners: dict[str, str] = {}
    for node in model.graph.node:
        scopes = _name_scopes(node)
        if not scopes or not node.name:
            continue
        # scopes: ['', 'features', 'features.0', '<fx node>']: the module paths from the root, then the op
        for scope in reversed(scopes[:-1]):
            if scope in kron_paths:
                owners[node.name] = scope
                break
    return owners


def _name_factor_weights(model: onnx.ModelProto, placeholder_to_fqn: dict[str, str]) -> None:
    """Rename the folded factor weights ``<placeholder>_T`` (named by the lowering) to ``<parameter FQN>.T``."""
    renames = {f"{ph}_T": f"{fqn}.T" for ph, fqn in placeholder_to_fqn.items()}
    taken = {i.name for i in model.graph.initializer} | {v.name for v in model.graph.value_info}
    renames = {old: new for old, new in renames.items() if old in taken and new not in taken}
    if not renames:
        return
    for init in model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for value in model.graph.value_info:
        value.name = renames.get(value.name, value.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
        node.output[:] = [renames.get(o, o) for o in node.output]


def _layer_report(
    model: onnx.ModelProto, owners: dict[str, str], layers: dict[str, KronLinear]
) -> dict[str, dict[str, Any]]:
    inits = {i.name: [int(d) for d in i.dims] for i in model.graph.initializer}
    report: dict[str, dict[str, Any]] = {}
    for path, layer in layers.items():
        nodes = [n for n in model.graph.node if owners.get(n.name) == path]
        weights = [inits.get(n.input[1]) for n in nodes if n.op_type == "MatMul" and len(n.input) > 1]
        report[path] = {
            "in_shape": list(layer.in_shape),
            "out_shape": list(layer.out_shape),
            "ops": dict(sorted(Counter(n.op_type for n in nodes).items())),
            "matmul_weights": weights,
        }
    return report


def _io_shape(value: onnx.ValueInfoProto) -> list[int | str]:
    dims: list[int | str] = []
    for d in value.type.tensor_type.shape.dim:
        dims.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?"))
    return dims


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_checked(model: onnx.ModelProto, path: Path) -> None:
    """Save to a temp file beside ``path``, check it (full check + strict shape inference), rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        onnx.save(model, os.fspath(tmp))
        _graph.check_model(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# export


@contextlib.contextmanager
def _quiet_exporter():
    """Silence what torch's exporter prints on every call that a user cannot act on: 'torchvision is not
    installed' lines from its op registry, and torch.export's warning about its own deprecated LeafSpec."""
    reg = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = reg.level
    reg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        reg.setLevel(level)


def export_onnx(
    model: nn.Module,
    input_shape: Sequence[int],
    path: str | os.PathLike,
    *,
    opset: int = 18,
    batch: int | None = None,
    input_name: str = "input",
    output_name: str = "logits",
    simplify: bool = True,
    check_redensify: bool = True,
) -> ExportReport:
    """Export ``model`` to ONNX with every ``KronLinear`` lowered to Transpose / MatMul, checked and simplified.

    The model is exported in eval mode (its training flags are restored afterwards) with
    ``torch.onnx.export(dynamo=True)`` and the ``edgesep::kron_linear`` translation table, then checked
    (standard ops only, no weight larger than the model's largest parameter), simplified with onnxsim (symbolic
    batch kept), written atomically (temp file + rename) and verified with ``onnx.checker`` (full check) and
    strict shape inference.

    Args:
        model: the torch model; its input is float32 pixels in [0, 1] (normalization inside the model).
        input_shape: per-sample input shape without the batch axis, e.g. (1, 28, 28).
        path: the .onnx file to write (parent directories are created).
        opset: ONNX opset, one of 17, 18, 20.
        batch: None for a symbolic batch axis named ``"batch"``; an int for a static batch size.
        input_name, output_name: names of the graph's input and output.
        simplify: run onnxsim (default). Turn off only to inspect the raw export.
        check_redensify: fail if any stored weight is larger than the model's largest parameter or buffer.
    Returns:
        An ``ExportReport``.
    Raises:
        ConfigError: an unsupported opset, batch or input_shape, or a model that onnx's version converter cannot
            take to the requested opset (e.g. ``Pad`` below opset 18).
        ShapeMismatchError: the model does not accept inputs of ``input_shape``.
        GraphCheckError: the exported graph is invalid, holds non-standard ops, re-densified a weight, or lost its
            symbolic batch axis.
    """
    shape = _check_options(input_shape, opset, batch)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"export_onnx needs a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, KronLinear)}
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    # pixels in [0, 1] from a private generator: exporting must not advance the caller's global RNG
    x = torch.rand(batch or _EXAMPLE_BATCH, *shape, generator=torch.Generator().manual_seed(0)).to(device)

    with _eval_mode(model):
        try:
            with torch.no_grad():
                model(x)
        except EdgesepError:
            raise
        except (RuntimeError, ValueError) as e:
            raise ShapeMismatchError(
                f"the model does not accept inputs of per-sample shape {shape} (batch of {x.shape[0]}): {e}. "
                "Pass input_shape without the batch axis, e.g. (1, 28, 28)"
            ) from e
        with _quiet_exporter():
            program = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                opset_version=max(opset, _NATIVE_OPSET),
                input_names=[input_name],
                output_names=[output_name],
                dynamic_shapes=({0: torch.export.Dim(_BATCH_DIM)},) if batch is None else None,
                custom_translation_table=translation_table(),
                optimize=False,  # optimized below, after the raw op census
                verbose=False,
            )
    census_before = _graph.op_census(program.model_proto)  # the raw lowering: Transpose(U_k) not yet folded
    program.optimize()  # torch's default pass (onnxscript optimizer): constant folding, dead-code removal
    proto = program.model_proto
    _name_factor_weights(proto, program.exported_program.graph_signature.inputs_to_parameters)
    # the exporter's node metadata holds the module name scopes; version conversion and onnxsim drop metadata
    # but keep node names, so attribute nodes to layers now
    owners = _kron_node_layers(proto, set(layers))
    if opset < _NATIVE_OPSET:
        try:
            proto = onnx.version_converter.convert_version(proto, opset)
        except RuntimeError as e:  # the converter lacks adapters for some ops (e.g. Pad 18 -> 17)
            raise ConfigError(
                f"this model cannot be converted to ONNX opset {opset}: {str(e).strip()}. Export it at opset "
                f"{_NATIVE_OPSET} or 20 instead"
            ) from e
    # torch keeps the file at its native opset, with only a warning, when its own conversion fails: check it
    stamped = {o.domain: o.version for o in proto.opset_import}.get("")
    if stamped != opset:
        raise ConfigError(
            f"the exporter produced ONNX opset {stamped} instead of the requested {opset} (version conversion "
            f"failed; see the log above). Export at opset {_NATIVE_OPSET} instead"
        )
    _graph.check_standard_ops(proto)

    if simplify:
        proto, _, census_after = _graph.simplify(proto)
    else:
        census_after = _graph.op_census(proto)
    max_param = _max_param_elems(model)
    if check_redensify:
        _graph.check_no_redensify(proto, max_param)

    in_shape = _graph.input_shapes(proto).get(input_name)
    expected_batch = batch if batch is not None else _BATCH_DIM
    if not in_shape or in_shape[0] != expected_batch:
        raise _graph.GraphCheckError(
            f"the exported input {input_name!r} has shape {in_shape}, expected batch axis {expected_batch!r}; the "
            "model fixes the batch size somewhere (e.g. a reshape with a literal batch): use x.shape[0] or -1"
        )

    _write_checked(proto, path)
    largest, largest_elems = _graph.largest_initializer(proto)
    return ExportReport(
        path=os.fspath(path),
        opset=opset,
        dynamic_batch=batch is None,
        input_name=input_name,
        input_shape=_io_shape(proto.graph.input[0]),
        output_name=output_name,
        output_shape=_io_shape(proto.graph.output[0]),
        census_before=census_before,
        census_after=census_after,
        simplified=simplify,
        num_initializers=len(proto.graph.initializer),
        largest_initializer=largest,
        largest_initializer_elems=largest_elems,
        max_param_elems=max_param,
        file_size=path.stat().st_size,
        sha256=_sha256(path),
        kron_layers=_layer_report(proto, owners, layers),
    )


# ----------------------------------------------------------------------------------------------------------------
# parity


def parity(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    x: np.ndarray,
    *,
    rtol: float = 1e-4,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Compare ONNX Runtime (CPUExecutionProvider) with the torch model (eval mode) on a numpy batch.

    Args:
        model: the torch model the file was exported from.
        onnx_path: the .onnx file.
        x: inputs of shape (N, *input_shape), pixels in [0, 1]; cast to float32.
        rtol: tolerance on the relative error for ``ok``.
        batch_size: inputs per run (a file with a static batch runs in chunks of that size, the last one padded).
    Returns:
        ``{"n", "max_abs_err", "max_rel_err", "top1_agreement", "rtol", "ok"}``: the relative error is the max
        absolute error over max |torch output|; ``ok`` means max_rel_err <= rtol and top-1 agreement is 1.
    Raises:
        ShapeMismatchError: x does not match the file's input, or the outputs differ in shape.
    """
    import onnxruntime as ort

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim < 2 or len(x) == 0:
        raise ShapeMismatchError(f"x must be a non-empty batch (N, *input_shape), got shape {x.shape}")
    session = ort.InferenceSession(os.fspath(onnx_path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    want = list(inp.shape)
    if len(want) != x.ndim or any(isinstance(w, int) and w != s for w, s in zip(want[1:], x.shape[1:], strict=True)):
        raise ShapeMismatchError(f"x of shape {x.shape} does not fit the ONNX input {inp.name!r} of shape {want}")
    static = want[0] if isinstance(want[0], int) else None
    step = static or max(1, int(batch_size))

    onnx_out, torch_out = [], []
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    with _eval_mode(model), torch.no_grad():
        for i in range(0, len(x), step):
            chunk = x[i : i + step]
            n = len(chunk)
            if static is not None and n < static:  # pad the last chunk of a static-batch file
                chunk = np.concatenate([chunk, np.zeros((static - n, *chunk.shape[1:]), np.float32)])
            onnx_out.append(session.run(None, {inp.name: chunk})[0][:n])
            torch_out.append(model(torch.from_numpy(chunk[:n]).to(device)).float().cpu().numpy())
    got, ref = np.concatenate(onnx_out), np.concatenate(torch_out)
    if got.shape != ref.shape:
        raise ShapeMismatchError(f"ONNX output shape {got.shape} differs from torch's {ref.shape}")

    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(err.max(initial=0.0))
    scale = float(np.abs(ref).max(initial=0.0))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    n = len(x)
    top1 = float(np.mean(got.reshape(n, -1).argmax(1) == ref.reshape(n, -1).argmax(1)))
    return {
        "n": n,
        "max_abs_err": max_abs,
        "max_rel_err": max_rel,
        "top1_agreement": top1,
        "rtol": float(rtol),
        "ok": bool(max_rel <= rtol and top1 == 1.0),
    }
