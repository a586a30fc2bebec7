"""Calibration data: readers for image folders, .npy/.npz arrays and ONNX Runtime readers.

Every source is opened against the model it feeds (:func:`open_calibration`) and yields
:class:`Batch` objects whose ``feeds`` map each model input name to an array [B, ...] of the
input's element type. Errors in the data raise :class:`~onnx_ocnna.errors.InputError`.

Choices (documented here because callers rely on them):

* **Image folders** are read recursively. Non-hidden sub-folders of the root are classes
  (label = index in the sorted names, empty ones included so indices stay aligned with the
  names); images directly in the root mean "no labels"; both at once is an error.
* **Preprocessing** of an image: convert to RGB (L for a 1-channel input), resize to the
  model's H x W (bilinear) -- or, when a preset gives ``resize`` S, resize the shorter side to S
  and centre-crop H x W (torchvision's ``Resize(S)`` + ``CenterCrop``; with ``crop`` C != H x W the
  shorter side becomes ``S * max(H/C_h, W/C_w)`` so the crop keeps the same fraction), scale to
  [0, 1], then ``(x - mean) / std`` with mean/std on 0-1 pixels, all in float32 (bit-identical to
  torchvision's ToTensor + Normalize), finally cast to the input's dtype. There is no default:
  a folder needs a preset or mean/std (``raw``, 0-1 pixels, said on purpose), because a wrong
  normalisation gives accuracies that look plausible. A symbolic height/width is taken from the ``size`` option, else the preset's ``size``,
  else its ``crop``; without one that is an error. Layout: NCHW if dim 1 is 1 or 3, else NHWC if
  dim 3 is, else the preset must say ``layout``.
* **max_samples** picks a deterministic subset with ``numpy.random.default_rng(seed)``: with
  labels it is class-balanced (round robin over classes, each class shuffled, so 512 of 50,000
  CIFAR images are 51-52 per class, lower class indices taking the remainder); without labels
  a uniform random subset. The chosen
  samples are produced in their original (sorted) order.
* **Batching**: ``batch_size`` samples per batch, the last one smaller; a model whose batch
  dimension is fixed to B0 gets batches of exactly B0 (for B0 > 1 a remainder is dropped with a
  warning). ``CalibrationDataReader`` feeds pass through in the reader's own batches.
* **Arrays**: axis 0 is the sample axis; a ``.npy`` is memory-mapped (only the rows of the
  current batch are read), a ``.npz`` is read into memory (only the keys the model needs).
  Image options (preset, mean, std, size) do not apply to arrays and readers (a warning says so).
* **Readers** are re-iterated through ``rewind()`` when they have one; otherwise they can be
  iterated once and a second ``batches()`` call raises ``InputError``. Their feeds must have
  exactly the model's input names (as ``InferenceSession.run`` requires); they carry no labels.
* **Decoding** is streaming: one batch is decoded at a time, the next one in a background thread
  while the caller uses the current one. A thread pool inside a batch was measured slower for
  32x32 JPEGs (GIL-bound Python overhead) and only ~1.7x faster for 500x375 ones.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader
from PIL import Image

from onnx_ocnna.errors import InputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
_PRESET_KEYS = frozenset({"description", "mean", "std", "size", "resize", "crop", "layout"})
#: What an image folder without a preset is normalised with when mean/std are given.
_BASE_PRESET = "raw"


@dataclass
class Batch:
    """One batch of calibration data.

    Attributes:
        feeds: model input name -> array [B, ...] in the input's dtype.
        labels: [B] int64 class labels, or None when the source has none.
    """

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, shape (None for a symbolic dim), numpy dtype, layout guess.

    ``layout`` is "NCHW" or "NHWC" for a rank-4 input whose channel dim (1 or 3) can be told
    apart, else None.
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype
    layout: str | None


def model_input_spec(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's graph inputs that are not initializers, in graph order."""
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            raise InputError(f"model input {value.name!r} is not a tensor, which calibration data cannot feed.")
        tensor_type = value.type.tensor_type
        # A dim_value <= 0 is a dynamic dim too: Paddle2ONNX wrote -1 for an unknown size, and
        # taken as a size it gave a negative batch (and a negative number of batches).
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in tensor_type.shape.dim)
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, TypeError, ValueError):
            raise InputError(f"model input {value.name!r} has an unsupported element type.") from None
        specs.append(InputSpec(value.name, dims, dtype, _guess_layout(dims)))
    return specs


