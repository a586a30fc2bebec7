"""Element-wise handlers: activations, arithmetic, comparisons, Where and Softmax."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from onnx_ocnna.distill.torch_ops.context import Handler, NodeContext, Tensor


def unary(fn: Callable[[Tensor], Tensor]) -> Handler:
    """A handler applying ``fn`` to the node's one input."""
    return lambda ctx, inputs, attrs: fn(inputs[0])


def binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Handler:
    """A handler applying ``fn`` to the node's two inputs."""
    return lambda ctx, inputs, attrs: fn(inputs[0], inputs[1])


# Attribute-free unary ops: ONNX op type -> torch function (wrapped by :func:`unary` in the registry).
UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Relu": F.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "HardSwish": F.hardswish,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Erf": torch.erf,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Not": torch.logical_not,
    "Softplus": F.softplus,
    "Softsign": F.softsign,
    "Sign": torch.sign,
    "Mish": F.mish,
}


def round_(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return torch.round(inputs[0])  # round half to even, as ONNX specifies


def leaky_relu(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return F.leaky_relu(inputs[0], attrs.get("alpha", 0.01))


def elu(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return F.elu(inputs[0], attrs.get("alpha", 1.0))


def selu(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    alpha, gamma = attrs.get("alpha", 1.67326319217681884765625), attrs.get("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


def gelu(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return F.gelu(inputs[0], approximate=attrs.get("approximate", "none"))


def prelu(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x, slope = inputs
    return torch.where(x >= 0, x, x * slope)


def clip(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    if "min" in attrs or "max" in attrs or ctx.opset < 11:
        lo, hi = attrs.get("min"), attrs.get("max")
    else:
        lo = inputs[1] if len(inputs) > 1 else None
        hi = inputs[2] if len(inputs) > 2 else None
        lo = None if lo is None else lo.to(x.dtype)
        hi = None if hi is None else hi.to(x.dtype)
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


def hard_sigmoid(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return torch.clamp(attrs.get("alpha", 0.2) * inputs[0] + attrs.get("beta", 0.5), 0.0, 1.0)


def _softmax_like(fn: Callable[..., Tensor]) -> Handler:
    def handler(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
        x = inputs[0]
        if ctx.opset >= 13:
            return fn(x, dim=attrs.get("axis", -1))
        # Before opset 13 the input is coerced to 2D at ``axis`` (default 1).
        axis = attrs.get("axis", 1) % x.dim()
        flat = x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
        return fn(flat, dim=1).reshape(x.shape)

    return handler


softmax = _softmax_like(torch.softmax)
log_softmax = _softmax_like(torch.log_softmax)


def add(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return inputs[0] + inputs[1]


def sub(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return inputs[0] - inputs[1]


def mul(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return inputs[0] * inputs[1]


def div(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    a, b = inputs
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates


def mod(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    a, b = inputs
    return torch.fmod(a, b) if attrs.get("fmod", 0) else torch.remainder(a, b)


def pow_(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return torch.pow(inputs[0], inputs[1]).to(inputs[0].dtype)


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Handler:
    def handler(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
        out = inputs[0]
        for t in inputs[1:]:
            out = fn(out, t)
        return out

    return handler


sum_ = _variadic(torch.add)
max_ = _variadic(torch.maximum)
min_ = _variadic(torch.minimum)


def mean(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return sum_(ctx, inputs, attrs) / len(inputs)


# Comparisons and logic: ONNX op type -> torch function (wrapped by :func:`binary` in the registry).
COMPARISONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}


def where(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return torch.where(inputs[0].bool(), inputs[1], inputs[2])


# ---------------------------------------------------------------------------------------
