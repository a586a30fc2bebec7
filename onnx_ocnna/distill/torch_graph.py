"""Execute an ONNX graph in PyTorch, with its float initializers as trainable parameters.

:class:`OnnxModule` is a small interpreter, not a code generator: it keeps the ONNX
graph, runs its nodes in topological order and looks every node up in :data:`OPS`, one
dictionary from ``op_type`` to a handler ``fn(ctx, inputs, attrs) -> Tensor | tuple``.
Shape sub-graphs (Shape -> Gather -> Concat -> Reshape) run eagerly on int64 tensors, so a
dynamic batch size works without any shape inference.

Why not ``onnx2torch``: checked against the six pretrained CIFAR ResNets and torchvision
ResNet-18 / MobileNetV2 / EfficientNet-B0 (TorchScript exporter opset 13 and dynamo
exporter opset 18), it converted only the five TorchScript CIFAR ResNets; it has no
converter for opset-18 ``Pad`` and ``ReduceMean``, failed with a ``KeyError`` on the
torchvision TorchScript exports, and names its parameters after nodes, not after the
initializers that write-back must fill.

Parameters and constants:

* A float initializer becomes an ``nn.Parameter`` (in :attr:`OnnxModule.params`, keyed by
  a sanitised name; :attr:`OnnxModule.param_names` maps back to the initializer name),
  unless every use of it is a slot that is a setting rather than a weight (BatchNorm
  running mean/var, Clip bounds, Resize scales, Pad value, Pow exponent, ...; see
  :data:`_FROZEN_SLOTS`). Those, integer initializers and Constant nodes are buffers.
* BatchNormalization normalises with the model's running statistics (buffers, listed in
  :attr:`OnnxModule.stat_buffers`) by default, also in ``train()`` mode: training and the
  written-back ONNX graph then compute exactly the same function, and only scale and bias
  (and the Conv weights around it) train. With :attr:`OnnxModule.batch_stats` set, ``train()``
  mode normalises with the batch's statistics and updates the running ones in place
  (``bn_momentum``; None = cumulative average), as ``torch.nn.BatchNorm`` does; the
  distiller uses this to re-estimate them after pruning or to train with them, and
  :func:`~onnx_ocnna.distill.writeback.write_back` copies them into the ONNX graph.
* Dropout is active in ``train()`` mode and the identity in ``eval()`` mode.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from onnx_ocnna.errors import InputError

Tensor = torch.Tensor

# (op_type, input index) slots whose float initializer is a setting, not a weight to train.
_FROZEN_SLOTS: set[tuple[str, int]] = {
    ("BatchNormalization", 3),
    ("BatchNormalization", 4),
    ("Clip", 1),
    ("Clip", 2),
    ("Resize", 1),
    ("Resize", 2),
    ("Upsample", 1),
    ("Pad", 2),
    ("Pow", 1),
    ("Range", 0),
    ("Range", 1),
    ("Range", 2),
    ("Dropout", 1),
    ("ConstantOfShape", 0),
}

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}

_TORCH_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
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
OPS: dict[str, Handler] = {}


def register(*op_types: str) -> Callable[[Handler], Handler]:
    """Decorator adding a handler to :data:`OPS` under one or more ONNX op types."""

    def wrap(fn: Handler) -> Handler:
        for op in op_types:
            OPS[op] = fn
        return fn

    return wrap


def to_torch_dtype(onnx_type: int) -> torch.dtype:
    if onnx_type not in _TORCH_DTYPES:
        name = onnx.TensorProto.DataType.Name(onnx_type)
        raise InputError(f"ONNX tensor type {name} is not supported by the distiller")
    return _TORCH_DTYPES[onnx_type]


def _sanitise(name: str, taken: set[str]) -> str:
    key = re.sub(r"\W", "_", name) or "t"
    if key[0].isdigit():
        key = "t_" + key
    base, i = key, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    taken.add(key)
    return key


def _tensor_from_proto(tensor: onnx.TensorProto) -> Tensor:
    array = numpy_helper.to_array(tensor)
    return torch.from_numpy(np.array(array, copy=True))


def _attr_value(attr: onnx.AttributeProto):
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):
        return _tensor_from_proto(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode() for v in value]
    return value


def _toposort(graph: onnx.GraphProto, available: set[str]) -> list[onnx.NodeProto]:
    """Kahn's algorithm keeping the file's order among ready nodes."""
    producers = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    deps: list[set[int]] = []
    for node in graph.node:
        deps.append({producers[i] for i in node.input if i and i not in available and i in producers})
    users: dict[int, list[int]] = {i: [] for i in range(len(graph.node))}
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    remaining = [len(d) for d in deps]
    ready = [i for i, r in enumerate(remaining) if r == 0]
    order: list[int] = []
    heapq.heapify(ready)
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in users[i]:
            remaining[j] -= 1
            if remaining[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(graph.node):
        raise InputError("the ONNX graph has a cycle; it cannot be executed")
    return [graph.node[i] for i in order]


class OnnxModule(torch.nn.Module):
    """An ONNX graph as a ``torch.nn.Module``.

    Args:
        model: the ONNX model (initializers loaded, external data included).

    Attributes:
        params: trainable float initializers, keyed by sanitised name.
        param_names: sanitised key -> initializer name, for every parameter.
        buffer_names: buffer attribute name -> initializer name, for frozen initializers.
        stat_buffers: the buffer attribute names that are BatchNormalization running mean/var.
        batch_stats: in ``train()`` mode, BatchNormalization uses and updates batch statistics.
        bn_momentum: weight of a new batch in the running statistics (None: cumulative average).
        output_hooks: node output name -> ``fn(ctx, value) -> value`` applied right after the node
            (how :mod:`~onnx_ocnna.distill.conv_norm` adds training-time normalisation).
        conv_norms: that normalisation's module, folded in by write-back (None without it).
        input_names / output_names: the graph's real inputs (initializers excluded) and outputs.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        init_names = [t.name for t in graph.initializer]
        self.input_names = [i.name for i in graph.input if i.name not in set(init_names)]
        self.output_names = [o.name for o in graph.output]

        trainable = self._trainable_initializers(graph)
        self.params = torch.nn.ParameterDict()
        self.param_names: dict[str, str] = {}
        self.buffer_names: dict[str, str] = {}
        self.batch_stats = False
        self.bn_momentum: float | None = 0.1
        self._bn_batches = 0
        self.output_hooks: dict[str, Callable[[NodeContext, Tensor], Tensor]] = {}
        self.conv_norms: torch.nn.Module | None = None
        # value name -> ("param" | "buffer", key)
        self._sources: dict[str, tuple[str, str]] = {}
        taken: set[str] = set()
        for init in graph.initializer:
            key = _sanitise(init.name, taken)
            value = _tensor_from_proto(init)
            if init.name in trainable:
                self.params[key] = torch.nn.Parameter(value)
                self.param_names[key] = init.name
                self._sources[init.name] = ("param", key)
            else:
                buf = "c_" + key
                self.register_buffer(buf, value, persistent=False)
                self.buffer_names[buf] = init.name
                self._sources[init.name] = ("buffer", buf)

        available = set(init_names) | set(self.input_names)
        self._program: list[tuple[Handler, onnx.NodeProto, list[str], list[str], dict]] = []
        for node in _toposort(graph, available):
            if node.domain not in ("", "ai.onnx"):
                raise InputError(
                    f"operator {node.domain}:{node.op_type} (node {node.name!r}) is not supported by the distiller"
                )
            attrs = {a.name: _attr_value(a) for a in node.attribute}
            if node.op_type == "Constant":
                # Constants become buffers once instead of a tensor built every call.
                buf = "c_" + _sanitise(node.output[0], taken)
                self.register_buffer(buf, _constant(attrs), persistent=False)
                self._sources[node.output[0]] = ("buffer", buf)
                continue
            handler = OPS.get(node.op_type)
            if handler is None:
                raise InputError(f"operator {node.op_type} (node {node.name!r}) is not supported by the distiller")
            self._program.append((handler, node, list(node.input), list(node.output), attrs))

        stat_inits = {n.input[i] for n in graph.node if n.op_type == "BatchNormalization"
                      for i in (3, 4) if len(n.input) > i and n.input[i]}
        self.stat_buffers = [b for b, init in self.buffer_names.items() if init in stat_inits]

        # Free each intermediate after its last use (matters for no-grad evaluation).
        last_use: dict[str, int] = {}
        for step, (_, _, inputs, _, _) in enumerate(self._program):
            for name in inputs:
                last_use[name] = step
        keep = set(self.output_names)
        self._release: list[list[str]] = [[] for _ in self._program]
        for name, step in last_use.items():
            if name not in keep and name not in self._sources:
                self._release[step].append(name)

    @staticmethod
    def _trainable_initializers(graph: onnx.GraphProto) -> set[str]:
        floats = {t.name for t in graph.initializer if t.data_type in _FLOAT_TYPES}
        trainable: set[str] = set()
        for node in graph.node:
            for slot, name in enumerate(node.input):
                if name in floats and (node.op_type, slot) not in _FROZEN_SLOTS:
                    trainable.add(name)
        return trainable

    def initializer_values(self) -> dict[str, Tensor]:
        """Initializer name -> current tensor (parameters and frozen buffers)."""
        out = {self.param_names[k]: p for k, p in self.params.items()}
        out.update({init: getattr(self, buf) for buf, init in self.buffer_names.items()})
        return out

    def reset_bn_average(self) -> None:
        """Start a new cumulative average (``bn_momentum=None``): the next batch replaces the statistics."""
        self._bn_batches = 0

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Run the graph.

        Args:
            args: inputs in graph-input order; kwargs: inputs by name.

        Returns:
            The single output tensor, or a tuple in graph-output order.
        """
        if len(args) > len(self.input_names):
            raise InputError(f"the model takes {len(self.input_names)} inputs, got {len(args)}")
        env: dict[str, Tensor] = dict(zip(self.input_names, args))
        env.update(kwargs)
        missing = [n for n in self.input_names if n not in env]
        if missing:
            raise InputError(f"missing model input(s): {', '.join(missing)}")
        for name, (kind, key) in self._sources.items():
            env[name] = self.params[key] if kind == "param" else getattr(self, key)

        momentum = self.bn_momentum
        if self.training and self.batch_stats:
            self._bn_batches += 1
            momentum = momentum if momentum is not None else 1.0 / self._bn_batches
        ctx = NodeContext(self.opset, self.training, onnx.NodeProto(), self.batch_stats, momentum)
        for step, (handler, node, inputs, outputs, attrs) in enumerate(self._program):
            ctx.node = node
            args_ = [env[i] if i else None for i in inputs]
            try:
                result = handler(ctx, args_, attrs)
            except InputError:
                raise
            except Exception as exc:
                raise InputError(
                    f"operator {node.op_type} (node {node.name!r}) failed in the distiller: {type(exc).__name__}: {exc}"
                ) from exc
            if isinstance(result, Tensor):
                result = (result,)
            for name, value in zip(outputs, result):
                if name:
                    hook = self.output_hooks.get(name)
                    env[name] = value if hook is None else hook(ctx, value)
            for name in self._release[step]:
                env.pop(name, None)
        results = tuple(env[n] for n in self.output_names)
        return results[0] if len(results) == 1 else results

    @torch.no_grad()
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Like ``InferenceSession.run(None, feeds)``: numpy in, list of numpy outputs out."""
        out = self(**{k: as_tensor(v) for k, v in feeds.items() if k in self.input_names})
        out = out if isinstance(out, tuple) else (out,)
        return [o.detach().cpu().numpy() for o in out]


