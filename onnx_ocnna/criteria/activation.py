"""Activation criteria: APoZ (Hu et al. 2016) and mean |activation|.

Both reduce every element of a channel (all images and positions) to one per-channel
sum plus a shared element count, so batches and workers merge by plain addition.

APoZ counts elements that are exactly zero. On the measured tensor after a ReLU (or
Clip at 0, HardSwish below -3) inactive positions are exact zeros, and any tolerance
would also count small genuine responses; after an activation without a zero plateau
(LeakyReLU, Sigmoid) nearly nothing is zero and APoZ cannot tell channels apart.
"""

from __future__ import annotations

import numpy as np

from onnx_ocnna.criteria import register
from onnx_ocnna.criteria.base import Accumulator, Criterion, MemberInfo
from onnx_ocnna.errors import InputError


class ChannelSumAccumulator(Accumulator):
    """Per-channel sum of f(x) over all elements, and the number of elements per channel.

    Subclasses define :meth:`_batch_sum` (shape [C]) and how the mean becomes a score.
    """

    kind = ""

    def __init__(self, channels: int) -> None:
        self.channels = int(channels)
        self.total = np.zeros(self.channels, dtype=np.float64)
        self.count = 0

    def update(self, activations: np.ndarray, labels: np.ndarray | None = None) -> None:
        x = np.asarray(activations)
        if x.ndim < 2 or x.shape[1] != self.channels:
            raise InputError(f"expected activations with {self.channels} channels on axis 1, got shape {list(x.shape)}")
        axes = (0, *range(2, x.ndim))
        self.total += self._batch_sum(x, axes)
        self.count += x.size // self.channels

    def _batch_sum(self, x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError

    def merge(self, other: Accumulator) -> None:
        if type(other) is not type(self) or other.channels != self.channels:
            raise InputError(f"can only merge {self.kind} statistics of the same channel count")
        self.total += other.total
        self.count += other.count

    def state(self) -> dict[str, np.ndarray]:
        return {"total": self.total.copy(), "count": np.asarray(self.count, dtype=np.int64)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], **options) -> "ChannelSumAccumulator":
        total = np.asarray(state["total"], dtype=np.float64)
        if total.ndim != 1:
            raise InputError(f"saved {cls.kind} statistics must be one value per channel")
        acc = cls(total.shape[0])
        acc.total, acc.count = total.copy(), int(state["count"])
        return acc

    def _mean(self) -> np.ndarray:
        if self.count == 0:
            raise InputError("no calibration images reached this layer, so it cannot be scored")
        return self.total / self.count


class APoZAccumulator(ChannelSumAccumulator):
    """Score = 1 - APoZ = the fraction of non-zero elements per channel, in [0, 1]."""

    kind = "apoz"

    def _batch_sum(self, x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        return np.count_nonzero(x, axis=axes).astype(np.float64)

    def scores(self) -> np.ndarray:
        return self._mean()


class MeanAbsAccumulator(ChannelSumAccumulator):
    """Score = mean |x| per channel."""

    kind = "mean-activation"

    def _batch_sum(self, x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        return np.abs(x).sum(axis=axes, dtype=np.float64)

    def scores(self) -> np.ndarray:
        return self._mean()


@register
class APoZ(Criterion):
    """1 - average percentage of zeros of the post-activation output."""

    name = "apoz"
    needs_data = True

    def new_accumulator(self, member: MemberInfo) -> APoZAccumulator:
        return APoZAccumulator(member.channels)


@register
class MeanActivation(Criterion):
    """Mean |output| per channel over all images and positions."""

    name = "mean-activation"
    needs_data = True

    def new_accumulator(self, member: MemberInfo) -> MeanAbsAccumulator:
        return MeanAbsAccumulator(member.channels)
