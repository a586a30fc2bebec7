"""Handlers for operators that keep channels apart: activations, pools, broadcasting
arithmetic, and the operators that rearrange the channel axis (Concat, Split, Slice, Pad)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnx_ocnna.channels.context import AnalysisContext, RewriteAttr, RewriteInput, SliceInput, describe
from onnx_ocnna.channels.space import Layout

_INT_MAX = 2**62


def ints_from(ctx: AnalysisContext, node: gs.Node, input_index: int, attr: str) -> list[int] | None:
    """An integer list given either as constant input ``input_index`` (newer opsets) or as
    attribute ``attr`` (older opsets); None when absent or not constant."""
    if len(node.inputs) > input_index and node.inputs[input_index].name:
        value = ctx.constant(node.inputs[input_index])
        return None if value is None else [int(v) for v in np.asarray(value).ravel()]
    if attr in node.attrs:
        return [int(v) for v in np.asarray(node.attrs[attr]).ravel()]
    return None


def passthrough(ctx: AnalysisContext, node: gs.Node) -> None:
    """Channel-preserving unary operators: the output has the input's layout."""
    layout = ctx.layout(node.inputs[0]) if node.inputs else None
    if layout is not None:
        ctx.set_layout(node.outputs[0], layout)


def spatial_pool(ctx: AnalysisContext, node: gs.Node) -> None:
    """Pooling reduces spatial axes 2.. only; channels must be on axis 1."""
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    if layout.axis != 1:
        ctx.freeze_layout(layout, f"{describe(node)} pools over the channel axis {layout.axis}")
        return
    for output in node.outputs:  # MaxPool's optional Indices output encodes channel offsets
        if output is not node.outputs[0] and output.outputs:
            ctx.freeze_layout(layout, f"{describe(node)} returns indices that depend on the channel count")
            return
    ctx.set_layout(node.outputs[0], layout)


def broadcast(ctx: AnalysisContext, node: gs.Node) -> None:
    """Add/Sub/Mul/Div/Max/Min/Sum/Mean/PRelu/Pow/Where with numpy broadcasting.

    Inputs whose channels are tracked must meet on the same output axis: their channels are
    tied one to one (a residual Add, a squeeze-excite gate). A constant that varies along
    that axis is sliced with them; one of size 1 broadcasts and stays.
    """
    out_rank = ctx.rank(node.outputs[0])
    ranks = [ctx.rank(t) for t in node.inputs]
    tracked = [(i, ctx.layout(t)) for i, t in enumerate(node.inputs) if ctx.layout(t) is not None]
    if not tracked:
        return
    if out_rank is None or any(r is None for r in ranks):
        ctx.shape_unknown(node, "has inputs of unknown rank")
        return
    aligned = {layout.axis + out_rank - ranks[i] for i, layout in tracked}
    sizes = {layout.size for _, layout in tracked}
    if len(aligned) != 1 or len(sizes) != 1:
        ctx.opaque(node, f"{describe(node)} combines channels on different axes or of different counts")
        return
    axis = aligned.pop()
    first = tracked[0][1]
    for _, layout in tracked[1:]:
        ctx.space.union(first.ids, layout.ids)
    tracked_indices = {i for i, _ in tracked}
    for index, tensor in enumerate(node.inputs):
        if index in tracked_indices or not tensor.name:
            continue
        in_axis = axis - (out_rank - ranks[index])
        if in_axis < 0:
            continue  # a lower-rank operand broadcasts over the channel axis
        shape = ctx.shape(tensor)
        dim = shape[in_axis]
        if dim == 1:
            continue
        if dim == first.size and ctx.constant(tensor) is not None:
            ctx.add_edit(SliceInput(node, index, in_axis, first.ids))
            continue
        ctx.opaque(node, f"{describe(node)} mixes tracked channels with '{tensor.name}' of unknown channel origin")
        return
    ctx.set_layout(node.outputs[0], Layout(axis, out_rank, first.ids))


def concat(ctx: AnalysisContext, node: gs.Node) -> None:
    """Concat on the channel axis joins layouts end to end; elsewhere it ties them."""
    rank = ctx.rank(node.outputs[0])
    layouts = [ctx.layout(t) for t in node.inputs]
    if all(layout is None for layout in layouts):
        return
    if rank is None:
        ctx.shape_unknown(node, "has an output of unknown rank")
        return
    axis = int(node.attrs.get("axis", 1)) % rank
    tracked = [layout for layout in layouts if layout is not None]
    if any(layout.axis != axis for layout in tracked):
        if len({layout.axis for layout in tracked}) == 1 and len(tracked) == len(layouts) \
                and len({layout.size for layout in tracked}) == 1:
            for layout in tracked[1:]:
                ctx.space.union(tracked[0].ids, layout.ids)
            ctx.set_layout(node.outputs[0], tracked[0])
        else:
            ctx.opaque(node, f"{describe(node)} concatenates on axis {axis} across channels on other axes")
        return
    pieces = []
    for tensor, layout in zip(node.inputs, layouts):
        if layout is not None:
            pieces.append(layout.ids)
            continue
        shape = ctx.shape(tensor)
        if shape is None or not isinstance(shape[axis], int):
            ctx.shape_unknown(node, f"input '{tensor.name}' has an unknown channel count")
            return
        pieces.append(ctx.new_frozen(shape[axis], node, f"{describe(node)} input '{tensor.name}' is not a tracked channel source"))
    ctx.set_layout(node.outputs[0], Layout(axis, rank, np.concatenate(pieces)))


