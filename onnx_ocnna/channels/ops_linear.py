"""Handlers for fully connected consumers: Gemm and MatMul read channels (often expanded
over spatial positions by a Flatten) as their reduction dimension K."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnx_ocnna.channels.context import AnalysisContext, SliceInput, describe


def _input_layout(ctx: AnalysisContext, node: gs.Node):
    """The channels of operand A; a second operand that carries channels is not followed."""
    if ctx.layout(node.inputs[1]) is not None:
        ctx.opaque(node, f"{describe(node)} multiplies by a tensor that carries channels")
        return None
    return ctx.layout(node.inputs[0])


def gemm(ctx: AnalysisContext, node: gs.Node) -> None:
    """Y = A·B (+C): channels of A on its K axis remove rows (or columns, transB) of B."""
    layout = _input_layout(ctx, node)
    if layout is None:
        return
    k_axis = 0 if int(node.attrs.get("transA", 0)) else 1
    if layout.axis != k_axis:
        ctx.opaque(node, f"{describe(node)} reads channels on its row axis")
        return
    if ctx.constant(node.inputs[1]) is None:
        ctx.opaque(node, f"{describe(node)} has a weight that is not a constant")
        return
    ctx.add_edit(SliceInput(node, 1, 1 if int(node.attrs.get("transB", 0)) else 0, layout.ids))


def matmul(ctx: AnalysisContext, node: gs.Node) -> None:
    """A[..., K]·B[K, N] with constant B: channels on A's last axis remove rows of B; channels
    on an outer axis of A pass through to the output."""
    layout = _input_layout(ctx, node)
    if layout is None:
        return
    weight = ctx.constant(node.inputs[1])
    if layout.axis != layout.rank - 1:
        if layout.axis == layout.rank - 2 or layout.rank < 2:
            ctx.set_layout(node.outputs[0], layout)
        else:
            ctx.opaque(node, f"{describe(node)} broadcasts over the channel axis")
        return
    if weight is None or weight.ndim != 2:
        ctx.opaque(node, f"{describe(node)} has a weight that is not a constant matrix")
        return
    ctx.add_edit(SliceInput(node, 1, 0, layout.ids))
