"""Static INT8 quantization with ONNX Runtime (SPEC section 8).

Choices (each an argument of :func:`quantize_int8`):

* **Format** QDQ (QuantizeLinear/DequantizeLinear pairs around float ops): ONNX Runtime's
  recommended format for CPU since 1.11; the file stays a standard ONNX graph.
* **Types**: weights QInt8 (symmetric, per output channel by default), activations QUInt8
  (asymmetric), the pairing ``quantize_static``'s own guidance gives for x86/x64 CPUs.
  ``activation_type="int8"`` gives S8S8, which its guidance prefers on ARM. ``reduce_range``
  (7-bit weights) is off: it only helps x86 CPUs without VNNI, where U8S8 products can saturate.
* **Calibration**: MinMax by default. Its augmented graph returns only per-tensor ReduceMin /
  ReduceMax values per batch, so memory stays small without ``CalibMaxIntermediateOutputs``
  (which in ORT 1.31 discards every full block of batches instead of merging it, so it is not
  used). "entropy" and "percentile" keep whole activations of every batch in memory: use
  ``max_batches`` with them.
* **Pre-processing**: ORT's ``quant_pre_process`` (shape inference + basic graph optimisation,
  which folds BatchNormalization into Conv so the folded weights are quantized once) runs first.
  If it fails on a model, the model is quantized as given and a warning says so.
* **Opset**: per-channel weights need QuantizeLinear/DequantizeLinear with an ``axis``, which
  ONNX has from opset 13; ORT's quantizer writes them into a graph of opset 11 or 12 all the
  same (an invalid model), so such a model is converted to opset 13 first (``onnx.version_converter``)
  and a warning says so; if the conversion fails, weights get one scale per tensor instead.
* **Fixed batch**: when the model fixes its batch dimension to B0, calibration batches are cut
  into slices of B0 samples (a remainder smaller than B0 is skipped).
* The result is written to a temporary file next to ``out_path``, loaded and run in ONNX Runtime
  on one calibration batch, and only then moved into place (``os.replace``).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from onnx_ocnna.calibration import CalibrationSource, OrtReaderAdapter, model_fixed_batch
from onnx_ocnna.errors import InputError, ValidationError
from onnx_ocnna.model_io import atomic_output

# Protobuf's 2 GiB limit, with headroom: above it the temporary copies use external data.
_INLINE_LIMIT = 1_900_000_000
_ACTIVATION_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


def quantize_int8(
    model: onnx.ModelProto | str | os.PathLike,
    calibration: CalibrationSource,
    out_path: str | os.PathLike,
    *,
    per_channel: bool = True,
    max_batches: int | None = None,
    activation_type: str = "uint8",
    reduce_range: bool = False,
    calibrate_method: str = "minmax",
    preprocess: bool = True,
    nodes_to_exclude: list[str] | None = None,
) -> Path:
    """Quantize ``model`` to INT8 (QDQ) with ranges calibrated on ``calibration``; write ``out_path``.

    Args:
        model: the float model, in memory or as a path (external data next to it is read).
        calibration: batches whose ``feeds`` match the model's inputs.
        out_path: where the quantized model goes (replaced atomically).
        per_channel: one weight scale per output channel (else per tensor).
        max_batches: use at most this many batches of ``calibration``.
        activation_type: "uint8" (asymmetric, default) or "int8" (symmetric range of int8).
        reduce_range: 7-bit weights, for x86 CPUs without VNNI.
        calibrate_method: "minmax", "entropy" or "percentile".
        preprocess: run ORT's ``quant_pre_process`` first.
        nodes_to_exclude: node names left in float.

    Returns:
        ``out_path`` as a Path.
    """
    if activation_type not in _ACTIVATION_TYPES:
        raise InputError(f"activation_type must be one of {sorted(_ACTIVATION_TYPES)}, got {activation_type!r}")
    if calibrate_method not in _METHODS:
        raise InputError(f"calibrate_method must be one of {sorted(_METHODS)}, got {calibrate_method!r}")
    if max_batches is not None and max_batches < 1:
        raise InputError(f"max_batches must be a positive integer, got {max_batches!r}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    proto = onnx.load(os.fspath(model)) if not isinstance(model, onnx.ModelProto) else model
    fixed = model_fixed_batch(proto)
    if per_channel:
        proto, per_channel = _with_per_axis_opset(proto)

    with tempfile.TemporaryDirectory(prefix="ocnna-quant-") as work:
        # ORT's tools are given files: with a ModelProto they move its initializers out of the
        # proto in place (the caller's model) and then fail on constants shape inference reads.
        source_model = os.path.join(work, "input.onnx")
        onnx.save_model(proto, source_model, save_as_external_data=proto.ByteSize() > _INLINE_LIMIT)
        if preprocess:
            prepared = os.path.join(work, "prepared.onnx")
            try:
                # ONNX shape inference covers CNN graphs; the symbolic pass targets transformers.
                quant_pre_process(source_model, prepared, skip_symbolic_shape=True,
                                  save_as_external_data=proto.ByteSize() > _INLINE_LIMIT)  # fmt: skip
                source_model = prepared
            except Exception as exc:  # ORT raises assorted types for graphs its tools reject
                warnings.warn(f"quantization pre-processing failed ({exc}); quantizing the model as given",
                              stacklevel=2)

        reader = OrtReaderAdapter(calibration, fixed, max_batches)
        with atomic_output(out_path) as tmp:
            try:
                quantize_static(
                    source_model,
                    str(tmp),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                    activation_type=_ACTIVATION_TYPES[activation_type],
                    weight_type=QuantType.QInt8,
                    calibrate_method=_METHODS[calibrate_method],
                    nodes_to_exclude=nodes_to_exclude,
                )
            except Exception as exc:  # onnxruntime raises assorted types
                if reader.exhausted and reader.first is None:
                    raise InputError("the calibration data produced no batch to calibrate the quantizer with") from exc
                raise ValidationError(f"ONNX Runtime could not quantize the model: {exc}") from exc
            _check_runs(str(tmp), reader.first)
    return out_path


# The first opset whose QuantizeLinear / DequantizeLinear take an ``axis`` (per-channel scales).
_PER_AXIS_OPSET = 13


def _with_per_axis_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """(``model`` at an opset with per-axis QDQ, True), converted when older; (``model``, False)
    with a warning when it cannot be converted, so weights are quantized per tensor."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), _PER_AXIS_OPSET)
    if opset >= _PER_AXIS_OPSET:
        return model, True
    try:
        converted = onnx.version_converter.convert_version(model, _PER_AXIS_OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises assorted types for ops it has no adapter for
        warnings.warn(f"the model's opset {opset} has no per-channel QuantizeLinear and converting it to opset "
                      f"{_PER_AXIS_OPSET} failed ({exc}); weights are quantized with one scale per tensor",
                      stacklevel=3)
        return model, False
    warnings.warn(f"the model's opset {opset} has no per-channel QuantizeLinear; the INT8 model is converted to "
                  f"opset {_PER_AXIS_OPSET}", stacklevel=3)
    return converted, True


def _check_runs(path: str, feeds: dict[str, np.ndarray]) -> None:
    """Load the quantized model and run it on ``feeds``; ValidationError if that fails."""
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        outputs = session.run(None, feeds)
    except Exception as exc:  # onnxruntime raises its own exception classes
        raise ValidationError(f"the quantized model does not run in ONNX Runtime: {exc}") from exc
    for info, value in zip(session.get_outputs(), outputs):
        if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.all(np.isfinite(value)):
            raise ValidationError(f"the quantized model's output {info.name!r} is not finite")
