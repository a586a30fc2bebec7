"""Handlers for fully connected layers: Gemm and MatMul read channels (often expanded over
spatial positions by a Flatten) as their reduction dimension K, and a layer with a constant
weight produces new channels, its output neurons (SPEC section 1).

Weight layouts: Gemm B is [K, N], or [N, K] with transB = 1; MatMul B is [K, N]. A neuron
is removed by slicing its column of B (its row with transB) and its bias; the next layer
loses the matching row of its own weight. The classifier's neurons are never channels: a
layer whose outputs reach a graph output without another layer in between is left out of the
groups by the analysis (:func:`onnx_ocnna.channels.analysis.analyse`)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnx_ocnna.channels.context import AnalysisContext, Producer, SliceInput, describe
from onnx_ocnna.channels.space import Layout

LINEAR_OPS = ("Gemm", "MatMul")
"""The fully connected layers whose neurons can be channels."""


def _input_layout(ctx: AnalysisContext, node: gs.Node):
    """The channels of operand A; a second operand that carries channels is not followed."""
    if ctx.layout(node.inputs[1]) is not None:
        ctx.opaque(node, f"{describe(node)} multiplies by a tensor that carries channels")
        return None
    return ctx.layout(node.inputs[0])


def _produce(ctx: AnalysisContext, node: gs.Node, neurons: int, weight_axis: int, bias: int | None,
             out_rank: int) -> None:
    """Make the layer's ``neurons`` outputs new channels: their weight slices along
    ``weight_axis``, the bias input ``bias`` (None: no bias) along its last axis."""
    ids = ctx.space.new(neurons, "producer", node.name)
    ctx.producers.append(Producer(node, ids, weight_axis=weight_axis))
    ctx.require_nonempty(ids, f"output '{node.outputs[0].name}' of {describe(node)}")
    ctx.add_edit(SliceInput(node, 1, weight_axis, ids, learned=True))
    if bias is not None:
        ctx.add_edit(SliceInput(node, bias, ctx.constant(node.inputs[bias]).ndim - 1, ids))
    ctx.set_layout(node.outputs[0], Layout(out_rank - 1, out_rank, ids))


def gemm(ctx: AnalysisContext, node: gs.Node) -> None:
    """Y = A·B (+C): channels of A on its K axis remove rows (or columns, transB) of B; the N
    outputs of a constant B are new channels (columns of B, or rows with transB, and of C)."""
    if ctx.layout(node.inputs[1]) is not None:
        ctx.opaque(node, f"{describe(node)} multiplies by a tensor that carries channels")
        return
    layout = ctx.layout(node.inputs[0])
    weight = ctx.constant(node.inputs[1])
    trans_b = int(node.attrs.get("transB", 0))
    if layout is not None:
        k_axis = 0 if int(node.attrs.get("transA", 0)) else 1
        if layout.axis != k_axis:
            ctx.opaque(node, f"{describe(node)} reads channels on its row axis")
            return
        if weight is None:
            ctx.opaque(node, f"{describe(node)} has a weight that is not a constant")
            return
        ctx.add_edit(SliceInput(node, 1, 1 if trans_b else 0, layout.ids, learned=True))
    if weight is None or weight.ndim != 2:
        return
    neurons = int(weight.shape[0 if trans_b else 1])
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        value = ctx.constant(node.inputs[2])
        if value is None:
            return  # a bias computed at run time: the neurons cannot be cut out of it
        if value.ndim and value.shape[-1] == neurons and neurons > 1:
            bias = 2
        elif value.size != 1:
            return  # a bias that varies over the rows only (shape [M, 1]): not one per neuron
    _produce(ctx, node, neurons, 0 if trans_b else 1, bias, 2)


def matmul(ctx: AnalysisContext, node: gs.Node) -> None:
    """A[..., K]·B[K, N] with constant B: channels on A's last axis remove rows of B; channels
    on an outer axis of A pass through to the output. With a 2-D A the N outputs of a constant
    B are new channels (columns of B; tf2onnx's bias is the Add that follows)."""
    layout = _input_layout(ctx, node)
    weight = ctx.constant(node.inputs[1])
    if layout is not None:
        if layout.axis != layout.rank - 1:
            if layout.axis == layout.rank - 2 or layout.rank < 2:
                ctx.set_layout(node.outputs[0], layout)
            else:
                ctx.opaque(node, f"{describe(node)} broadcasts over the channel axis")
            return
        if weight is None or weight.ndim != 2:
            ctx.opaque(node, f"{describe(node)} has a weight that is not a constant matrix")
            return
        ctx.add_edit(SliceInput(node, 1, 0, layout.ids, learned=True))
    elif ctx.layout(node.inputs[1]) is not None:
        return
    # A batch of rows ([M, K]) or a channels-last image ([N, H, W, K]: ConvNeXt's pointwise
    # layers, a 1 x 1 convolution) makes neurons; a [B, T, K] input (attention, sequences)
    # is left alone.
    rank = ctx.rank(node.inputs[0])
    if weight is None or weight.ndim != 2 or rank not in (2, 4):
        return
    _produce(ctx, node, int(weight.shape[1]), 1, None, rank)