def as_tensor(array: np.ndarray) -> Tensor:
    """A torch view of a numpy array (copied only when read-only, e.g. memory-mapped)."""
    array = np.asarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


# ---------------------------------------------------------------------------------------
# Helpers for handlers


def _ints(t: Tensor | Sequence[int] | None) -> list[int]:
    if t is None:
        return []
    if isinstance(t, Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def _scalar(t: Tensor | None, default: float | None = None):
    if t is None or (isinstance(t, Tensor) and t.numel() == 0):
        return default
    return t.reshape(-1)[0].item() if isinstance(t, Tensor) else t


def _constant(attrs: dict) -> Tensor:
    if "value" in attrs:
        return attrs["value"]
    if "value_float" in attrs:
        return torch.tensor(attrs["value_float"], dtype=torch.float32)
    if "value_floats" in attrs:
        return torch.tensor(attrs["value_floats"], dtype=torch.float32)
    if "value_int" in attrs:
        return torch.tensor(attrs["value_int"], dtype=torch.int64)
    if "value_ints" in attrs:
        return torch.tensor(attrs["value_ints"], dtype=torch.int64)
    raise InputError(f"Constant node form {sorted(attrs)} is not supported by the distiller")


def _spatial_pads(attrs: dict, x: Tensor, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
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


def _torch_pad_arg(pads: list[int]) -> list[int]:
    """ONNX [b1..bn, e1..en] over the trailing n dims -> F.pad's last-dim-first pairs."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


def _symmetric(pads: list[int]) -> bool:
    n = len(pads) // 2
    return pads[:n] == pads[n:]


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _axes_arg(inputs: list, attrs: dict, index: int = 1) -> list[int] | None:
    """``axes`` from the attribute (older opsets) or from input ``index`` (newer ones)."""
    if "axes" in attrs:
        return list(attrs["axes"])
    if len(inputs) > index and inputs[index] is not None:
        return _ints(inputs[index])
    return None


# ---------------------------------------------------------------------------------------
# Convolution, normalisation, pooling


def _conv_geometry(inputs: list, attrs: dict):
    """(x, weight, bias or None, spatial rank n, kernel, strides, dilations) of a (transposed) Conv."""
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    n = w.dim() - 2
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    return x, w, b, n, kernel, list(attrs.get("strides", [1] * n)), list(attrs.get("dilations", [1] * n))


@register("Conv")
def _conv(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x, w, b, n, kernel, strides, dilations = _conv_geometry(inputs, attrs)
    pads = _spatial_pads(attrs, x, kernel, strides, dilations)
    if _symmetric(pads):
        padding = pads[:n]
    else:
        x, padding = F.pad(x, _torch_pad_arg(pads)), [0] * n
    return _CONV[n](x, w, b, strides, padding, dilations, attrs.get("group", 1))


@register("ConvTranspose")
def _conv_transpose(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
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
    if _symmetric(pads) and all(op < max(s, d) for op, s, d in zip(out_pad, strides, dilations)):
        return _CONV_T[n](x, w, b, strides, pads[:n], out_pad, groups, dilations)
    # General case: transpose without padding, then crop, because torch has no asymmetric padding here.
    y = _CONV_T[n](x, w, None, strides, 0, 0, groups, dilations)
    y = F.pad(y, _torch_pad_arg([0] * n + out_pad))
    index = [slice(None), slice(None)] + [slice(p, y.shape[2 + i] - pads[n + i]) for i, p in enumerate(pads[:n])]
    y = y[tuple(index)]
    return y if b is None else y + b.reshape(1, -1, *([1] * n))


@register("BatchNormalization")
def _batch_norm(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x, scale, bias, mean, var = inputs[:5]
    eps = attrs.get("epsilon", 1e-5)
    if not (ctx.training and ctx.batch_stats):  # frozen running statistics (module docstring)
        return F.batch_norm(x, mean, var, scale, bias, training=False, eps=eps)
    if mean.requires_grad or var.requires_grad:
        raise InputError(f"BatchNormalization {ctx.node.name!r} shares its running statistics with another "
                         "operator; they cannot be re-estimated (keep them frozen)")
    return F.batch_norm(x, mean, var, scale, bias, training=True, momentum=ctx.bn_momentum, eps=eps)


@register("InstanceNormalization")
def _instance_norm(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x, scale, bias = inputs[:3]
    return F.instance_norm(x, weight=scale, bias=bias, eps=attrs.get("epsilon", 1e-5))


@register("LayerNormalization")
def _layer_norm(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = attrs.get("axis", -1) % x.dim()
    shape = tuple(x.shape[axis:])
    scale = scale.expand(shape)
    bias = bias.expand(shape) if bias is not None else None
    return F.layer_norm(x, shape, scale, bias, eps=attrs.get("epsilon", 1e-5))


def _pool_geometry(attrs: dict, x: Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = list(attrs["kernel_shape"])
    n = len(kernel)
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    return kernel, strides, dilations, _spatial_pads(attrs, x, kernel, strides, dilations)


@register("MaxPool")
def _max_pool(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    if len(ctx.node.output) > 1 and ctx.node.output[1]:
        raise InputError(f"MaxPool with an Indices output (node {ctx.node.name!r}) is not supported by the distiller")
    x = inputs[0]
    kernel, strides, dilations, pads = _pool_geometry(attrs, x)
    n = len(kernel)
    ceil = bool(attrs.get("ceil_mode", 0))
    if _symmetric(pads) and all(2 * p <= k for p, k in zip(pads[:n], kernel)):
        return _MAXPOOL[n](x, kernel, strides, pads[:n], dilations, ceil_mode=ceil)
    x = F.pad(x, _torch_pad_arg(pads), value=-math.inf)
    return _MAXPOOL[n](x, kernel, strides, 0, dilations, ceil_mode=ceil)


@register("AveragePool")
def _avg_pool(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    kernel, strides, dilations, pads = _pool_geometry(attrs, x)
    if any(d != 1 for d in dilations):
        raise InputError(f"AveragePool with dilations (node {ctx.node.name!r}) is not supported by the distiller")
    n = len(kernel)
    ceil = bool(attrs.get("ceil_mode", 0))
    include = bool(attrs.get("count_include_pad", 0))
    if _symmetric(pads) and all(2 * p <= k for p, k in zip(pads[:n], kernel)):
        return _AVGPOOL[n](x, kernel, strides, pads[:n], ceil_mode=ceil, count_include_pad=include)
    padded = F.pad(x, _torch_pad_arg(pads))
    total = _AVGPOOL[n](padded, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    if include:
        return total
    # Divide by the number of real (unpadded) elements in each window.
    ones = F.pad(torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype), _torch_pad_arg(pads))
    frac = _AVGPOOL[n](ones, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    return total / frac


@register("GlobalAveragePool")
def _global_avg_pool(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@register("GlobalMaxPool")
def _global_max_pool(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# ---------------------------------------------------------------------------------------
# Activations and element-wise arithmetic


def _unary(fn: Callable[[Tensor], Tensor]) -> Handler:
    return lambda ctx, inputs, attrs: fn(inputs[0])


for _op, _fn in {
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
}.items():
    register(_op)(_unary(_fn))


@register("Round")
def _round(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return torch.round(inputs[0])  # round half to even, as ONNX specifies


@register("LeakyRelu")
def _leaky_relu(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return F.leaky_relu(inputs[0], attrs.get("alpha", 0.01))


@register("Elu")
def _elu(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return F.elu(inputs[0], attrs.get("alpha", 1.0))


@register("Selu")
def _selu(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    alpha, gamma = attrs.get("alpha", 1.67326319217681884765625), attrs.get("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@register("Gelu")
def _gelu(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return F.gelu(inputs[0], approximate=attrs.get("approximate", "none"))


@register("PRelu")
def _prelu(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x, slope = inputs
    return torch.where(x >= 0, x, x * slope)


@register("Clip")
def _clip(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
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


@register("HardSigmoid")
def _hard_sigmoid(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
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


register("Softmax")(_softmax_like(torch.softmax))
register("LogSoftmax")(_softmax_like(torch.log_softmax))


@register("Add")
def _add(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return inputs[0] + inputs[1]


@register("Sub")
def _sub(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return inputs[0] - inputs[1]


@register("Mul")
def _mul(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return inputs[0] * inputs[1]


@register("Div")
def _div(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    a, b = inputs
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates


@register("Mod")
def _mod(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    a, b = inputs
    return torch.fmod(a, b) if attrs.get("fmod", 0) else torch.remainder(a, b)


@register("Pow")
def _pow(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return torch.pow(inputs[0], inputs[1]).to(inputs[0].dtype)


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Handler:
    def handler(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
        out = inputs[0]
        for t in inputs[1:]:
            out = fn(out, t)
        return out

    return handler


register("Sum")(_variadic(torch.add))
register("Max")(_variadic(torch.maximum))
register("Min")(_variadic(torch.minimum))


@register("Mean")
def _mean(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return _variadic(torch.add)(ctx, inputs, attrs) / len(inputs)


for _op, _fn in {
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}.items():
    register(_op)(lambda ctx, inputs, attrs, _fn=_fn: _fn(inputs[0], inputs[1]))


@register("Where")
def _where(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return torch.where(inputs[0].bool(), inputs[1], inputs[2])


# ---------------------------------------------------------------------------------------
# Reductions and linear algebra


def _reduce(fn: Callable[[Tensor, tuple[int, ...], bool], Tensor]) -> Handler:
    def handler(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
        x = inputs[0]
        axes = _axes_arg(inputs, attrs)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, tuple(a % x.dim() for a in axes), keep)

    return handler


register("ReduceMean")(_reduce(lambda x, d, k: x.mean(dim=d, keepdim=k)))
register("ReduceSum")(_reduce(lambda x, d, k: x.sum(dim=d, keepdim=k)))
register("ReduceMax")(_reduce(lambda x, d, k: x.amax(dim=d, keepdim=k)))
register("ReduceMin")(_reduce(lambda x, d, k: x.amin(dim=d, keepdim=k)))
register("ReduceProd")(_reduce(lambda x, d, k: _prod(x, d, k)))
register("ReduceL2")(_reduce(lambda x, d, k: torch.sqrt((x * x).sum(dim=d, keepdim=k))))
register("ReduceL1")(_reduce(lambda x, d, k: x.abs().sum(dim=d, keepdim=k)))
register("ReduceSumSquare")(_reduce(lambda x, d, k: (x * x).sum(dim=d, keepdim=k)))


def _prod(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keep)
    return x


@register("Gemm")
def _gemm(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
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


@register("MatMul")
def _matmul(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return torch.matmul(inputs[0], inputs[1])


# ---------------------------------------------------------------------------------------
# Shape manipulation


@register("Flatten")
def _flatten(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    axis = attrs.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


@register("Reshape")
def _reshape(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x, shape = inputs[0], _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@register("Squeeze")
def _squeeze(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    axes = _axes_arg(inputs, attrs)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in axes)) if axes else x


@register("Unsqueeze")
def _unsqueeze(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    axes = _axes_arg(inputs, attrs) or []
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


@register("Transpose")
def _transpose(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    perm = attrs.get("perm", list(reversed(range(x.dim()))))
    return x.permute(*perm)


@register("Concat")
def _concat(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return torch.cat([t for t in inputs if t is not None], dim=attrs["axis"])


@register("Split")
def _split(ctx: NodeContext, inputs: list, attrs: dict) -> tuple[Tensor, ...]:
    x = inputs[0]
    axis = attrs.get("axis", 0) % x.dim()
    if "split" in attrs:
        sizes = list(attrs["split"])
    elif len(inputs) > 1 and inputs[1] is not None:
        sizes = _ints(inputs[1])
    else:
        parts = attrs.get("num_outputs", len(ctx.node.output))
        # ceil-sized chunks, the last one smaller: the ONNX opset-18 rule, and torch.split's
        return tuple(torch.split(x, -(-x.shape[axis] // parts), dim=axis))
    return tuple(torch.split(x, sizes, dim=axis))


@register("Slice")
def _slice(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    if "starts" in attrs:  # opset < 10
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
        steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
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


@register("Pad")
def _pad(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    mode = attrs.get("mode", "constant")
    if "pads" in attrs:  # opset < 11
        pads, value, axes = list(attrs["pads"]), attrs.get("value", 0.0), None
    else:
        pads = _ints(inputs[1])
        value = _scalar(inputs[2] if len(inputs) > 2 else None, 0.0)
        axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
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
        return F.pad(x, _torch_pad_arg(trimmed), value=float(value))
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None or first < 2:
        raise InputError(
            f"Pad mode {mode!r} on axes {first}.. (node {ctx.node.name!r}) is not supported by the distiller"
        )
    return F.pad(x, _torch_pad_arg(trimmed), mode=torch_mode)


@register("Shape")
def _shape(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    shape = list(inputs[0].shape)
    # Python slicing clamps out-of-range start/end exactly as opset-15 Shape does.
    return torch.tensor(shape[attrs.get("start", 0) : attrs.get("end", len(shape))], dtype=torch.int64)


@register("Size")
def _size(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return torch.tensor(inputs[0].numel(), dtype=torch.int64)


@register("Gather")
def _gather(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x, idx = inputs
    axis = attrs.get("axis", 0) % x.dim()
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))


@register("GatherElements")
def _gather_elements(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x, idx = inputs
    axis = attrs.get("axis", 0) % x.dim()
    idx = idx.long()
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


@register("Identity")
def _identity(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return inputs[0]


@register("Dropout")
def _dropout(ctx: NodeContext, inputs: list, attrs: dict) -> tuple[Tensor, Tensor]:
    x = inputs[0]
    ratio = attrs.get("ratio", _scalar(inputs[1] if len(inputs) > 1 else None, 0.5))
    y = F.dropout(x, float(ratio), training=ctx.training) if ctx.training and ratio > 0 else x
    mask = torch.ones_like(x, dtype=torch.bool)
    return y, mask


@register("Cast")
def _cast(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return inputs[0].to(to_torch_dtype(attrs["to"]))


@register("CastLike")
def _cast_like(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return inputs[0].to(inputs[1].dtype)


@register("ConstantOfShape")
def _constant_of_shape(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    value = attrs.get("value", torch.zeros(1, dtype=torch.float32))
    return torch.full(_ints(inputs[0]), value.reshape(-1)[0].item(), dtype=value.dtype)


@register("Expand")
def _expand(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(inputs[1]))))


@register("Tile")
def _tile(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    return inputs[0].repeat(*_ints(inputs[1]))


@register("Range")
def _range(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
    start, limit, delta = inputs
    return torch.arange(_scalar(start), _scalar(limit), _scalar(delta), dtype=start.dtype)


@register("Resize", "Upsample")
def _resize(ctx: NodeContext, inputs: list, attrs: dict) -> Tensor:
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
        sizes = _ints(sizes_t) if sizes_t is not None and sizes_t.numel() else None
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
