"""The interface every importance criterion implements.

A criterion only returns scores (higher = more important); it knows nothing of groups,
selection or graph surgery. Data-driven criteria see the activations of one *measured
tensor* (the end of the channel-preserving chain after a producer Conv, SPEC section 1)
batch by batch through an :class:`Accumulator`, whose state is mergeable so that partial
statistics from several workers or batches combine exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from onnx_ocnna.reductions import Reduction


@dataclass
class MemberInfo:
    """What a criterion may know about one producer (a Conv node) of a channel group.

    Attributes:
        name: node name of the producer.
        weight: the producer's weight with output channels on axis 0, shape [C, ...]
            (for ConvTranspose already transposed to that layout).
        channels: C, the number of output channels.
    """

    name: str
    weight: np.ndarray
    channels: int


class Accumulator:
    """Streaming per-channel statistics of one measured tensor."""

    def update(self, activations: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Add one batch.

        Args:
            activations: shape [N, C, H, W] or [N, C] (a 1x1 map), any float dtype.
            labels: shape [N] integer class labels, or None when the data has none.
        """
        raise NotImplementedError

    def reduction(self, shape: list) -> Reduction | None:
        """What ONNX Runtime may compute from the measured tensor in the graph instead of
        returning it, or None (the default) when :meth:`update` needs the tensor itself.

        Args:
            shape: the tensor's dims (ints static, str or None dynamic), e.g. [N, C, H, W].
        """
        return None

    def update_reduced(self, reduction: Reduction, reduced: list[np.ndarray],
                       labels: np.ndarray | None = None) -> None:
        """Add one batch given as the outputs of ``reduction``'s nodes (what :meth:`reduction`
        returned), in their order."""
        raise NotImplementedError

    def merge(self, other: "Accumulator") -> None:
        """Fold another accumulator of the same criterion and channel count into this one."""
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        """The complete state as named arrays (for saving or all-gather across workers)."""
        raise NotImplementedError

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], **options) -> "Accumulator":
        raise NotImplementedError

    def scores(self) -> np.ndarray:
        """Per-channel importance, shape [C], float64, higher = more important."""
        raise NotImplementedError


MIN_SAMPLES_ADVISED = 32


@dataclass
class Criterion:
    """Base class: a named way of scoring the output channels of one producer (or, coupled,
    of one channel group).

    Subclasses set the class attributes and implement :meth:`weight_scores` (``needs_data =
    False``), :meth:`new_accumulator` (``needs_data = True``) or :meth:`group_scores`
    (``coupled = True``).
    """

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    # A criterion built on a spread across images (OCNNA's coefficient of variation, SI's class
    # separation) is undefined below this many samples; fewer than MIN_SAMPLES_ADVISED are noisy.
    min_samples: ClassVar[int] = 1
    # A coupled criterion scores a channel from everything tied to it (every member's filter
    # and every reader's input slice), so it sees the whole analysis, not one producer.
    coupled: ClassVar[bool] = False
    options: dict = field(default_factory=dict)

    def weight_scores(self, member: MemberInfo) -> np.ndarray:
        """Scores from weights alone, shape [C]."""
        raise NotImplementedError(f"criterion {self.name!r} needs data")

    def group_scores(self, analysis) -> dict[int, np.ndarray]:
        """Scores of a coupled criterion (``coupled = True``): prunable group id -> [channels],
        indexed like the group's channels."""
        raise NotImplementedError(f"criterion {self.name!r} scores one producer at a time")

    def new_accumulator(self, member: MemberInfo) -> Accumulator:
        """A fresh accumulator for the measured tensor of ``member``."""
        raise NotImplementedError(f"criterion {self.name!r} needs no data")