def _guess_layout(shape: tuple[int | None, ...]) -> str | None:
    if len(shape) != 4:
        return None
    if shape[1] in (1, 3):
        return "NCHW"
    if shape[3] in (1, 3):
        return "NHWC"
    return None


# ---------------------------------------------------------------------------------------------
# Presets


def _preset_dir() -> Any:
    try:
        return resources.files("onnx_ocnna.presets")
    except ModuleNotFoundError:
        # Running from a source tree that is not installed: the package-dir mapping of
        # pyproject.toml does not exist yet, the presets sit in ../calibration.
        return Path(__file__).resolve().parent.parent / "calibration"


def list_presets() -> list[str]:
    """Names of the bundled preprocessing presets (calibration/*.json)."""
    return sorted(p.name[: -len(".json")] for p in _preset_dir().iterdir() if p.name.endswith(".json"))


def load_preset(name_or_path: str | os.PathLike) -> dict:
    """Load and validate a preset by bundled name ("imagenet") or path to a JSON file.

    Returns a dict with ``mean``/``std`` as float lists and optional ``size`` [H, W],
    ``resize`` int, ``crop`` [H, W], ``layout`` "NCHW"/"NHWC".
    """
    text_name = os.fspath(name_or_path)
    looks_like_path = text_name.endswith(".json") or os.sep in text_name or "/" in text_name
    resource = None if looks_like_path else _preset_dir().joinpath(f"{text_name}.json")
    if resource is not None and resource.is_file():
        source, text = f"preset {text_name!r}", resource.read_text(encoding="utf-8")
    elif Path(text_name).is_file():
        source, text = text_name, Path(text_name).read_text(encoding="utf-8")
    elif looks_like_path:
        raise InputError(f"preset file {text_name} does not exist.")
    else:
        raise InputError(
            f"unknown preprocessing preset {text_name!r}; available: {', '.join(list_presets())} "
            "(or give a path to a JSON file)."
        )
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source} is not valid JSON: {exc}.") from None
    return _validate_preset(raw, source)


def _validate_preset(raw: Any, source: str) -> dict:
    if not isinstance(raw, dict):
        raise InputError(f"{source} must be a JSON object with keys such as mean, std, size.")
    unknown = sorted(set(raw) - _PRESET_KEYS)
    if unknown:
        raise InputError(f"{source} has unknown keys {unknown}; allowed: {sorted(_PRESET_KEYS)}.")
    preset: dict[str, Any] = {"description": str(raw.get("description", ""))}
    preset["mean"] = _float_list(raw.get("mean", 0.0), f"{source}: mean")
    preset["std"] = _float_list(raw.get("std", 1.0), f"{source}: std")
    if "size" in raw:
        preset["size"] = _size_pair(raw["size"], f"{source}: size")
    if "crop" in raw:
        preset["crop"] = _size_pair(raw["crop"], f"{source}: crop")
        if "resize" not in raw:
            raise InputError(f"{source}: crop needs resize (the shorter side before cropping).")
    if "resize" in raw:
        resize = raw["resize"]
        if isinstance(resize, bool) or not isinstance(resize, int) or resize <= 0:
            raise InputError(f"{source}: resize must be a positive integer (the shorter side in pixels).")
        if "crop" in raw and resize < max(preset["crop"]):
            raise InputError(f"{source}: resize {resize} is smaller than crop {preset['crop']}.")
        preset["resize"] = resize
    if "layout" in raw:
        if raw["layout"] not in ("NCHW", "NHWC"):
            raise InputError(f"{source}: layout must be \"NCHW\" or \"NHWC\".")
        preset["layout"] = raw["layout"]
    return preset


