"""Handlers for operators that move, merge or read the channel axis: Transpose, Flatten,
Reshape, Squeeze/Unsqueeze, reductions, Softmax, Resize, Shape."""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnx_ocnna.channels.context import AnalysisContext, ConstantInput, RewriteInput, describe
from onnx_ocnna.channels.ops_elementwise import ints_from
from onnx_ocnna.channels.space import Layout


def transpose(ctx: AnalysisContext, node: gs.Node) -> None:
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    perm = node.attrs.get("perm")
    perm = list(perm) if perm is not None else list(reversed(range(layout.rank)))
    ctx.set_layout(node.outputs[0], Layout(perm.index(layout.axis), layout.rank, layout.ids))


def _merged_layout(layout: Layout, dims: list, start: int, stop: int) -> np.ndarray | None:
    """Element ids along one axis made by merging input axes [start, stop) (C order).

    Every merged axis other than the channel axis must be static; each channel then
    occupies several positions (Flatten before Gemm: channel x spatial positions).
    """
    merged = dims[start:stop]
    if any(not isinstance(d, int) for i, d in enumerate(merged) if start + i != layout.axis):
        return None
    shape = [1] * len(merged)
    shape[layout.axis - start] = layout.size
    full = [layout.size if start + i == layout.axis else d for i, d in enumerate(merged)]
    return np.broadcast_to(layout.ids.reshape(shape), full).reshape(-1)


def flatten(ctx: AnalysisContext, node: gs.Node) -> None:
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    dims = ctx.shape(node.inputs[0])
    axis = int(node.attrs.get("axis", 1)) % (layout.rank + 1) if layout.rank else 0
    if dims is None:
        ctx.shape_unknown(node, "has an input of unknown shape")
        return
    if layout.axis < axis:
        ctx.opaque(node, f"{describe(node)} merges the channel axis into the batch axis")
        return
    ids = _merged_layout(layout, dims, axis, layout.rank)
    if ids is None:
        ctx.opaque(node, f"{describe(node)} flattens channels with dynamic spatial dims {dims}: each channel's "
                         "share of the output changes with the input size; a fixed input height and width would "
                         "unfreeze it")
        return
    ctx.set_layout(node.outputs[0], Layout(1, 2, ids))


_RESHAPE_HINT = "a constant target, or value_info giving the output shape, would unfreeze it"


def _static_prod(dims: list) -> int | None:
    return math.prod(dims) if all(isinstance(d, int) for d in dims) else None


def reshape(ctx: AnalysisContext, node: gs.Node) -> None:
    """Reshape keeps or merges the channel axis; a Reshape that splits it (channel shuffle)
    is not followed. A shape constant that names the channel count is rewritten."""
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    in_dims, out_dims = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    if in_dims is not None and (out_dims is None or not all(isinstance(d, int) for d in out_dims[1:])):
        out_dims = _target_dims(ctx, node, in_dims) or out_dims
    if in_dims is None or out_dims is None:
        ctx.shape_unknown(node, "has tensors of unknown shape")
        return
    match = None
    for start in range(layout.axis, -1, -1):
        for stop in range(layout.axis + 1, len(in_dims) + 1):
            merged = _static_prod([layout.size if i == layout.axis else in_dims[i] for i in range(start, stop)])
            tail = _static_prod(in_dims[stop:])
            if merged is None or tail is None:
                continue
            head = _static_prod(in_dims[:start])
            # A size-1 channel axis also matches a leading 1 (batch 1): the output axis at the
            # same position is tried first, and the dims before must hold as many elements.
            for b in sorted(range(len(out_dims)), key=lambda b: b != start):
                dim, before = out_dims[b], _static_prod(out_dims[:b])
                if head is not None and before is not None and head != before:
                    continue
                if dim == merged and _static_prod(out_dims[b + 1:]) == tail:
                    match = (start, stop, b)
                    break
            if match:
                break
        if match:
            break
    if match is None:
        if any(not isinstance(d, int) for d in out_dims[1:]):
            # Not shown to split anything: the output shape is simply not known.
            ctx.opaque(node, f"{describe(node)} reshapes channels to a shape computed at run time that shape "
                             f"inference does not reduce (output {out_dims}); {_RESHAPE_HINT}")
        else:
            ctx.opaque(node, f"{describe(node)} splits or scatters the channel axis (e.g. a channel shuffle)")
        return
    start, stop, b = match
    ids = _merged_layout(layout, in_dims, start, stop)
    if ids is None:
        ctx.opaque(node, f"{describe(node)} merges channels with dynamic dims {in_dims}; a fixed input size "
                         "would unfreeze it")
        return
    if not _shape_entry_rewritable(ctx, node, b, ids, start == stop - 1 == b):
        return
    ctx.set_layout(node.outputs[0], Layout(b, len(out_dims), ids))


