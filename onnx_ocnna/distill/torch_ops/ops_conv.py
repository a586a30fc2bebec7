"""Convolution and normalisation handlers: Conv, ConvTranspose, Batch-, Instance- and LayerNormalization."""

from __future__ import annotations

import torch.nn.functional as F

from onnx_ocnna.distill.torch_ops.context import NodeContext, Tensor, spatial_pads, symmetric, torch_pad_arg
from onnx_ocnna.errors import InputError

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv_geometry(inputs: list, attrs: dict):
    """(x, weight, bias or None, spatial rank n, kernel, strides, dilations) of a (transposed) Conv."""
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    n = w.dim() - 2
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    return x, w, b, n, kernel, list(attrs.get("strides", [1] * n)), list(attrs.get("dilations", [1] * n))


def conv(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x, w, b, n, kernel, strides, dilations = _conv_geometry(inputs, attrs)
    pads = spatial_pads(attrs, x, kernel, strides, dilations)
    if symmetric(pads):
        padding = pads[:n]
    else:
        x, padding = F.pad(x, torch_pad_arg(pads)), [0] * n
    return _CONV[n](x, w, b, strides, padding, dilations, attrs.get("group", 1))


def conv_transpose(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x, w, b, n, kernel, strides, dilations = _conv_geometry(inputs, attrs)
    out_pad = list(attrs.get("output_padding", [0] * n))
    groups = attrs.get("group", 1)
    geometry = zip(x.shape[2:], strides, out_pad, kernel, dilations)
    full = [s * (i - 1) + op + (k - 1) * d + 1 for i, s, op, k, d in geometry]
    auto = attrs.get("auto_pad", "NOTSET")
    if "output_shape" in attrs:
        totals = [f - o for f, o in zip(full, attrs["output_shape"][-n:])]
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        totals = [f - i * s for f, i, s in zip(full, x.shape[2:], strides)]
    else:
        totals = None
    if totals is not None:
        upper = auto != "SAME_LOWER"
        begins = [t // 2 if upper else t - t // 2 for t in totals]
        pads = begins + [t - b_ for t, b_ in zip(totals, begins)]
    else:
        pads = list(attrs.get("pads", [0] * (2 * n)))
    if symmetric(pads) and all(op < max(s, d) for op, s, d in zip(out_pad, strides, dilations)):
        return _CONV_T[n](x, w, b, strides, pads[:n], out_pad, groups, dilations)
    # General case: transpose without padding, then crop, because torch has no asymmetric padding here.
    y = _CONV_T[n](x, w, None, strides, 0, 0, groups, dilations)
    y = F.pad(y, torch_pad_arg([0] * n + out_pad))
    index = [slice(None), slice(None)] + [slice(p, y.shape[2 + i] - pads[n + i]) for i, p in enumerate(pads[:n])]
    y = y[tuple(index)]
    return y if b is None else y + b.reshape(1, -1, *([1] * n))


def batch_norm(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x, scale, bias, mean, var = inputs[:5]
    eps = attrs.get("epsilon", 1e-5)
    if not (ctx.training and ctx.batch_stats):  # frozen running statistics (module docstring)
        return F.batch_norm(x, mean, var, scale, bias, training=False, eps=eps)
    if mean.requires_grad or var.requires_grad:
        raise InputError(f"BatchNormalization {ctx.node.name!r} shares its running statistics with another "
                         "operator; they cannot be re-estimated (keep them frozen)")
    return F.batch_norm(x, mean, var, scale, bias, training=True, momentum=ctx.bn_momentum, eps=eps)


def instance_norm(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x, scale, bias = inputs[:3]
    return F.instance_norm(x, weight=scale, bias=bias, eps=attrs.get("epsilon", 1e-5))


def layer_norm(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = attrs.get("axis", -1) % x.dim()
    shape = tuple(x.shape[axis:])
    scale = scale.expand(shape)
    bias = bias.expand(shape) if bias is not None else None
    return F.layer_norm(x, shape, scale, bias, eps=attrs.get("epsilon", 1e-5))
