"""Offline deployability checks: would this ONNX model build on TensorRT (Jetson) or TVM (ARM)? No device needed.

``check_tensorrt`` walks the graph against TensorRT 10.x's ONNX operator support matrix and the quantization rules
of its ONNX parser; ``check_tvm`` runs a TVM Relax import dry run (``from_onnx`` + ``LegalizeOps``, and a real
``tvm.compile`` for small models); ``check_bundle`` runs either over a bundle's ONNX artifacts. Each returns a
``CheckReport``: a JSON-ready list of ``Issue`` (error: fails on the device; warning: builds but not as intended,
e.g. a layer TensorRT runs in float; info: what to do on the device) and the op census.

Source of the TensorRT table (cite this when it is questioned):

- ``onnx/onnx-tensorrt`` ``docs/operators.md``, "TensorRT 10.15 supports operators in the inclusive range of opset 9
  to opset 24", the operator support matrix (operator, supported, supported types, restrictions) as published for
  TensorRT **10.15** GA. ``_TRT_MATRIX_10_15`` below is that table, row by row (types and restriction text
  verbatim; a few long restrictions shortened where marked).
- Earlier 10.x versions are **derived** from it with ``docs/Changelog.md`` of the same repository (entries "TensorRT
  10.0 EA" .. "TensorRT 10.15 GA"): an op the changelog says was added in 10.N is absent before 10.N (DeformConv
  10.1; BlackmanWindow / HammingWindow / HannWindow 10.4; STFT 10.5; Attention 10.14; RotaryEmbedding,
  RMSNormalization, TensorScatter 10.15), FP4 types appear in 10.8, integer ``Pow`` in 10.12, Einsum ellipsis /
  diagonal / broadcasting in 10.12, tensor ``axes`` for ``Slice`` in 10.3 and for ``Pad`` in 10.4. The opset range
  is 9..20 for 10.0 (its own operators.md) and 9..24 for 10.15; in between the table keeps 20 and only warns above
  it. A restriction that the changelog does not date is applied to every 10.x as the 10.15 table states it (an
  assumption: an older parser may differ in ways neither document records). The JetPack 6 default, TensorRT
  **10.3**, is the default ``trt_version``; ``"10.x"`` means what every 10.x parser accepts (the 10.0 table).

Rules beyond the matrix, and where each comes from:

- Quantized types. "INT8, INT4, FP8 and FP4 are treated as Quantized Types in TensorRT, where support is available
  only through quantization from a floating-point type with higher precision" (operators.md): an INT8 tensor may only
  leave a QuantizeLinear and enter a DequantizeLinear. "There is limited support for DOUBLE type. TensorRT will
  attempt to cast DOUBLE down to FLOAT": no op lists DOUBLE, so float64 compute is an error here. "UINT8 is only
  supported as network input or output tensor types".
- Q/DQ (the parser's ``QuantDequantLinearHelper``, onnx-tensorrt ``onnxOpImporters.cpp``, and TensorRT's operator
  reference for Quantize / Dequantize): the zero point must be all zeros (symmetric quantization only), scales must
  be strictly positive build-time constants, a scalar (per-tensor) or a 1-D tensor as long as the quantized axis
  (per-channel); block (2-D) scales are for INT4 only; the quantized type is INT8, FP8, INT4 or FP4 (the matrix's
  DequantizeLinear types). A UINT8 DequantizeLinear input is refused by the parser unless the DLA-only asymmetric
  flag is set; an INT32 one (ONNX Runtime's default quantized bias) is outside the matrix's types, and parsers have
  failed it with "only activation types allowed as input to this layer" (onnx/onnx-tensorrt #850, TensorRT 8.x;
  the same error with ORT-quantized models in lyuwenyu/RT-DETR #343, 2024). Not verified on a 10.x device here.
  A QuantizeLinear without a zero point is INT8 for TensorRT (its parser's default), not ONNX's UINT8.
- QDQ placement for real INT8 kernels (TensorRT's explicit-quantization guide): a Conv / ConvTranspose / Gemm /
  MatMul runs in INT8 only when **both** its data inputs come from DequantizeLinear; weights per-channel on the
  output-channel axis (Conv: 0; ConvTranspose: 1; Gemm ``transB=1``: 0, ``transB=0``: 1; MatMul with the weight as
  the right operand ``(.., n, m)``: the last axis), activations per-tensor. Anything else builds, but TensorRT runs
  that layer in float: a warning, not an error (per-channel activation scales are a warning too: the parser does
  not reject them, the INT8 kernels want per-tensor).

What the checks found on this project's own ONNX Runtime INT8 models (``quantize_onnx``, ORT 1.32 defaults): the
activation zero points are not 0 (QInt8 activations are asymmetric unless ``ActivationSymmetric`` is set) and the
biases are INT32 DequantizeLinear nodes (``QuantizeBias`` defaults to true). Both are errors for TensorRT; ORT's
``extra_options={"ActivationSymmetric": True, "QuantizeBias": False}`` produces a model that passes.

onnx and numpy only; ``check_tvm`` imports TVM (``edgesep[tvm]``) when called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgesep._io import jsonable
from edgesep.errors import BackendMissingError, BundleLookupError, ConfigError
from edgesep.export import _graph

__all__ = [
    "CHECK_TARGETS",
    "SEVERITIES",
    "TRT_SOURCE",
    "TRT_VERSIONS",
    "BackendMissingError",
    "CheckReport",
    "Issue",
    "check_bundle",
    "check_tensorrt",
    "check_tvm",
    "trt_op_support",
]

CHECK_TARGETS: tuple[str, ...] = ("tensorrt", "tvm")
SEVERITIES: tuple[str, ...] = ("error", "warning", "info")
DEFAULT_TRT_VERSION = "10.3"  # JetPack 6.0 / 6.1 ship TensorRT 10.3
TRT_SOURCE = (
    "onnx/onnx-tensorrt docs/operators.md (TensorRT 10.15 operator support matrix); earlier 10.x derived with "
    "docs/Changelog.md (10.0 EA .. 10.15 GA)"
)

# ----------------------------------------------------------------------------------------------------------------
# the TensorRT 10.15 ONNX operator support matrix: "Op | Y/N | supported types | restrictions"

_TRT_MATRIX_10_15 = """
Abs|Y|FP32, FP16, BF16, INT32, INT64|
Acos|Y|FP32, FP16, BF16|
Acosh|Y|FP32, FP16, BF16|
Add|Y|FP32, FP16, BF16, INT32, INT64|
AffineGrid|N||
And|Y|BOOL|
ArgMax|Y|FP32, FP16, BF16, INT32, INT64|
ArgMin|Y|FP32, FP16, BF16, INT32, INT64|
Asin|Y|FP32, FP16, BF16|
Asinh|Y|FP32, FP16, BF16|
Atan|Y|FP32, FP16, BF16|
Atanh|Y|FP32, FP16, BF16|
Attention|Y|FP32, FP16, BF16, INT8, FP8|`Q`, `K`, `V` and `attn_mask` must be 4D; `past_key`, `past_value`,
    `nonpad_kv_seqlen` inputs, `present_key`, `present_value`, `qk_matmul_output` outputs, `qk_matmul_output_mode` and
    `softcap` are unsupported (shortened)
AveragePool|Y|FP32, FP16, BF16|2D or 3D Pooling only. `dilations` must be empty or all ones
BatchNormalization|Y|FP32, FP16, BF16|
Bernoulli|N||
BitShift|N||
BitwiseAnd|N||
BitwiseNot|N||
BitwiseOr|N||
BitwiseXor|N||
BlackmanWindow|Y|FP32, FP16|
Cast|Y|FP32, FP16, BF16, INT32, INT64, UINT8, BOOL|
CastLike|Y|FP32, FP16, BF16, INT32, INT64, UINT8, BOOL|
Ceil|Y|FP32, FP16, BF16|
Col2Im|N||
Celu|Y|FP32, FP16, BF16|
CenterCropPad|N||
Clip|Y|FP32, FP16, BF16|
Compress|N||
Concat|Y|FP32, FP16, BF16, INT32, INT64, BOOL|
ConcatFromSequence|N||
Constant|Y|FP32, FP16, BF16, FP8, FP4, INT4, INT32, INT64, BOOL|`sparse_value`, `value_string`, and `value_strings`
    attributes are unsupported.
ConstantOfShape|Y|FP32, FP16, BF16, FP8, FP4, INT4, INT32, INT64, BOOL|
Conv|Y|FP32, FP16, BF16|
ConvInteger|N||
ConvTranspose|Y|FP32, FP16, BF16|
Cos|Y|FP32, FP16, BF16|
Cosh|Y|FP32, FP16, BF16|
CumSum|Y|FP32, FP16, BF16|`axis` must be a build-time constant
DFT|N||
DeformConv|Y|FP32, FP16|`input` must have 1D or 2D spatial dimensions. `pads` for the beginning and end along each
    spatial axis must be the same
