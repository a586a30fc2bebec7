"""The model's class scores before a final Softmax.

Keras models end in a Softmax, and tf2onnx keeps it: their first output holds probabilities.
Everything that compares two models' outputs as distributions needs the logits: a softmax of
probabilities (which lie in [0, 1]) is nearly uniform, so the KL divergence the allocation
measures shrank 20-50 times and lost its ranking, and distillation at T = 4 had almost no
signal to learn from. Measured on the CIFAR-10 ResNet-20 (BN kept) with a Softmax appended,
``--target-macs 0.5 --criterion group-l2 --distill`` (one label-free epoch over 3,010 training
images, 1,000 test images): distillation took it from 62.0 % to 58.4 %, where the same network
without the Softmax goes from 58.2 % to 69.6 %.

:func:`logits_name` is the tensor to read instead, :func:`logits_view` a copy of the model whose
first output is that tensor (the Softmax left out); both leave a model without a final Softmax
as it is. The view has the model's initializers, so values trained on it are written back into
the model by name.
"""

from __future__ import annotations

import onnx


def final_softmax(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The Softmax node that computes the first output [N, K] over its class axis, else None."""
    output = model.graph.output[0]
    dims = output.type.tensor_type.shape.dim
    if len(dims) != 2:  # a class axis only where the output is [N, K]
        return None
    node = next((n for n in model.graph.node if output.name in n.output), None)
    if node is None or node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
        return None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
    return node if axis in (1, -1) else None


def logits_name(model: onnx.ModelProto) -> str:
    """The tensor of class scores: the first output, or the input of its final Softmax."""
    softmax = final_softmax(model)
    return softmax.input[0] if softmax is not None else model.graph.output[0].name


def logits_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when its first output is not a final Softmax's, else a copy whose first
    output is the Softmax's input (same shape) and without that node when nothing else reads it."""
    softmax = final_softmax(model)
    if softmax is None:
        return model
    view = onnx.ModelProto()
    view.CopyFrom(model)
    graph = view.graph
    old = graph.output[0]
    logits = onnx.ValueInfoProto()
    logits.CopyFrom(old)
    logits.name = softmax.input[0]
    graph.output.remove(old)
    graph.output.insert(0, logits)
    for info in [v for v in graph.value_info if v.name == logits.name]:
        graph.value_info.remove(info)  # now a graph output
    still_read = any(old.name in n.input for n in graph.node) or any(o.name == old.name for o in graph.output)
    if not still_read:
        graph.node.remove(next(n for n in graph.node if old.name in n.output))
    return view


def with_values_of(model: onnx.ModelProto, trained: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers take the values of ``trained``'s of the same name
    (a :func:`logits_view` of it, after training)."""
    values = {init.name: init for init in trained.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in values:
            init.CopyFrom(values[init.name])
    return out
