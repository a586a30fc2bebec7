"""Parameters and MACs (SPEC section 9)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder
from shared_data import MODELS, needs_shared

from onnx_ocnna.metrics import count_macs, count_parameters


def test_conv_and_gemm_macs_and_parameters():
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 8, name="a"))  # 3x3, pads 1: out 8x6x6
    flat = g.node("Flatten", [a])[0]
    out = g.gemm(flat, 8 * 36, 5)
    model = g.model(["N", 3, 6, 6], out)
    assert count_macs(model) == 8 * 36 * 3 * 9 + 8 * 36 * 5
    assert count_parameters(model) == 8 * 3 * 9 + 8 + 8 * 36 * 5 + 5


def test_gemm_after_a_run_time_reshape_is_counted():
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 4, name="a"))
    shape = g.node("Concat", [g.node("Slice", [g.node("Shape", [a])[0], g.const(np.array([0])),
                                               g.const(np.array([1]))])[0],
                              g.const(np.array([-1]))], axis=0)[0]
    out = g.gemm(g.node("Reshape", [a, shape])[0], 4 * 36, 3)
    model = g.model(["N", 3, 6, 6], out)
    assert count_macs(model) == 4 * 36 * 3 * 9 + 4 * 36 * 3


@needs_shared
@pytest.mark.shared
def test_exports_of_one_network_have_equal_macs():
    ts = count_macs(onnx.load(MODELS / "resnet20_ts_opset13.onnx"))
    dynamo = count_macs(onnx.load(MODELS / "resnet20_dynamo_opset18.onnx"))
    assert ts == dynamo == 40_551_040


def test_blocked_macs_round_conv_channels_up_to_the_block():
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 4, name="a"))  # 3 -> 4 channels, out 6x6
    b = g.conv(a, 4, 12, name="b")
    model = g.model(["N", 3, 6, 6], b)
    assert count_macs(model) == 4 * 36 * 3 * 9 + 12 * 36 * 4 * 9
    # Output channels 4 -> 8 and 12 -> 16, the second Conv's input 4 -> 8; the image's 3 too.
    assert count_macs(model, block=8) == 8 * 36 * 8 * 9 + 16 * 36 * 8 * 9


def test_near_chance_warning_names_the_likely_cause(digits):
    from onnx_ocnna.evaluate import near_chance_warning
    from onnx_ocnna.calibration import open_calibration

    model, split, images, labels = digits
    test = split["test"]
    right = open_calibration({"input": images[test], "labels": labels[test]}, model, batch_size=64)
    assert near_chance_warning(model, right.batches(), "the data") is None
    shifted = open_calibration({"input": images[test], "labels": (labels[test] + 1) % 10}, model, batch_size=64)
    message = near_chance_warning(model, shifted.batches(), "the data")
    assert message is not None and "preprocessing is probably wrong" in message and "chance is 10.0 %" in message
    unlabelled = open_calibration(images[test], model, batch_size=64)
    assert near_chance_warning(model, unlabelled.batches(), "the data") is None


def test_half_and_bfloat16_weights_are_parameters_and_integers_are_not():
    from onnx import TensorProto, helper

    def tensor(name, data_type, dims):
        size = int(np.prod(dims)) * {TensorProto.BFLOAT16: 2, TensorProto.FLOAT16: 2, TensorProto.INT64: 8}[data_type]
        return helper.make_tensor(name, data_type, dims, np.zeros(size, np.uint8).tobytes(), raw=True)

    nodes = [helper.make_node("Conv", ["x", "w16"], ["a"]), helper.make_node("Conv", ["a", "wb16"], ["b"]),
             helper.make_node("Reshape", ["b", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)],
                              [tensor("w16", TensorProto.FLOAT16, [8, 3, 1, 1]),
                               tensor("wb16", TensorProto.BFLOAT16, [5, 8, 1, 1]), tensor("shape", TensorProto.INT64, [2])])
    assert count_parameters(helper.make_model(graph)) == 8 * 3 + 5 * 8
