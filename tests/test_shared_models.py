"""The pretrained CIFAR-10 ResNets (option-A shortcuts with channel Pads): lossless oracle
on every export, and OCNNA end to end with real calibration images."""

from __future__ import annotations

import onnx
import pytest
from oracle import check_lossless
from shared_data import CIFAR_TEST, CIFAR_TRAIN, MODELS, needs_shared

from onnx_ocnna import api
from onnx_ocnna.model_io import validate_model

pytestmark = [needs_shared, pytest.mark.shared]

EXPORTS = ["resnet20_ts_opset13", "resnet20_ts_opset13_bn", "resnet20_dynamo_opset18", "resnet32_ts_opset13_bn",
           "resnet56_ts_opset13", "resnet56_ts_opset13_bn"]


@pytest.mark.parametrize("name", EXPORTS)
def test_lossless_oracle(name):
    result = check_lossless(onnx.load(MODELS / f"{name}.onnx"), fraction=0.3)
    assert result["max_rel_error"] < 1e-5
    assert result["prunable_groups"] == result["groups"]  # the Pad-coupled residual group included
    assert result["after_params"] < result["before_params"]


@pytest.mark.parametrize("name", ["resnet20_ts_opset13", "resnet56_ts_opset13_bn"])
def test_ocnna_k40_end_to_end(name):
    model = onnx.load(MODELS / f"{name}.onnx")
    options = {"preprocess": "imagenet-32", "max_samples": 256, "batch_size": 64}
    pruned, report = api.compress(model, str(CIFAR_TRAIN), percentile=40, calibration_options=options,
                                  progress=False)
    assert report.rpr <= 0.45, report.table()
    assert report.settings["calibration_samples"] == 256
    validate_model(pruned)
    from onnx_ocnna.evaluate import compare_accuracy

    held_out = api.as_source(str(CIFAR_TEST), model, preprocess="imagenet-32", max_samples=500, batch_size=100)
    accuracy = compare_accuracy(model, pruned, held_out.batches)
    # Without distillation the pruned network loses accuracy; it must still be a working
    # classifier that mostly agrees with the original, and the base model must be sane.
    assert accuracy.top1_before > 0.7
    assert accuracy.top1_after > 0.1
    print(name, report.table(), accuracy)
