"""Shape and data-movement handlers: Reshape, Slice, Pad, Gather, Cast, Resize and the other ops without arithmetic."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from onnx_ocnna.distill.torch_ops.context import (
    NodeContext,
    Tensor,
    axes_arg,
    ints,
    scalar,
    to_torch_dtype,
    torch_pad_arg,
)
from onnx_ocnna.errors import InputError

def flatten(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    axis = attrs.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def reshape(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x, shape = inputs[0], ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def squeeze(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    axes = axes_arg(inputs, attrs)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in axes)) if axes else x


def unsqueeze(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    axes = axes_arg(inputs, attrs) or []
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def transpose(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    perm = attrs.get("perm", list(reversed(range(x.dim()))))
    return x.permute(*perm)


def concat(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return torch.cat([t for t in inputs if t is not None], dim=attrs["axis"])


def split(ctx: NodeContext, inputs: list, attrs: dict) -> tuple[Tensor, ...]:
    x = inputs[0]
    axis = attrs.get("axis", 0) % x.dim()
    if "split" in attrs:
        sizes = list(attrs["split"])
    elif len(inputs) > 1 and inputs[1] is not None:
        sizes = ints(inputs[1])
    else:
        parts = attrs.get("num_outputs", len(ctx.node.output))
        # ceil-sized chunks, the last one smaller: the ONNX opset-18 rule, and torch.split's
        return tuple(torch.split(x, -(-x.shape[axis] // parts), dim=axis))
    return tuple(torch.split(x, sizes, dim=axis))


def slice_(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    if "starts" in attrs:  # opset < 10
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = ints(inputs[1]), ints(inputs[2])
        axes = ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
        steps = ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        dim = x.shape[axis]
        if step > 0:
            start = min(max(start + dim if start < 0 else start, 0), dim)
            end = min(max(end + dim if end < 0 else end, 0), dim)
            index = [slice(None)] * x.dim()
            index[axis] = slice(start, end, step)
            x = x[tuple(index)]
        else:
            # torch has no negative-step slicing: gather the indices explicitly
            start = min(max(start + dim if start < 0 else start, -1), dim - 1)
            end = min(max(end + dim if end < 0 else end, -1), dim - 1)
            x = x.index_select(axis, torch.arange(start, end, step, dtype=torch.int64))
    return x


def pad(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    mode = attrs.get("mode", "constant")
    if "pads" in attrs:  # opset < 11
        pads, value, axes = list(attrs["pads"]), attrs.get("value", 0.0), None
    else:
        pads = ints(inputs[1])
        value = scalar(inputs[2] if len(inputs) > 2 else None, 0.0)
        axes = ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
    rank = x.dim()
    if axes is not None:
        full = [0] * (2 * rank)
        for i, a in enumerate(axes):
            full[a % rank], full[a % rank + rank] = pads[i], pads[i + len(axes)]
        pads = full
    # Drop leading axes without padding: F.pad's non-constant modes only pad trailing dims.
    first = next((i for i in range(rank) if pads[i] or pads[i + rank]), rank)
    trimmed = pads[first:rank] + pads[rank + first :]
    if not trimmed:
        return x
    if mode == "constant":
        return F.pad(x, torch_pad_arg(trimmed), value=float(value))
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None or first < 2:
        raise InputError(
            f"Pad mode {mode!r} on axes {first}.. (node {ctx.node.name!r}) is not supported by the distiller"
        )
    return F.pad(x, torch_pad_arg(trimmed), mode=torch_mode)


def shape(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    shape = list(inputs[0].shape)
    # Python slicing clamps out-of-range start/end exactly as opset-15 Shape does.
    return torch.tensor(shape[attrs.get("start", 0) : attrs.get("end", len(shape))], dtype=torch.int64)


def size(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return torch.tensor(inputs[0].numel(), dtype=torch.int64)


def gather(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x, idx = inputs
    axis = attrs.get("axis", 0) % x.dim()
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))


def gather_elements(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x, idx = inputs
    axis = attrs.get("axis", 0) % x.dim()
    idx = idx.long()
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


def identity(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return inputs[0]


def dropout(ctx: NodeContext, inputs: list, attrs: dict) -> tuple[Tensor, Tensor]:
    x = inputs[0]
    ratio = attrs.get("ratio", scalar(inputs[1] if len(inputs) > 1 else None, 0.5))
    y = F.dropout(x, float(ratio), training=ctx.training) if ctx.training and ratio > 0 else x
    mask = torch.ones_like(x, dtype=torch.bool)
    return y, mask


def cast(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return inputs[0].to(to_torch_dtype(attrs["to"]))


def cast_like(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return inputs[0].to(inputs[1].dtype)


def constant_of_shape(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    value = attrs.get("value", torch.zeros(1, dtype=torch.float32))
    return torch.full(ints(inputs[0]), value.reshape(-1)[0].item(), dtype=value.dtype)


def expand(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(ints(inputs[1]))))


def tile(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return inputs[0].repeat(*ints(inputs[1]))


def range_(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    start, limit, delta = inputs
    return torch.arange(scalar(start), scalar(limit), scalar(delta), dtype=start.dtype)


def resize(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    n = x.dim() - 2
    if ctx.node.op_type == "Upsample":
        scales = attrs["scales"] if "scales" in attrs else inputs[1].tolist()
        sizes = None
    else:
        scales_t = inputs[2] if len(inputs) > 2 else None
        sizes_t = inputs[3] if len(inputs) > 3 else None
        if len(inputs) == 2 and ctx.opset < 11:  # Resize-10: (X, scales)
            scales_t = inputs[1]
        scales = scales_t.tolist() if scales_t is not None and scales_t.numel() else None
        sizes = ints(sizes_t) if sizes_t is not None and sizes_t.numel() else None
    scaled_nc = scales is not None and any(s != 1 for s in scales[:2])
    if scaled_nc or sizes is not None and list(sizes[:2]) != list(x.shape[:2]):
        raise InputError(f"Resize over batch/channel axes (node {ctx.node.name!r}) is not supported by the distiller")
    size = sizes[2:] if sizes is not None else [int(math.floor(d * s)) for d, s in zip(x.shape[2:], scales[2:])]
    mode = attrs.get("mode", "nearest")
    coord = attrs.get("coordinate_transformation_mode", "asymmetric" if ctx.opset < 11 else "half_pixel")
    nearest = attrs.get("nearest_mode", "round_prefer_floor")
    if mode == "nearest":
        if coord == "asymmetric" and (nearest == "floor" or ctx.opset < 11):
            return F.interpolate(x, size=size, mode="nearest")
        if coord in ("half_pixel", "pytorch_half_pixel") and nearest in ("round_prefer_ceil", "round_prefer_floor"):
            # torch's 'nearest-exact' is half-pixel with floor(x + 0.5), i.e. round-prefer-ceil;
            # identical to round-prefer-floor unless a source coordinate lands exactly on .5.
            return F.interpolate(x, size=size, mode="nearest-exact")
    elif mode == "linear" and n in (1, 2, 3):
        torch_mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[n]
        if coord == "align_corners":
            return F.interpolate(x, size=size, mode=torch_mode, align_corners=True)
        if coord in ("half_pixel", "pytorch_half_pixel"):
            return F.interpolate(x, size=size, mode=torch_mode, align_corners=False)
    raise InputError(
        f"Resize mode={mode!r} coordinate_transformation_mode={coord!r} (node {ctx.node.name!r}) "
        "is not supported by the distiller"
    )
