"""Run the passes of a batch-1 model on whole batches, and write it back at batch 1.

torch.onnx's dynamo exporter fixes every input's batch size unless told otherwise, so its
models usually take exactly one image: [1, 3, H, W] in, a Reshape to [1, -1] before the
classifier. Every pass the compressor makes over the calibration data (scoring, the damage of
each candidate cut, the reconstruction) then runs one image at a time; on the CIFAR-10 ResNet-20
the dynamo export took twice as long as the TorchScript export of the same network (84 s
against 43 s for `--target-latency 0.5`, docs/measurements.md).

:func:`relax_batch` makes a copy whose batch size is free: the inputs' and outputs' first axis
becomes symbolic, and every Reshape shape constant (an initializer or a Constant node) that starts
with 1 starts with 0 instead ("copy this axis from the input"; a Reshape with ``allowzero=1``, as
the dynamo exporter writes them, gets ``allowzero=0``, which means the same for a shape with no
other 0). The copy is kept only if it computes, on two images at once, what the original computes
on each alone. :meth:`RelaxedBatch.restore` puts the fixed batch back into a model derived from
the copy, so the file written is the user's graph, at batch 1, with its constants as they were.

Data opened for the batch-1 model holds one image per batch. The callers read it for the copy:
a source is re-read :data:`JOINED_ROWS` images at a time (``api._whole_batches``: compress,
score, distill), and a held-out pass joins its batches (:func:`for_passes`). Distillation and
the synthesis of calibration data also work on the copies, whose batches are more than a speed
matter there: one image per optimiser step, or per matched BatchNorm statistic, is another method.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_ocnna.calibration import Batch, model_fixed_batch
from onnx_ocnna.calibration.opening import DEFAULT_BATCH_SIZE
from onnx_ocnna.segments import sample_count

# What the copy must reproduce, per image, on random inputs.
_RTOL, _ATOL = 1e-4, 1e-5

#: Samples per batch when single-image batches are joined for a relaxed copy: the data's default.
JOINED_ROWS = DEFAULT_BATCH_SIZE


@dataclass
class RelaxedBatch:
    """A batch-1 model's copy that takes any batch size.

    Attributes:
        model: the copy.
        reshapes: the Reshape shape constants (initializers or Constant nodes' outputs) whose
            leading 1 became 0.
        allowzero: output names of the Reshapes whose ``allowzero`` went from 1 to 0.
    """

    model: onnx.ModelProto
    reshapes: list[str] = field(default_factory=list)
    allowzero: list[str] = field(default_factory=list)

    def restore(self, derived: onnx.ModelProto) -> onnx.ModelProto:
        """``derived`` (a model made from :attr:`model`: pruned, refitted) at batch 1 again."""
        fixed = onnx.ModelProto()
        fixed.CopyFrom(derived)
        graph = fixed.graph
        constants = {i.name for i in graph.initializer}
        for value in [*(i for i in graph.input if i.name not in constants), *graph.output]:
            _set_batch(value, 1)
        for name, tensor in _shape_tensors(graph).items():
            if name in self.reshapes:
                shape = numpy_helper.to_array(tensor).copy()
                if shape.size and shape[0] == 0:
                    shape[0] = 1
                    tensor.CopyFrom(numpy_helper.from_array(shape, tensor.name))
        for node in graph.node:
            if node.op_type == "Reshape" and node.output[0] in self.allowzero:
                _set_allowzero(node, 1)
        del graph.value_info[:]  # symbolic batch axes; shape inference fills them in again
        return onnx.shape_inference.infer_shapes(fixed)


def relax_batch(model: onnx.ModelProto) -> RelaxedBatch | None:
    """The copy of ``model`` that runs any batch size, or None when ``model`` does not fix its
    inputs' batch size at 1 or the copy does not compute the same per image."""
    import onnxruntime as ort

    from onnx_ocnna.model_io import ort_session, sample_feeds

    if not takes_batch_1_only(model):
        return None
    constants = {i.name for i in model.graph.initializer}
    relaxed = onnx.ModelProto()
    relaxed.CopyFrom(model)
    rgraph = relaxed.graph
    for value in [*(i for i in rgraph.input if i.name not in constants), *rgraph.output]:
        if _batch(value) == 1:
            _set_batch(value, None)
    del rgraph.value_info[:]
    readers: dict[str, set[str]] = {}
    for node in rgraph.node:
        for position, name in enumerate(node.input):
            readers.setdefault(name, set()).add("shape" if node.op_type == "Reshape" and position == 1 else "other")
    reshapes, allowzero = [], []
    tensors = _shape_tensors(rgraph)
    for node in rgraph.node:
        name = node.input[1] if node.op_type == "Reshape" else None
        if name not in tensors or readers[name] != {"shape"}:
            continue
        shape = numpy_helper.to_array(tensors[name]).copy()
        if shape.ndim != 1 or not shape.size or shape[0] not in (0, 1) or (shape[1:] == 0).any():
            continue
        if name not in reshapes and shape[0] == 1:
            shape[0] = 0
            tensors[name].CopyFrom(numpy_helper.from_array(shape, tensors[name].name))
            reshapes.append(name)
        if name in reshapes and next((a.i for a in node.attribute if a.name == "allowzero"), 0):
            _set_allowzero(node, 0)
            allowzero.append(node.output[0])
    try:
        one = [sample_feeds(model, batch=1, seed=seed) for seed in (0, 1)]
        session = ort_session(model)
        each = [session.run(None, feeds) for feeds in one]
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a copy ORT refuses is expected, not an error to show
        both = ort_session(relaxed).run(None, {k: np.concatenate([f[k] for f in one]) for k in one[0]}, quiet)
    except Exception:  # ORT refuses the copy (a shape only batch 1 satisfies): keep the original
        return None
    for index, value in enumerate(both):
        # Every output must lead with the batch axis: a [10] output would also join two images
        # into [20], and 20 rows would then be taken for 20 images.
        if any(np.ndim(outputs[index]) == 0 or np.shape(outputs[index])[0] != 1 for outputs in each):
            return None
        expected = np.concatenate([outputs[index] for outputs in each])
        if value.shape != expected.shape or not np.allclose(value, expected, rtol=_RTOL, atol=_ATOL):
            return None
    return RelaxedBatch(relaxed, reshapes, allowzero)


def for_passes(model: onnx.ModelProto, batches: Iterable[Batch]) -> tuple[onnx.ModelProto, Iterable[Batch]]:
    """The model one pass over ``batches`` should run, and the batches shaped for it.

    A model whose inputs fix batch 1 runs as its relaxed copy (:func:`relax_batch`), or, when it
    has no such copy, on the batches split into single samples. A model (or copy) that takes
    any batch runs on the batches joined into at least :data:`JOINED_ROWS` samples: data opened
    for a batch-1 model holds one image per batch. A model with another fixed batch runs on
    the batches as they are. Per sample the outputs are the original's (checked by
    :func:`relax_batch`).
    """
    if takes_batch_1_only(model):
        relaxed = relax_batch(model)
        if relaxed is None:
            return model, split_rows(batches)
        model = relaxed.model
    elif not _takes_any_batch(model):
        return model, batches
    return model, joined(batches, JOINED_ROWS)


def takes_batch_1_only(model: onnx.ModelProto) -> bool:
    """Whether ``model``'s data inputs fix its batch size at 1."""
    return model_fixed_batch(model) == 1


def _takes_any_batch(model: onnx.ModelProto) -> bool:
    """Whether no data input of ``model`` fixes its batch size."""
    return model_fixed_batch(model) is None


def joined(batches: Iterable[Batch], rows: int) -> Iterator[Batch]:
    """Consecutive ``batches`` joined into batches of ``rows`` samples (the last may hold
    fewer); labels are joined alike, and are None when any batch joined has none."""
    pending: list[Batch] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += sample_count([batch.feeds])
        if count >= rows:
            yield _join(pending)
            pending, count = [], 0
    if pending:
        yield _join(pending)


def split_rows(batches: Iterable[Batch]) -> Iterator[Batch]:
    """``batches`` as batches of one sample each."""
    for batch in batches:
        for row in range(sample_count([batch.feeds])):
            yield Batch({k: v[row : row + 1] for k, v in batch.feeds.items()},
                        None if batch.labels is None else batch.labels[row : row + 1])


def _join(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    feeds = {k: np.concatenate([b.feeds[k] for b in batches]) for k in batches[0].feeds}
    labelled = all(b.labels is not None for b in batches)
    return Batch(feeds, np.concatenate([np.asarray(b.labels) for b in batches]) if labelled else None)


def _shape_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Constant int64 tensors by the name nodes read them as: initializers, and the ``value`` of
    Constant nodes (older TorchScript exports give a Reshape its shape so). Edited in place."""
    tensors = {i.name: i for i in graph.initializer if i.data_type == onnx.TensorProto.INT64}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            if node.attribute[0].t.data_type == onnx.TensorProto.INT64:
                tensors[node.output[0]] = node.attribute[0].t
    return tensors


def _set_allowzero(node: onnx.NodeProto, value: int) -> None:
    for attribute in node.attribute:
        if attribute.name == "allowzero":
            attribute.i = value


def _batch(value: onnx.ValueInfoProto) -> int | None:
    dims = value.type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None


def _set_batch(value: onnx.ValueInfoProto, size: int | None) -> None:
    dims = value.type.tensor_type.shape.dim
    if not dims:
        return
    if size is None:
        dims[0].dim_param = "batch"
    else:
        dims[0].dim_value = size
