"""Execute an ONNX graph in PyTorch, with its float initializers as trainable parameters.

:class:`OnnxModule` is a small interpreter, not a code generator: it keeps the ONNX
graph, runs its nodes in topological order and looks every node up in :data:`OPS`, one
dictionary from ``op_type`` to a handler ``fn(ctx, inputs, attrs) -> Tensor | tuple``; the
handlers live in :mod:`onnx_ocnna.distill.torch_ops`, one small file per operator family.
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
* A float16 or bfloat16 model runs in float32 (its initializers, constants, inputs and Casts);
  write-back stores every value in its initializer's own type again.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from onnx_ocnna.distill.torch_ops import ops_conv, ops_elementwise, ops_linear, ops_pool, ops_shape
from onnx_ocnna.distill.torch_ops.context import Handler, NodeContext, to_torch_dtype
from onnx_ocnna.errors import InputError
from onnx_ocnna.metrics import is_float

__all__ = ["OPS", "Handler", "NodeContext", "OnnxModule", "as_tensor", "to_torch_dtype"]

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

# Computed in float32 (see ``to_torch_dtype``): initializers, constants, inputs and Casts to them.
_HALF_TYPES = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}

# The one table of operator knowledge: ONNX op type -> handler. An op type missing here is refused
# with a reason when the module is built (the distiller never guesses).
OPS: dict[str, Handler] = {
    # convolution and normalisation
    "Conv": ops_conv.conv,
    "ConvTranspose": ops_conv.conv_transpose,
    "BatchNormalization": ops_conv.batch_norm,
    "InstanceNormalization": ops_conv.instance_norm,
    "LayerNormalization": ops_conv.layer_norm,
    # pooling and reductions
    "MaxPool": ops_pool.max_pool,
    "AveragePool": ops_pool.avg_pool,
    "GlobalAveragePool": ops_pool.global_avg_pool,
    "GlobalMaxPool": ops_pool.global_max_pool,
    "ReduceMean": ops_pool.reduce_mean,
    "ReduceSum": ops_pool.reduce_sum,
    "ReduceMax": ops_pool.reduce_max,
    "ReduceMin": ops_pool.reduce_min,
    "ReduceProd": ops_pool.reduce_prod,
    "ReduceL2": ops_pool.reduce_l2,
    "ReduceL1": ops_pool.reduce_l1,
    "ReduceSumSquare": ops_pool.reduce_sum_square,
    # element-wise: activations, arithmetic, comparisons
    **{op: ops_elementwise.unary(fn) for op, fn in ops_elementwise.UNARY.items()},
    "Round": ops_elementwise.round_,
    "LeakyRelu": ops_elementwise.leaky_relu,
    "Elu": ops_elementwise.elu,
    "Selu": ops_elementwise.selu,
    "Gelu": ops_elementwise.gelu,
    "PRelu": ops_elementwise.prelu,
    "Clip": ops_elementwise.clip,
    "HardSigmoid": ops_elementwise.hard_sigmoid,
    "Softmax": ops_elementwise.softmax,
    "LogSoftmax": ops_elementwise.log_softmax,
    "Add": ops_elementwise.add,
    "Sub": ops_elementwise.sub,
    "Mul": ops_elementwise.mul,
    "Div": ops_elementwise.div,
    "Mod": ops_elementwise.mod,
    "Pow": ops_elementwise.pow_,
    "Sum": ops_elementwise.sum_,
    "Max": ops_elementwise.max_,
    "Min": ops_elementwise.min_,
    "Mean": ops_elementwise.mean,
    **{op: ops_elementwise.binary(fn) for op, fn in ops_elementwise.COMPARISONS.items()},
    "Where": ops_elementwise.where,
    # linear algebra
    "Gemm": ops_linear.gemm,
    "MatMul": ops_linear.matmul,
    # shape and data movement
    "Flatten": ops_shape.flatten,
    "Reshape": ops_shape.reshape,
    "Squeeze": ops_shape.squeeze,
    "Unsqueeze": ops_shape.unsqueeze,
    "Transpose": ops_shape.transpose,
    "Concat": ops_shape.concat,
    "Split": ops_shape.split,
    "Slice": ops_shape.slice_,
    "Pad": ops_shape.pad,
    "Shape": ops_shape.shape,
    "Size": ops_shape.size,
    "Gather": ops_shape.gather,
    "GatherElements": ops_shape.gather_elements,
    "Identity": ops_shape.identity,
    "Dropout": ops_shape.dropout,
    "Cast": ops_shape.cast,
    "CastLike": ops_shape.cast_like,
    "ConstantOfShape": ops_shape.constant_of_shape,
    "Expand": ops_shape.expand,
    "Tile": ops_shape.tile,
    "Range": ops_shape.range_,
    "Resize": ops_shape.resize,
    "Upsample": ops_shape.resize,
}


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
    if tensor.data_type in _HALF_TYPES:
        return torch.from_numpy(array.astype(np.float32))
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
        floats = {t.name for t in graph.initializer if is_float(t.data_type)}
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
        env = {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in env.items()}
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


def _constant(attrs: dict) -> Tensor:
    """The value of a Constant node from whichever ``value*`` attribute it carries."""
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
