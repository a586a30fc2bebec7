"""Linear-algebra handlers: Gemm and MatMul."""

from __future__ import annotations

import torch

from onnx_ocnna.distill.torch_ops.context import NodeContext, Tensor

def gemm(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    y = attrs.get("alpha", 1.0) * (a @ b)
    if c is not None:
        y = y + attrs.get("beta", 1.0) * c
    return y


def matmul(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return torch.matmul(inputs[0], inputs[1])


# ---------------------------------------------------------------------------------------