DepthToSpace|Y|FP32, FP16, BF16, INT32, INT64|
DequantizeLinear|Y|INT8, FP8, FP4, INT4|`x_zero_point` must be zero
Det|N||
Div|Y|FP32, FP16, BF16, INT32, INT64|
Dropout|Y|FP32, FP16, BF16|`is_training` must be an initializer and evaluate to False.
DynamicQuantizeLinear|N||Not supported. TensorRT's IDynamicQuantize can be composed from ONNX operators in the form of
    a model local function.
Einsum|Y|FP32, FP16, BF16|
Elu|Y|FP32, FP16, BF16|
Equal|Y|FP32, FP16, BF16, INT32, INT64|
Erf|Y|FP32, FP16, BF16|
Exp|Y|FP32, FP16, BF16|
Expand|Y|FP32, FP16, BF16, INT32, INT64, BOOL|
EyeLike|Y|FP32, FP16, BF16, INT32, INT64, BOOL|`input` must have static dimensions
Flatten|Y|FP32, FP16, BF16, INT32, INT64, BOOL|
Floor|Y|FP32, FP16, BF16|
Gather|Y|FP32, FP16, BF16, INT32, INT64, BOOL|
GatherElements|Y|FP32, FP16, BF16, INT32, INT64, BOOL|
GatherND|Y|FP32, FP16, BF16, INT32, INT64, BOOL|
Gelu|Y|FP32, FP16, BF16, INT8, INT32, INT64|
Gemm|Y|FP32, FP16, BF16|
GlobalAveragePool|Y|FP32, FP16, BF16|
GlobalLpPool|Y|FP32, FP16, BF16|
GlobalMaxPool|Y|FP32, FP16, BF16|
Greater|Y|FP32, FP16, BF16, INT32, INT64|
GreaterOrEqual|Y|FP32, FP16, BF16, INT32, INT64|
GridSample|Y|FP32, FP16|Input must be 4D input.
GroupNormalization|Y|FP32, FP16, BF16|
GRU|Y|FP32, FP16, BF16|For bidirectional GRUs, activation functions must be the same for both the forward and reverse
    pass
HammingWindow|Y|FP32, FP16|
HannWindow|Y|FP32, FP16|
HardSigmoid|Y|FP32, FP16, BF16|
HardSwish|Y|FP32, FP16, BF16|
Hardmax|Y|FP32, FP16, BF16|`axis` dimension of input must be a build-time constant
Identity|Y|FP32, FP16, BF16, INT32, INT64, BOOL|
If|Y|FP32, FP16, BF16, INT32, INT64, BOOL|Output tensors of the two conditional branches must have the same rank and
    must have different names
ImageScaler|Y|FP32, FP16, BF16|
ImageDecoder|N||
InstanceNormalization|Y|FP32, FP16, BF16|
IsInf|Y|FP32, FP16, BF16|
IsNaN|Y|FP32, FP16, BF16, INT32, INT64|
LayerNormalization|Y|FP32, FP16, BF16|Only the first output `Y` is supported.
LeakyRelu|Y|FP32, FP16, BF16|
Less|Y|FP32, FP16, BF16, INT32, INT64|
LessOrEqual|Y|FP32, FP16, BF16, INT32, INT64|
Log|Y|FP32, FP16, BF16|
LogSoftmax|Y|FP32, FP16, BF16|
Loop|Y|FP32, FP16, BF16, INT32, INT64, BOOL|Scan output length cannot be dynamic. The shape of Loop carried
    dependencies must be the same across all loop iterations.
LRN|Y|FP32, FP16, BF16|
LSTM|Y|FP32, FP16, BF16|For bidirectional LSTMs, activation functions must be the same for both the forward and
    reverse pass. `input_forget` attribute must be 0. `layout` attribute must be 0.
LpNormalization|Y|FP32, FP16, BF16|
LpPool|Y|FP32, FP16, BF16|`dilations` must be empty or all ones
MatMul|Y|FP32, FP16, BF16|
MatMulInteger|N||
Max|Y|FP32, FP16, BF16, INT32, INT64|
MaxPool|Y|FP32, FP16, BF16|2D or 3D pooling only. `Indices` output tensor unsupported. `dilations` must be empty or
    all ones
MaxRoiPool|N||
MaxUnpool|N||
Mean|Y|FP32, FP16, BF16, FP8, INT32, INT64|
MeanVarianceNormalization|Y|FP32, FP16, BF16|
MelWeightMatrix|N||
Min|Y|FP32, FP16, BF16, INT32, INT64|
Mish|Y|FP32, FP16|
Mod|Y|FP32, FP16, BF16, INT32, INT64|
Mul|Y|FP32, FP16, BF16, INT32, INT64|
Multinomial|N||
Neg|Y|FP32, FP16, BF16, INT32, INT64|
NegativeLogLikelihoodLoss|N||
NonMaxSuppression|Y|FP32, FP16|
NonZero|Y|FP32, FP16|
Not|Y|BOOL|
OneHot|Y|FP32, FP16, BF16, INT32, INT64, BOOL|`depth` must be a build-time constant
Optional|N||
OptionalGetElement|N||
OptionalHasElement|N||
Or|Y|BOOL|
Pad|Y|FP32, FP16, BF16, INT32, INT64|
ParametricSoftplus|Y|FP32, FP16, BF16|
Pow|Y|FP32, FP16, BF16, INT32, INT64|
PRelu|Y|FP32, FP16, BF16|
QLinearConv|N||
QLinearMatMul|N||
QuantizeLinear|Y|FP32, FP16, BF16|`y_zero_point` must be 0
RandomNormal|Y|FP32, FP16, BF16|`seed` value is ignored by TensorRT
RandomNormalLike|Y|FP32, FP16, BF16|`seed` value is ignored by TensorRT
RandomUniform|Y|FP32, FP16, BF16|`seed` value is ignored by TensorRT
RandomUniformLike|Y|FP32, FP16, BF16|`seed` value is ignored by TensorRT
Range|Y|FP32, FP16, BF16, INT32, INT64|
Reciprocal|Y|FP32, FP16, BF16|
ReduceL1|Y|FP32, FP16, BF16, INT32, INT64|`axes` must be an initializer
ReduceL2|Y|FP32, FP16, BF16, INT32, INT64|`axes` must be an initializer
ReduceLogSum|Y|FP32, FP16, BF16, INT32, INT64|`axes` must be an initializer
ReduceLogSumExp|Y|FP32, FP16, BF16, INT32, INT64|`axes` must be an initializer
ReduceMax|Y|FP32, FP16, BF16, INT32, INT64|`axes` must be an initializer
ReduceMean|Y|FP32, FP16, BF16, INT32, INT64|`axes` must be an initializer
ReduceMin|Y|FP32, FP16, BF16, INT32, INT64|`axes` must be an initializer
ReduceProd|Y|FP32, FP16, BF16, INT32, INT64|`axes` must be an initializer
ReduceSum|Y|FP32, FP16, BF16, INT32, INT64|`axes` must be an initializer
ReduceSumSquare|Y|FP32, FP16, BF16, INT32, INT64|`axes` must be an initializer
RegexFullMatch|N||
Relu|Y|FP32, FP16, BF16, INT32, INT64|
Reshape|Y|FP32, FP16, BF16, INT32, INT64, BOOL|
Resize|Y|FP32, FP16, BF16|Supported resize transformation modes: `half_pixel`, `pytorch_half_pixel`,
    `tf_half_pixel_for_nn`, `asymmetric`, and `align_corners`. Supported resize modes: `nearest`, `linear`. Supported
    nearest modes: `floor`, `ceil`, `round_prefer_floor`, `round_prefer_ceil`. Supported aspect ratio policy:
    `stretch`. When `scales` is a tensor input, `axes` must be an iota vector of length rank(input). Antialiasing is
    not supported.
ReverseSequence|Y|FP32, FP16, BF16, INT32, INT64, BOOL|
RMSNormalization|Y|FP32, FP16, BF16|
RNN|Y|FP32, FP16, BF16|For bidirectional RNNs, activation functions must be the same for both the forward and reverse
    pass