def _target_entries(ctx: AnalysisContext, node: gs.Node) -> list[int | None] | None:
    """The Reshape target entry by entry: an int where it is constant, None where it is
    computed at run time (a Concat of Shape-derived and constant pieces)."""
    target = ctx.constant(node.inputs[1])
    if target is not None:
        return [int(v) for v in target.ravel()]
    producer = _shape_producer(node.inputs[1])
    if producer is None or producer.op != "Concat":
        return None
    entries: list[int | None] = []
    for piece in producer.inputs:
        piece_shape = ctx.shape(piece)
        if piece_shape is None or len(piece_shape) != 1 or not isinstance(piece_shape[0], int):
            return None
        value = ctx.constant(piece)
        entries.extend([int(v) for v in value.ravel()] if value is not None else [None] * piece_shape[0])
    return entries


def _target_dims(ctx: AnalysisContext, node: gs.Node, in_dims: list) -> list | None:
    """Output dims of a Reshape when shape inference left them unknown: 0 copies, -1 takes
    the static remainder, run-time entries stay symbolic."""
    entries = _target_entries(ctx, node)
    if entries is None or int(node.attrs.get("allowzero", 0)):
        return None
    dims: list = [in_dims[i] if e == 0 and i < len(in_dims) else e for i, e in enumerate(entries)]
    if dims.count(-1) == 1:
        known = [d for d in dims if isinstance(d, int) and d != -1]
        # The remainder is static only if everything it is divided out of is static.
        dynamic_in = [d for d in in_dims if not isinstance(d, int)]
        dynamic_out = [d for d in dims if d is None or not isinstance(d, int)]
        if len(dynamic_in) == len(dynamic_out) <= 1 and _static_prod([d for d in in_dims if isinstance(d, int)]):
            total = _static_prod([d for d in in_dims if isinstance(d, int)])
            dims[dims.index(-1)] = total // max(_static_prod(known) or 1, 1)
        else:
            return None
    return [d if d is not None else f"dyn{i}" for i, d in enumerate(dims)]


def _shape_entry_rewritable(ctx: AnalysisContext, node: gs.Node, b: int, ids: np.ndarray, copies: bool) -> bool:
    """Record how entry ``b`` of the Reshape's target shape changes; False if it cannot."""
    target = ctx.constant(node.inputs[1])
    if target is not None:
        entry = int(target[b])
        if entry == -1 or (entry == 0 and copies):
            return True
        if entry == 0:
            ctx.opaque(node, f"{describe(node)} copies a dimension that changes meaning")
            return False

        def value(keep, target=target.copy()):
            out = target.astype(np.int64)
            out[b] = int(keep(ids).sum())
            return out

        ctx.add_edit(RewriteInput(node, 1, value))
        return True
    # A shape built at run time (Concat of Shape-derived and constant pieces, as the
    # TorchScript exporter writes x.view(x.size(0), -1) and tf2onnx writes Keras' Flatten,
    # there with Casts to int32 and back): find the piece holding entry b.
    producer = _shape_producer(node.inputs[1])
    if producer is not None and producer.op == "Concat":
        offset = 0
        for index, piece in enumerate(producer.inputs):
            piece_shape = ctx.shape(piece)
            if piece_shape is None or len(piece_shape) != 1 or not isinstance(piece_shape[0], int):
                break
            if offset <= b < offset + piece_shape[0]:
                value = ctx.constant(piece)
                if value is None:
                    break
                entry = int(value[b - offset])
                # allowzero=1 (the dynamo exporter's default) makes a 0 literal; -1 still infers.
                if entry == -1 or (entry == 0 and copies and not int(node.attrs.get("allowzero", 0))):
                    return True
                if entry > 0 and _sole_path(node.inputs[1], producer):
                    def piece_value(keep, value=value.copy(), at=b - offset):
                        out = value.astype(np.int64)
                        out[at] = int(keep(ids).sum())
                        return out

                    ctx.add_edit(RewriteInput(producer, index, piece_value))
                    return True
                break
            offset += piece_shape[0]
    if _constant_target(ctx, node, b, ids):
        return True
    ctx.opaque(node, f"{describe(node)} reshapes channels to a shape computed at run time that shape inference "
                     f"does not reduce to constants and copied input dims (output {ctx.shape(node.outputs[0])}); "
                     f"{_RESHAPE_HINT}")
    return False


