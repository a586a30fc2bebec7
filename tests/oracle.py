"""The lossless oracle: make chosen channels exactly zero after their activation, remove
them with a plan, and check that nothing else changed.

Channels are killed in ONNX space, so the same code serves every exporter: every Conv that
writes a killed channel gets zero rows and bias (a Gemm/MatMul zero weight columns and bias); every per-channel normalisation on a killed
channel gets scale 0 and shift -1 before a ReLU (0 elsewhere, which SiLU/HardSwish/ReLU6 map to 0);
a per-channel constant added to a killed channel becomes 0.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_ocnna.channels.analysis import ChannelAnalysis, _restore_model_fields, analyse, prepare_graph
from onnx_ocnna.model_io import ort_session, sample_feeds, validate_model
from onnx_ocnna.plan import build_plan, resolve_plan
from onnx_ocnna.surgery import apply_removal

_ZERO_AT_ZERO_AFTER_SHIFT = {"Relu", "Clip"}


def pick_channels(analysis: ChannelAnalysis, fraction: float = 0.3, seed: int = 0) -> dict[int, np.ndarray]:
    """Random removable channels of every prunable group (leaving at least one), group id -> indices.

    The pick is then trimmed so it never empties a Split piece, a Slice result or a member
    Conv: surgery refuses such a plan (PlanError), and selection keeps one channel of each the
    same way.
    """
    rng = np.random.default_rng(seed)
    chosen = {}
    for group in analysis.groups:
        candidates = group.removable()
        count = min(int(np.ceil(fraction * group.channels)), group.channels - 1, len(candidates))
        if count > 0:
            chosen[group.id] = np.sort(rng.choice(candidates, size=count, replace=False))
    where = {int(root): (g.id, c) for g in analysis.groups for c, root in enumerate(g.roots)}
    space = analysis.context.space
    for ids, _ in analysis.context.nonempty:
        if ids.size and not analysis.keep_fn(chosen)(ids).any():
            gid, channel = where[space.find(int(ids[0]))]
            chosen[gid] = chosen[gid][chosen[gid] != channel]
    return {gid: channels for gid, channels in chosen.items() if len(channels)}


def kill_channels(model: onnx.ModelProto, chosen: dict[int, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` (constant-folded) whose chosen group channels are exactly zero."""
    graph = prepare_graph(model)
    analysis = analyse(model, graph)
    space = analysis.context.space
    dead_roots = {int(analysis.groups[g].roots[c]) for g, cs in chosen.items() for c in cs}

    def dead(tensor: gs.Tensor) -> np.ndarray | None:
        layout = analysis.context.layout(tensor)
        if layout is None:
            return None
        mask = np.array([space.find(int(i)) in dead_roots for i in layout.ids])
        return mask if mask.any() else None

    for node in graph.nodes:
        mask = dead(node.outputs[0]) if node.outputs else None
        if mask is None:
            continue
        if node.op == "Conv":
            _zero(node.inputs[1], mask, 0)
            if len(node.inputs) > 2 and node.inputs[2].name:
                _zero(node.inputs[2], mask, 0)
        elif node.op == "Gemm":
            # A hidden layer's dead neurons: zero weight columns (rows with transB) and bias.
            _zero(node.inputs[1], mask, 0 if int(node.attrs.get("transB", 0)) else 1)
            if len(node.inputs) > 2 and node.inputs[2].name and node.inputs[2].values.ndim:
                _zero(node.inputs[2], mask, node.inputs[2].values.ndim - 1)
        elif node.op == "MatMul":  # its bias, if any, is the Add that follows (below)
            _zero(node.inputs[1], mask, 1)
        elif node.op == "ConvTranspose":
            _zero(node.inputs[1], mask, 1)
            if len(node.inputs) > 2 and node.inputs[2].name:
                _zero(node.inputs[2], mask, 0)
        elif node.op in ("BatchNormalization", "InstanceNormalization"):
            consumers = node.outputs[0].outputs
            shift = -1.0 if len(consumers) == 1 and consumers[0].op in _ZERO_AT_ZERO_AFTER_SHIFT else 0.0
            _zero(node.inputs[1], mask, 0)
            _zero(node.inputs[2], mask, 0, fill=shift)
        elif node.op in ("Add", "Sub"):
            layout = analysis.context.layout(node.outputs[0])
            for tensor in node.inputs:
                if isinstance(tensor, gs.Constant) and tensor.values.ndim:
                    axis = layout.axis - (layout.rank - tensor.values.ndim)
                    if axis >= 0 and tensor.values.shape[axis] == len(mask):
                        _zero(tensor, mask, axis)
    result = gs.export_onnx(graph, do_type_check=False)
    _restore_model_fields(result, model)
    return result


def _zero(tensor: gs.Tensor, mask: np.ndarray, axis: int, fill: float = 0.0) -> None:
    assert isinstance(tensor, gs.Constant), f"{tensor.name} is not a constant"
    values = np.array(tensor.values, copy=True)
    index = [slice(None)] * values.ndim
    index[axis] = mask
    values[tuple(index)] = fill
    tensor.values = values


def check_lossless(model: onnx.ModelProto, fraction: float = 0.3, seed: int = 0, rtol: float = 1e-5,
                   sizes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """Kill, prune and compare. Returns figures for the test to assert on.

    ``sizes``: input name -> one sample's shape (no batch axis) for inputs with a dynamic
    height and width, which are otherwise fed at 1 x 1.
    """
    probe = analyse(model)
    chosen = pick_channels(probe, fraction, seed)
    killed = kill_channels(model, chosen)
    analysis = analyse(killed)
    plan = build_plan(analysis, chosen, model_sha256="")
    removed = resolve_plan(plan, analysis)
    pruned = apply_removal(killed, analysis, removed)
    feeds = sample_feeds(model, batch=2, seed=seed, sizes=sizes)
    validate_model(pruned, feeds)
    expected = ort_session(killed).run(None, feeds)
    actual = ort_session(pruned).run(None, feeds)
    errors = [float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-12)) for a, e in zip(actual, expected)]
    return {
        "removed": int(sum(len(c) for c in removed.values())),
        "groups": len(analysis.groups),
        "prunable_groups": sum(g.prunable for g in analysis.groups),
        "max_rel_error": max(errors),
        "before_params": _conv_out_channels(killed),
        "after_params": _conv_out_channels(pruned),
        "before_neurons": _fc_out_neurons(killed),
        "after_neurons": _fc_out_neurons(pruned),
        "pruned": pruned,
    }


def _conv_out_channels(model: onnx.ModelProto) -> int:
    inits = {i.name: i for i in model.graph.initializer}
    return sum(inits[n.input[1]].dims[0] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits)


def _fc_out_neurons(model: onnx.ModelProto) -> int:
    """Output neurons of every Gemm/MatMul with a 2-D initializer weight."""
    inits = {i.name: i for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type in ("Gemm", "MatMul") else None
        if weight is not None and len(weight.dims) == 2:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            total += weight.dims[0] if trans_b else weight.dims[1]
    return total
