"""Weight-norm criteria: the L1 or L2 norm of each output filter (Li et al. 2017), and the L2
norm of every weight coupled to a channel (the group norm of DepGraph, Fang et al. 2023)."""

from __future__ import annotations

import numpy as np

from onnx_ocnna.channels.context import SliceInput
from onnx_ocnna.criteria import register
from onnx_ocnna.criteria.base import Criterion, MemberInfo
from onnx_ocnna.errors import InputError


def _filters(member: MemberInfo) -> np.ndarray:
    """The weight as [C, K] float64 (one row per output filter)."""
    weight = np.asarray(member.weight)
    if weight.ndim == 0 or weight.shape[0] != member.channels:
        raise InputError(
            f"weight of {member.name!r} has shape {list(weight.shape)}, expected {member.channels} output channels on axis 0"
        )
    return weight.reshape(member.channels, -1).astype(np.float64)


@register
class L1Norm(Criterion):
    """Sum of |w| over each filter, shape [C]."""

    name = "l1"

    def weight_scores(self, member: MemberInfo) -> np.ndarray:
        return np.abs(_filters(member)).sum(axis=1)


@register
class L2Norm(Criterion):
    """Euclidean norm of each filter, shape [C]."""

    name = "l2"

    def weight_scores(self, member: MemberInfo) -> np.ndarray:
        return np.linalg.norm(_filters(member), axis=1)


@register
class GroupL2Norm(Criterion):
    """L2 norm of every learned weight a channel owns, shape [C] per group.

    A channel of a group owns a slice of each member's kernel (its filter), of each
    normalisation scale after it, and of each reader's kernel (the input slice of the next
    Conv, Gemm or MatMul, including a flattened classifier's columns): everything that leaves
    the model with it. Summing the squares over all of them (biases and running statistics
    excluded) ranks a channel by how much it writes *and* how much it is read, where ``l2``
    sees only the filter that writes it.
    """

    name = "group-l2"
    coupled = True

    def group_scores(self, analysis) -> dict[int, np.ndarray]:
        context = analysis.context
        # Squared weight per channel class, indexed by its representative element id.
        energy = np.zeros(len(context.space))
        for edit in context.edits:
            if not isinstance(edit, SliceInput) or not edit.learned:
                continue
            value = context.constant(edit.node.inputs[edit.index])
            if value is None:
                continue
            value = np.moveaxis(np.asarray(value, dtype=np.float64), edit.axis, 0)
            np.add.at(energy, context.space.roots(edit.ids), np.square(value.reshape(len(edit.ids), -1)).sum(axis=1))
        return {g.id: np.sqrt(energy[g.roots]) for g in analysis.groups if g.prunable}
