"""Decoded images held in memory as a labelled calibration source, reshuffled every epoch."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from onnx_ocnna.calibration import Batch, CalibrationSource


class ArraySource(CalibrationSource):
    """Images x [N, 3, H, W] (labels y [N] or None) under input ``name``, in batches; ``shuffle``
    draws a new seeded permutation for every call of :meth:`batches` (one call per epoch)."""

    def __init__(self, name: str, x: np.ndarray, y: np.ndarray | None, batch_size: int, shuffle: bool = False,
                 seed: int = 0):
        self.input_names = [name]
        self.x, self.y = x, y
        self.has_labels = y is not None
        self.num_samples = len(x)
        self.batch_size, self.shuffle, self.seed, self.calls = batch_size, shuffle, seed, 0

    def batches(self) -> Iterator[Batch]:
        order = np.arange(self.num_samples)
        if self.shuffle:
            order = np.random.default_rng(self.seed + self.calls).permutation(self.num_samples)
        self.calls += 1
        for start in range(0, self.num_samples, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield Batch({self.input_names[0]: self.x[idx]}, None if self.y is None else self.y[idx])
