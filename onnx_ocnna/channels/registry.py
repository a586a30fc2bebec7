"""The one table of operator knowledge: ONNX op type -> channel handler.

A handler receives the analysis context and a node whose inputs were all visited (the
graph is walked in topological order). It sets the layouts of the node's outputs, ties
coupled channels together, records the edits that cut the node, or freezes what it cannot
follow with a reason. An op type missing from this table freezes every channel that
reaches it (see :func:`unsupported`): analysis never guesses.
"""

from __future__ import annotations

from typing import Callable

import onnx_graphsurgeon as gs

from onnx_ocnna.channels import ops_conv, ops_elementwise, ops_linear, ops_shape
from onnx_ocnna.channels.context import AnalysisContext, describe

Handler = Callable[[AnalysisContext, gs.Node], None]


def unsupported(ctx: AnalysisContext, node: gs.Node) -> None:
    ctx.opaque(node, f"{describe(node)}: operator {node.op} is not supported by the channel analysis; a handler "
                     "for it in channels/registry.py would unfreeze it")


def graph_only(ctx: AnalysisContext, node: gs.Node) -> None:
    """Ops that never read a tracked tensor in a well-formed CNN (constants, shape maths)."""
    if any(ctx.layout(t) is not None for t in node.inputs):
        unsupported(ctx, node)


# Unary ops that act on each element (or each channel's own map) independently.
_PASSTHROUGH = [
    "Relu", "LeakyRelu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "Mish", "Gelu", "ThresholdedRelu", "Exp", "Log", "Neg", "Abs",
    "Sqrt", "Reciprocal", "Erf", "Floor", "Ceil", "Round", "Sign", "Dropout", "Identity", "Cast",
    "CastLike", "Not",
]
_POOLS = ["MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"]
_BROADCAST = ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"]
_REDUCE = ["ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSumExp", "ReduceSumSquare"]
_GRAPH_ONLY = ["Constant", "ConstantOfShape", "Range", "Equal", "Less", "Greater", "Where", "NonZero",
               "Gather", "Size"]

HANDLERS: dict[str, Handler] = {
    "Conv": ops_conv.conv,
    "ConvTranspose": ops_conv.conv_transpose,
    "BatchNormalization": ops_conv.per_channel_norm,
    "InstanceNormalization": ops_conv.per_channel_norm,
    "Concat": ops_elementwise.concat,
    "Split": ops_elementwise.split,
    "Slice": ops_elementwise.slice_,
    "Pad": ops_elementwise.pad,
    "Transpose": ops_shape.transpose,
    "Flatten": ops_shape.flatten,
    "Reshape": ops_shape.reshape,
    "Expand": ops_shape.expand,
    "Squeeze": ops_shape.squeeze_unsqueeze,
    "Unsqueeze": ops_shape.squeeze_unsqueeze,
    "Softmax": ops_shape.softmax,
    "LogSoftmax": ops_shape.softmax,
    "Resize": ops_shape.resize,
    "Upsample": ops_shape.resize,
    "Shape": ops_shape.shape,
    "Gemm": ops_linear.gemm,
    "MatMul": ops_linear.matmul,
    **{op: ops_elementwise.passthrough for op in _PASSTHROUGH},
    **{op: ops_elementwise.spatial_pool for op in _POOLS},
    **{op: ops_elementwise.broadcast for op in _BROADCAST},
    **{op: ops_shape.reduce for op in _REDUCE},
    **{op: graph_only for op in _GRAPH_ONLY},
}


def handler_for(node: gs.Node) -> Handler:
    if node.domain not in (None, "", "ai.onnx"):
        return unsupported
    return HANDLERS.get(node.op, unsupported)
