"""Weight-norm criteria (Li et al. 2017): the L1 or L2 norm of each output filter."""

from __future__ import annotations

import numpy as np

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
