"""Streaming per-channel moments (count, mean, M2) that merge exactly.

Batches are folded in with Chan et al.'s parallel formula (each batch's own mean and
M2 first, then one combination step), which is as accurate as Welford's one-at-a-time
update and lets partial statistics from several batches or workers combine in any order
up to float64 rounding.
"""

from __future__ import annotations

import numpy as np

from onnx_ocnna.errors import InputError


class RunningMoments:
    """Count, mean and sum of squared deviations (M2) of C channels, in float64.

    Every update adds one value per channel per row, so one count serves all channels.
    """

    def __init__(self, channels: int) -> None:
        self.channels = int(channels)
        self.count = 0
        self._mean = np.zeros(self.channels, dtype=np.float64)
        self._m2 = np.zeros(self.channels, dtype=np.float64)

    def update(self, values: np.ndarray) -> None:
        """Add N observations per channel; ``values`` has shape [N, C]."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != self.channels:
            raise InputError(f"expected values of shape [N, {self.channels}], got {list(values.shape)}")
        n = values.shape[0]
        if n == 0:
            return
        mean = values.mean(axis=0)
        m2 = np.square(values - mean).sum(axis=0)
        self._combine(n, mean, m2)

    def merge(self, other: "RunningMoments") -> None:
        """Fold another instance over the same channels into this one."""
        if other.channels != self.channels:
            raise InputError(f"cannot merge statistics of {other.channels} channels into {self.channels}")
        self._combine(other.count, other._mean, other._m2)

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        # Chan, Golub & LeVeque (1979): exact for any split of the data.
        if n_b == 0:
            return
        n_a = self.count
        if n_a == 0:
            self.count, self._mean, self._m2 = n_b, mean_b.astype(np.float64, copy=True), m2_b.astype(np.float64, copy=True)
            return
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.square(delta) * (n_a * n_b / n)
        self.count = n

    @property
    def mean(self) -> np.ndarray:
        """Per-channel mean, shape [C] (zeros before any update)."""
        return self._mean.copy()

    @property
    def var(self) -> np.ndarray:
        """Per-channel population variance M2 / count, shape [C] (zeros before any update)."""
        if self.count == 0:
            return np.zeros(self.channels)
        return np.maximum(self._m2, 0.0) / self.count

    @property
    def std(self) -> np.ndarray:
        """Per-channel population standard deviation, shape [C]."""
        return np.sqrt(self.var)

    def state(self) -> dict[str, np.ndarray]:
        """``{"count": int64 scalar, "mean": [C], "m2": [C]}``."""
        return {"count": np.asarray(self.count, dtype=np.int64), "mean": self._mean.copy(), "m2": self._m2.copy()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "RunningMoments":
        mean = np.asarray(state["mean"], dtype=np.float64)
        m2 = np.asarray(state["m2"], dtype=np.float64)
        if mean.ndim != 1 or mean.shape != m2.shape:
            raise InputError("saved statistics have inconsistent mean and m2 shapes")
        moments = cls(mean.shape[0])
        moments.count = int(state["count"])
        moments._mean, moments._m2 = mean.copy(), m2.copy()
        return moments
