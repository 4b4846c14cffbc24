"""The translation table: ``edgesep::kron_linear`` -> standard ONNX ops (Transpose / MatMul).

The ONNX exporter (``torch.onnx.export(..., dynamo=True)``) finds one ``torch.ops.edgesep.kron_linear.default``
node per ``KronLinear`` and calls the function registered for it in ``custom_translation_table``.

How the ``list[Tensor]`` argument arrives: the exporter maps every FX argument to ONNX IR values and calls the
registered function as ``fn(x, [U_1, ..., U_d])`` under an ``OpRecorder`` evaluator
(``torch/onnx/_internal/exporter/_core.py``: ``onnx_function(*onnx_args)``; ``_convert_fx_arg_to_onnx_arg`` turns
a list of FX nodes into a list of values). A plain Python function therefore receives ``factors`` as a Python
``list`` of ``SymbolicTensor`` values of known static shape (m_k, n_k), and can loop over it in Python: every
``op.*`` call inside records one ONNX node, so d is unrolled at export time. Dispatch does no type matching for
custom entries (``_dispatching.dispatch`` takes the first registered function), and the signature of a plain
function is only inferred, never enforced. An ``@onnxscript.script`` function would be the wrong tool here: its
parameter would be a ``Sequence(tensor)`` built with ``SequenceConstruct`` and the loop would become an ONNX
``Loop`` over ``SequenceAt``, which no edge compiler wants.

The emitted graph is the mode-product forward of ``edgesep.layers.kron.kron_linear_reference``, step for step:

    for k = d .. 1 (last factor first):
        Y = MatMul(Y, Transpose(U_k))          # weight on the RIGHT: per-channel INT8 scales land on axis m_k
        Y = Transpose(Y, perm=[0, r-1, 1..r-2])  # rotate the new axis m_k to position 1 (d > 1 only)

No Reshape is needed: MatMul broadcasts a rank-(d+1) left operand against a 2-D right operand over the leading
axes, so the batch axis stays symbolic and no shape tensor is emitted. (The reference's final ``reshape`` maps
(B, m_1, ..., m_d) to itself.) ``Transpose(U_k)`` reads only an initializer: the exporter's optimizer (or onnxsim)
folds it into an initializer of shape (n_k, m_k), so each MatMul's right input is a constant weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import onnxscript
import torch

__all__ = ["SUPPORTED_OPSETS", "kron_linear_onnx", "translation_table"]

# Opsets the lowering and the tests cover. The translation function records opset-13+ nodes (Transpose-13,
# MatMul-13) whose semantics are unchanged up to opset 23; the exporter stamps and converts the whole graph.
SUPPORTED_OPSETS: tuple[int, ...] = (17, 18, 20)

# torchlib (the exporter's aten decompositions) is written against opset 18; use the same ops for ours.
_op = onnxscript.opset18
_TRANSPOSED = "edgesep.kron_linear.transposed"  # key in a factor value's metadata: its Transpose(U) value


def _rotate_last_to_front(rank: int) -> list[int]:
    """perm of ``movedim(-1, 1)`` for a tensor of ``rank`` axes (batch axis 0 stays put)."""
    return [0, rank - 1, *range(1, rank - 1)]


def _transposed(u: Any) -> Any:
    """Transpose(U) emitted once per factor value and export: a layer called twice (shared weights) reuses it."""
    meta = getattr(u, "meta", None)  # ONNX IR values carry a metadata dict; eager numpy inputs do not
    if meta is not None and _TRANSPOSED in meta:
        return meta[_TRANSPOSED]
    ut = _op.Transpose(u, perm=[1, 0])
    name = getattr(u, "name", None)
    if isinstance(name, str) and name:
        ut.name = f"{name}_T"  # the folded initializer keeps the parameter's name (renamed to "<fqn>.T" later)
    if meta is not None:
        meta[_TRANSPOSED] = ut
    return ut


def kron_linear_onnx(x: Any, factors: Sequence[Any]) -> Any:
    """Translate ``edgesep::kron_linear(x, factors)`` into Transpose / MatMul nodes.

    Args:
        x: ONNX IR value of shape (B, n_1, ..., n_d); B may be symbolic.
        factors: Python list of d ONNX IR values, U_k of shape (m_k, n_k) (initializers in practice).
    Returns:
        The ONNX IR value of shape (B, m_1, ..., m_d).
    """
    d = len(factors)
    r = d + 1  # rank of the activation throughout: one batch axis + d factor axes
    y = x  # (B, n_1, ..., n_d)
    for k in range(d - 1, -1, -1):
        # (m_k, n_k) -> (n_k, m_k): reads only an initializer, constant-folded to one (n_k, m_k) weight
        ut = _transposed(factors[k])
        # (B, m_{k+1..d}, n_1..n_k) -> (B, m_{k+1..d}, n_1..n_{k-1}, m_k): contract the last axis with U_kᵀ
        y = _op.MatMul(y, ut)
        if d > 1:
            # (B, m_{k+1..d}, n_1..n_{k-1}, m_k) -> (B, m_k, m_{k+1..d}, n_1..n_{k-1}): new axis to position 1
            y = _op.Transpose(y, perm=_rotate_last_to_front(r))
    return y  # after d rotations: (B, m_1, ..., m_d)


def translation_table() -> dict[Callable[..., Any], Callable[..., Any]]:
    """The ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``.

    Returns:
        ``{torch.ops.edgesep.kron_linear.default: kron_linear_onnx}``.
    """
    import edgesep.layers.kron  # noqa: F401  (registers torch.ops.edgesep.kron_linear)

    return {torch.ops.edgesep.kron_linear.default: kron_linear_onnx}
