"""Image preprocessing presets: the bundled JSON files (repository folder ``calibration/``), loaded and validated."""

from __future__ import annotations

import json
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from onnx_ocnna.errors import InputError


_PRESET_KEYS = frozenset({"description", "mean", "std", "size", "resize", "crop", "layout"})
#: What an image folder without a preset is normalised with when mean/std are given.
BASE_PRESET = "raw"


def _preset_dir() -> Any:
    try:
        return resources.files("onnx_ocnna.presets")
    except ModuleNotFoundError:
        # Running from a source tree that is not installed: the package-dir mapping of
        # pyproject.toml does not exist yet, the presets sit in ../calibration.
        return Path(__file__).resolve().parents[2] / "calibration"


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
    return validate_preset(raw, source)


def validate_preset(raw: Any, source: str) -> dict:
    if not isinstance(raw, dict):
        raise InputError(f"{source} must be a JSON object with keys such as mean, std, size.")
    unknown = sorted(set(raw) - _PRESET_KEYS)
    if unknown:
        raise InputError(f"{source} has unknown keys {unknown}; allowed: {sorted(_PRESET_KEYS)}.")
    preset: dict[str, Any] = {"description": str(raw.get("description", ""))}
    preset["mean"] = float_list(raw.get("mean", 0.0), f"{source}: mean")
    preset["std"] = float_list(raw.get("std", 1.0), f"{source}: std")
    if "size" in raw:
        preset["size"] = size_pair(raw["size"], f"{source}: size")
    if "crop" in raw:
        preset["crop"] = size_pair(raw["crop"], f"{source}: crop")
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


def float_list(value: Any, what: str) -> list[float]:
    values = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number or a list of numbers, got {value!r}.") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise InputError(f"{what} must be finite numbers, got {value!r}.")
    return out


def size_pair(value: Any, what: str) -> tuple[int, int]:
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
