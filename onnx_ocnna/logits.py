"""The model's class scores before a final Softmax.

Keras models end in a Softmax, and tf2onnx keeps it: their first output holds probabilities.
Some exports also return the predicted class (an ArgMax, int64 [N]) as their first output.
Everything that compares two models' outputs as distributions needs the logits: a softmax of
probabilities (which lie in [0, 1]) is nearly uniform, so the KL divergence the allocation
measures shrank 20-50 times and lost its ranking, and distillation at T = 4 had almost no
signal to learn from. Measured on the CIFAR-10 ResNet-20 (BN kept) with a Softmax appended,
``--target-macs 0.5 --criterion group-l2 --distill`` (one label-free epoch over 3,010 training
images, 1,000 test images): distillation took it from 62.0 % to 58.4 %, where the same network
without the Softmax goes from 58.2 % to 69.6 %.

:func:`scores_value` is the graph output with the class scores (what top-1 is read from),
:func:`logits_name` the tensor to compare distributions on, and :func:`logits_view` a copy of
the model whose only output is that tensor (a model whose first output already is its logits is
left as it is). The view has the model's initializers, so values trained on it are written
back into the model by name.
"""

from __future__ import annotations

import onnx

from onnx_ocnna.errors import InputError
from onnx_ocnna.metrics import is_float


def _float_outputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph outputs of a floating-point type, in order."""
    return [o for o in model.graph.output if is_float(o.type.tensor_type.elem_type)]


def scores_value(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The graph output that holds the class scores: the first float output shaped [N, K] (or
    of unknown shape), else the first float output. A model that also returns its predicted
    class (an ArgMax, int64 [N]) first is read by its scores. InputError when no output is float:
    labels alone tell neither how far a cut moved the model nor what to distil."""
    floats = _float_outputs(model)
    if not floats:
        names = ", ".join(o.name for o in model.graph.output)
        raise InputError(f"the model's outputs ({names}) hold no class scores, only integers: measuring a cut, "
                         "evaluating and distilling compare scores; export the model with its logits or "
                         "probabilities as an output")
    shaped = [o for o in floats if not o.type.tensor_type.HasField("shape") or len(o.type.tensor_type.shape.dim) == 2]
    return (shaped or floats)[0]


def scores_output(model: onnx.ModelProto) -> str:
    """The name of :func:`scores_value`."""
    return scores_value(model).name


def has_scores(model: onnx.ModelProto) -> bool:
    """Whether some graph output is float (class scores can be read, see :func:`scores_value`)."""
    return bool(_float_outputs(model))


def final_softmax(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The Softmax node that computes the scores output [N, K] over its class axis, else None."""
    return _final_softmax(model, scores_value(model))


def _final_softmax(model: onnx.ModelProto, scores: onnx.ValueInfoProto) -> onnx.NodeProto | None:
    if len(scores.type.tensor_type.shape.dim) != 2:  # a class axis only where the output is [N, K]
        return None
    node = next((n for n in model.graph.node if scores.name in n.output), None)
    if node is None or node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
        return None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
    return node if axis in (1, -1) else None


def logits_name(model: onnx.ModelProto) -> str:
    """The tensor of class scores: :func:`scores_output`, or the input of its final Softmax."""
    return _scores_and_logits(model)[1]


def _scores_and_logits(model: onnx.ModelProto) -> tuple[onnx.ValueInfoProto, str]:
    """(:func:`scores_value`, :func:`logits_name`), the scores output found once."""
    scores = scores_value(model)
    softmax = _final_softmax(model, scores)
    return scores, (softmax.input[0] if softmax is not None else scores.name)


def logits_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when its first output already is :func:`logits_name`, else a copy whose
    only output is that tensor (same shape as the scores output), with the nodes it needs."""
    scores, name = _scores_and_logits(model)
    if model.graph.output[0].name == name:
        return model
    view = onnx.ModelProto()
    view.CopyFrom(model)
    graph = view.graph
    logits = onnx.ValueInfoProto()
    logits.CopyFrom(scores)
    logits.name = name
    del graph.output[:]
    graph.output.append(logits)
    for info in [v for v in graph.value_info if v.name == name]:
        graph.value_info.remove(info)  # now a graph output
    needed, kept = {name}, []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
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
