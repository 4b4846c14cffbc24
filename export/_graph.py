"""Graph checks on ONNX models: op census, largest initializer, re-densification, standard ops, simplify.

onnx and onnxsim only (no torch): these run on exported files wherever they are inspected.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections import Counter
from collections.abc import Iterator

import onnx

from edgesep.errors import EdgesepError

__all__ = [
    "GraphCheckError",
    "check_model",
    "check_no_redensify",
    "check_standard_ops",
    "input_shapes",
    "largest_initializer",
    "op_census",
    "simplify",
    "stored_tensors",
]

_STANDARD_DOMAINS = frozenset({"", "ai.onnx"})


class GraphCheckError(EdgesepError, ValueError):
    """An ONNX graph that fails a structural check (invalid, non-standard ops, re-densified weights, ...)."""


def _as_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """graph and every subgraph (If / Loop / Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in _STANDARD_DOMAINS else f"{node.domain}::{node.op_type}"


def op_census(model: onnx.ModelProto | str | os.PathLike) -> dict[str, int]:
    """Count the nodes of each op type, subgraphs included.

    Args:
        model: a ModelProto or the path of a .onnx file.
    Returns:
        ``{op_type: count}`` sorted by op type; ops outside the default domain are keyed ``"domain::op_type"``.
    """
    m = _as_model(model)
    counts = Counter(_op_key(n) for g in _graphs(m.graph) for n in g.node)
    return dict(sorted(counts.items()))


def _dims_numel(dims) -> int:
    return math.prod(int(d) for d in dims)


def stored_tensors(model: onnx.ModelProto | str | os.PathLike) -> dict[str, int]:
    """Element counts of every stored weight: initializers and ``Constant`` node values, subgraphs included.

    Returns:
        ``{name: number of elements}``; a Constant is named by its output.
    """
    m = _as_model(model)
    sizes: dict[str, int] = {}
    for g in _graphs(m.graph):
        for init in g.initializer:
            sizes[init.name] = _dims_numel(init.dims)
        for init in g.sparse_initializer:
            sizes[init.values.name] = _dims_numel(init.dims)
        for node in g.node:
            if node.op_type == "Constant" and node.domain in _STANDARD_DOMAINS:
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        sizes[node.output[0]] = _dims_numel(attr.t.dims)
                    elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                        sizes[node.output[0]] = _dims_numel(attr.sparse_tensor.dims)
                    elif attr.type in (onnx.AttributeProto.FLOATS, onnx.AttributeProto.INTS):
                        sizes[node.output[0]] = len(attr.floats) + len(attr.ints)
    return sizes


def largest_initializer(model: onnx.ModelProto | str | os.PathLike) -> tuple[str, int]:
    """The largest stored weight (initializer or Constant).

    Returns:
        ``(name, number of elements)``; ``("", 0)`` for a graph without weights.
    """
    sizes = stored_tensors(model)
    if not sizes:
        return "", 0
    name = max(sizes, key=lambda k: (sizes[k], k))
    return name, sizes[name]


def check_no_redensify(model: onnx.ModelProto | str | os.PathLike, max_elems: int) -> None:
    """Check that no stored weight has more than ``max_elems`` elements.

    A Kronecker layer lowered correctly stores only its small factors; a graph holding a tensor larger than the
    model's largest parameter has materialized (re-densified) a structured weight somewhere.

    Args:
        model: a ModelProto or the path of a .onnx file.
        max_elems: the bound, e.g. the element count of the model's largest parameter.
    Raises:
        GraphCheckError: naming every tensor over the bound.
    """
    over = {k: v for k, v in stored_tensors(model).items() if v > max_elems}
    if over:
        listed = ", ".join(f"{k} ({v} elements)" for k, v in sorted(over.items(), key=lambda kv: -kv[1]))
        raise GraphCheckError(
            f"the graph stores tensors larger than the bound of {max_elems} elements (the largest parameter): "
            f"{listed}. A structured (Kronecker) weight was re-densified: check the custom translation table and "
            "that constant folding did not multiply factors together"
        )


def check_standard_ops(model: onnx.ModelProto | str | os.PathLike) -> None:
    """Check that every node is a standard ONNX op (default domain) and there are no model-local functions.

    Raises:
        GraphCheckError: listing the non-standard ops, which edge compilers (TVM, TensorRT) cannot run.
    """
    m = _as_model(model)
    custom = sorted({_op_key(n) for g in _graphs(m.graph) for n in g.node if n.domain not in _STANDARD_DOMAINS})
    functions = sorted(f"{f.domain}::{f.name}" for f in m.functions)
    if custom or functions:
        raise GraphCheckError(
            f"the graph holds non-standard ops {custom} and local functions {functions}; every custom torch op "
            "needs an entry in the exporter's custom_translation_table that lowers it to standard ONNX ops"
        )


def input_shapes(model: onnx.ModelProto | str | os.PathLike) -> dict[str, list[int | str | None]]:
    """Graph inputs (initializers excluded) and their shapes: ints, symbolic names (str) or None (unknown)."""
    m = _as_model(model)
    inits = {i.name for i in m.graph.initializer}
    shapes: dict[str, list[int | str | None]] = {}
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        dims: list[int | str | None] = []
        for d in inp.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        shapes[inp.name] = dims
    return shapes


def check_model(model: onnx.ModelProto | str | os.PathLike) -> None:
    """``onnx.checker.check_model(full_check=True)`` and strict shape inference.

    Args:
        model: a ModelProto, or a path (checked from the file, which also works past the 2 GB protobuf limit).
    Raises:
        GraphCheckError: with the checker's message.
    """
    target = model if isinstance(model, onnx.ModelProto) else os.fspath(model)
    try:
        onnx.checker.check_model(target, full_check=True)
        # weights are not needed to infer shapes: skip external data, so a path never loads more than the graph
        proto = target if isinstance(target, onnx.ModelProto) else onnx.load(target, load_external_data=False)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise GraphCheckError(f"the ONNX model is invalid: {e}") from e


def simplify(
    model: onnx.ModelProto | str | os.PathLike, *, check_n: int = 3
) -> tuple[onnx.ModelProto, dict[str, int], dict[str, int]]:
    """Simplify with onnxsim (constant folding, dead-node elimination, fusions), keeping symbolic dims.

    Args:
        model: a ModelProto or the path of a .onnx file.
        check_n: random inputs on which onnxsim compares the simplified model with the original (ONNX Runtime).
    Returns:
        (simplified model, op census before, op census after).
    Raises:
        GraphCheckError: if onnxsim's own comparison fails or an input's shape changed (e.g. a symbolic batch
            dimension was fixed).
    """
    import onnxsim

    m = _as_model(model)
    before, shapes = op_census(m), input_shapes(m)
    # onnxsim prints its progress ("Checking 0/3...") on stdout; a library call should stay quiet
    with contextlib.redirect_stdout(io.StringIO()):
        simplified, ok = onnxsim.simplify(m, check_n=check_n, certify=False)
    if not ok:
        raise GraphCheckError(
            f"onnxsim's simplified model differs from the original on {check_n} random inputs; export without "
            "simplification and report the model to onnxsim"
        )
    if input_shapes(simplified) != shapes:
        raise GraphCheckError(
            f"onnxsim changed the input shapes from {shapes} to {input_shapes(simplified)}; the symbolic batch "
            "dimension must survive simplification"
        )
    return simplified, before, op_census(simplified)