def _float_list(value: Any, what: str) -> list[float]:
    values = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number or a list of numbers, got {value!r}.") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise InputError(f"{what} must be finite numbers, got {value!r}.")
    return out


def _size_pair(value: Any, what: str) -> tuple[int, int]:
    pair = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(pair, (list, tuple)) and len(pair) == 1:  # "--size 32" from the CLI
        pair = [pair[0], pair[0]]
    if (
        not isinstance(pair, (list, tuple))
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)
    ):
        raise InputError(f"{what} must be a positive integer or [height, width], got {value!r}.")
    return int(pair[0]), int(pair[1])


# ---------------------------------------------------------------------------------------------
# Sources


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


class _ImageFolderSource(CalibrationSource):
    """Decodes images batch by batch; the next batch is decoded in a thread while the current
    one is used (ONNX Runtime releases the GIL, so decoding overlaps inference)."""

    def __init__(self, files: list[str], labels: np.ndarray | None, class_names: list[str] | None,
                 spec: InputSpec, plan: "_ImagePlan", batch_size: int) -> None:
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
                                  "formula": "(pixel / 255 - mean) / std"}}

    def _decode(self, positions: np.ndarray) -> Batch:
        files = [self.files[i] for i in positions]
        plan = self._plan
        pixels = np.empty((len(files), plan.height, plan.width, plan.channels), dtype=np.uint8)
        for i, path in enumerate(files):
            pixels[i] = plan.pixels(path)
        out = plan.normalize(pixels)
        bad = _first_non_finite(out)
        if bad is not None:
            raise InputError(f"image {files[bad]} gives NaN or Inf after preprocessing.")
        labels = None if self.labels is None else self.labels[positions]
        feed = out if self._spec.dtype == np.float32 else out.astype(self._spec.dtype)
        return Batch({self._spec.name: feed}, labels)


class _ArraySource(CalibrationSource):
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
                bad = _first_non_finite(feed)
                if bad is not None:
                    raise InputError(
                        f"{self._origin}: sample {int(rows[bad])} of input {spec.name!r} contains NaN or Inf."
                    )
                feeds[spec.name] = feed
            yield Batch(feeds, None if self.labels is None else self.labels[rows])


class _ReaderSource(CalibrationSource):
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
                array = _as_numeric(feed[spec.name], spec, where)
                _check_shape(array.shape, spec, where)
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
                bad = _first_non_finite(array)
                if bad is not None:
                    raise InputError(f"{where}, row {bad} of input {name!r} contains NaN or Inf.")
            produced += size
            number += 1
            yield Batch(feeds, None)


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


# ---------------------------------------------------------------------------------------------
# Opening a source