def _constant_target(ctx: AnalysisContext, node: gs.Node, b: int, ids: np.ndarray) -> bool:
    """A run-time target whose every output dim shape inference knows as a constant or as the
    input's dim at the same position (the batch of a flatten built from ``Shape``): once
    channels go, it is replaced by a constant, the copied dims as 0 (or -1 if there is one).

    Args:
        b: the output axis that holds the channels; ids: their element ids, [out_dims[b]].
    """
    in_dims, out_dims = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    if in_dims is None or out_dims is None or len(node.inputs) < 2:
        return False
    entries: list[int] = []
    copied: list[int] = []
    for i, dim in enumerate(out_dims):
        if isinstance(dim, int) and dim > 0:
            entries.append(dim)
        elif isinstance(dim, str) and i < len(in_dims) and in_dims[i] == dim:
            entries.append(0)
            copied.append(i)
        else:
            return False
    attrs = {}
    if len(copied) == 1:
        entries[copied[0]] = -1  # valid whatever allowzero says
    elif copied and int(node.attrs.get("allowzero", 0)):
        attrs["allowzero"] = 0  # the zeros must copy

    def value(keep, entries=tuple(entries)):
        out = np.array(entries, dtype=np.int64)
        out[b] = int(keep(ids).sum())
        return out

    ctx.add_edit(ConstantInput(node, 1, ids, value, attrs))
    return True


def _shape_producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that computes a shape vector, looking through Casts between integer types."""
    node = tensor.inputs[0] if tensor.inputs else None
    while node is not None and node.op == "Cast":
        node = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    return node


def _sole_path(tensor: gs.Tensor, producer: gs.Node) -> bool:
    """Whether ``tensor`` is computed from ``producer`` by a chain that nothing else reads, so
    rewriting one of ``producer``'s inputs changes only this Reshape."""
    while True:
        if len(tensor.outputs) != 1:
            return False
        node = tensor.inputs[0]
        if node is producer:
            return True
        tensor = node.inputs[0]


def expand(ctx: AnalysisContext, node: gs.Node) -> None:
    """Expand broadcasts its input to a target shape (numpy rules); channels pass through when
    the channel dim is not broadcast. A constant target entry naming the channel count is
    rewritten; a target computed at run time that shape inference reduces to constants and the
    input's own dims (an SE gate expanded to [batch, C, H, W]) is replaced by a constant whose
    channel entry is 1, right for any kept count. A target that is the whole Shape of a tracked
    tensor (``y.expand_as(x)``) ties the input's channels to that tensor's."""
    layout = ctx.layout(node.inputs[0])
    shape_of = ctx.expand_targets.get(node.name or node.outputs[0].name)
    if layout is None:
        if shape_of is not None:
            ctx.space.freeze(shape_of, f"{describe(node)} expands an untracked tensor to the shape of these channels")
        return
    if shape_of is not None:
        if len(shape_of) != layout.size:
            ctx.space.freeze(shape_of, f"{describe(node)} expands {layout.size} channels to {len(shape_of)}")
            ctx.opaque(node, f"{describe(node)} expands {layout.size} channels to {len(shape_of)}")
            return
        ctx.space.union(layout.ids, shape_of)
        out_rank = ctx.rank(node.outputs[0])
        if out_rank is None:
            ctx.shape_unknown(node, "has an output of unknown rank")
            return
        ctx.set_layout(node.outputs[0], Layout(layout.axis + out_rank - layout.rank, out_rank, layout.ids))
        return
    in_dims, out_dims = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    target_shape = ctx.shape(node.inputs[1])
    if in_dims is None or out_dims is None or target_shape is None:
        ctx.shape_unknown(node, "has tensors of unknown shape")
        return
    offset = len(out_dims) - len(in_dims)
    axis = layout.axis + offset
    if out_dims[axis] != layout.size:
        ctx.opaque(node, f"{describe(node)} broadcasts the channel axis from {layout.size} to {out_dims[axis]}")
        return
    t_axis = axis - (len(out_dims) - int(target_shape[0])) if isinstance(target_shape[0], int) else -1
    target = ctx.constant(node.inputs[1])
    if target is not None:
        target = np.asarray(target).ravel()
        if 0 <= t_axis and int(target[t_axis]) not in (1, layout.size):
            ctx.opaque(node, f"{describe(node)} has a target entry {int(target[t_axis])} on the channel axis")
            return
        if 0 <= t_axis and int(target[t_axis]) == layout.size != 1:
            def value(keep, target=target.copy(), at=t_axis, ids=layout.ids):
                out = target.astype(np.int64)
                out[at] = int(keep(ids).sum())
                return out

            ctx.add_edit(RewriteInput(node, 1, value))
    elif t_axis >= 0:
        entries = []
        for i, dim in enumerate(out_dims):
            source = in_dims[i - offset] if i >= offset else None
            if i == axis or dim == source:
                entries.append(1)  # the input's own dim, kept by broadcasting
            elif isinstance(dim, int) and dim > 0:
                entries.append(dim)
            else:
                ctx.opaque(node, f"{describe(node)} expands channels to a shape computed at run time that shape "
                                 f"inference does not reduce (output {out_dims}); {_RESHAPE_HINT}")
                return
        entries = entries[len(out_dims) - int(target_shape[0]):]
        ctx.add_edit(ConstantInput(node, 1, layout.ids, lambda keep, entries=tuple(entries): np.array(entries)))
    ctx.set_layout(node.outputs[0], Layout(axis, len(out_dims), layout.ids))


