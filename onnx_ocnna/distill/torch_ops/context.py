"""What every torch operator handler shares: the node context, the handler type and the attribute/padding helpers.

A handler is ``fn(ctx, inputs, attrs) -> Tensor | tuple[Tensor, ...]``: ``inputs`` are the node's
input tensors in ONNX order (None for an omitted optional input), ``attrs`` its attributes as
Python values (tensors for TensorProto attributes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx
import torch

from onnx_ocnna.errors import InputError

Tensor = torch.Tensor

# float16 and bfloat16 are computed in float32: SGD steps in half precision lose the small
# updates, and PyTorch's CPU kernels for them are slow; write-back stores each initializer in
# its own type again.
_TORCH_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float32,
    onnx.TensorProto.BFLOAT16: torch.float32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


@dataclass
class NodeContext:
    """What a handler may know besides its inputs: the default-domain opset and the mode."""

    opset: int
    training: bool
    node: onnx.NodeProto
    batch_stats: bool = False
    bn_momentum: float | None = 0.1


Handler = Callable[[NodeContext, list, dict], "Tensor | tuple[Tensor, ...]"]


def to_torch_dtype(onnx_type: int) -> torch.dtype:
    """The torch dtype the distiller computes an ONNX ``TensorProto`` data type in (float32 for
    float16 and bfloat16); InputError for one the distiller cannot run."""
    if onnx_type not in _TORCH_DTYPES:
        name = onnx.TensorProto.DataType.Name(onnx_type)
        raise InputError(f"ONNX tensor type {name} is not supported by the distiller")
    return _TORCH_DTYPES[onnx_type]


def ints(t: Tensor | Sequence[int] | None) -> list[int]:
    """A 1-D int64 tensor (any shape, flattened) or a sequence as a list of ints; None -> []."""
    if t is None:
        return []
    if isinstance(t, Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def scalar(t: Tensor | None, default: float | None = None):
    """The first element of a tensor as a Python number, or ``default`` when absent or empty."""
    if t is None or (isinstance(t, Tensor) and t.numel() == 0):
        return default
    return t.reshape(-1)[0].item() if isinstance(t, Tensor) else t


def spatial_pads(attrs: dict, x: Tensor, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] after resolving ``auto_pad``."""
    n = len(kernel)
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else large)
            ends.append(large if auto == "SAME_UPPER" else small)
        return begins + ends
    if auto == "VALID":
        return [0] * (2 * n)
    return list(attrs.get("pads", [0] * (2 * n)))


def torch_pad_arg(pads: list[int]) -> list[int]:
    """ONNX [b1..bn, e1..en] over the trailing n dims -> F.pad's last-dim-first pairs."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


def symmetric(pads: list[int]) -> bool:
    """Whether ONNX pads [b1..bn, e1..en] pad each axis equally at both ends."""
    n = len(pads) // 2
    return pads[:n] == pads[n:]


def axes_arg(inputs: list, attrs: dict, index: int = 1) -> list[int] | None:
    """``axes`` from the attribute (older opsets) or from input ``index`` (newer ones)."""
    if "axes" in attrs:
        return list(attrs["axes"])
    if len(inputs) > index and inputs[index] is not None:
        return ints(inputs[index])
    return None
