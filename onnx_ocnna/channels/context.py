"""State shared by the operator handlers while they walk the graph, and the edits they record.

A handler never changes the graph during analysis. It records *edits*: how each constant or
attribute it owns must change once the removed channels are known. Surgery later applies
every edit with a ``keep(ids) -> mask`` function, so the knowledge of how an operator is cut
stays beside the knowledge of how its channels are coupled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnx_ocnna.channels.space import ChannelSpace, Layout

KeepFn = Callable[[np.ndarray], np.ndarray]
"""Maps element ids, shape [n], to a boolean keep mask, shape [n]."""


@dataclass
class SliceInput:
    """Slice the constant input ``index`` of ``node`` along ``axis`` by keep(ids).

    ``learned`` marks a trained weight (a Conv/Gemm/MatMul kernel, a normalisation's scale), as
    opposed to a bias or a running statistic: the weight-coupled criterion (``group-l2``) sums
    every learned slice a channel owns.
    """

    node: gs.Node
    index: int
    axis: int
    ids: np.ndarray
    learned: bool = False

    def touches(self, keep: KeepFn) -> bool:
        return not keep(self.ids).all()


@dataclass
class RewriteInput:
    """Replace the constant input ``index`` of ``node`` by ``value(keep)``."""

    node: gs.Node
    index: int
    value: Callable[[KeepFn], np.ndarray]


@dataclass
class RewriteAttr:
    """Set attribute ``name`` of ``node`` to ``value(keep)``."""

    node: gs.Node
    name: str
    value: Callable[[KeepFn], object]


@dataclass
class ConstantInput:
    """Replace input ``index`` of ``node``, computed at run time, by the constant ``value(keep)``
    once keep(ids) drops one of ``ids``; ``attrs`` are set on ``node`` at the same time.

    For a Reshape target that shape inference reduces to constants and copied input dims (a
    flatten built from ``Shape``): the computed value would still name the old channel count.
    """

    node: gs.Node
    index: int
    ids: np.ndarray
    value: Callable[[KeepFn], np.ndarray]
    attrs: dict = field(default_factory=dict)


Edit = SliceInput | RewriteInput | RewriteAttr | ConstantInput

SHAPE_HINT = ("no shape source (the model's value_info, ONNX shape inference, ONNX Runtime's symbolic shape "
              "inference) gives it; declaring the shapes in the model's value_info would unfreeze it")
"""What would unfreeze a group frozen for a missing shape, appended to the reason."""


@dataclass
class Producer:
    """A node that creates prunable channels (a Conv's outputs, a hidden Gemm/MatMul's neurons).

    Attributes:
        node: the Conv / ConvTranspose / Gemm / MatMul node.
        ids: element id of each output channel, shape [C].
        weight_axis: axis of the weight that indexes output channels (0 for Conv and for
            Gemm with transB, 1 for ConvTranspose, MatMul and Gemm without transB).
    """

    node: gs.Node
    ids: np.ndarray
    weight_axis: int = 0


@dataclass
class AnalysisContext:
    graph: gs.Graph
    opset: int
    space: ChannelSpace = field(default_factory=ChannelSpace)
    layouts: dict[str, Layout] = field(default_factory=dict)
    edits: list[Edit] = field(default_factory=list)
    producers: list[Producer] = field(default_factory=list)
    # Nodes whose output channels are their input's (a depthwise Conv): a plan may name them.
    carriers: list[Producer] = field(default_factory=list)
    # Sets of element ids of which at least one must survive (a Split piece, a Slice result).
    nonempty: list[tuple[np.ndarray, str]] = field(default_factory=list)
    # Expand node name -> element ids of the tensor whose Shape is its whole target
    # (``y.expand_as(x)``): the Expand's input must keep as many channels as that tensor.
    expand_targets: dict[str, np.ndarray] = field(default_factory=dict)
    _consumers: dict[str, list[gs.Node]] = field(default_factory=dict)

    # --- tensors -----------------------------------------------------------------------
    def layout(self, tensor: gs.Tensor | None) -> Layout | None:
        if tensor is None or not tensor.name:
            return None
        return self.layouts.get(tensor.name)

    def set_layout(self, tensor: gs.Tensor, layout: Layout | None) -> None:
        if layout is not None and tensor.name:
            self.layouts[tensor.name] = layout

    def constant(self, tensor: gs.Tensor | None) -> np.ndarray | None:
        """The value of a constant tensor (initializer or Constant node output), else None."""
        if tensor is None:
            return None
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
            value = tensor.inputs[0].attrs.get("value")
            if isinstance(value, gs.Constant):
                return np.asarray(value.values)
        return None

    def shape(self, tensor: gs.Tensor | None) -> list | None:
        """The tensor's shape: ints for static dims, strings/None for symbolic; None if unknown."""
        if tensor is None:
            return None
        if isinstance(tensor, gs.Constant):
            return list(tensor.values.shape)
        if tensor.shape is None:
            return None
        return list(tensor.shape)

    def rank(self, tensor: gs.Tensor | None) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def consumers(self, tensor: gs.Tensor) -> list[gs.Node]:
        return list(tensor.outputs)

    # --- channel bookkeeping -------------------------------------------------------------
    def freeze_layout(self, layout: Layout | None, reason: str) -> None:
        if layout is not None:
            self.space.freeze(layout.ids, reason)

    def freeze_inputs(self, node: gs.Node, reason: str) -> None:
        """Freeze every channel that reaches ``node``."""
        for tensor in node.inputs:
            self.freeze_layout(self.layout(tensor), reason)

    def opaque(self, node: gs.Node, reason: str) -> None:
        """The node is not understood: its inputs' channels are frozen, its outputs untracked."""
        self.freeze_inputs(node, reason)

    def shape_unknown(self, node: gs.Node, what: str) -> None:
        """``opaque`` for a node the analysis cannot follow because a shape is unknown; the
        reason names the node, the operator and what would unfreeze it."""
        self.opaque(node, f"{describe(node)} {what}: {SHAPE_HINT}")

    def new_frozen(self, count: int, node: gs.Node, reason: str, kind: str = "opaque") -> np.ndarray:
        ids = self.space.new(count, kind, node.name)
        self.space.freeze(ids, reason)
        return ids

    def add_edit(self, edit: Edit) -> None:
        self.edits.append(edit)

    def require_nonempty(self, ids: np.ndarray, what: str) -> None:
        self.nonempty.append((ids, what))


def describe(node: gs.Node) -> str:
    """``Op 'name'`` for messages."""
    return f"{node.op} '{node.name}'"
