"""Image folders: scanning the class sub-folders, then decoding, resizing and normalising each image."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from onnx_ocnna.calibration.inputs import InputSpec
from onnx_ocnna.calibration.presets import float_list, size_pair
from onnx_ocnna.errors import InputError


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


@dataclass(frozen=True)
class ImagePlan:
    """How to turn one image file into a normalised array of ``sample_shape``."""

    height: int
    width: int
    channels: int
    layout: str
    mean: np.ndarray  # [1 or C] float32
    std: np.ndarray
    resize_shorter: int | None  # None: resize straight to height x width
    # A uint8 input takes the pixels themselves, 0-255 (the model normalises inside its graph).
    pixel_values: bool = False

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
        """[B, H, W, C] uint8 -> [B, C, H, W] or [B, H, W, C] float32, ``(x / 255 - mean) / std``
        (uint8 and unchanged for a model that takes :attr:`pixel_values`)."""
        # The same float32 operations as torchvision's ToTensor + Normalize, so bit-identical.
        x = pixels if self.pixel_values else (pixels.astype(np.float32) / 255 - self.mean) / self.std
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


def image_plan(spec: InputSpec, preset: dict, mean: Any, std: Any, size: Any) -> ImagePlan:
    name = spec.name
    if len(spec.shape) != 4:
        raise InputError(f"model input {name!r} has rank {len(spec.shape)}, but images need a rank-4 input; "
                         "give the data as a .npy array or a .npz keyed by input name instead.")
    pixel_values = spec.dtype == np.uint8
    if spec.dtype.kind != "f" and not pixel_values:
        raise InputError(f"model input {name!r} has dtype {spec.dtype}; images need a float or uint8 input "
                         "(give a .npy).")
    if pixel_values and (mean is not None or std is not None):
        raise InputError(f"model input {name!r} is uint8: it takes the pixels as they are (0-255), so --mean and "
                         "--std cannot apply; leave them out (the preset then only sizes the images).")
    layout = preset.get("layout") or spec.layout
    if layout is None:
        raise InputError(
            f"cannot tell whether model input {name!r} {list(spec.shape)} is NCHW or NHWC; "
            "set \"layout\" in a preset JSON."
        )
    c_axis, h_axis, w_axis = (1, 2, 3) if layout == "NCHW" else (3, 1, 2)
    channels = spec.shape[c_axis]
    mean_v = float_list(mean, "mean") if mean is not None else preset["mean"]
    std_v = float_list(std, "std") if std is not None else preset["std"]
    if channels is None:  # only possible with a preset layout; images are RGB by default
        channels = 3
    if channels not in (1, 3):
        raise InputError(f"model input {name!r} has {channels} channels in {layout}; images give 1 or 3.")
    for what, values in (("mean", mean_v), ("std", std_v)):
        if len(values) not in (1, channels):
            raise InputError(f"{what} has {len(values)} values but model input {name!r} has {channels} channels; "
                             f"give --mean and --std with 1{'' if channels == 1 else f' or {channels}'} value(s) "
                             "(the normalisation the model was trained with).")
    if any(v == 0 for v in std_v):
        raise InputError("std must not contain zero.")
    if pixel_values:
        if any(v != 0 for v in mean_v) or any(v != 1 for v in std_v):
            warnings.warn(f"model input {name!r} is uint8: the images are fed as pixels 0-255, without the "
                          "preset's mean and std (the model normalises them itself).", stacklevel=4)
        mean_v, std_v = [0.0], [1.0]

    wanted = size_pair(size, "size") if size is not None else preset.get("size") or preset.get("crop")
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
    return ImagePlan(height, width, channels, layout, np.asarray(mean_v, np.float32),
                     np.asarray(std_v, np.float32), resize_shorter, pixel_values)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _images_under(folder: str) -> list[str]:
    """Image paths below ``folder``, recursive, sorted (folders and files by name)."""
    found = []
    for directory, subdirs, names in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found.extend(os.path.join(directory, n) for n in sorted(names) if _is_image(n))
    return found


def scan_folder(root: Path) -> tuple[list[str], np.ndarray | None, list[str] | None]:
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
