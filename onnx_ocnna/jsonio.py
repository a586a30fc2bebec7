"""Strict JSON for everything the tool writes (report, plan, ``inspect --json``).

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which strict parsers (browsers,
``jq``, most other languages) reject; here a non-finite float becomes ``null`` and the dump
refuses any that slipped through.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np


def plain(value: Any) -> Any:
    """``value`` as JSON-ready Python: numpy scalars and arrays as numbers and lists, objects
    through their ``as_dict`` (or as dataclasses), paths as strings, and non-finite floats
    (inf, -inf, NaN: undefined figures such as the coefficient of variation 0/0) as None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, dict):
        return {(k if isinstance(k, (str, int)) and not isinstance(k, bool) else str(k)): plain(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in (sorted(value, key=str) if isinstance(value, (set, frozenset)) else value)]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "as_dict"):
        return plain(value.as_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    return str(value)


def dumps(value: Any, indent: int | None = 1) -> str:
    """Strict JSON text of ``value`` (see :func:`plain`)."""
    return json.dumps(plain(value), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Write strict JSON atomically (:func:`model_io.atomic_output`: a temporary file beside
    ``path``, renamed when complete, removed on any error or Ctrl-C)."""
    from onnx_ocnna.model_io import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(dumps(value) + "\n")
