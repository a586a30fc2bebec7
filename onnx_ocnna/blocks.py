"""Separation-Index block removal (SPEC section 4, `--drop-blocks`).

A residual block with an identity shortcut computes ``y = x + F(x)``. Its input x and output
(the end of the channel-preserving chain after the Add, e.g. the ReLU) are measured on
labelled calibration data; a block whose output SI does not exceed its input SI by
``si_epsilon`` is removed: the Add's output is rewired to x and F's nodes disappear.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_ocnna.channels.analysis import _restore_model_fields, prepare_graph
from onnx_ocnna.shapes import onnx_inference
from onnx_ocnna.collect import with_outputs
from onnx_ocnna.criteria.si import separation_index
from onnx_ocnna.errors import InputError
from onnx_ocnna.model_io import ort_session

_CHAIN = {"Relu", "LeakyRelu", "Clip", "HardSwish", "Identity", "Dropout"}


@dataclass
class ResidualBlock:
    """Attributes:
        add: name of the Add node joining shortcut and branch.
        shortcut: the block input x (the Add operand used as is).
        output: the tensor after the Add's activation chain (what the next block reads).
        branch_nodes: number of nodes only the residual branch uses.
    """

    add: str
    shortcut: str
    output: str
    branch_nodes: int
    si_in: float | None = None
    si_out: float | None = None
    dropped: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def _ancestors(tensor: gs.Tensor, stop: gs.Tensor) -> set[int] | None:
    """Ids of the nodes between ``stop`` and ``tensor``; None if ``tensor`` does not depend on
    ``stop`` alone (another graph input or a non-constant source reaches it)."""
    seen: set[int] = set()
    stack = [tensor]
    reaches_stop = False
    while stack:
        t = stack.pop()
        if t is stop:
            reaches_stop = True
            continue
        if isinstance(t, gs.Constant):
            continue
        if not t.inputs:
            return None  # a graph input other than the block input
        node = t.inputs[0]
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(node.inputs)
    return seen if reaches_stop else None


def find_residual_blocks(graph: gs.Graph) -> list[ResidualBlock]:
    """Adds whose one operand x feeds, through the other operand's branch, only that Add."""
    blocks = []
    for node in graph.nodes:
        if node.op != "Add" or len(node.inputs) != 2:
            continue
        for x, branch in (node.inputs, node.inputs[::-1]):
            if isinstance(x, gs.Constant) or isinstance(branch, gs.Constant):
                continue
            inner = _ancestors(branch, x)
            if not inner:
                continue
            # The branch must be private: no node of it feeds anything outside the block.
            private = all(all(id(c) in inner or c is node for out in n.outputs for c in out.outputs)
                          for n in graph.nodes if id(n) in inner)
            if not private or not any(n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul")
                                      for n in graph.nodes if id(n) in inner):
                continue
            output = node.outputs[0]
            while len(output.outputs) == 1 and output.outputs[0].op in _CHAIN:
                output = output.outputs[0].outputs[0]
            blocks.append(ResidualBlock(node.name, x.name, output.name, len(inner)))
            break
    return blocks


def measure_blocks(model: onnx.ModelProto, blocks: list[ResidualBlock], batches, max_samples: int = 2000,
                   seed: int = 0) -> None:
    """Fill ``si_in``/``si_out`` of every block from one streaming ONNX Runtime pass.

    Features are spatially averaged responses, [n, C] per tensor (SPEC section 3).
    """
    names = sorted({b.shortcut for b in blocks} | {b.output for b in blocks})
    session = ort_session(with_outputs(model, names))
    inputs = {i.name for i in session.get_inputs()}
    features: dict[str, list[np.ndarray]] = {name: [] for name in names}
    labels = []
    for batch in batches:
        if batch.labels is None:
            raise InputError("--drop-blocks needs labelled calibration data (class sub-folders or npz 'labels')")
        outputs = session.run(names, {k: v for k, v in batch.feeds.items() if k in inputs})
        for name, value in zip(names, outputs):
            value = np.asarray(value)
            features[name].append(value.reshape(value.shape[0], value.shape[1], -1).mean(axis=2).astype(np.float32))
        labels.append(np.asarray(batch.labels))
    if not labels:
        raise InputError("the calibration data produced no batches")
    y = np.concatenate(labels)
    keep = np.sort(np.random.default_rng(seed).permutation(len(y))[:max_samples])
    si = {name: separation_index(np.concatenate(f)[keep], y[keep]) for name, f in features.items()}
    for block in blocks:
        block.si_in, block.si_out = si[block.shortcut], si[block.output]


def drop_blocks(model: onnx.ModelProto, blocks: list[ResidualBlock], graph: gs.Graph | None = None) -> onnx.ModelProto:
    """Remove the given blocks: every reader of the Add's output reads the shortcut instead.

    Args:
        graph: ``model`` already prepared by :func:`prepare_graph` (edited in place); built when omitted.
    """
    graph = graph if graph is not None else prepare_graph(model)
    tensors = graph.tensors()
    nodes = {n.name: n for n in graph.nodes}
    # A block's shortcut can be the Add output of a block removed before it (consecutive blocks
    # without an activation after the Add, as in MobileNetV2): follow it to what replaced it.
    replaced: dict[str, gs.Tensor] = {}
    for block in blocks:
        add, shortcut = nodes[block.add], tensors[block.shortcut]
        while shortcut.name in replaced:
            shortcut = replaced[shortcut.name]
        out = add.outputs[0]
        if out in graph.outputs:
            raise InputError(f"block '{block.add}' produces a graph output; it cannot be removed")
        for consumer in list(out.outputs):
            for index, tensor in enumerate(consumer.inputs):
                if tensor is out:
                    consumer.inputs[index] = shortcut
        replaced[out.name] = shortcut
        add.outputs.clear()
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor not in graph.inputs and tensor not in graph.outputs:
            tensor.shape = None
    result = gs.export_onnx(graph, do_type_check=False)
    _restore_model_fields(result, model)
    return onnx_inference(result)


def select_blocks(model: onnx.ModelProto, batches, si_epsilon: float = 0.0, max_samples: int = 2000,
                  seed: int = 0) -> tuple[onnx.ModelProto, list[ResidualBlock]]:
    """Measure every identity-shortcut block and drop those that do not raise SI by ``si_epsilon``.

    Returns the model with the blocks removed (the original when none qualifies) and every
    block with its SI values and verdict, in graph order (the SI curve through the network).
    """
    graph = prepare_graph(model)
    prepared = gs.export_onnx(graph, do_type_check=False)
    _restore_model_fields(prepared, model)
    blocks = find_residual_blocks(graph)
    if not blocks:
        return model, []
    measure_blocks(prepared, blocks, batches, max_samples=max_samples, seed=seed)
    chosen = [b for b in blocks if b.si_out - b.si_in <= si_epsilon]
    for block in chosen:
        block.dropped = True
    return (drop_blocks(prepared, chosen, graph) if chosen else model), blocks
