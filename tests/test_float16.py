"""A float16 model (an export for half-precision deployment) is pruned, refitted, distilled and
synthesized for in its own precision: the fits and the training run in float32 and the values are
written back as float16."""

from __future__ import annotations

import numpy as np
import onnx
from graphs import GraphBuilder
from onnx import TensorProto, numpy_helper

from onnx_ocnna import api
from onnx_ocnna.model_io import ort_session, validate_model
from onnx_ocnna.synthesize import synthesize


def _net() -> onnx.ModelProto:
    """conv-BN-relu x 3, GAP, Gemm: enough channels for a MACs budget to cut and refit."""
    g = GraphBuilder(seed=3)
    a = g.relu(g.bn(g.conv("x", 3, 16, name="conv_a"), 16, name="bn_a"))
    b = g.relu(g.bn(g.conv(a, 16, 16, name="conv_b"), 16, name="bn_b"))
    c = g.relu(g.bn(g.conv(b, 16, 16, name="conv_c"), 16, name="bn_c"))
    out = g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [c])[0]])[0], 16, 5, name="fc")
    return g.model(["N", 3, 8, 8], out)


def _float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every float initializer, Constant and graph input/output in float16."""
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for init in half.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for value in [*half.graph.input, *half.graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    for node in half.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16)))
    del half.graph.value_info[:]
    onnx.checker.check_model(half, full_check=True)
    return half


def _float_types(model: onnx.ModelProto) -> set[int]:
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}
    return {i.data_type for i in model.graph.initializer if i.data_type in floats}


def _images(count: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((count, 3, 8, 8)).astype(np.float32)


def test_a_float16_model_is_pruned_and_refitted_in_float16():
    """Before, the refit wrote float32 weights into the float16 graph and ONNX Runtime refused it
    (`Type parameter (T) of Optype (Conv) bound to different types`)."""
    x = _images(96)
    full, half = _net(), _float16(_net())
    pruned32, report32 = api.compress(full, x, target_macs=0.6, progress=False)
    pruned16, report16 = api.compress(half, x.astype(np.float16), target_macs=0.6, progress=False)
    validate_model(pruned16)
    assert _float_types(pruned16) == {TensorProto.FLOAT16}
    refitted = [layer for layer in report16.extra["reconstruction"]["layers"] if layer["error_after"] is not None]
    assert refitted
    assert [(g["id"], g["kept"]) for g in report16.groups] == [(g["id"], g["kept"]) for g in report32.groups]
    y32 = ort_session(pruned32).run(None, {"x": x})[0]
    y16 = ort_session(pruned16).run(None, {"x": x.astype(np.float16)})[0].astype(np.float32)
    np.testing.assert_allclose(y16, y32, rtol=0, atol=0.02 * np.abs(y32).max())


def test_a_float16_student_is_distilled_in_float32_and_written_in_float16():
    """Before, PyTorch trained the float16 weights in half precision and the check against ONNX
    Runtime refused the result at float32 tolerances."""
    x = _images(64)
    teacher = _float16(_net())
    student, _ = api.compress(teacher, x.astype(np.float16), target_macs=0.6, progress=False)
    distilled, report = api.distill(student, teacher, x.astype(np.float16), epochs=1, progress=False, threads=1)
    validate_model(distilled)
    assert _float_types(distilled) == {TensorProto.FLOAT16}
    before = {i.name: numpy_helper.to_array(i) for i in student.graph.initializer}
    changed = [i.name for i in distilled.graph.initializer
               if i.data_type == TensorProto.FLOAT16 and not np.array_equal(numpy_helper.to_array(i), before[i.name])]
    assert changed  # the weights trained
    assert report.check_max_diff is not None


def test_calibration_data_is_synthesized_for_a_float16_model():
    synthesis = synthesize(_float16(_net()), samples=8, batch_size=8, iterations=3, progress=False)
    assert synthesis.arrays["x"].dtype == np.float16 and synthesis.arrays["x"].shape == (8, 3, 8, 8)
    assert np.isfinite(synthesis.arrays["x"].astype(np.float32)).all()
