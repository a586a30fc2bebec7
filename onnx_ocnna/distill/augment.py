"""Training-time augmentation of image inputs: random crop after zero padding and horizontal flip.

Only 4D image inputs are augmented (``augment=True``): a random crop after zero padding of
4 px per 32 px of the shorter side (at least 1), and a horizontal flip with probability 0.5
(``hflip=False`` for data where a mirror image changes the class, such as digits). The
teacher sees the same augmented images, so the KD targets stay consistent. The layout
(NCHW / NHWC) comes from the model's declared input shape, else from the array's shape.
"""

from __future__ import annotations

import onnx
import torch
import torch.nn.functional as F


def input_layouts(model: onnx.ModelProto) -> dict[str, str]:
    """Input name -> "NCHW" / "NHWC" for rank-4 inputs whose declared shape tells."""
    try:
        from onnx_ocnna.calibration import model_input_spec
    except ImportError:  # pragma: no cover - calibration is part of the package
        return {}
    return {spec.name: spec.layout for spec in model_input_spec(model) if spec.layout}


def _guess_layout(shape: tuple[int, ...]) -> str | None:
    """Layout of an [N, a, b, c] array: the channel axis is the small one (1, 3 or 4)."""
    small = (1, 3, 4)
    if shape[1] in small and shape[3] not in small:
        return "NCHW"
    if shape[3] in small and shape[1] not in small:
        return "NHWC"
    return None


def augment(x: torch.Tensor, layout: str | None, gen: torch.Generator, hflip: bool) -> torch.Tensor:
    """Random crop with zero padding and optional horizontal flip of an image batch.

    Args:
        x: [N, C, H, W] or [N, H, W, C]; other ranks and non-numeric inputs pass through.
    """
    if x.dim() != 4 or x.dtype == torch.bool:
        return x
    layout = layout or _guess_layout(tuple(x.shape))
    if layout is None:
        return x
    nhwc = x if layout == "NHWC" else x.permute(0, 2, 3, 1)
    n, h, w, _ = nhwc.shape
    pad = max(1, round(4 * min(h, w) / 32))
    padded = F.pad(nhwc, (0, 0, pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = padded[torch.arange(n)[:, None, None], rows, cols]  # [N, H, W, C]
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(2), out)
    out = out if layout == "NHWC" else out.permute(0, 3, 1, 2)
    return out.contiguous()