def open_calibration(
    source: str | os.PathLike | CalibrationDataReader | np.ndarray | Mapping[str, np.ndarray],
    model: onnx.ModelProto,
    *,
    preprocess: str | os.PathLike | Mapping | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    size: int | Sequence[int] | None = None,
    max_samples: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> CalibrationSource:
    """Open calibration data for ``model``.

    Args:
        source: an image folder, a ``.npy`` (single-input model, [N, ...]), a ``.npz`` keyed by
            input name with optional ``labels`` [N], an array or dict of arrays like those, or an
            ORT ``CalibrationDataReader``.
        model: the model the data feeds; its non-initializer inputs define names, shapes, dtypes.
        preprocess: image preset name (see :func:`list_presets`), JSON path or dict; an image
            folder needs this or ``mean``/``std`` (which then apply to 0-1 pixels).
        mean, std: per-channel (or scalar) values on 0-1 pixels; override the preset.
        size: H x W for images when the model's spatial dims are symbolic; overrides the preset.
        max_samples: use a deterministic, seeded subset of this many samples (class-balanced
            with labels); for a reader, stop after this many samples.
        batch_size: samples per batch, unless the model fixes its batch dimension.
        seed: seed of the subset selection.
    """
    specs = model_input_spec(model)
    if not specs:
        raise InputError("the model has no inputs to feed calibration data to.")
    for what, value in (("batch_size", batch_size), ("max_samples", max_samples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise InputError(f"{what} must be a positive integer, got {value!r}.")
    batch_size = int(batch_size)
    max_samples = None if max_samples is None else int(max_samples)
    image_options = preprocess is not None or mean is not None or std is not None or size is not None

    if isinstance(source, np.ndarray):
        return _open_arrays(_single_input(source, specs, "the array"), None, specs,
                            max_samples, batch_size, seed, "the array", image_options)
    if isinstance(source, Mapping):
        arrays, labels = _split_mapping(source, specs, "the dict")
        return _open_arrays(arrays, labels, specs, max_samples, batch_size, seed, "the dict", image_options)
    if not isinstance(source, (str, os.PathLike)):
        if isinstance(source, CalibrationDataReader):
            _warn_ignored(image_options, "a CalibrationDataReader")
            return _ReaderSource(source, specs, max_samples)
        raise InputError(
            f"calibration data must be a folder, .npy, .npz or CalibrationDataReader, not {type(source).__name__}."
        )

    path = Path(source)
    if not path.exists():
        raise InputError(f"calibration data {path} does not exist.")
    if path.is_dir():
        return _open_folder(path, specs, preprocess, mean, std, size, max_samples, batch_size, seed)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise InputError(f"{path} is not a numeric .npy array ({exc}).") from None
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc}.") from None
        return _open_arrays(_single_input(array, specs, str(path)), None, specs,
                            max_samples, batch_size, seed, str(path), image_options)
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                # Read only the arrays the model needs; the message for a missing one lists all keys.
                wanted = {s.name for s in specs} | {"labels"}
                data = {k: archive[k] for k in archive.files if k in wanted}
                arrays, labels = _split_mapping(data, specs, str(path), all_keys=archive.files)
        except ValueError as exc:
            raise InputError(f"{path} holds a non-numeric or unreadable array ({exc}).") from None
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc}.") from None
        return _open_arrays(arrays, labels, specs, max_samples, batch_size, seed, str(path), image_options)
    raise InputError(f"calibration data {path} must be a folder of images, a .npy or a .npz file.")


def _warn_ignored(image_options: bool, what: str) -> None:
    if image_options:
        warnings.warn(f"preprocess/mean/std/size apply to image folders only and are ignored for {what}.",
                      stacklevel=3)


def _single_input(array: np.ndarray, specs: list[InputSpec], origin: str) -> dict[str, np.ndarray]:
    if len(specs) != 1:
        raise InputError(
            f"the model has {len(specs)} inputs ({', '.join(s.name for s in specs)}); give a .npz keyed by input "
            f"name instead of {origin}."
        )
    return {specs[0].name: array}


def _split_mapping(data: Mapping[str, Any], specs: list[InputSpec], origin: str,
                   all_keys: Sequence[str] | None = None) -> tuple[dict, np.ndarray | None]:
    missing = [s.name for s in specs if s.name not in data]
    if missing:
        keys = sorted(all_keys if all_keys is not None else data)
        raise InputError(f"{origin} has no array for model input(s) {missing}; its keys are {keys}.")
    arrays = {s.name: data[s.name] for s in specs}
    labels = data.get("labels") if "labels" not in arrays else None
    return arrays, labels


def _open_arrays(arrays: dict[str, Any], labels: Any, specs: list[InputSpec], max_samples: int | None,
                 batch_size: int, seed: int, origin: str, image_options: bool) -> _ArraySource:
    _warn_ignored(image_options, origin)
    count = None
    for spec in specs:
        array = arrays[spec.name]
        if not isinstance(array, np.ndarray):
            array = arrays[spec.name] = np.asarray(array)
        where = f"{origin} (input {spec.name!r})"
        _check_dtype(array.dtype, spec, where)
        _check_shape(array.shape, spec, where)
        if count is not None and array.shape[0] != count:
            raise InputError(f"{origin}: the inputs have different numbers of samples.")
        count = array.shape[0]
    if count == 0:
        raise InputError(f"{origin} holds no samples.")
    if labels is not None:
        labels = _check_labels(np.asarray(labels), count, origin)
    batch = _effective_batch(specs, batch_size)
    indices = _select(count, labels, max_samples, seed)
    indices = _fit_fixed_batch(indices, specs, batch, origin)
    return _ArraySource(arrays, labels, specs, indices, batch, origin)


def _check_labels(labels: np.ndarray, count: int, origin: str) -> np.ndarray:
    if labels.ndim != 1 or labels.shape[0] != count:
        raise InputError(f"{origin}: labels have shape {list(labels.shape)} but there are {count} samples.")
    if labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
        raise InputError(f"{origin}: labels must be non-negative integers, got dtype {labels.dtype}.")
    return labels.astype(np.int64)


def _check_dtype(dtype: np.dtype, spec: InputSpec, where: str) -> None:
    if dtype.kind not in "biuf":
        raise InputError(f"{where} has non-numeric dtype {dtype}.")
    if not np.can_cast(dtype, spec.dtype, casting="same_kind"):
        raise InputError(f"{where} has dtype {dtype}, which cannot be cast to the model's {spec.dtype}.")


def _check_shape(shape: tuple[int, ...], spec: InputSpec, where: str) -> None:
    expected = "[" + ", ".join("?" if d is None else str(d) for d in spec.shape) + "]"
    if len(shape) != len(spec.shape):
        raise InputError(f"{where} has shape {list(shape)} but the model expects {expected}.")
    for axis, (got, want) in enumerate(zip(shape, spec.shape)):
        # Axis 0 is the sample axis of the data; a fixed model batch is handled by batching.
        if axis > 0 and want is not None and got != want:
            raise InputError(f"{where} has shape {list(shape)} but the model expects {expected} (axis {axis}).")


def _as_numeric(value: Any, spec: InputSpec, where: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: input {spec.name!r} is not an array.") from None
    _check_dtype(array.dtype, spec, f"{where}, input {spec.name!r}")
    if array.ndim and spec.shape and spec.shape[0] is not None and array.shape[0] != spec.shape[0]:
        raise InputError(f"{where}: input {spec.name!r} has batch {array.shape[0]}, the model fixes {spec.shape[0]}.")
    return np.ascontiguousarray(array, dtype=spec.dtype)


def _first_non_finite(array: np.ndarray) -> int | None:
    """Row index of the first sample with NaN/Inf, or None."""
    if array.dtype.kind != "f":
        return None
    bad = ~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def _effective_batch(specs: list[InputSpec], batch_size: int) -> int:
    fixed = {s.shape[0] for s in specs if s.shape and s.shape[0] is not None}
    if len(fixed) > 1:
        raise InputError(f"the model's inputs fix different batch sizes {sorted(fixed)}.")
    return fixed.pop() if fixed else batch_size


def _fit_fixed_batch(indices: np.ndarray, specs: list[InputSpec], batch: int, origin: str) -> np.ndarray:
    """For a model with a fixed batch B0 > 1 keep a multiple of B0 samples."""
    if batch == 1 or not any(s.shape and s.shape[0] == batch for s in specs):
        return indices
    if len(indices) < batch:
        raise InputError(f"{origin} has {len(indices)} samples but the model's batch dimension is fixed to {batch}.")
    keep = len(indices) - len(indices) % batch
    if keep != len(indices):
        warnings.warn(f"the model's batch is fixed to {batch}; the last {len(indices) - keep} samples are not used.",
                      stacklevel=4)
    return indices[:keep]


def _select(count: int, labels: np.ndarray | None, max_samples: int | None, seed: int,
            num_classes: int | None = None) -> np.ndarray:
    """Indices of the samples to use, ascending: all, or a seeded (class-balanced) subset."""
    if max_samples is None or max_samples >= count:
        return np.arange(count)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(count, size=max_samples, replace=False))
    classes = range(num_classes) if num_classes is not None else np.unique(labels)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    sizes = np.array([len(p) for p in pools])
    take = np.zeros_like(sizes)
    remaining = max_samples
    while remaining:
        # Round robin: one more sample from every class that still has some, lower classes first.
        open_classes = np.flatnonzero(take < sizes)
        if len(open_classes) > remaining:
            open_classes = open_classes[:remaining]
        take[open_classes] += 1
        remaining -= len(open_classes)
    return np.sort(np.concatenate([p[:t] for p, t in zip(pools, take)]))


# ---------------------------------------------------------------------------------------------
# Image folders


@dataclass(frozen=True)
class _ImagePlan:
    """How to turn one image file into a normalised array of ``sample_shape``."""

    height: int
    width: int
    channels: int
    layout: str
    mean: np.ndarray  # [1 or C] float32
    std: np.ndarray
    resize_shorter: int | None  # None: resize straight to height x width

    def pixels(self, path: str) -> np.ndarray:
        """The decoded, resized image, shape [H, W, C] uint8."""
        mode = "L" if self.channels == 1 else "RGB"
        try:
            with Image.open(path) as image:
                if image.mode != mode:
                    image = image.convert(mode)
                image = self._resize(image)
                array = np.asarray(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InputError(f"cannot read image {path}: {exc}.") from None
        return array[:, :, None] if array.ndim == 2 else array

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """[B, H, W, C] uint8 -> [B, C, H, W] or [B, H, W, C] float32, ``(x / 255 - mean) / std``."""
        # The same float32 operations as torchvision's ToTensor + Normalize, so bit-identical.
        x = (pixels.astype(np.float32) / 255 - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if self.layout == "NCHW" else x

    def _resize(self, image: Image.Image) -> Image.Image:
        if self.resize_shorter is None:
            if image.size != (self.width, self.height):
                image = image.resize((self.width, self.height), Image.Resampling.BILINEAR)
            return image
        # torchvision Resize(int): the longer side is truncated, not rounded.
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.resize_shorter * long / short)
        new_size = (self.resize_shorter, new_long) if w <= h else (new_long, self.resize_shorter)
        image = image.resize(new_size, Image.Resampling.BILINEAR)
        # torchvision CenterCrop: offsets rounded half to even.
        left = int(round((new_size[0] - self.width) / 2.0))
        top = int(round((new_size[1] - self.height) / 2.0))
        return image.crop((left, top, left + self.width, top + self.height))


def _open_folder(root: Path, specs: list[InputSpec], preprocess: Any, mean: Any, std: Any, size: Any,
                 max_samples: int | None, batch_size: int, seed: int) -> _ImageFolderSource:
    if len(specs) != 1:
        raise InputError(
            f"an image folder can feed a single-input model only; this one has inputs "
            f"{', '.join(s.name for s in specs)} (give a .npz keyed by input name)."
        )
    spec = specs[0]
    if preprocess is None and mean is None and std is None:
        # Raw 0-1 pixels fed to a normalised model give believable, meaningless accuracies.
        raise InputError(
            f"an image folder needs its preprocessing: --preprocess {'|'.join(list_presets())}|FILE.json "
            "or --mean/--std (raw = 0-1 pixels on purpose; `onnx-ocnna presets` describes each)."
        )
    preset = (_validate_preset(dict(preprocess), "the preprocess dict") if isinstance(preprocess, Mapping)
              else load_preset(preprocess if preprocess is not None else _BASE_PRESET))
    plan = _image_plan(spec, preset, mean, std, size)
    files, labels, class_names = _scan_folder(root)
    batch = _effective_batch(specs, batch_size)
    indices = _select(len(files), labels, max_samples, seed, None if class_names is None else len(class_names))
    indices = _fit_fixed_batch(indices, specs, batch, str(root))
    return _ImageFolderSource(
        [files[i] for i in indices], None if labels is None else labels[indices], class_names, spec, plan, batch
    )


def _image_plan(spec: InputSpec, preset: dict, mean: Any, std: Any, size: Any) -> _ImagePlan:
    name = spec.name
    if len(spec.shape) != 4:
        raise InputError(f"model input {name!r} has rank {len(spec.shape)}, but images need a rank-4 input.")
    if spec.dtype.kind != "f":
        raise InputError(f"model input {name!r} has dtype {spec.dtype}; images need a float input (give a .npy).")
    layout = preset.get("layout") or spec.layout
    if layout is None:
        raise InputError(
            f"cannot tell whether model input {name!r} {list(spec.shape)} is NCHW or NHWC; "
            "set \"layout\" in a preset JSON."
        )
    c_axis, h_axis, w_axis = (1, 2, 3) if layout == "NCHW" else (3, 1, 2)
    channels = spec.shape[c_axis]
    mean_v = _float_list(mean, "mean") if mean is not None else preset["mean"]
    std_v = _float_list(std, "std") if std is not None else preset["std"]
    if channels is None:  # only possible with a preset layout; images are RGB by default
        channels = 3
    if channels not in (1, 3):
        raise InputError(f"model input {name!r} has {channels} channels in {layout}; images give 1 or 3.")
    for what, values in (("mean", mean_v), ("std", std_v)):
        if len(values) not in (1, channels):
            raise InputError(f"{what} has {len(values)} values but model input {name!r} has {channels} channels.")
    if any(v == 0 for v in std_v):
        raise InputError("std must not contain zero.")

    wanted = _size_pair(size, "size") if size is not None else preset.get("size") or preset.get("crop")
    model_hw = (spec.shape[h_axis], spec.shape[w_axis])
    if None in model_hw and wanted is None:
        raise InputError(
            f"model input {name!r} has symbolic height/width {list(spec.shape)}; give an image size "
            "(a preset with \"size\" or the size option)."
        )
    height = model_hw[0] if model_hw[0] is not None else wanted[0]
    width = model_hw[1] if model_hw[1] is not None else wanted[1]
    if wanted is not None and size is not None and tuple(wanted) != (height, width):
        raise InputError(f"size {list(wanted)} does not match model input {name!r} {list(spec.shape)}.")
    if wanted is not None and tuple(wanted) != (height, width) and "resize" not in preset:
        warnings.warn(f"the preset's size {list(wanted)} differs from model input {name!r} "
                      f"{list(spec.shape)}; images are resized to {height}x{width}.", stacklevel=4)

    resize_shorter = None
    if "resize" in preset:
        crop = preset.get("crop", (height, width))
        scale = max(height / crop[0], width / crop[1])
        resize_shorter = max(round(preset["resize"] * scale), height, width)
    return _ImagePlan(height, width, channels, layout, np.asarray(mean_v, np.float32),
                      np.asarray(std_v, np.float32), resize_shorter)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _images_under(folder: str) -> list[str]:
    """Image paths below ``folder``, recursive, sorted (folders and files by name)."""
    found = []
    for directory, subdirs, names in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found.extend(os.path.join(directory, n) for n in sorted(names) if _is_image(n))
    return found


def _scan_folder(root: Path) -> tuple[list[str], np.ndarray | None, list[str] | None]:
    """(files, labels [N] int64 or None, class names or None) of an image folder."""
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    direct = [e.path for e in entries if e.is_file() and _is_image(e.name)]
    classes = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    if direct:
        if any(_images_under(c.path) for c in classes):
            raise InputError(
                f"{root} has images both directly inside it and in sub-folders; put every image in a class "
                "sub-folder, or none."
            )
        return direct, None, None
    files: list[str] = []
    labels: list[int] = []
    for index, entry in enumerate(classes):
        found = _images_under(entry.path)
        files.extend(found)
        labels.extend([index] * len(found))
    if not files:
        raise InputError(f"{root} contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    return files, np.asarray(labels, dtype=np.int64), [c.name for c in classes]


__all__ = [
    "Batch",
    "CalibrationSource",
    "InputSpec",
    "OrtReaderAdapter",
    "IMAGE_EXTENSIONS",
    "list_presets",
    "load_preset",
    "model_input_spec",
    "open_calibration",
]
