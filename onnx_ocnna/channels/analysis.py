"""Channel-group analysis: walk the graph once, let each operator's handler say how channels
flow and tie, then gather producers whose channels are tied into groups (SPEC section 1)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_ocnna.channels.context import AnalysisContext, KeepFn, SliceInput
from onnx_ocnna.channels.ops_linear import LINEAR_OPS
from onnx_ocnna.channels.registry import handler_for
from onnx_ocnna.shapes import infer_model

# Ops a filter's activation is followed through before it is measured (SPEC section 1); a
# bias Add/Sub of a constant too (:func:`_is_bias`).
_CHAIN_OPS = {
    "BatchNormalization", "InstanceNormalization", "Relu", "LeakyRelu", "PRelu", "Clip", "HardSwish",
    "Elu", "Selu", "Celu", "Gelu", "Mish", "Softplus", "Tanh", "MaxPool", "AveragePool", "GlobalAveragePool",
    "GlobalMaxPool", "LpPool", "Pad", "Dropout", "Identity", "Cast",
}
_GATES = {"Sigmoid", "HardSigmoid"}


@dataclass
class ChannelGroup:
    """Producer output channels that must be removed together.

    Attributes:
        id: index of the group in the analysis.
        members: names of the producer nodes (Conv), the anchor (the member that shows every
            channel) first, then in graph order.
        channels: number of removable channels (equivalence classes) of the group.
        member_channels: member -> group channel index of each of its output channels, [C_m].
        frozen: per group channel, the reason it cannot be removed ("" when it can), [channels].
        measured: member -> name of the tensor its activation is measured on.
        roots: class representative of each group channel, [channels].
        carriers: node name -> group channel index of each output channel, [C_n], for the
            nodes whose outputs are these channels without making them (a depthwise Conv):
            a plan may name them like members (SPEC section 6).
    """

    id: int
    members: list[str]
    channels: int
    member_channels: dict[str, np.ndarray]
    frozen: list[str]
    measured: dict[str, str]
    roots: np.ndarray
    carriers: dict[str, np.ndarray] = field(default_factory=dict)

    def channels_of(self, name: str) -> np.ndarray | None:
        """Group channel index of each output channel of member or carrier ``name``, [C_n]."""
        found = self.member_channels.get(name)
        return found if found is not None else self.carriers.get(name)

    @property
    def prunable(self) -> bool:
        return any(not reason for reason in self.frozen)

    @property
    def frozen_reason(self) -> str:
        """The reason shared by the frozen channels, or ''."""
        reasons = [r for r in self.frozen if r]
        return reasons[0] if reasons else ""

    def removable(self) -> np.ndarray:
        """Indices of the channels that may be removed, [n]."""
        return np.array([i for i, r in enumerate(self.frozen) if not r], dtype=np.int64)


@dataclass
class ChannelAnalysis:
    """The result of analysing one model: its graph, channel layouts, edits and groups."""

    graph: gs.Graph
    context: AnalysisContext
    groups: list[ChannelGroup]
    opset: int
    _member_group: dict[str, int] = field(default_factory=dict)

    def group_of(self, member: str) -> ChannelGroup | None:
        index = self._member_group.get(member)
        return None if index is None else self.groups[index]

    def keep_fn(self, removed: dict[int, np.ndarray]) -> KeepFn:
        """The keep mask for element ids once ``removed`` (group id -> channel indices) is applied."""
        dropped = np.concatenate([self.groups[gid].roots[np.asarray(channels, dtype=np.int64)]
                                  for gid, channels in removed.items()] or [np.zeros(0, np.int64)])
        space = self.context.space

        def keep(ids: np.ndarray) -> np.ndarray:
            return ~np.isin(space.roots(np.ravel(ids)), dropped)

        return keep

    def excluded(self, patterns: list[str]) -> set[int]:
        """Ids of groups with a member node or member weight matching one of the glob patterns."""
        hits = set()
        nodes = {n.name: n for n in self.graph.nodes}
        for group in self.groups:
            names = []
            for member in group.members:
                names.append(member)
                names.extend(t.name for t in nodes[member].inputs[1:] if t.name)
            if any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in patterns):
                hits.add(group.id)
        return hits


def prepare_graph(model: onnx.ModelProto, observed: dict | None = None) -> gs.Graph:
    """Constant-fold and shape-infer a model into a graph-surgeon graph in topological order.

    Folding turns exporter-built constant subgraphs (the Pad amounts of option-A shortcuts,
    Reshape targets) into constants the handlers can read and rewrite. Shapes come from the
    best source available (:mod:`onnx_ocnna.shapes`: the model's value_info, ONNX inference,
    ONNX Runtime's symbolic inference, then ``observed`` run-time shapes from
    :func:`onnx_ocnna.shapes.observed_shapes`).
    """
    graph = gs.import_onnx(infer_model(model, observed))
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)  # folding runs ORT; its optimiser warnings are noise here
        graph.fold_constants(size_threshold=16 * 1024 * 1024, error_ok=True)
    except Exception:  # folding is an optimisation; analysis still works without it
        pass
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    exported = gs.export_onnx(graph, do_type_check=False)
    _restore_model_fields(exported, model)
    graph = gs.import_onnx(infer_model(exported, observed))
    return graph


def _restore_model_fields(target: onnx.ModelProto, source: onnx.ModelProto) -> None:
    target.ir_version = source.ir_version
    target.producer_name = source.producer_name
    target.producer_version = source.producer_version
    del target.opset_import[:]
    target.opset_import.extend(source.opset_import)
    del target.metadata_props[:]
    target.metadata_props.extend(source.metadata_props)


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def analyse(model: onnx.ModelProto, graph: gs.Graph | None = None) -> ChannelAnalysis:
    """Find the channel groups of ``model``.

    Args:
        model: the ONNX model (used for its opset and as the source of ``graph``).
        graph: a graph from :func:`prepare_graph` (built here when omitted). Surgery edits
            this graph's nodes, so analyse a fresh graph for each rewrite.
    """
    graph = graph if graph is not None else prepare_graph(model)
    opset = default_opset(model)
    ctx = AnalysisContext(graph=graph, opset=opset)
    for node in graph.nodes:
        handler_for(node)(ctx, node)
        for subgraph_attr in node.attrs.values():
            if isinstance(subgraph_attr, gs.Graph):
                ctx.opaque(node, f"{node.op} '{node.name}' has a subgraph")
    for output in graph.outputs:
        ctx.freeze_layout(ctx.layout(output), f"reaches the graph output '{output.name}'")
    heads = _output_heads(ctx)
    ctx.producers = [p for p in ctx.producers if p.node.name not in heads]
    groups, member_group = _build_groups(ctx)
    return ChannelAnalysis(graph=graph, context=ctx, groups=groups, opset=opset, _member_group=member_group)


_LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _output_heads(ctx: AnalysisContext) -> set[str]:
    """Names of the Gemm/MatMul producers whose neurons are the model's outputs (the
    classifier): their values reach a graph output with no other layer in between, and no
    layer reads them. They make no channels (SPEC section 1), so they form no group."""
    reaches: set[str] = {t.name for t in ctx.graph.outputs}
    for node in reversed(ctx.graph.nodes):  # topological order: readers before writers
        if node.op not in _LAYER_OPS and any(t.name in reaches for t in node.outputs):
            reaches.update(t.name for t in node.inputs if t.name)
    read_by: dict[int, set[str]] = {}  # class root -> the layers whose weights it slices
    for edit in ctx.edits:
        if isinstance(edit, SliceInput) and edit.node.op in _LAYER_OPS:
            for root in np.unique(ctx.space.roots(edit.ids)).tolist():
                read_by.setdefault(root, set()).add(edit.node.name)
    heads = set()
    for producer in ctx.producers:
        if producer.node.op not in LINEAR_OPS or producer.node.outputs[0].name not in reaches:
            continue
        readers = set().union(*(read_by.get(r, set()) for r in np.unique(ctx.space.roots(producer.ids)).tolist()))
        if not readers - {producer.node.name}:
            heads.add(producer.node.name)
    return heads


def _build_groups(ctx: AnalysisContext) -> tuple[list[ChannelGroup], dict[str, int]]:
    space = ctx.space
    producer_roots = [space.roots(p.ids) for p in ctx.producers]
    # Producers sharing any class belong to one group: union-find over producer indices.
    parent = list(range(len(ctx.producers)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_owner: dict[int, int] = {}
    for index, roots in enumerate(producer_roots):
        for root in np.unique(roots).tolist():
            if root in first_owner:
                a, b = find(first_owner[root]), find(index)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first_owner[root] = index

    components: dict[int, list[int]] = {}
    for index in range(len(ctx.producers)):
        components.setdefault(find(index), []).append(index)

    groups: list[ChannelGroup] = []
    member_group: dict[str, int] = {}
    for indices in components.values():
        anchor = max(indices, key=lambda i: (len(np.unique(producer_roots[i])), -i))
        ordered = [anchor] + [i for i in indices if i != anchor]
        order: dict[int, int] = {}
        for i in ordered:
            for root in producer_roots[i].tolist():
                order.setdefault(root, len(order))
        roots = np.array(list(order), dtype=np.int64)
        members = [ctx.producers[i].node.name for i in ordered]
        group = ChannelGroup(
            id=len(groups),
            members=members,
            channels=len(roots),
            member_channels={ctx.producers[i].node.name: np.array([order[r] for r in producer_roots[i].tolist()])
                             for i in ordered},
            frozen=[space.frozen_reason(int(r)) or "" for r in roots],
            measured={ctx.producers[i].node.name: measured_tensor(ctx, ctx.producers[i].node).name for i in ordered},
            roots=roots,
        )
        for name in members:
            member_group[name] = group.id
        groups.append(group)
    for carrier in ctx.carriers:
        # A carrier whose channels all lie in one group can be named in a plan like a member.
        roots = space.roots(carrier.ids).tolist()
        owners = {find(first_owner[r]) for r in roots if r in first_owner}
        if len(owners) != 1 or any(r not in first_owner for r in roots):
            continue
        name = ctx.producers[owners.pop()].node.name
        group = groups[member_group[name]]
        position = {int(r): i for i, r in enumerate(group.roots.tolist())}
        group.carriers[carrier.node.name] = np.array([position[r] for r in roots], dtype=np.int64)
        member_group.setdefault(carrier.node.name, group.id)
    return groups, member_group


def measured_tensor(ctx: AnalysisContext, producer: gs.Node) -> gs.Tensor:
    """The end of the channel-preserving chain after ``producer``: the tensor its consumers read."""
    tensor = producer.outputs[0]
    axis = ctx.layout(tensor).axis if ctx.layout(tensor) is not None else 1  # 3 for channels-last
    graph_outputs = {t.name for t in ctx.graph.outputs}
    while tensor.name not in graph_outputs:
        consumers = list(tensor.outputs)
        if len(consumers) == 1 and consumers[0].op in _CHAIN_OPS and consumers[0].inputs[0] is tensor:
            nxt = consumers[0].outputs[0]
        elif len(consumers) == 1 and _is_bias(ctx, consumers[0], tensor):
            nxt = consumers[0].outputs[0]
        elif len(consumers) == 2 and _self_gate(tensor, consumers) is not None:
            nxt = _self_gate(tensor, consumers)
        else:
            break
        if ctx.layout(nxt) is None or ctx.layout(nxt).axis != axis:
            break
        tensor = nxt
    return tensor


def _is_bias(ctx: AnalysisContext, node: gs.Node, tensor: gs.Tensor) -> bool:
    """An Add/Sub of a constant to ``tensor`` (tf2onnx's bias after a MatMul): part of the chain."""
    if node.op not in ("Add", "Sub") or len(node.inputs) != 2 or node.inputs[0] is not tensor \
            and not (node.op == "Add" and node.inputs[1] is tensor):
        return False
    other = node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]
    return ctx.constant(other) is not None


def _self_gate(tensor: gs.Tensor, consumers: list[gs.Node]) -> gs.Tensor | None:
    """x * sigmoid(x) (SiLU) or x * hardsigmoid(x) (HardSwish) built from two nodes."""
    gates = [n for n in consumers if n.op in _GATES]
    muls = [n for n in consumers if n.op == "Mul"]
    if len(gates) != 1 or len(muls) != 1:
        return None
    gate, mul = gates[0], muls[0]
    if {t.name for t in mul.inputs} != {tensor.name, gate.outputs[0].name}:
        return None
    if len(gate.outputs[0].outputs) != 1:
        return None
    return mul.outputs[0]
