"""Copy trained parameters back into the ONNX graph, and check ONNX Runtime agrees with PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from onnx_ocnna.distill.torch_graph import OnnxModule
from onnx_ocnna.errors import InputError, ValidationError


def write_back(module: OnnxModule, model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers hold the module's current parameter values
    and BatchNormalization running statistics (which the distiller may re-estimate), with any
    training-time Conv normalisation (``module.conv_norms``) folded into its Conv.

    Only the values change: every initializer keeps its name, dtype, shape and position,
    and nodes, inputs, outputs and metadata are untouched.

    Raises:
        ValidationError: the module does not match the model (a name or shape is missing).
    """
    values = {module.param_names[k]: p.detach().cpu() for k, p in module.params.items()}
    values.update({module.buffer_names[b]: getattr(module, b).detach().cpu() for b in module.stat_buffers})
    norms = getattr(module, "conv_norms", None)
    if norms is not None:
        values.update({k: v.cpu() for k, v in norms.folded(module.params).items()})
    out = onnx.ModelProto()
    out.CopyFrom(model)
    found = 0
    for init in out.graph.initializer:
        if init.name not in values:
            continue
        old_shape = tuple(init.dims)
        new = values[init.name]
        if tuple(new.shape) != old_shape:
            raise ValidationError(
                f"trained value {init.name!r} has shape {tuple(new.shape)}, the model's initializer {old_shape}"
            )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        # bfloat16 has no numpy dtype of its own; go through float32 and let onnx convert.
        array = new.float().numpy() if new.dtype == torch.bfloat16 else new.numpy()
        replacement = numpy_helper.from_array(array.astype(dtype, copy=False), init.name)
        replacement.data_type = init.data_type
        init.CopyFrom(replacement)
        found += 1
    if found != len(values):
        missing = sorted(set(values) - {i.name for i in out.graph.initializer})
        raise ValidationError(
            f"the model has no initializer named {missing[0]!r}; it is not the graph the module was built from"
        )
    return out


def check_agreement(
    model: onnx.ModelProto,
    module: OnnxModule,
    sample_feeds: dict[str, np.ndarray],
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> float:
    """Run ``model`` in ONNX Runtime and ``module`` in PyTorch (eval mode) on the same feeds.

    Tolerances apply as in ``numpy.allclose`` with ``atol`` scaled by the largest |output|,
    so logits of any magnitude get the same relative slack. An output ONNX Runtime computes in
    float16 or bfloat16 (which PyTorch computes in float32) gets at least 16 of its type's
    machine epsilons of each (2 % of the largest |output| for float16).

    Returns:
        The largest absolute difference over all outputs.

    Raises:
        ValidationError: an output differs beyond the tolerance (or has another shape).
    """
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ValidationError(f"ONNX Runtime cannot load the distilled model: {str(exc).splitlines()[0]}") from None
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in sample_feeds]
    if missing:
        raise InputError(f"sample feeds lack model input(s): {', '.join(missing)}")
    feeds = {n: np.asarray(sample_feeds[n]) for n in names}
    expected = session.run(None, feeds)
    was_training = module.training
    module.eval()
    try:
        actual = module.run(feeds)
    finally:
        module.train(was_training)
    worst = 0.0
    for name, ref, got in zip(module.output_names, expected, actual):
        if ref.shape != got.shape:
            raise ValidationError(f"output {name!r}: ONNX Runtime gives shape {ref.shape}, PyTorch {got.shape}")
        if ref.size == 0:
            continue
        if not np.issubdtype(ref.dtype, np.floating):
            if not np.array_equal(ref, got):
                raise ValidationError(f"output {name!r} differs between ONNX Runtime and PyTorch")
            continue
        diff = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))
        worst = max(worst, diff)
        scale = float(np.max(np.abs(ref)))
        slack = 16 * _epsilon(ref.dtype) if ref.dtype.itemsize < 4 else 0.0
        if not np.allclose(got, ref, rtol=max(rtol, slack), atol=max(atol, slack) * max(scale, 1.0)):
            raise ValidationError(
                f"output {name!r} differs between ONNX Runtime and PyTorch by up to {diff:.3g} "
                f"(largest |output| {scale:.3g}); the distilled model was not written"
            )
    return worst


def _epsilon(dtype: np.dtype) -> float:
    """Machine epsilon of a float dtype (bfloat16's, 2**-7, where numpy does not know it)."""
    try:
        return float(np.finfo(dtype).eps)
    except ValueError:
        return 2.0 ** -7
