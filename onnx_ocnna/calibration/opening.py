"""Opening calibration data for a model: dispatch on the source's kind, sample selection and batching."""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from onnx_ocnna.calibration.images import image_plan, scan_folder
from onnx_ocnna.calibration.inputs import (
    InputSpec,
    check_dtype,
    check_labels,
    check_shape,
    fixed_batch,
    model_input_spec,
)
from onnx_ocnna.calibration.presets import BASE_PRESET, list_presets, load_preset, validate_preset
from onnx_ocnna.calibration.sources import ArraySource, CalibrationSource, ImageFolderSource, ReaderSource
from onnx_ocnna.errors import InputError


#: Samples per batch unless the caller or the model's fixed batch axis says otherwise.
DEFAULT_BATCH_SIZE = 32


def open_calibration(
    source: str | os.PathLike | CalibrationDataReader | np.ndarray | Mapping[str, np.ndarray],
    model: onnx.ModelProto,
    *,
    preprocess: str | os.PathLike | Mapping | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    size: int | Sequence[int] | None = None,
    max_samples: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
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
            return ReaderSource(source, specs, max_samples)
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
                 batch_size: int, seed: int, origin: str, image_options: bool) -> ArraySource:
    _warn_ignored(image_options, origin)
    count = None
    for spec in specs:
        array = arrays[spec.name]
        if not isinstance(array, np.ndarray):
            array = arrays[spec.name] = np.asarray(array)
        where = f"{origin} (input {spec.name!r})"
        check_dtype(array.dtype, spec, where)
        check_shape(array.shape, spec, where)
        if count is not None and array.shape[0] != count:
            raise InputError(f"{origin}: the inputs have different numbers of samples.")
        count = array.shape[0]
    if count == 0:
        raise InputError(f"{origin} holds no samples.")
    if labels is not None:
        labels = check_labels(np.asarray(labels), count, origin)
    batch = fixed_batch(specs) or batch_size
    indices = _select(count, labels, max_samples, seed)
    indices = _fit_fixed_batch(indices, specs, batch, origin)
    return ArraySource(arrays, labels, specs, indices, batch, origin)


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


def _open_folder(root: Path, specs: list[InputSpec], preprocess: Any, mean: Any, std: Any, size: Any,
                 max_samples: int | None, batch_size: int, seed: int) -> ImageFolderSource:
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
    preset = (validate_preset(dict(preprocess), "the preprocess dict") if isinstance(preprocess, Mapping)
              else load_preset(preprocess if preprocess is not None else BASE_PRESET))
    plan = image_plan(spec, preset, mean, std, size)
    files, labels, class_names = scan_folder(root)
    batch = fixed_batch(specs) or batch_size
    indices = _select(len(files), labels, max_samples, seed, None if class_names is None else len(class_names))
    indices = _fit_fixed_batch(indices, specs, batch, str(root))
    return ImageFolderSource(
        [files[i] for i in indices], None if labels is None else labels[indices], class_names, spec, plan, batch
    )
