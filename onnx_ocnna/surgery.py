"""Apply a channel removal to the graph: every edit the handlers recorded, then re-infer shapes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_ocnna.channels.analysis import ChannelAnalysis, _restore_model_fields
from onnx_ocnna.shapes import onnx_inference
from onnx_ocnna.channels.context import ConstantInput, KeepFn, RewriteAttr, RewriteInput, SliceInput
from onnx_ocnna.errors import PlanError


def check_removal(analysis: ChannelAnalysis, removed: dict[int, np.ndarray]) -> None:
    """Raise ``PlanError`` if the removal would empty a group or a tensor, or touch a frozen channel."""
    for gid, channels in removed.items():
        group = analysis.groups[gid]
        channels = np.asarray(channels, dtype=np.int64)
        if channels.size and (channels.min() < 0 or channels.max() >= group.channels):
            raise PlanError(f"group {gid} has {group.channels} channels; cannot remove index {int(channels.max())}")
        for c in channels.tolist():
            if group.frozen[c]:
                raise PlanError(f"channel {c} of group {gid} ({group.members[0]}) cannot be removed: {group.frozen[c]}")
        if len(set(channels.tolist())) >= group.channels:
            raise PlanError(f"the plan removes every channel of group {gid} ({group.members[0]})")
    keep = analysis.keep_fn(removed)
    for ids, what in analysis.context.nonempty:
        if ids.size and not keep(ids).any():
            raise PlanError(f"the plan removes every channel of {what}")


def apply_removal(model: onnx.ModelProto, analysis: ChannelAnalysis, removed: dict[int, np.ndarray],
                  in_place: bool = True) -> onnx.ModelProto:
    """Rewrite ``analysis.graph`` so the channels in ``removed`` (group id -> group channel
    indices) are gone, and return the new model with re-inferred shapes.

    ``in_place``: edit ``analysis.graph`` itself, which is then spent (analyse a fresh graph
    for the next rewrite); False edits a copy of it and leaves the analysis reusable. The copy
    shares the weights' arrays: an edit gives a node a new array, never writes into one.
    """
    check_removal(analysis, removed)
    keep = analysis.keep_fn(removed)
    graph = analysis.graph
    nodes = {}
    if not in_place:
        # Graph.copy() copies the nodes in order and their attribute dicts; the edits name the
        # analysed graph's nodes, so each is applied to its copy.
        copied = graph.copy()
        nodes = {id(old): new for old, new in zip(graph.nodes, copied.nodes)}
        graph = copied
    for edit in analysis.context.edits:
        # Every edit names a node of the graph: in a copy, none may reach the analysed graph.
        _apply(edit, keep, nodes[id(edit.node)] if nodes else edit.node)
    boundary = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in boundary:
            tensor.shape = None
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    result = gs.export_onnx(graph, do_type_check=False)
    _restore_model_fields(result, model)
    return onnx_inference(result)


def _apply(edit, keep: KeepFn, node: gs.Node) -> None:
    """Apply ``edit`` to ``node`` (the edit's node, or its copy)."""
    if isinstance(edit, SliceInput):
        mask = keep(edit.ids)
        if mask.all():
            return
        values = _constant_values(node.inputs[edit.index])
        _set_constant(node, edit.index, np.compress(mask, values, axis=edit.axis))
    elif isinstance(edit, RewriteInput):
        if edit.index < len(node.inputs) and node.inputs[edit.index].name:
            old = _constant_values(node.inputs[edit.index])
            new = np.asarray(edit.value(keep)).astype(old.dtype).reshape(old.shape)
            if not np.array_equal(old, new):
                _set_constant(node, edit.index, new)
        else:
            value = np.asarray(edit.value(keep), dtype=np.int64)
            while len(node.inputs) < edit.index:
                node.inputs.append(gs.Variable.empty())
            node.inputs.append(gs.Constant(f"{node.name}_input{edit.index}", value))
    elif isinstance(edit, ConstantInput):
        if keep(edit.ids).all():
            return  # the computed value is still right; leave the exporter's graph alone
        value = np.asarray(edit.value(keep), dtype=np.int64)
        # Named after the computed tensor it replaces (unique; node names may be empty); the
        # subgraph that computed it is left without readers and removed by cleanup.
        old = node.inputs[edit.index]
        node.inputs[edit.index] = gs.Constant(f"{old.name}__kept", value)
        node.attrs.update(edit.attrs)
    elif isinstance(edit, RewriteAttr):
        value = edit.value(keep)
        if value is None:
            node.attrs.pop(edit.name, None)
        else:
            node.attrs[edit.name] = value
    else:  # pragma: no cover - the edit types are closed
        raise TypeError(f"unknown edit {edit!r}")


def _constant_values(tensor: gs.Tensor) -> np.ndarray:
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return np.asarray(tensor.inputs[0].attrs["value"].values)


def _set_constant(node: gs.Node, index: int, values: np.ndarray) -> None:
    """Give ``node`` a new value for constant input ``index`` without touching other users."""
    tensor = node.inputs[index]
    values = np.ascontiguousarray(values)
    sole_user = len(tensor.outputs) == 1
    if isinstance(tensor, gs.Constant) and sole_user:
        tensor.values = values
    elif not isinstance(tensor, gs.Constant) and sole_user and len(tensor.inputs[0].outputs) == 1:
        tensor.inputs[0].attrs["value"] = gs.Constant(tensor.name + "_value", values)
        tensor.shape, tensor.dtype = list(values.shape), values.dtype
    else:
        node.inputs[index] = gs.Constant(f"{tensor.name}__{node.name}", values)
