"""A :class:`CalibrationSource` presented as an ONNX Runtime ``CalibrationDataReader``."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from onnx_ocnna.calibration.sources import Batch, CalibrationSource


class OrtReaderAdapter(CalibrationDataReader):
    """Presents a :class:`CalibrationSource` as an ONNX Runtime ``CalibrationDataReader``
    (feeds only), e.g. for ``onnxruntime.quantization.quantize_static``.

    Args:
        fixed_batch: cut every batch into feeds of this many samples (models whose batch
            dimension is fixed), dropping a shorter remainder.
        max_batches: read at most this many batches of the source.

    Attributes:
        first: the first feeds handed out (None before), e.g. to test-run a result.
        exhausted: True once a read found no more batches.
    """

    def __init__(self, source: CalibrationSource, fixed_batch: int | None = None,
                 max_batches: int | None = None) -> None:
        self.source = source
        self.fixed_batch = fixed_batch
        self.max_batches = max_batches
        self.first: dict[str, np.ndarray] | None = None
        self.exhausted = False
        self._range: tuple[int, int] | None = None
        self._batches: Iterator[Batch] | None = None  # the source's generator, closed on rewind
        self._feeds: Iterator[dict[str, np.ndarray]] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._feeds is None:
            self._batches = self.source.batches()
            start, stop = self._range or (0, None)
            if self.max_batches is not None:
                stop = self.max_batches if stop is None else min(stop, self.max_batches)
            selected = itertools.islice(self._batches, start, stop)
            self._feeds = (feeds for batch in selected for feeds in split_feeds(batch, self.fixed_batch))
        feeds = next(self._feeds, None)
        if feeds is None:
            self.exhausted = True
        elif self.first is None:
            self.first = feeds
        return feeds

    def rewind(self) -> None:
        """Start again from the first batch (raises InputError on the next read for a one-shot source)."""
        self._close()

    def __len__(self) -> int:
        return len(self.source)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Restrict reading to batches [start_index, end_index) (ORT's strided calibration)."""
        self._range = (start_index, end_index)
        self._close()

    def _close(self) -> None:
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()  # stops a prefetching decode thread
        self._batches = self._feeds = None


def split_feeds(batch: Batch, fixed_batch: int | None) -> Iterator[dict[str, np.ndarray]]:
    """The batch's feeds as they are, or cut into slices of ``fixed_batch`` samples."""
    sizes = {len(v) for v in batch.feeds.values()}
    size = sizes.pop() if len(sizes) == 1 else None
    if fixed_batch is None or size is None or size == fixed_batch:
        yield dict(batch.feeds)
        return
    for start in range(0, size - fixed_batch + 1, fixed_batch):
        yield {k: v[start : start + fixed_batch] for k, v in batch.feeds.items()}
