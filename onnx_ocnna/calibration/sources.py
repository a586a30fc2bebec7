"""Calibration sources: the :class:`CalibrationSource` protocol and its image-folder, array and reader kinds."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnx_ocnna.calibration.images import ImagePlan
from onnx_ocnna.calibration.inputs import InputSpec, as_numeric, check_shape, first_non_finite
from onnx_ocnna.errors import InputError


@dataclass
class Batch:
    """One batch of calibration data.

    Attributes:
        feeds: model input name -> array [B, ...] in the input's dtype.
        labels: [B] int64 class labels, or None when the source has none.
    """

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None


class CalibrationSource:
    """Calibration samples for one model, produced batch by batch.

    Attributes:
        input_names: the model inputs every batch feeds.
        has_labels: whether batches carry labels.
        num_samples: samples one pass produces, None when unknown (a reader).
        batch_size: samples per batch (the last may be smaller); None for a reader.
        class_names: class folder names for a labelled image folder, else None.
        one_shot: True when ``batches()`` can be called only once (a reader without rewind).
    """

    input_names: list[str]
    has_labels: bool = False
    num_samples: int | None = None
    batch_size: int | None = None
    class_names: list[str] | None = None
    one_shot: bool = False

    # Set ``shuffle`` (folder and array sources) to get a new seeded sample order on every
    # ``batches()`` call: training needs it, since folders list their images class by class.
    shuffle: bool = False
    seed: int = 0
    # With ``reshuffle`` off, every call repeats the first seeded order: the budget allocation,
    # the reconstruction and its final check then read the same images in the same order, and
    # a damage table, whose key is those images, is found again instead of measured again.
    reshuffle: bool = True
    _epoch: int = 0

    def batches(self) -> Iterator[Batch]:
        """Iterate over the data from the start."""
        raise NotImplementedError

    def _sample_order(self) -> np.ndarray:
        """Positions of the samples in the order of this pass, [num_samples]."""
        count = int(self.num_samples or 0)
        if not self.shuffle:
            return np.arange(count)
        order = np.random.default_rng([self.seed, self._epoch]).permutation(count)
        if self.reshuffle:
            self._epoch += 1
        return order

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def __len__(self) -> int:
        """Number of batches in one pass (>= 0); TypeError when unknown (so tqdm and friends skip it)."""
        if self.num_samples is None or self.batch_size is None:
            raise TypeError(f"{type(self).__name__} does not know its number of batches")
        if self.batch_size <= 0 or self.num_samples < 0:
            raise InputError(f"{type(self).__name__} has batch size {self.batch_size} and {self.num_samples} "
                             "samples; both must be positive")
        return math.ceil(self.num_samples / self.batch_size)

    def sample_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """Input name -> shape of one sample (without the batch axis), e.g. (3, 48, 192), when
        known without reading a batch; None for a reader. Dynamic model dims (height, width)
        take their size from here wherever the model is run outside the data (validation)."""
        return None

    def describe(self) -> dict:
        """What the samples are and how they were preprocessed (for the report)."""
        return {"kind": "reader", "samples": self.num_samples, "labels": self.has_labels,
                "batch_size": self.batch_size, "preprocessing": None}


class ImageFolderSource(CalibrationSource):
    """Decodes images batch by batch; the next batch is decoded in a thread while the current
    one is used (ONNX Runtime releases the GIL, so decoding overlaps inference)."""

    def __init__(self, files: list[str], labels: np.ndarray | None, class_names: list[str] | None,
                 spec: InputSpec, plan: "ImagePlan", batch_size: int) -> None:
        self.input_names = [spec.name]
        self.files, self.labels = files, labels
        self.has_labels = labels is not None
        self.class_names = class_names
        self.num_samples = len(files)
        self.batch_size = batch_size
        self._spec, self._plan = spec, plan

    def batches(self) -> Iterator[Batch]:
        order = self._sample_order()
        starts = range(0, self.num_samples, self.batch_size)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocnna-decode") as pool:
            pending: Future | None = None
            try:
                for start in starts:
                    current = pending or pool.submit(self._decode, order[start : start + self.batch_size])
                    nxt = start + self.batch_size
                    pending = (pool.submit(self._decode, order[nxt : nxt + self.batch_size])
                               if nxt < self.num_samples else None)
                    yield current.result()
            finally:
                if pending is not None:
                    pending.cancel()

    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        plan = self._plan
        hw = (plan.height, plan.width)
        return {self._spec.name: (plan.channels, *hw) if plan.layout == "NCHW" else (*hw, plan.channels)}

    def describe(self) -> dict:
        plan = self._plan
        return {**super().describe(), "kind": "image folder", "classes": len(self.class_names or []) or None,
                "preprocessing": {"layout": plan.layout, "size": [plan.height, plan.width], "channels": plan.channels,
                                  "mean": plan.mean.tolist(), "std": plan.std.tolist(),
                                  "resize_shorter": plan.resize_shorter,
                                  "formula": "pixel (uint8)" if plan.pixel_values else "(pixel / 255 - mean) / std"}}

    def _decode(self, positions: np.ndarray) -> Batch:
        files = [self.files[i] for i in positions]
        plan = self._plan
        pixels = np.empty((len(files), plan.height, plan.width, plan.channels), dtype=np.uint8)
        for i, path in enumerate(files):
            pixels[i] = plan.pixels(path)
        out = plan.normalize(pixels)
        bad = first_non_finite(out)
        if bad is not None:
            raise InputError(f"image {files[bad]} gives NaN or Inf after preprocessing.")
        labels = None if self.labels is None else self.labels[positions]
        feed = out if self._spec.dtype == np.float32 else out.astype(self._spec.dtype)
        return Batch({self._spec.name: feed}, labels)


class ArraySource(CalibrationSource):
    """Slices preprocessed arrays (memory-mapped for .npy) into batches."""

    def __init__(self, arrays: dict[str, np.ndarray], labels: np.ndarray | None,
                 specs: list[InputSpec], indices: np.ndarray, batch_size: int, origin: str) -> None:
        self.input_names = [s.name for s in specs]
        self._arrays, self._specs, self._origin = arrays, specs, origin
        self.labels = labels
        self.has_labels = labels is not None
        self.indices = indices
        self.num_samples = len(indices)
        self.batch_size = batch_size

    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        return {spec.name: tuple(int(d) for d in self._arrays[spec.name].shape[1:]) for spec in self._specs}

    def describe(self) -> dict:
        # Arrays are fed as they are: any preprocessing happened before they were saved.
        return {**super().describe(), "kind": "arrays"}

    def batches(self) -> Iterator[Batch]:
        order = self._sample_order()
        for start in range(0, self.num_samples, self.batch_size):
            positions = order[start : start + self.batch_size]
            # Each batch is a random subset; reading its rows sorted keeps a memory-mapped .npy fast.
            rows = self.indices[np.sort(positions)] if self.shuffle else self.indices[positions]
            feeds = {}
            for spec in self._specs:
                feed = np.ascontiguousarray(self._arrays[spec.name][rows], dtype=spec.dtype)
                bad = first_non_finite(feed)
                if bad is not None:
                    raise InputError(
                        f"{self._origin}: sample {int(rows[bad])} of input {spec.name!r} contains NaN or Inf."
                    )
                feeds[spec.name] = feed
            yield Batch(feeds, None if self.labels is None else self.labels[rows])


class ReaderSource(CalibrationSource):
    """Wraps a ``CalibrationDataReader``; checks every feed against the model inputs."""

    def __init__(self, reader: Any, specs: list[InputSpec], max_samples: int | None) -> None:
        self.input_names = [s.name for s in specs]
        self._reader, self._specs, self._max = reader, specs, max_samples
        rewind = getattr(reader, "rewind", None)
        self._rewind = rewind if callable(rewind) else None
        self.one_shot = self._rewind is None
        self._used = False

    def batches(self) -> Iterator[Batch]:
        if self._rewind is not None:
            self._rewind()
        elif self._used:
            raise InputError(
                "the CalibrationDataReader has no rewind() method, so it can be read only once; add rewind() "
                "or pass a folder, .npy or .npz."
            )
        self._used = True
        return self._iterate()

    def _iterate(self) -> Iterator[Batch]:
        produced, number = 0, 0
        names = set(self.input_names)
        while self._max is None or produced < self._max:
            feed = self._reader.get_next()
            if not feed:
                return
            where = f"CalibrationDataReader batch {number}"
            if not isinstance(feed, Mapping):
                raise InputError(f"{where} is a {type(feed).__name__}, not a dict from input name to array.")
            if set(feed) != names:
                raise InputError(
                    f"{where} has keys {sorted(feed)} but the model's inputs are {sorted(names)}."
                )
            feeds, size = {}, None
            for spec in self._specs:
                array = as_numeric(feed[spec.name], spec, where)
                check_shape(array.shape, spec, where)
                if size is not None and array.shape[0] != size:
                    raise InputError(f"{where}: inputs have different batch sizes.")
                size = array.shape[0]
                feeds[spec.name] = array
            if size == 0:
                raise InputError(f"{where} is empty.")
            if self._max is not None and produced + size > self._max:
                keep = self._max - produced
                feeds = {k: v[:keep] for k, v in feeds.items()}
                size = keep
            for name, array in feeds.items():
                bad = first_non_finite(array)
                if bad is not None:
                    raise InputError(f"{where}, row {bad} of input {name!r} contains NaN or Inf.")
            produced += size
            number += 1
            yield Batch(feeds, None)