def squeeze_unsqueeze(ctx: AnalysisContext, node: gs.Node) -> None:
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    out_rank = ctx.rank(node.outputs[0])
    axes = ints_from(ctx, node, 1, "axes")
    if out_rank is None:
        ctx.shape_unknown(node, "has an output of unknown rank")
        return
    if node.op == "Squeeze":
        if axes is None:
            dims = ctx.shape(node.inputs[0])
            axes = [i for i, d in enumerate(dims or []) if d == 1]
        axes = [a % layout.rank for a in axes]
        if layout.axis in axes:
            ctx.opaque(node, f"{describe(node)} removes the channel axis")
            return
        new_axis = layout.axis - sum(a < layout.axis for a in axes)
    else:
        if axes is None:
            ctx.opaque(node, f"{describe(node)} has non-constant axes")
            return
        axes = sorted(a % out_rank for a in axes)
        new_axis = layout.axis
        for a in axes:
            if a <= new_axis:
                new_axis += 1
    ctx.set_layout(node.outputs[0], Layout(new_axis, out_rank, layout.ids))


def reduce(ctx: AnalysisContext, node: gs.Node) -> None:
    """ReduceMean/Max/Sum/...: fine over other axes, cross-channel over the channel axis."""
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    axes = ints_from(ctx, node, 1, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        ctx.opaque(node, f"{describe(node)} has non-constant axes")
        return
    if not axes:
        if int(node.attrs.get("noop_with_empty_axes", 0)):
            ctx.set_layout(node.outputs[0], layout)
            return
        axes = list(range(layout.rank))
    axes = [a % layout.rank for a in axes]
    if layout.axis in axes:
        ctx.opaque(node, f"{describe(node)} reduces over the channel axis")
        return
    if int(node.attrs.get("keepdims", 1)):
        ctx.set_layout(node.outputs[0], layout)
    else:
        new_axis = layout.axis - sum(a < layout.axis for a in axes)
        ctx.set_layout(node.outputs[0], Layout(new_axis, layout.rank - len(axes), layout.ids))


def softmax(ctx: AnalysisContext, node: gs.Node) -> None:
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    axis = int(node.attrs.get("axis", -1 if ctx.opset >= 13 else 1)) % layout.rank
    cross = layout.axis == axis if ctx.opset >= 13 else layout.axis >= axis
    if cross:
        ctx.opaque(node, f"{describe(node)} normalises across channels")
        return
    ctx.set_layout(node.outputs[0], layout)


def resize(ctx: AnalysisContext, node: gs.Node) -> None:
    """Resize/Upsample: spatial scaling passes channels through if the channel scale is 1."""
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    for index in range(1, len(node.inputs)):
        tensor = node.inputs[index]
        if not tensor.name:
            continue
        value = ctx.constant(tensor)
        if value is None:
            ctx.opaque(node, f"{describe(node)} has non-constant scales or sizes")
            return
        value = np.asarray(value).ravel()
        if value.size == layout.rank and value.dtype.kind == "f" and value[layout.axis] != 1:
            ctx.opaque(node, f"{describe(node)} scales the channel axis")
            return
        if value.size == layout.rank and value.dtype.kind == "i":
            ctx.opaque(node, f"{describe(node)} names output sizes including the channel count")
            return
    ctx.set_layout(node.outputs[0], layout)


def shape(ctx: AnalysisContext, node: gs.Node) -> None:
    """Shape reads dims: harmless when only other dims are used (the batch size for a
    Flatten); anything that might read the channel count freezes the channels."""
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    start = int(node.attrs.get("start", 0)) % (layout.rank or 1) if "start" in node.attrs else 0
    end = int(node.attrs.get("end", layout.rank))
    end = end % layout.rank if end < 0 else min(end, layout.rank)
    if not (start <= layout.axis < end):
        return
    position = layout.axis - start
    if start == 0 and end == layout.rank:
        # The whole shape as an Expand target (y.expand_as(x)): it reads the count at run
        # time, right after pruning if y keeps what x keeps; the Expand handler ties them.
        for consumer in node.outputs[0].outputs:
            if consumer.op == "Expand" and len(consumer.inputs) > 1 and consumer.inputs[1] is node.outputs[0]:
                ctx.expand_targets[consumer.name or consumer.outputs[0].name] = layout.ids
    reader = _count_reader(ctx, node.outputs[0], {position}, end - start)
    if reader is not None:
        ctx.freeze_layout(layout, f"{describe(node)} reads the channel count (used by {describe(reader)})")


def _count_reader(ctx: AnalysisContext, vector: gs.Tensor, positions: set[int], length: int) -> gs.Node | None:
    """The first node that may use entries ``positions`` of the 1-D shape vector ``vector``
    (``length`` entries), followed through Cast, Gather and Slice with constant indices
    (tf2onnx's Keras Flatten reads the batch size as Shape -> Gather(perm) -> Cast ->
    Slice[0:1]); None if no node does."""
    for consumer in vector.outputs:
        if consumer.op == "Expand" and consumer.inputs[1] is vector \
                and (consumer.name or consumer.outputs[0].name) in ctx.expand_targets:
            continue  # tied by the Expand handler (see shape())
        if consumer.op == "Cast":
            found = _count_reader(ctx, consumer.outputs[0], positions, length)
        elif consumer.op == "Gather" and int(consumer.attrs.get("axis", 0)) == 0 and consumer.inputs[0] is vector:
            indices = ctx.constant(consumer.inputs[1])
            if indices is None:
                return consumer
            flat = [int(i) % length for i in np.ravel(indices)]
            picked = {k for k, i in enumerate(flat) if i in positions}
            if not picked:
                continue
            if np.ndim(indices) == 0:
                return consumer
            found = _count_reader(ctx, consumer.outputs[0], picked, len(flat))
        elif consumer.op == "Slice" and consumer.inputs[0] is vector:
            bounds = _unit_slice(ctx, consumer, length)
            if bounds is None:
                return consumer
            lo, hi = bounds
            picked = {p - lo for p in positions if lo <= p < hi}
            if not picked:
                continue
            found = _count_reader(ctx, consumer.outputs[0], picked, hi - lo)
        else:
            return consumer
        if found is not None:
            return found
    return None


def _unit_slice(ctx: AnalysisContext, node: gs.Node, length: int) -> tuple[int, int] | None:
    """[lo, hi) taken by a Slice with step 1 of a 1-D vector of ``length`` entries, else None."""
    starts, ends = ints_from(ctx, node, 1, "starts"), ints_from(ctx, node, 2, "ends")
    axes = ints_from(ctx, node, 3, "axes")
    steps = ints_from(ctx, node, 4, "steps") if ctx.opset >= 10 else None
    if starts is None or ends is None or len(starts) != 1 or (axes and axes[0] not in (0, -1)) \
            or (steps and steps[0] != 1):
        return None
    lo, hi = starts[0], ends[0]
    lo = min(max(lo + length if lo < 0 else lo, 0), length)
    hi = min(max(hi + length if hi < 0 else hi, 0), length)
    return lo, max(lo, hi)