RoiAlign|Y|FP32, FP16|
RotaryEmbedding|Y|FP32, FP16, BF16|`position_ids` must be INT64
Round|Y|FP32, FP16, BF16|
STFT|Y|FP32|`frame_step` and `window` must be an initializer. Input must be real-valued.
ScaledTanh|Y|FP32, FP16, BF16|
Scan|Y|FP32, FP16, BF16|
Scatter|Y|FP32, FP16, BF16, INT32, INT64|
ScatterElements|Y|FP32, FP16, BF16, INT32, INT64|
ScatterND|Y|FP32, FP16, BF16, INT32, INT64|`reduction` other than `none` is not supported
Selu|Y|FP32, FP16, BF16|
SequenceAt|N||
SequenceConstruct|N||
SequenceEmpty|N||
SequenceErase|N||
SequenceInsert|N||
SequenceLength|N||
SequenceMap|N||
Shape|Y|FP32, FP16, BF16, INT32, INT64, BOOL|
Shrink|Y|FP32, FP16, BF16, INT32, INT64|
Sigmoid|Y|FP32, FP16, BF16|
Sign|Y|FP32, FP16, BF16, INT32, INT64|
Sin|Y|FP32, FP16, BF16|
Sinh|Y|FP32, FP16, BF16|
Size|Y|FP32, FP16, BF16, INT32, INT64, BOOL|
Slice|Y|FP32, FP16, BF16, INT32, INT64, BOOL|
Softmax|Y|FP32, FP16, BF16|
SoftmaxCrossEntropyLoss|N||
Softplus|Y|FP32, FP16, BF16|
Softsign|Y|FP32, FP16, BF16|
SpaceToDepth|Y|FP32, FP16, BF16, INT32, INT64|
Split|Y|FP32, FP16, BF16, INT32, INT64, BOOL|
SplitToSequence|N||
Sqrt|Y|FP32, FP16, BF16|
Squeeze|Y|FP32, FP16, BF16, INT32, INT64, BOOL|`axes` must be resolvable to a constant.
StringConcat|N||
StringNormalizer|N||
StringSplit|N||
Sub|Y|FP32, FP16, BF16, INT32, INT64|
Sum|Y|FP32, FP16, BF16, INT32, INT64|
Tan|Y|FP32, FP16, BF16|
Tanh|Y|FP32, FP16, BF16|
TensorScatter|Y|FP32, FP16, BF16, INT32|`past_cache` and `update` must be 4D. `axis` must be -2.
TfIdfVectorizer|N||
ThresholdedRelu|Y|FP32, FP16, BF16|
Tile|Y|FP32, FP16, BF16, INT32, INT64, BOOL|
TopK|Y|FP32, FP16, BF16, INT32, INT64|`sorted` must be 1. `K` input must be less than 3840.
Transpose|Y|FP32, FP16, BF16, INT32, INT64, BOOL|
Trilu|Y|FP32, FP16, BF16, INT32, INT64, BOOL|
Unique|N||
Unsqueeze|Y|FP32, FP16, BF16, INT32, INT64, BOOL|`axes` must be resolvable to a constant.
Upsample|Y|FP32, FP16, BF16|
Where|Y|FP32, FP16, BF16, INT32, INT64, BOOL|
Xor|Y|BOOL|
"""

# ops docs/Changelog.md says were added after 10.0 -> the minor version that added them
_TRT_ADDED_IN: dict[str, int] = {
    "DeformConv": 1,
    "BlackmanWindow": 4,
    "HammingWindow": 4,
    "HannWindow": 4,
    "STFT": 5,
    "Attention": 14,
    "RotaryEmbedding": 15,
    "RMSNormalization": 15,
    "TensorScatter": 15,
}
_TRT_LATEST_MINOR = 15
_TRT_OPSET_MIN = 9
# documented maxima: 10.0 -> opset 20, 10.15 -> opset 24 (each release's operators.md header)
_TRT_OPSET_MAX_DOCUMENTED = {0: 20, 15: 24}

# ONNX element type -> the type names operators.md uses
_ONNX_TO_TRT_TYPE: dict[int, str] = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.DOUBLE: "DOUBLE",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.INT4: "INT4",
    onnx.TensorProto.FLOAT8E4M3FN: "FP8",
    onnx.TensorProto.FLOAT4E2M1: "FP4",
}
_QUANTIZED_TYPES = frozenset({"INT8", "FP8", "INT4", "FP4"})
_IO_TYPES = frozenset({"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL", "UINT8"})
_STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

# which inputs carry the op's data type "T" (the matrix's "supported types"); the others are indices, shapes, axes
_ALL_INPUTS = frozenset(
    {
        *("Add", "Sub", "Mul", "Div", "Max", "Min", "Mean", "Sum", "Mod", "Concat", "Clip", "Range", "PRelu"),
        *("Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor"),
        *("MatMul", "Gemm", "Conv", "ConvTranspose"),
        *("BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"),
    }
)
_OUTPUT_TYPED = frozenset({"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "Cast", "CastLike"})


def _type_name(elem_type: int) -> str:
    name = _ONNX_TO_TRT_TYPE.get(elem_type)
    if name is not None:
        return name
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"type{elem_type}"


@dataclasses.dataclass(frozen=True)
class _OpSupport:
    supported: bool
    types: frozenset[str]
    restriction: str


def _parse_matrix(text: str) -> dict[str, _OpSupport]:
    table: dict[str, _OpSupport] = {}
    rows: list[str] = []
    for line in text.strip().splitlines():
        if line.startswith("    "):  # a long restriction continues on the next line
            rows[-1] += " " + line.strip()
        else:
            rows.append(line)
    for line in rows:
        op, yn, types, *rest = line.split("|")
        table[op] = _OpSupport(
            supported=yn == "Y",
            types=frozenset(t.strip() for t in types.split(",") if t.strip()),
            restriction="|".join(rest).strip(),
        )
    return table


_MATRIX = _parse_matrix(_TRT_MATRIX_10_15)


@dataclasses.dataclass(frozen=True)
class _TrtTable:
    """The operator table of one TensorRT 10.minor parser."""

    version: str
    minor: int
    ops: dict[str, _OpSupport]
    opset_max: int

    @property
    def opset_documented(self) -> bool:
        return self.minor in _TRT_OPSET_MAX_DOCUMENTED


def _build_table(minor: int, version: str) -> _TrtTable:
    ops: dict[str, _OpSupport] = {}
    for op, sup in _MATRIX.items():
        if _TRT_ADDED_IN.get(op, 0) > minor:
            continue  # added by a later 10.x (docs/Changelog.md)
        types, restriction = sup.types, sup.restriction
        if minor < 8:
            types = types - {"FP4"}  # 10.8: "Added support for FLOAT4E2M1 types for quantized networks"
        if op == "Pow" and minor < 12:
            types = types - {"INT32", "INT64"}  # 10.12: "integer-typed base tensors for Pow"
        if op == "Einsum" and minor < 12:
            # lifted in 10.12: "Added support for ellipses, diagonal, and broadcasting in Einsum"
            restriction = (
                "Ellipsis and diagonal operations are not supported. Broadcasting between inputs is not supported"
            )
        ops[op] = _OpSupport(sup.supported, types, restriction)
    opset_max = _TRT_OPSET_MAX_DOCUMENTED[15] if minor >= 15 else _TRT_OPSET_MAX_DOCUMENTED[0]
    return _TrtTable(version=version, minor=minor, ops=ops, opset_max=opset_max)


TRT_VERSIONS: tuple[str, ...] = ("10.x", *(f"10.{m}" for m in range(_TRT_LATEST_MINOR + 1)))


def _trt_table(trt_version: str) -> _TrtTable:
    """The table for ``"10.x"``, ``"10.3"``, ``"10.3.0"``, ``"10.3.0.30"``.

    Raises:
        ConfigError: for a version without data, listing the known ones.
    """
    v = str(trt_version).strip().lower()
    if v in ("10", "10.x"):
        return _build_table(0, "10.x")
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+){0,2}", v)
    if match and int(match.group(1)) == 10 and int(match.group(2)) <= _TRT_LATEST_MINOR:
        minor = int(match.group(2))
        return _build_table(minor, f"10.{minor}")
    raise ConfigError(
        f"no TensorRT operator table for version {trt_version!r}; known versions: {', '.join(TRT_VERSIONS)} "
        f"(a patch level such as 10.3.0 is fine; JetPack 6 ships {DEFAULT_TRT_VERSION})"
    )


def trt_op_support(op_type: str, trt_version: str = DEFAULT_TRT_VERSION) -> dict[str, Any] | None:
    """What the encoded matrix says about one op: ``{supported, types, restriction}``, or None if it is not listed.

    Raises:
        ConfigError: for an unknown ``trt_version``.
    """
    sup = _trt_table(trt_version).ops.get(op_type)
    if sup is None:
        return None
    return {"supported": sup.supported, "types": sorted(sup.types), "restriction": sup.restriction}


# ----------------------------------------------------------------------------------------------------------------
# report


@dataclasses.dataclass(frozen=True)
class Issue:
    """One finding.

    Attributes:
        severity: ``"error"`` (would fail to parse or build on the device), ``"warning"`` (builds, but not as
            intended: e.g. a layer TensorRT runs in float in an INT8 model) or ``"info"`` (what to do on the device).
        node: the node's name ("" for a model-level finding).
        op_type: the node's op type, ``domain::op`` outside the default domain ("" for a model-level finding).
        message: what is wrong and what to do about it.
        code: a short machine-readable kind, e.g. ``"unsupported-op"``, ``"dtype"``, ``"qdq-zero-point"``.
    """

    severity: str
    node: str
    op_type: str
    message: str
    code: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        where = f"{self.node} ({self.op_type})" if self.node else (self.op_type or "model")
        return f"{self.severity.upper():7s} {where}: {self.message}"


@dataclasses.dataclass(frozen=True)
class CheckReport:
    """The result of one check of one model for one target.

    Attributes:
        target: ``"tensorrt"`` or ``"tvm"``.
        version: the TensorRT table used (``"10.3"``) or the installed TVM version.
        model: the checked file (or the graph's name for an in-memory model).
        issues: every finding, errors first, in graph order within a severity.
        census: ``{op_type: count}`` (``domain::op`` outside the default domain).
        source: where the rules come from.
        options: the options the check ran with (TVM target, input shapes, compiled or not, ...).
        artifact: the bundle artifact id, for ``check_bundle``.
        seconds: wall time of the check.
    """

    target: str
    version: str
    model: str
    issues: list[Issue]
    census: dict[str, int]
    source: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    artifact: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No error: nothing is expected to fail on the device (warnings may still cost speed)."""
        return not self.errors

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def infos(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "info"]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (plain types only)."""
        return {
            "target": self.target,
            "version": self.version,
            "model": self.model,
            "artifact": self.artifact,
            "ok": self.ok,
            "counts": {s: sum(i.severity == s for i in self.issues) for s in SEVERITIES},
            "issues": [i.to_dict() for i in self.issues],
            "census": dict(self.census),
            "source": self.source,
            "options": jsonable(self.options),
            "seconds": round(self.seconds, 4),
        }

    def lines(self) -> list[str]:
        """Human-readable lines: a header, then one line per issue."""
        what = f"{self.artifact} ({self.model})" if self.artifact else self.model
        verdict = "OK" if self.ok else "FAILS"
        n = {s: sum(i.severity == s for i in self.issues) for s in SEVERITIES}
        head = (
            f"{what}: {self.target} {self.version}: {verdict} "
            f"({n['error']} errors, {n['warning']} warnings, {n['info']} notes)"
        )
        return [head, *(f"  {i}" for i in self.issues)]


_ORDER = {s: i for i, s in enumerate(SEVERITIES)}


def _sorted(issues: list[Issue]) -> list[Issue]:
    return sorted(issues, key=lambda i: _ORDER[i.severity])  # stable: graph order within a severity


# ----------------------------------------------------------------------------------------------------------------
# graph facts: types, shapes, constants, producers, consumers (subgraphs included)


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in _STANDARD_DOMAINS else f"{node.domain}::{node.op_type}"


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield from _graph._graphs(graph)


class _Facts:
    """What the checks look up: elem type and shape per tensor, constant values, producer and consumers."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list[int | None]] = {}
        self.consts: dict[str, onnx.TensorProto] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.nodes: list[onnx.NodeProto] = []
        self.graph_inputs: set[str] = set()
        for g in _graphs(model.graph):
            for vi in [*g.input, *g.output, *g.value_info]:
                self._value_info(vi)
            for init in g.initializer:
                self.types[init.name] = init.data_type
                self.shapes[init.name] = [int(d) for d in init.dims]
                self.consts[init.name] = init
            for node in g.node:
                self.nodes.append(node)
                for out in node.output:
                    if out:
                        self.producer[out] = node
                for inp in node.input:
                    if inp:
                        self.consumers[inp].append(node)
                if node.op_type == "Constant" and node.domain in _STANDARD_DOMAINS and node.output:
                    t = _constant_tensor(node)
                    if t is not None:
                        self.consts[node.output[0]] = t
                        self.types.setdefault(node.output[0], t.data_type)
                        self.shapes.setdefault(node.output[0], [int(d) for d in t.dims])
        inits = {i.name for i in model.graph.initializer}
        self.graph_inputs = {i.name for i in model.graph.input if i.name not in inits}
        for name in self.graph_inputs:  # an initializer shadowed by a graph input is not a constant
            self.consts.pop(name, None)

    def _value_info(self, vi: onnx.ValueInfoProto) -> None:
        if not vi.type.HasField("tensor_type"):
            return
        tt = vi.type.tensor_type
        if tt.elem_type:
            self.types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            self.shapes[vi.name] = [int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim]

    def type_of(self, name: str) -> str | None:
        t = self.types.get(name)
        return None if t is None else _type_name(t)

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def const_value(self, name: str) -> np.ndarray | None:
        t = self.consts.get(name)
        if t is None:
            return None
        try:
            return numpy_helper.to_array(t)
        except Exception:  # external data not loaded, exotic types: the value is unknown, not an error
            return None

    def is_weight(self, name: str) -> bool:
        """A build-time constant, possibly through DequantizeLinear / QuantizeLinear / Identity / Cast."""
        seen = 0
        while name and seen < 8:
            if self.is_const(name):
                return True
            node = self.producer.get(name)
            if node is None or node.op_type not in ("DequantizeLinear", "QuantizeLinear", "Identity", "Cast"):
                return False
            name, seen = node.input[0] if node.input else "", seen + 1
        return False


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return a.t
        if a.name == "value_float":
            return numpy_helper.from_array(np.array(a.f, dtype=np.float32))
        if a.name == "value_floats":
            return numpy_helper.from_array(np.array(list(a.floats), dtype=np.float32))
        if a.name == "value_int":
            return numpy_helper.from_array(np.array(a.i, dtype=np.int64))
        if a.name == "value_ints":
            return numpy_helper.from_array(np.array(list(a.ints), dtype=np.int64))
    return None


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _load(model: onnx.ModelProto | str | os.PathLike) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "<in-memory model>"
    path = Path(model)
    if not path.is_file():
        raise ConfigError(f"ONNX model {os.fspath(path)!r} not found; export it first (edgesep export)")
    try:
        return onnx.load(os.fspath(path)), os.fspath(path)
    except Exception as e:  # protobuf DecodeError and friends: not an ONNX file
        raise ConfigError(f"{os.fspath(path)} is not a readable ONNX model ({type(e).__name__}: {e})") from e


def _infer(model: onnx.ModelProto, issues: list[Issue]) -> onnx.ModelProto:
    """Strict shape inference with data propagation; on failure an error, then the lenient result to go on with."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        issues.append(
            Issue(
                "error",
                "",
                "",
                f"strict ONNX shape inference fails ({first[:400]}); TensorRT's parser needs every tensor's type and "
                "rank. Fix the graph (or the op named in the message) and re-export",
                "shape-inference",
            )
        )
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        return model


def _check_valid(model: onnx.ModelProto, issues: list[Issue]) -> None:
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        issues.append(Issue("error", "", "", f"onnx.checker rejects the model: {first[:400]}", "invalid-onnx"))


def _default_opset(model: onnx.ModelProto) -> int | None:
    for o in model.opset_import:
        if o.domain in _STANDARD_DOMAINS:
            return int(o.version)
    return None


def _dynamic_inputs(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    return {k: v for k, v in _graph.input_shapes(model).items() if any(not isinstance(d, int) for d in v)}


# ----------------------------------------------------------------------------------------------------------------
# TensorRT


def _data_inputs(node: onnx.NodeProto) -> list[str]:
    """The inputs whose type the matrix's "supported types" column constrains."""
    op, ins = node.op_type, list(node.input)
    if op in _OUTPUT_TYPED and op not in ("Cast", "CastLike"):
        return []
    if op == "Where":
        return [i for i in ins[1:3] if i]
    if op in ("Pow", "QuantizeLinear", "DequantizeLinear"):
        return [ins[0]] if ins and ins[0] else []
    if op in _ALL_INPUTS:
        return [i for i in ins if i]
    return [ins[0]] if ins and ins[0] else []


def _dtype_message(t: str, op: str, sup: _OpSupport, version: str) -> str:
    listed = ", ".join(sorted(sup.types)) or "none"
    if t == "DOUBLE":
        return (
            f"float64 tensor: TensorRT {version} has no DOUBLE kernels ({op} supports {listed}; the parser can only "
            "cast float64 initializers down to float32, clamping to +-FLT_MAX). Export the model in float32"
        )
    if t in _QUANTIZED_TYPES:
        return (
            f"{t} tensor outside Q/DQ: TensorRT treats {t} as a quantized type, available only through "
            f"QuantizeLinear -> DequantizeLinear pairs; {op} supports {listed}. Use QDQ-format quantization "
            "(QuantFormat.QDQ), not integer ops"
        )
    if t == "UINT8":
        return (
            f"UINT8 tensor inside the graph: TensorRT supports UINT8 only as a network input or output; {op} "
            f"supports {listed}. Cast to float32 right after the input"
        )
    return f"{op} with a {t} input: TensorRT {version} supports {listed} for {op}"


def _node_issue(issues: list[Issue], sev: str, node: onnx.NodeProto, message: str, code: str) -> None:
    issues.append(Issue(sev, _node_name(node), _op_key(node), message, code))


def _check_trt_node(node: onnx.NodeProto, f: _Facts, table: _TrtTable, issues: list[Issue], noted: set[str]) -> None:
    op, v = node.op_type, table.version
    if node.domain not in _STANDARD_DOMAINS:
        local = any(fn.domain == node.domain and fn.name == node.op_type for fn in f.model.functions)
        if local:
            _node_issue(
                issues,
                "warning",
                node,
                f"custom-domain op {node.domain}::{op} is a model-local function: TensorRT >= 9 inlines local "
                "functions, this check does not look inside it. Prefer standard ops",
                "custom-domain",
            )
        else:
            _node_issue(
                issues,
                "error",
                node,
                f"custom-domain op {node.domain}::{op}: TensorRT's ONNX parser has no importer for it and needs a "
                "TensorRT plugin of that name. Lower it to standard ONNX ops at export (custom_translation_table)",
                "custom-domain",
            )
        return
    sup = table.ops.get(op)
    if sup is None:
        later = f" (added in TensorRT 10.{_TRT_ADDED_IN[op]})" if op in _TRT_ADDED_IN else ""
        _node_issue(
            issues,
            "error",
            node,
            f"{op} is not in the TensorRT {v} ONNX operator matrix{later}: the parser has no importer for it. "
            "Replace it with supported ops or provide a TensorRT plugin",
            "unsupported-op",
        )
        return
    if not sup.supported:
        hint = {
            "MatMulInteger": "; quantize in QDQ format (QuantizeLinear/DequantizeLinear around MatMul), not QOperator",
            "ConvInteger": "; quantize in QDQ format (QuantizeLinear/DequantizeLinear around Conv), not QOperator",
            "QLinearConv": "; quantize in QDQ format (QuantFormat.QDQ), not QOperator",
            "QLinearMatMul": "; quantize in QDQ format (QuantFormat.QDQ), not QOperator",
            "DynamicQuantizeLinear": "; use static QDQ quantization",
        }.get(op, "")
        _node_issue(
            issues,
            "error",
            node,
            f"{op} is not supported by TensorRT {v} (operators.md: N){hint}",
            "unsupported-op",
        )
        return

    # types
    names = list(_data_inputs(node))
    if op in ("Cast", "CastLike") or op in _OUTPUT_TYPED:
        names += [o for o in node.output[:1] if o]
    for name in dict.fromkeys(names):
        t = f.type_of(name)
        if t is None or t in sup.types:
            continue
        if op in ("QuantizeLinear", "DequantizeLinear"):
            continue  # reported with the Q/DQ rules, which say what to change
        _node_issue(issues, "error", node, f"{name!r}: " + _dtype_message(t, op, sup, v), "dtype")
    for name in node.output:  # a float64 result anywhere is a float64 compute
        if name and f.type_of(name) == "DOUBLE" and op not in ("Cast", "CastLike", "Constant"):
            msg = f"output {name!r} is float64: " + _dtype_message("DOUBLE", op, sup, v)
            _node_issue(issues, "error", node, msg, "dtype")

    if op in ("QuantizeLinear", "DequantizeLinear"):
        _check_qdq_node(node, f, issues)
    else:
        encoded = _check_restrictions(node, f, table, issues)
        if sup.restriction and not encoded and op not in noted:
            noted.add(op)
            _node_issue(
                issues,
                "info",
                node,
                f"TensorRT {v} restriction on {op} (not checked here): {sup.restriction}",
                "restriction",
            )


def _const_or_missing(f: _Facts, node: onnx.NodeProto, index: int) -> bool:
    return len(node.input) <= index or not node.input[index] or f.is_const(node.input[index])


def _check_restrictions(node: onnx.NodeProto, f: _Facts, table: _TrtTable, issues: list[Issue]) -> bool:
    """The matrix's restrictions this module encodes; returns whether the op's restriction is fully covered."""
    op, v = node.op_type, table.version

    def err(msg: str, code: str = "restriction") -> None:
        _node_issue(issues, "error", node, msg, code)

    if op in ("AveragePool", "MaxPool", "LpPool"):
        kernel = _attr(node, "kernel_shape", [])
        if op != "LpPool" and len(kernel) not in (2, 3):
            err(f"{op} with a {len(kernel)}-D kernel: TensorRT {v} pools in 2D or 3D only; reshape to 2D (N, C, 1, L)")
        dil = _attr(node, "dilations", [])
        if dil and any(d != 1 for d in dil):
            err(f"{op} with dilations {list(dil)}: TensorRT {v} requires dilations empty or all ones")
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            err(f"MaxPool's Indices output is unsupported by TensorRT {v}; drop it (return_indices=False)")
        return True
    if op == "Resize":
        ctm = _attr(node, "coordinate_transformation_mode", "half_pixel")
        mode = _attr(node, "mode", "nearest")
        nearest = _attr(node, "nearest_mode", "round_prefer_floor")
        ok_ctm = ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners")
        if ctm not in ok_ctm:
            err(f"Resize coordinate_transformation_mode={ctm!r}: TensorRT {v} supports {', '.join(ok_ctm)}")
        if mode not in ("nearest", "linear"):
            err(f"Resize mode={mode!r}: TensorRT {v} supports nearest and linear only (no cubic)")
        ok_nearest = ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil")
        if mode == "nearest" and nearest not in ok_nearest:
            err(f"Resize nearest_mode={nearest!r}: TensorRT {v} supports {', '.join(ok_nearest)}")
        if _attr(node, "antialias", 0):
            err(f"Resize with antialias=1: antialiasing is not supported by TensorRT {v}")
        policy = _attr(node, "keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            err(f"Resize keep_aspect_ratio_policy={policy!r}: TensorRT {v} supports stretch only")
        axes = _attr(node, "axes")
        rank = len(f.shapes.get(node.input[0], []) or [])
        if axes is not None and rank and list(axes) != list(range(rank)) and len(node.input) > 2 and node.input[2]:
            err(f"Resize with scales and axes {list(axes)}: TensorRT {v} needs axes = 0..rank-1 when scales is given")
        return True
    if op == "Slice" and table.minor < 3 and not _const_or_missing(f, node, 3):
        err(f"Slice with a tensor `axes` input: supported from TensorRT 10.3; {v} needs constant axes")
        return True
    if op == "Pad":
        if table.minor < 4 and not _const_or_missing(f, node, 3):
            err(f"Pad with a tensor `axes` input: supported from TensorRT 10.4; {v} needs constant axes")
        return True
    if op in ("Squeeze", "Unsqueeze"):
        if not _const_or_missing(f, node, 1):
            _node_issue(
                issues,
                "warning",
                node,
                f"{op} `axes` is computed at run time; TensorRT {v} requires axes resolvable to a constant. Fold "
                "constants (polygraphy surgeon sanitize --fold-constants) or export static axes",
                "restriction",
            )
        return True
    if op.startswith("Reduce"):
        if not _const_or_missing(f, node, 1):
            err(f"{op} `axes` is not an initializer: TensorRT {v} requires it to be one")
        return True
    if op in ("CumSum", "OneHot"):
        which = "axis" if op == "CumSum" else "depth"
        if not _const_or_missing(f, node, 1):
            err(f"{op} `{which}` must be a build-time constant for TensorRT {v}")
        return True
    if op == "TopK":
        if _attr(node, "sorted", 1) != 1:
            err(f"TopK with sorted=0: TensorRT {v} requires sorted=1")
        k = f.const_value(node.input[1]) if len(node.input) > 1 else None
        if k is not None and k.size and int(np.max(k)) >= 3840:
            err(f"TopK with K={int(np.max(k))}: TensorRT {v} requires K < 3840")
        return True
    if op == "Dropout":
        if len(node.input) > 2 and node.input[2]:
            val = f.const_value(node.input[2])
            if val is None or bool(np.any(val)):
                err(f"Dropout `training_mode` must be an initializer evaluating to False for TensorRT {v}")
        return True
    if op == "LayerNormalization":
        if any(o for o in node.output[1:]):
            err(f"LayerNormalization: only the first output Y is supported by TensorRT {v}; drop Mean/InvStdDev")
        return True
    if op == "ScatterND":
        red = _attr(node, "reduction", "none")
        if red != "none":
            err(f"ScatterND reduction={red!r}: TensorRT {v} supports reduction='none' only")
        return True
    if op == "Constant":
        bad = [a.name for a in node.attribute if a.name in ("sparse_value", "value_string", "value_strings")]
        if bad:
            err(f"Constant with attribute {bad[0]!r}: unsupported by TensorRT {v}")
        return True
    if op == "LSTM":
        if _attr(node, "input_forget", 0) != 0 or _attr(node, "layout", 0) != 0:
            err(f"LSTM with input_forget != 0 or layout != 0: TensorRT {v} requires both 0")
        return False  # the bidirectional activation rule is not checked
    if op == "GridSample":
        rank = len(f.shapes.get(node.input[0], []) or [])
        if rank and rank != 4:
            err(f"GridSample with a {rank}-D input: TensorRT {v} requires a 4D input")
        return True
    if op == "Einsum" and table.minor < 12:
        eq = str(_attr(node, "equation", ""))
        if "..." in eq:
            err(f"Einsum with an ellipsis ({eq!r}): supported from TensorRT 10.12")
        return False  # diagonal and broadcasting are not checked
    return False


def _values(f: _Facts, name: str) -> np.ndarray | None:
    return f.const_value(name) if name else None


def _trt_quantized_type(q: onnx.NodeProto, f: _Facts) -> str | None:
    """The type TensorRT quantizes a QuantizeLinear to: output_dtype, else the zero point's type, else INT8."""
    out_dtype = _attr(q, "output_dtype", 0)
    if out_dtype:
        return _type_name(int(out_dtype))
    if len(q.input) > 2 and q.input[2]:
        return f.type_of(q.input[2])
    return "INT8"


def _check_qdq_node(node: onnx.NodeProto, f: _Facts, issues: list[Issue]) -> None:
    """Zero point, scale, quantized type and granularity of one QuantizeLinear / DequantizeLinear."""
    is_dq = node.op_type == "DequantizeLinear"
    ins = [*node.input, "", "", ""]
    data, scale, zp = ins[0], ins[1], ins[2]

    def err(msg: str, code: str) -> None:
        _node_issue(issues, "error", node, msg, code)

    # the quantized type. ONNX defaults a Q without zero point to UINT8, but TensorRT's parser picks INT8 then
    # ("ONNX default is UINT8, TRT will default to INT8"); a UINT8 DequantizeLinear input is refused outright
    if is_dq:
        qtype = f.type_of(data)
        src = f.producer.get(data)
        if qtype == "UINT8" and src is not None and src.op_type == "QuantizeLinear":
            qtype = _trt_quantized_type(src, f)
    else:
        qtype = _trt_quantized_type(node, f)
    if qtype is not None and qtype not in _QUANTIZED_TYPES:
        if qtype == "INT32":
            err(
                f"DequantizeLinear of INT32 {data!r}: TensorRT quantizes to INT8 / FP8 / INT4 / FP4 only, an INT32 "
                "DequantizeLinear is refused (ONNX Runtime quantizes biases to INT32 by default). Keep biases float: "
                "quantize_static(..., extra_options={'QuantizeBias': False})",
                "qdq-dtype",
            )
        elif qtype == "UINT8":
            err(
                f"{node.op_type} with UINT8 data: TensorRT supports UINT8 (asymmetric) quantization only on DLA; "
                "use signed symmetric INT8 (QuantType.QInt8 with a zero point of 0)",
                "qdq-dtype",
            )
        else:
            err(f"{node.op_type} with {qtype} quantized data: TensorRT supports INT8, FP8, INT4 and FP4", "qdq-dtype")
    if not is_dq:
        t = f.type_of(data)
        if t is not None and t not in ("FP32", "FP16", "BF16"):
            err(f"QuantizeLinear of a {t} tensor: TensorRT quantizes FP32, FP16 or BF16 only", "qdq-dtype")

    # scale: a strictly positive build-time constant
    if not scale:
        err(f"{node.op_type} without a scale input", "qdq-scale")
        return
    sc = _values(f, scale)
    if not f.is_const(scale):
        err(
            f"{node.op_type} scale {scale!r} is computed at run time: TensorRT needs a build-time constant scale "
            "(an initializer or Constant)",
            "qdq-scale",
        )
    elif sc is not None and not bool(np.all(sc > 0)):
        err(f"{node.op_type} scale {scale!r} has non-positive values: TensorRT requires every scale > 0", "qdq-scale")

    # zero point: all zeros (symmetric)
    if zp:
        z = _values(f, zp)
        if z is not None and np.any(z != 0):
            nz = z[z != 0]
            err(
                f"{node.op_type} zero point {zp!r} is not 0 ({nz.size} of {z.size} values, e.g. {nz.flat[0]}): "
                "TensorRT supports symmetric quantization only. Re-quantize with symmetric activations and weights "
                "(ONNX Runtime: extra_options={'ActivationSymmetric': True, 'WeightSymmetric': True})",
                "qdq-zero-point",
            )
        elif z is None and not f.is_const(zp):
            err(f"{node.op_type} zero point {zp!r} is not a constant; TensorRT must verify it is 0", "qdq-zero-point")

    # granularity: per-tensor, per-channel (1-D along axis), or block (INT4 only)
    if sc is not None and sc.size > 1:
        if sc.ndim >= 2 and qtype not in ("INT4", "FP4"):
            err(
                f"{node.op_type} with {sc.ndim}-D (block) scales: TensorRT supports block quantization for INT4 / "
                "FP4 weights only; use per-tensor or per-channel scales for INT8",
                "qdq-granularity",
            )
        elif sc.ndim == 1:
            shape = f.shapes.get(data)
            axis = int(_attr(node, "axis", 1))
            if shape:
                ax = axis + len(shape) if axis < 0 else axis
                if not 0 <= ax < len(shape):
                    err(f"{node.op_type} axis {axis} is out of range for a rank-{len(shape)} input", "qdq-granularity")
                elif shape[ax] is not None and shape[ax] != sc.size:
                    err(
                        f"{node.op_type} has {sc.size} scales but axis {axis} has {shape[ax]} channels",
                        "qdq-granularity",
                    )
            if not f.is_weight(data):
                _node_issue(
                    issues,
                    "warning",
                    node,
                    f"per-channel scales ({sc.size}, axis {axis}) on an activation: TensorRT's INT8 kernels expect "
                    "per-tensor activation scales (per-channel is for constant weights)",
                    "qdq-placement",
                )


def _expected_weight_axis(node: onnx.NodeProto, weight_index: int, rank: int) -> int | None:
    """The output-channel axis TensorRT wants per-channel weight scales on; None when there is no clear one."""
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1 if int(_attr(node, "group", 1)) == 1 else None
    if op == "Gemm":
        if weight_index != 1:
            return None
        return 0 if int(_attr(node, "transB", 0)) else 1
    if op == "MatMul":
        return rank - 1 if weight_index == 1 and rank >= 2 else None
    return None


def _check_placement(f: _Facts, issues: list[Issue]) -> None:
    """QDQ placement TensorRT needs for INT8 kernels on Conv / ConvTranspose / Gemm / MatMul."""
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in f.nodes)
    weighted = [n for n in f.nodes if n.op_type in WEIGHTED_OPS and n.domain in _STANDARD_DOMAINS]
    if not has_qdq:
        if weighted:
            issues.append(
                Issue(
                    "info",
                    "",
                    "",
                    "no Q/DQ nodes: TensorRT builds a float engine (FP32; add --fp16 to trtexec for FP16 kernels). For "
                    "INT8 build from the model's QDQ (int8) artifact",
                    "precision",
                )
            )
        return
    for node in weighted:
        ins = [i for i in node.input[:2]]
        if len(ins) < 2:
            continue
        if node.op_type in ("MatMul", "Gemm") and not f.is_weight(ins[1]) and f.is_weight(ins[0]):
            w_idx = 0
            _node_issue(
                issues,
                "warning",
                node,
                f"the weight {ins[0]!r} is the LEFT operand of {node.op_type}: TensorRT's INT8 GEMMs take per-channel "
                "weight scales on the output channels of the right operand. Export y = x @ W^T (weight on the right)",
                "qdq-placement",
            )
        else:
            w_idx = 1 if f.is_weight(ins[1]) else None
        unfed = [name for name in ins if not (f.producer.get(name) and f.producer[name].op_type == "DequantizeLinear")]
        if unfed:
            _node_issue(
                issues,
                "warning",
                node,
                f"{node.op_type} runs in float on TensorRT: input(s) {', '.join(map(repr, unfed))} do not come from a "
                "DequantizeLinear; INT8 kernels need Q/DQ on both the activation and the weight",
                "qdq-placement",
            )
        if w_idx is None:
            continue
        dq = f.producer.get(ins[w_idx])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 2:
            continue
        sc = f.const_value(dq.input[1])
        shape = f.shapes.get(dq.output[0]) or f.shapes.get(dq.input[0]) or []
        if sc is None or sc.size <= 1:
            continue  # per-tensor weight scales: valid for TensorRT
        axis = int(_attr(dq, "axis", 1))
        rank = len(shape)
        ax = axis + rank if axis < 0 and rank else axis
        want = _expected_weight_axis(node, w_idx, rank)
        if want is not None and ax != want:
            _node_issue(
                issues,
                "warning",
                node,
                f"weight {ins[w_idx]!r} ({'x'.join(str(d) for d in shape) or '?'}) is quantized per-channel on axis "
                f"{axis}, but TensorRT's INT8 {node.op_type} needs the scales on the output-channel axis {want}; "
                "TensorRT will not use INT8 kernels with these scales. Re-quantize per-channel on the output axis",
                "qdq-placement",
            )


def check_tensorrt(
    onnx_model_or_path: onnx.ModelProto | str | os.PathLike, *, trt_version: str = DEFAULT_TRT_VERSION
) -> CheckReport:
    """Check an ONNX model against TensorRT's ONNX parser and INT8 rules, offline (TensorRT is not needed).

    Checks: onnx.checker and strict shape inference (with data propagation); the opset against the parser's range;
    graph input/output types; for every node (subgraphs included), its domain, op (the operator matrix of
    ``trt_version``), the types of its data inputs and outputs (no float64, no INT8 outside Q/DQ, UINT8 only at the
    graph edge), the matrix's restrictions that can be decided from the graph (pooling, Resize modes, constant
    axes, ...); Q/DQ rules (zero point 0, positive constant scales, INT8/FP8/INT4/FP4 data, per-tensor or per-channel
    scales); and QDQ placement for INT8 kernels (warnings). Dynamic input dims get a note about optimization
    profiles.

    Args:
        onnx_model_or_path: a ModelProto or the path of a .onnx file.
        trt_version: the TensorRT on the device: ``"10.3"`` (JetPack 6), any ``"10.0"`` .. ``"10.15"`` (a patch
            level is ignored), or ``"10.x"`` for what every 10.x accepts.
    Returns:
        A ``CheckReport``; ``report.ok`` is False when something would fail to parse or build.
    Raises:
        ConfigError: for an unknown ``trt_version`` or an unreadable file.
    """
    t0 = time.perf_counter()
    table = _trt_table(trt_version)
    model, label = _load(onnx_model_or_path)
    issues: list[Issue] = []
    _check_valid(model, issues)
    inferred = _infer(model, issues)
    f = _Facts(inferred)

    opset = _default_opset(model)
    if opset is not None and opset < _TRT_OPSET_MIN:
        issues.append(
            Issue(
                "error",
                "",
                "",
                f"default-domain opset {opset}: TensorRT 10 parses opset {_TRT_OPSET_MIN} and newer; convert it "
                "(onnx.version_converter) or re-export",
                "opset",
            )
        )
    elif opset is not None and opset > table.opset_max:
        documented = "its operators.md" if table.opset_documented else "the 10.0 operators.md (10.15: up to 24)"
        issues.append(
            Issue(
                "warning",
                "",
                "",
                f"default-domain opset {opset} is above {table.opset_max}, the newest opset documented for TensorRT "
                f"{table.version} ({documented}); the parser may reject newer op versions. Export with opset <= "
                f"{table.opset_max} (export_onnx's default is 18)",
                "opset",
            )
        )
    if model.functions:
        names = ", ".join(sorted(f"{fn.domain}::{fn.name}" for fn in model.functions))
        issues.append(Issue("info", "", "", f"model-local functions ({names}) are inlined by the parser", "functions"))

    # graph inputs and outputs
    for vi, kind in [(i, "input") for i in model.graph.input if i.name in f.graph_inputs] + [
        (o, "output") for o in model.graph.output
    ]:
        t = f.type_of(vi.name)
        if t is None:
            continue
        if t not in _IO_TYPES:
            issues.append(
                Issue(
                    "error",
                    "",
                    "",
                    f"graph {kind} {vi.name!r} is {t}: TensorRT I/O bindings are FP32, FP16, BF16, INT32, INT64, BOOL "
                    "or UINT8" + (" (export in float32)" if t == "DOUBLE" else ""),
                    "io-dtype",
                )
            )
        elif t == "INT64":
            issues.append(
                Issue(
                    "info",
                    "",
                    "",
                    f"graph {kind} {vi.name!r} is INT64: TensorRT >= 9 binds it as int64 (no longer cast to INT32); "
                    "pass int64 buffers",
                    "io-dtype",
                )
            )
    for name, dims in _dynamic_inputs(model).items():
        issues.append(
            Issue(
                "info",
                "",
                "",
                f"input {name!r} has dynamic dims {dims}: fine for TensorRT, but the engine needs an optimization "
                f"profile (trtexec --minShapes/--optShapes/--maxShapes={name}:...; IOptimizationProfile), and is "
                "fastest at its opt shape",
                "dynamic-shape",
            )
        )

    noted: set[str] = set()
    for node in f.nodes:
        _check_trt_node(node, f, table, issues, noted)
    _check_placement(f, issues)

    return CheckReport(
        target="tensorrt",
        version=table.version,
        model=label,
        issues=_sorted(issues),
        census=_graph.op_census(model),
        source=TRT_SOURCE + (" (10.15 itself)" if table.minor == _TRT_LATEST_MINOR else ""),
        options={"trt_version": str(trt_version), "opset": opset},
        seconds=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------------------------------------------
# TVM


def _import_tvm() -> tuple[Any, Any, Any]:
    try:
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx
    except ImportError as e:
        raise BackendMissingError(
            f"check_tvm needs Apache TVM (the apache-tvm wheel), which is not importable ({e}); "
            "pip install 'edgesep[tvm]'"
        ) from e
    return tvm, relax, from_onnx


def _tvm_convert_map() -> set[str] | None:
    """The op types TVM's Relax ONNX frontend converts (a private table: None if this TVM lacks it)."""
    try:
        from tvm.relax.frontend.onnx import onnx_frontend

        return set(onnx_frontend._get_convert_map()) | {"If", "Constant"}
    except Exception:
        return None


def _concrete_shapes(
    model: onnx.ModelProto, shape_dict: Mapping[str, Sequence[int]] | None, issues: list[Issue]
) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for name, dims in _graph.input_shapes(model).items():
        if shape_dict is not None and name in shape_dict:
            shapes[name] = [int(d) for d in shape_dict[name]]
            continue
        fixed = []
        for i, d in enumerate(dims):
            if isinstance(d, int):
                fixed.append(d)
            else:
                fixed.append(1)
                if i > 0:
                    issues.append(
                        Issue(
                            "info",
                            "",
                            "",
                            f"input {name!r} dim {i} ({d!r}) is dynamic; the dry run fixes it to 1. Pass shape_dict "
                            "with the deployed shape",
                            "dynamic-shape",
                        )
                    )
        shapes[name] = fixed
    if shape_dict is not None:
        unknown = sorted(set(shape_dict) - set(shapes))
        if unknown:
            raise ConfigError(f"shape_dict names {unknown}, which are not graph inputs; inputs: {sorted(shapes)}")
    return shapes


def _input_dtypes(model: onnx.ModelProto) -> dict[str, str]:
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for i in model.graph.input:
        if i.name in inits or not i.type.HasField("tensor_type"):
            continue
        out[i.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)).name
    return out


def _nodes_of(f_nodes: Sequence[onnx.NodeProto], op_type: str) -> list[onnx.NodeProto]:
    return [n for n in f_nodes if n.op_type == op_type]


def check_tvm(
    onnx_model_or_path: onnx.ModelProto | str | os.PathLike,
    *,
    target: str | Mapping[str, Any] = "llvm",
    shape_dict: Mapping[str, Sequence[int]] | None = None,
    build: bool | None = None,
) -> CheckReport:
    """A TVM (0.27, Relax) import dry run: what would fail when this model is compiled for ``target``.

    Runs ``tvm.relax.frontend.onnx.from_onnx`` with concrete input shapes (batch 1; other dynamic dims 1 unless
    ``shape_dict`` says otherwise), then ``relax.transform.LegalizeOps()``, then, for small models, a real
    ``tvm.compile(mod, target)``. Unsupported ops (checked against the frontend's converter table first, so each is
    reported with its node) and frontend, legalization or build exceptions become errors. Notes say that TVM 0.27
    runs QDQ as float fake-quant and that the default pipeline is unscheduled until tuned.

    Args:
        onnx_model_or_path: a ModelProto or the path of a .onnx file.
        target: a TVM target: ``"llvm"``, a tag such as ``"raspberry-pi/4b-aarch64"``, or a dict
            (``{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}``).
        shape_dict: concrete input shapes overriding the model's (e.g. a larger batch).
        build: also build with ``tvm.compile``; None (default) builds models up to ~4M weight elements and 2000
            nodes (0.1-1 s for this project's small models).
    Returns:
        A ``CheckReport`` (``version`` is TVM's).
    Raises:
        BackendMissingError: TVM is not installed (``pip install 'edgesep[tvm]'``).
        ConfigError: an invalid target or shape_dict, or an unreadable file.
    """
    t0 = time.perf_counter()
    tvm, relax, from_onnx = _import_tvm()
    model, label = _load(onnx_model_or_path)
    try:
        tgt = tvm.target.Target(dict(target) if isinstance(target, Mapping) else target)
    except Exception as e:
        raise ConfigError(
            f"invalid TVM target {target!r} ({e}); use 'llvm', a tag (tvm.target.list_tags()) or a dict such as "
            "{'kind': 'llvm', 'mtriple': 'aarch64-linux-gnu'} (CLI strings with flags are rejected by TVM 0.27)"
        ) from e
    issues: list[Issue] = []
    shapes = _concrete_shapes(model, shape_dict, issues)
    f = _Facts(model)
    census = _graph.op_census(model)

    known = _tvm_convert_map()
    blocked = False
    for node in f.nodes:
        if node.domain not in _STANDARD_DOMAINS:
            blocked = True
            _node_issue(
                issues,
                "error",
                node,
                f"custom-domain op {node.domain}::{node.op_type}: TVM's ONNX frontend ignores domains and has no "
                "converter for custom ops. Lower it to standard ONNX ops at export",
                "custom-domain",
            )
        elif known is not None and node.op_type not in known:
            blocked = True
            _node_issue(
                issues,
                "error",
                node,
                f"{node.op_type} has no converter in TVM {tvm.__version__}'s Relax ONNX frontend "
                "(tvm.error.OpNotImplemented). Replace it with supported ops",
                "unsupported-op",
            )

    stage = "skipped"
    compiled = False
    n_weights = sum(_graph.stored_tensors(model).values())
    do_compile = build if build is not None else (n_weights <= 4_000_000 and len(f.nodes) <= 2000)
    if not blocked:
        out = io.StringIO()
        mod = None
        try:
            stage = "import"
            with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
                warnings.simplefilter("always")
                mod = from_onnx(model, shape_dict=shapes, dtype_dict=_input_dtypes(model))
            for w in caught:
                text = str(w.message).strip().splitlines()[0][:300]
                if text:
                    issues.append(Issue("warning", "", "", f"TVM frontend warning: {text}", "frontend-warning"))
            stage = "legalize"
            mod = relax.transform.LegalizeOps()(mod)
            if do_compile:
                stage = "compile"
                tvm.compile(mod, target=tgt)
                compiled = True
            stage = "done"
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
            printed = re.search(r"Error converting operator (\w+)", out.getvalue())
            if isinstance(e, tvm.error.OpNotImplemented):
                ops = re.findall(r"(\w+)", first.split(":", 1)[-1]) if ":" in first else []
                for op in ops:
                    for node in _nodes_of(f.nodes, op):
                        msg = f"{op} has no converter in TVM's ONNX frontend"
                        _node_issue(issues, "error", node, msg, "unsupported-op")
                if not ops:
                    issues.append(Issue("error", "", "", f"TVM frontend: {first}", "unsupported-op"))
            elif stage == "import" and printed:
                op = printed.group(1)
                nodes = _nodes_of(f.nodes, op)
                node_name = _node_name(nodes[0]) if len(nodes) == 1 else ""
                issues.append(
                    Issue(
                        "error",
                        node_name,
                        op,
                        f"TVM's ONNX frontend fails converting {op}"
                        + ("" if node_name else f" (one of {len(nodes)} {op} nodes)")
                        + f": {type(e).__name__}: {first}",
                        "frontend-error",
                    )
                )
            else:
                issues.append(
                    Issue("error", "", "", f"TVM {stage} fails: {type(e).__name__}: {first}", f"{stage}-error")
                )
    if any(op in census for op in ("QuantizeLinear", "DequantizeLinear")):
        issues.append(
            Issue(
                "info",
                "",
                "",
                f"TVM {tvm.__version__} imports QuantizeLinear/DequantizeLinear as float fake-quant: the compiled "
                "module computes in float32 (no int8 kernels), so the int8 artifact is no faster than fp32 on TVM",
                "qdq-fake-quant",
            )
        )
    issues.append(
        Issue(
            "info",
            "",
            "",
            f"TVM {tvm.__version__}'s default Relax pipeline leaves every kernel unscheduled (serial, untuned loops: "
            "often 10-300x slower than ONNX Runtime); tune with MetaSchedule (tvm.s_tir.meta_schedule) before "
            "timing, and compare with ONNX Runtime on the device",
            "unscheduled",
        )
    )
    if not do_compile and not blocked:
        issues.append(
            Issue(
                "info",
                "",
                "",
                f"tvm.compile skipped ({n_weights} weight elements, {len(f.nodes)} nodes); pass build=True",
                "compile-skipped",
            )
        )
    return CheckReport(
        target="tvm",
        version=str(tvm.__version__),
        model=label,
        issues=_sorted(issues),
        census=census,
        source=f"TVM {tvm.__version__} Relax ONNX frontend dry run (from_onnx + LegalizeOps"
        + (" + tvm.compile)" if compiled else ")"),
        options={
            "target": target if isinstance(target, str) else dict(target),
            "input_shapes": shapes,
            "compiled": compiled,
            "stage_reached": stage,
        },
        seconds=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------------------------------------------
# bundles


def check_bundle(
    bundle_path: str | os.PathLike,
    target: str,
    *,
    artifact_id: str | None = None,
    trt_version: str = DEFAULT_TRT_VERSION,
    tvm_target: str | Mapping[str, Any] = "llvm",
) -> list[CheckReport]:
    """Check a bundle's ONNX artifacts for a target: ``edgesep check NAME.bundle --for tensorrt|tvm``.

    The bundle is verified first (every sha256, and each ONNX artifact's external data stays inside the bundle).

    Args:
        bundle_path: a bundle directory or a tar of one.
        target: ``"tensorrt"`` or ``"tvm"``.
        artifact_id: check this artifact only; by default every ONNX artifact of precision fp32 or int8 (kind
            ``onnx``, and also ``trt-onnx`` for TensorRT).
        trt_version: see ``check_tensorrt``.
        tvm_target: see ``check_tvm``'s ``target``.
    Returns:
        One ``CheckReport`` per artifact, with ``artifact`` set, in manifest order.
    Raises:
        ConfigError: an unknown target or trt_version.
        BundleLookupError: no matching ONNX artifact.
        BundleError: the bundle does not verify.
        BackendMissingError: TVM is missing (target tvm).
    """
    from edgesep.bundle import ONNX_KINDS, open_bundle

    if target not in CHECK_TARGETS:
        raise ConfigError(f"unknown check target {target!r}; use one of {list(CHECK_TARGETS)}")
    if target == "tensorrt":
        _trt_table(trt_version)  # fail on a bad version before opening anything
    kinds = ONNX_KINDS if target == "tensorrt" else ("onnx",)
    with open_bundle(bundle_path, verify=False) as bundle:
        bundle.verify(deep_onnx=True)
        if artifact_id is not None:
            art = bundle.artifact(id=artifact_id)
            if art.kind not in ONNX_KINDS:
                raise BundleLookupError(
                    f"artifact {artifact_id!r} is a {art.kind}, not an ONNX model; only ONNX artifacts are checked"
                )
            arts = [art]
        else:
            arts = [a for a in bundle.manifest.artifacts if a.kind in kinds and a.precision in ("fp32", "int8")]
            if not arts:
                listing = ", ".join(f"{a.id} ({a.kind}, {a.precision})" for a in bundle.manifest.artifacts)
                raise BundleLookupError(
                    f"bundle {bundle.name!r} has no fp32/int8 ONNX artifact of kind {list(kinds)} to check; it has: "
                    f"{listing or 'no artifacts'}"
                )
        reports = []
        for art in arts:
            path = bundle.path_of(art)
            if target == "tensorrt":
                r = check_tensorrt(path, trt_version=trt_version)
            else:
                r = check_tvm(path, target=tvm_target)
            reports.append(dataclasses.replace(r, model=art.file, artifact=art.id))
    return reports
