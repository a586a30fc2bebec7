"""Handlers for convolutions and per-channel normalisations."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnx_ocnna.channels.context import AnalysisContext, Producer, RewriteAttr, SliceInput, describe
from onnx_ocnna.channels.space import Layout


def _input_layout_on_axis1(ctx: AnalysisContext, node: gs.Node) -> Layout | None:
    """The layout of input 0 if it sits on axis 1 (NC...); otherwise freeze it and return None."""
    layout = ctx.layout(node.inputs[0])
    if layout is not None and layout.axis != 1:
        ctx.freeze_layout(layout, f"{describe(node)} reads channels on axis {layout.axis}, expected 1")
        return None
    return layout


def conv(ctx: AnalysisContext, node: gs.Node) -> None:
    """Conv: output channels are new prunable elements; input channels slice the weight.

    Depthwise Conv (group == C_in == C_out) passes its input's channels through. Other grouped
    Convs tie channel j of every group together, on the input and on the output side, so a
    removal keeps all groups the same size.
    """
    weight = ctx.constant(node.inputs[1]) if len(node.inputs) > 1 else None
    in_layout = _input_layout_on_axis1(ctx, node)
    out = node.outputs[0]
    if weight is None:
        ctx.opaque(node, f"{describe(node)} has a weight that is not a constant")
        return
    groups = int(node.attrs.get("group", 1))
    c_out, c_in_per_group = int(weight.shape[0]), int(weight.shape[1])
    c_in = c_in_per_group * groups
    rank = weight.ndim
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name != ""

    def slice_outputs(ids: np.ndarray) -> None:
        ctx.add_edit(SliceInput(node, 1, 0, ids, learned=True))
        if has_bias:
            ctx.add_edit(SliceInput(node, 2, 0, ids))

    def add_producer(ids: np.ndarray) -> None:
        ctx.producers.append(Producer(node, ids))
        # A member may hold only some of its group's channels (tied through a grouped Conv
        # or a channel Pad): it must keep one, a Conv with no filters breaks ORT's optimiser.
        ctx.require_nonempty(ids, f"output '{out.name}' of {describe(node)}")

    if groups == 1:
        if in_layout is not None:
            ctx.add_edit(SliceInput(node, 1, 1, in_layout.ids, learned=True))
        ids = ctx.space.new(c_out, "producer", node.name)
        add_producer(ids)
        slice_outputs(ids)
        ctx.set_layout(out, Layout(1, rank, ids))
        return

    if groups == c_in == c_out and c_in_per_group == 1:
        if in_layout is None:
            ids = ctx.new_frozen(c_out, node, f"{describe(node)}: depthwise input channels are not tracked")
            ctx.set_layout(out, Layout(1, rank, ids))
            return
        slice_outputs(in_layout.ids)
        ctx.add_edit(RewriteAttr(node, "group", lambda keep, ids=in_layout.ids: int(keep(ids).sum())))
        ctx.carriers.append(Producer(node, in_layout.ids))
        ctx.set_layout(out, Layout(1, rank, in_layout.ids))
        return

    if groups == c_in and c_out % groups == 0:
        reason = f"{describe(node)} is a depthwise Conv with channel multiplier {c_out // groups}"
        ctx.freeze_layout(in_layout, reason)
        ctx.set_layout(out, Layout(1, rank, ctx.new_frozen(c_out, node, reason)))
        return

    if c_out % groups or c_in % groups:
        ctx.opaque(node, f"{describe(node)} has channels not divisible by group={groups}")
        return
    if in_layout is not None:
        per_group = in_layout.ids.reshape(groups, c_in_per_group)
        for other in per_group[1:]:
            ctx.space.union(per_group[0], other)
        ctx.add_edit(SliceInput(node, 1, 1, per_group[0], learned=True))
    block = ctx.space.new(c_out // groups, "producer", node.name)
    ids = np.tile(block, groups)
    add_producer(ids)
    slice_outputs(ids)
    ctx.set_layout(out, Layout(1, rank, ids))


def conv_transpose(ctx: AnalysisContext, node: gs.Node) -> None:
    """ConvTranspose with group 1: weight [C_in, C_out, k...]; output channels are prunable."""
    weight = ctx.constant(node.inputs[1]) if len(node.inputs) > 1 else None
    in_layout = _input_layout_on_axis1(ctx, node)
    groups = int(node.attrs.get("group", 1))
    if weight is None or groups != 1:
        why = "has a weight that is not a constant" if weight is None else f"has group={groups}"
        ctx.opaque(node, f"{describe(node)} {why}")
        return
    if in_layout is not None:
        ctx.add_edit(SliceInput(node, 1, 0, in_layout.ids, learned=True))
    ids = ctx.space.new(int(weight.shape[1]), "producer", node.name)
    ctx.producers.append(Producer(node, ids, weight_axis=1))
    ctx.require_nonempty(ids, f"output '{node.outputs[0].name}' of {describe(node)}")
    ctx.add_edit(SliceInput(node, 1, 1, ids, learned=True))
    if len(node.inputs) > 2 and node.inputs[2].name:
        ctx.add_edit(SliceInput(node, 2, 0, ids))
    ctx.set_layout(node.outputs[0], Layout(1, weight.ndim, ids))


def per_channel_norm(ctx: AnalysisContext, node: gs.Node) -> None:
    """BatchNormalization / InstanceNormalization: every parameter input is indexed by channel."""
    layout = _input_layout_on_axis1(ctx, node)
    if layout is None:
        return
    for index in range(1, len(node.inputs)):
        if ctx.constant(node.inputs[index]) is None:
            ctx.freeze_layout(layout, f"{describe(node)} has non-constant parameters")
            return
    for index in range(1, len(node.inputs)):
        # Input 1 is the scale (learned); then the bias and, for BatchNormalization, statistics.
        ctx.add_edit(SliceInput(node, index, 0, layout.ids, learned=index == 1))
    ctx.set_layout(node.outputs[0], layout)
    for extra in node.outputs[1:]:  # training-mode running statistics: [C]
        ctx.set_layout(extra, Layout(0, 1, layout.ids))
