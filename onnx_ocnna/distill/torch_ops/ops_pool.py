"""Pooling and reduction handlers: (Global)MaxPool, (Global)AveragePool and the Reduce* family."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from onnx_ocnna.distill.torch_ops.context import (
    Handler,
    NodeContext,
    Tensor,
    axes_arg,
    spatial_pads,
    symmetric,
    torch_pad_arg,
)
from onnx_ocnna.errors import InputError

_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pool_geometry(attrs: dict, x: Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = list(attrs["kernel_shape"])
    n = len(kernel)
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    return kernel, strides, dilations, spatial_pads(attrs, x, kernel, strides, dilations)


def max_pool(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    if len(ctx.node.output) > 1 and ctx.node.output[1]:
        raise InputError(f"MaxPool with an Indices output (node {ctx.node.name!r}) is not supported by the distiller")
    x = inputs[0]
    kernel, strides, dilations, pads = _pool_geometry(attrs, x)
    n = len(kernel)
    ceil = bool(attrs.get("ceil_mode", 0))
    if symmetric(pads) and all(2 * p <= k for p, k in zip(pads[:n], kernel)):
        return _MAXPOOL[n](x, kernel, strides, pads[:n], dilations, ceil_mode=ceil)
    x = F.pad(x, torch_pad_arg(pads), value=-math.inf)
    return _MAXPOOL[n](x, kernel, strides, 0, dilations, ceil_mode=ceil)


def avg_pool(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    kernel, strides, dilations, pads = _pool_geometry(attrs, x)
    if any(d != 1 for d in dilations):
        raise InputError(f"AveragePool with dilations (node {ctx.node.name!r}) is not supported by the distiller")
    n = len(kernel)
    ceil = bool(attrs.get("ceil_mode", 0))
    include = bool(attrs.get("count_include_pad", 0))
    if symmetric(pads) and all(2 * p <= k for p, k in zip(pads[:n], kernel)):
        return _AVGPOOL[n](x, kernel, strides, pads[:n], ceil_mode=ceil, count_include_pad=include)
    padded = F.pad(x, torch_pad_arg(pads))
    total = _AVGPOOL[n](padded, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    if include:
        return total
    # Divide by the number of real (unpadded) elements in each window.
    ones = F.pad(torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype), torch_pad_arg(pads))
    frac = _AVGPOOL[n](ones, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    return total / frac


def global_avg_pool(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def global_max_pool(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


def _reduce(fn: Callable[[Tensor, tuple[int, ...], bool], Tensor]) -> Handler:
    def handler(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
        x = inputs[0]
        axes = axes_arg(inputs, attrs)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, tuple(a % x.dim() for a in axes), keep)

    return handler


reduce_mean = _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k))
reduce_sum = _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k))
reduce_max = _reduce(lambda x, d, k: x.amax(dim=d, keepdim=k))
reduce_min = _reduce(lambda x, d, k: x.amin(dim=d, keepdim=k))
reduce_prod = _reduce(lambda x, d, k: _prod(x, d, k))
reduce_l2 = _reduce(lambda x, d, k: torch.sqrt((x * x).sum(dim=d, keepdim=k)))
reduce_l1 = _reduce(lambda x, d, k: x.abs().sum(dim=d, keepdim=k))
reduce_sum_square = _reduce(lambda x, d, k: (x * x).sum(dim=d, keepdim=k))


def _prod(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keep)
    return x
