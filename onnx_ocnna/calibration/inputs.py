"""Model input specs and the checks calibration data must pass against them (dtype, shape, labels, finiteness)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnx_ocnna.errors import InputError


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


def fixed_batch(specs: list[InputSpec]) -> int | None:
    """The batch size the inputs ``specs`` fix on their first axis, or None when none fixes one
    (a symbolic or non-positive dim is free). InputError when they fix different sizes: no feed
    could satisfy them all.

    The one reading of a model's batch size: the data opened for it, the relaxed copy of a
    batch-1 model, the latency timings, the synthesis and the INT8 calibration all go by it.
    """
    fixed = {s.shape[0] for s in specs if s.shape and s.shape[0] is not None}
    if len(fixed) > 1:
        raise InputError(f"the model's inputs fix different batch sizes {sorted(fixed)}.")
    return fixed.pop() if fixed else None


def model_fixed_batch(model: onnx.ModelProto) -> int | None:
    """:func:`fixed_batch` of ``model``'s data inputs (graph inputs that are not initializers)."""
    return fixed_batch(model_input_spec(model))


def _guess_layout(shape: tuple[int | None, ...]) -> str | None:
    if len(shape) != 4:
        return None
    if shape[1] in (1, 3):
        return "NCHW"
    if shape[3] in (1, 3):
        return "NHWC"
    return None


def check_labels(labels: np.ndarray, count: int, origin: str) -> np.ndarray:
    if labels.ndim != 1 or labels.shape[0] != count:
        raise InputError(f"{origin}: labels have shape {list(labels.shape)} but there are {count} samples.")
    if labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
        raise InputError(f"{origin}: labels must be non-negative integers, got dtype {labels.dtype}.")
    return labels.astype(np.int64)


def check_dtype(dtype: np.dtype, spec: InputSpec, where: str) -> None:
    if dtype.kind not in "biuf":
        raise InputError(f"{where} has non-numeric dtype {dtype}.")
    if not np.can_cast(dtype, spec.dtype, casting="same_kind"):
        raise InputError(f"{where} has dtype {dtype}, which cannot be cast to the model's {spec.dtype}.")


def check_shape(shape: tuple[int, ...], spec: InputSpec, where: str) -> None:
    expected = "[" + ", ".join("?" if d is None else str(d) for d in spec.shape) + "]"
    if len(shape) != len(spec.shape):
        raise InputError(f"{where} has shape {list(shape)} but the model expects {expected}.")
    for axis, (got, want) in enumerate(zip(shape, spec.shape)):
        # Axis 0 is the sample axis of the data; a fixed model batch is handled by batching.
        if axis > 0 and want is not None and got != want:
            raise InputError(f"{where} has shape {list(shape)} but the model expects {expected} (axis {axis}).")


def as_numeric(value: Any, spec: InputSpec, where: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: input {spec.name!r} is not an array.") from None
    check_dtype(array.dtype, spec, f"{where}, input {spec.name!r}")
    if array.ndim and spec.shape and spec.shape[0] is not None and array.shape[0] != spec.shape[0]:
        raise InputError(f"{where}: input {spec.name!r} has batch {array.shape[0]}, the model fixes {spec.shape[0]}.")
    return np.ascontiguousarray(array, dtype=spec.dtype)


def first_non_finite(array: np.ndarray) -> int | None:
    """Row index of the first sample with NaN/Inf, or None."""
    if array.dtype.kind != "f":
        return None
    bad = ~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None