def split(ctx: AnalysisContext, node: gs.Node) -> None:
    """Split along the channel axis cuts the layout; the sizes are rewritten after removal."""
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    axis = int(node.attrs.get("axis", 0)) % layout.rank
    if axis != layout.axis:
        for output in node.outputs:
            ctx.set_layout(output, layout)
        return
    sizes = ints_from(ctx, node, 1, "split")
    if sizes is None:
        count = len(node.outputs)
        if layout.size % count:
            ctx.opaque(node, f"{describe(node)} splits {layout.size} channels unevenly without sizes")
            return
        sizes = [layout.size // count] * count
    if sum(sizes) != layout.size:
        ctx.opaque(node, f"{describe(node)} split sizes do not add up to the channel count")
        return
    bounds = np.cumsum([0] + sizes)
    pieces = [layout.ids[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
    for output, ids in zip(node.outputs, pieces):
        ctx.set_layout(output, Layout(axis, layout.rank, ids))
        ctx.require_nonempty(ids, f"output '{output.name}' of {describe(node)}")

    def new_sizes(keep, pieces=pieces) -> np.ndarray:
        return np.array([int(keep(ids).sum()) for ids in pieces], dtype=np.int64)

    if len(node.inputs) > 1 and node.inputs[1].name:
        ctx.add_edit(RewriteInput(node, 1, new_sizes))
    else:
        # Explicit sizes keep the split well defined once pieces differ in size.
        if ctx.opset >= 13:
            ctx.add_edit(RewriteInput(node, 1, new_sizes))
            ctx.add_edit(RewriteAttr(node, "num_outputs", lambda keep: None))
        else:
            ctx.add_edit(RewriteAttr(node, "split", lambda keep: [int(v) for v in new_sizes(keep)]))


def slice_(ctx: AnalysisContext, node: gs.Node) -> None:
    """Slice: a unit-step range on the channel axis selects a sub-layout; other axes pass."""
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    legacy = ctx.opset < 10
    starts = ints_from(ctx, node, 1, "starts")
    ends = ints_from(ctx, node, 2, "ends")
    axes = ints_from(ctx, node, 3, "axes")
    steps = ints_from(ctx, node, 4, "steps") if not legacy else None
    if starts is None or ends is None:
        ctx.opaque(node, f"{describe(node)} has non-constant bounds")
        return
    axes = [a % layout.rank for a in (axes if axes is not None else range(len(starts)))]
    steps = steps if steps is not None else [1] * len(starts)
    if layout.axis not in axes:
        ctx.set_layout(node.outputs[0], layout)
        return
    k = axes.index(layout.axis)
    if steps[k] != 1:
        ctx.opaque(node, f"{describe(node)} takes every {steps[k]}-th channel")
        return
    size = layout.size
    start = min(max(starts[k] + size if starts[k] < 0 else starts[k], 0), size)
    end = min(max(ends[k] + size if ends[k] < 0 else ends[k], 0), size)
    ids = layout.ids[start:end]
    ctx.set_layout(node.outputs[0], Layout(layout.axis, layout.rank, ids))
    ctx.require_nonempty(ids, f"output '{node.outputs[0].name}' of {describe(node)}")
    before, inside = layout.ids[:start], ids

    def bounds(keep) -> tuple[int, int]:
        new_start = int(keep(before).sum())
        return new_start, new_start + int(keep(inside).sum())

    def rewrite(values: list[int], which: int):
        def value(keep):
            out = list(values)
            out[k] = bounds(keep)[which]
            return out
        return value

    if legacy:
        ctx.add_edit(RewriteAttr(node, "starts", rewrite(starts, 0)))
        ctx.add_edit(RewriteAttr(node, "ends", rewrite(ends, 1)))
    else:
        ctx.add_edit(RewriteInput(node, 1, lambda keep, f=rewrite(starts, 0): np.array(f(keep), dtype=np.int64)))
        ctx.add_edit(RewriteInput(node, 2, lambda keep, f=rewrite(ends, 1): np.array(f(keep), dtype=np.int64)))


def pad(ctx: AnalysisContext, node: gs.Node) -> None:
    """Pad: spatial padding passes channels through. Padding on the channel axis inserts
    new elements (the CIFAR ResNets' option-A shortcut pads zero channels); a removed one
    shrinks the pad."""
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    pads = ints_from(ctx, node, 1, "pads" if ctx.opset >= 2 else "paddings")
    if pads is None:
        ctx.opaque(node, f"{describe(node)} has non-constant pads")
        return
    axes = ints_from(ctx, node, 3, "axes") if len(node.inputs) > 3 else None
    axes = [a % layout.rank for a in axes] if axes else list(range(layout.rank))
    half = len(pads) // 2
    if layout.axis not in axes:
        ctx.set_layout(node.outputs[0], layout)
        return
    k = axes.index(layout.axis)
    begin, end = pads[k], pads[k + half]
    if begin == 0 and end == 0:
        ctx.set_layout(node.outputs[0], layout)
        return
    if begin < 0 or end < 0 or node.attrs.get("mode", "constant") != "constant":
        ctx.opaque(node, f"{describe(node)} crops or reflects along the channel axis")
        return
    head = ctx.space.new(begin, "pad", node.name)
    tail = ctx.space.new(end, "pad", node.name)
    ctx.set_layout(node.outputs[0], Layout(layout.axis, layout.rank, np.concatenate([head, layout.ids, tail])))

    def new_pads(keep) -> list[int]:
        out = list(pads)
        out[k], out[k + half] = int(keep(head).sum()), int(keep(tail).sum())
        return out

    if len(node.inputs) > 1 and node.inputs[1].name:
        ctx.add_edit(RewriteInput(node, 1, lambda keep: np.array(new_pads(keep), dtype=np.int64)))
    else:
        ctx.add_edit(RewriteAttr(node, "pads" if "pads" in node.attrs else "paddings", new_pads))
