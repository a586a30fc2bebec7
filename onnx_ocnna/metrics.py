"""Model size and cost figures (SPEC section 9): parameters, MACs, nodes, file size."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import onnx

from onnx_ocnna.shapes import infer_model, onnx_inference


@dataclass
class ModelStats:
    """Parameters: float initializer elements the graph uses. MACs: batch 1, from inferred shapes."""

    parameters: int
    macs: int
    nodes: int
    file_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def count_parameters(model: onnx.ModelProto) -> int:
    used = {name for node in model.graph.node for name in node.input}
    total = sum(math.prod(init.dims) for init in model.graph.initializer
                if init.name in used and is_float(init.data_type))
    # Constant nodes holding weights (some exporters)
    return total + sum(constant_parameters(node) for node in model.graph.node if node.op_type == "Constant")


# The floating-point element types of weights and class scores. A set, not numpy's float kind:
# numpy knows bfloat16 only through ml_dtypes, as a kind "V" type.
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.BFLOAT16})


def is_float(data_type: int) -> bool:
    """Whether an ONNX tensor element type is a floating-point one (what parameters are)."""
    return data_type in FLOAT_TYPES


def constant_parameters(node: onnx.NodeProto) -> int:
    """Float elements a Constant node holds, counted as parameters (a scalar is not one)."""
    for attr in node.attribute:
        if attr.name == "value" and is_float(attr.t.data_type):
            size = math.prod(attr.t.dims)
            return size if size > 1 else 0
    return 0


def static_shapes(model: onnx.ModelProto, sizes: dict[str, Sequence[int]] | None = None) -> dict[str, list[int]]:
    """Tensor name -> inferred shape at batch 1 (symbolic batch 1, other unknown dims -1).

    ONNX's own shape inference first; when it leaves a layer that MACs are counted from
    without the shapes the count needs, the best source available
    (:func:`onnx_ocnna.shapes.infer_model`), so a model whose shapes ONNX's inference loses
    (a computed Reshape at opset 8) is counted too. The first is enough for most models and
    about 30 times cheaper (ResNet-56: 0.02 s against 0.7 s), which matters to the budget
    allocation, which counts every candidate cut.

    Args:
        sizes: input name -> one sample's shape without the batch axis (e.g. (3, 48, 192)),
            for inputs with a dynamic height and width: their MACs are counted at that size.
    """
    model = with_input_sizes(model, sizes) if sizes else model
    shapes = _shapes_of(onnx_inference(model, values=False))
    if _counted_layers_shaped(model, shapes):
        return shapes
    return _shapes_of(infer_model(model))


def _shapes_of(inferred: onnx.ModelProto) -> dict[str, list[int]]:
    shapes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = []
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            # Batch 1: symbolic leading dims count as 1, other symbolic dims are unknown.
            dims.append(dim.dim_value if dim.HasField("dim_value") else (1 if i == 0 else -1))
        shapes[value.name] = dims
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _counted_layers_shaped(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> bool:
    """Whether :func:`count_macs` finds what it needs for every Conv, ConvTranspose, Gemm and
    MatMul: the weight and output shapes (a Gemm/MatMul's 2-D constant weight alone will do)."""
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            needed = [node.input[1], node.output[0]] + ([node.input[0]] if node.op_type == "ConvTranspose" else [])
        elif node.op_type in ("Gemm", "MatMul"):
            weight = shapes.get(node.input[1])
            if weight is not None and len(weight) == 2 and _known(weight):
                continue
            needed = [node.input[0], node.output[0]]
        else:
            continue
        if not _known(*(shapes.get(name) for name in needed)):
            return False
    return True


def with_input_sizes(model: onnx.ModelProto, sizes: dict[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs' dynamic non-batch dims are fixed to ``sizes`` (input
    name -> one sample's shape without the batch axis); the batch stays as it is."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        sample = sizes.get(value.name)
        if not sample or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        if len(sample) + 1 != len(dims):
            raise ValueError(f"sizes[{value.name!r}] = {list(sample)} does not fit the input's rank {len(dims)}")
        for dim, size in zip(list(dims)[1:], sample):
            if not (dim.HasField("dim_value") and dim.dim_value > 0):
                dim.dim_value = int(size)
    return fixed


def _known(*shapes) -> bool:
    return all(shape and min(shape) >= 0 for shape in shapes)


def _up(value: int, block: int) -> int:
    return -(-value // block) * block


def count_macs(model: onnx.ModelProto, block: int = 1, shapes: dict[str, list[int]] | None = None) -> int:
    """Multiply-accumulates at batch 1 for Conv, ConvTranspose, Gemm and MatMul.

    ``block`` > 1 counts a Conv's output channels and input channels per group as ONNX
    Runtime's blocked (NCHWc) kernels pay for them: rounded up to a multiple of ``block``, so
    a 4-channel layer costs what an 8-channel one does with 8-channel blocks. ``shapes`` (from
    :func:`static_shapes`) saves the shape inference when one model is counted twice.
    """
    shapes = shapes if shapes is not None else static_shapes(model)
    total = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            weight, out = shapes.get(node.input[1]), shapes.get(node.output[0])
            if not _known(weight, out):
                continue
            if node.op_type == "Conv":
                total += conv_macs(weight[0], weight[1], math.prod(weight[2:]), math.prod(out[2:]), block)
            else:
                source = shapes.get(node.input[0])
                if not _known(source):
                    continue
                total += math.prod(source[1:]) * math.prod(weight[1:])
        elif node.op_type in ("Gemm", "MatMul"):
            weight = shapes.get(node.input[1])
            a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
            if weight is not None and len(weight) == 2 and _known(weight):
                # K and N from the weight; rows from the output (batch 1 when it is unknown,
                # e.g. after a Reshape whose target is computed at run time).
                trans_b = node.op_type == "Gemm" and any(at.name == "transB" and at.i for at in node.attribute)
                n, k = (weight[0], weight[1]) if trans_b else (weight[1], weight[0])
                rows = math.prod(out[:-1]) if _known(out) else 1
                total += rows * n * k
            elif _known(a, out):
                k = a[0] if node.op_type == "Gemm" and any(
                    at.name == "transA" and at.i for at in node.attribute) else a[-1]
                total += math.prod(out) * k
    return total


def conv_macs(cout: int, cin: int, kernel: int, positions: int, block: int = 1) -> int:
    """Cout * Hout*Wout * (Cin/g) * kh*kw of one Conv (``cin`` per group, ``kernel`` = kh*kw,
    ``positions`` = Hout*Wout); with ``block`` > 1 the channels are rounded up to the block as
    ONNX Runtime's NCHWc kernels pay for them (a depthwise kernel is not blocked in Cin)."""
    if block > 1:
        cout = _up(cout, block)
        cin = cin if cin == 1 else _up(cin, block)
    return cout * positions * cin * kernel


def model_stats(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None,
                sizes: dict[str, Sequence[int]] | None = None) -> ModelStats:
    """Size figures; ``sizes`` (see :func:`static_shapes`) sets a dynamic input's height and width."""
    if shapes is None and sizes:
        shapes = static_shapes(model, sizes)
    return ModelStats(
        parameters=count_parameters(model),
        macs=count_macs(model, shapes=shapes),
        nodes=len(model.graph.node),
        file_bytes=model.ByteSize(),
    )
