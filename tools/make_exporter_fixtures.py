"""Build the third-party exporter fixtures in tests/fixtures/ (issue 7), reproducibly.

Two interpreters take part, because TensorFlow must never become a dependency of the project:

* the project's environment builds the PyTorch exports (TorchScript at opset 9 with batch 1, a
  TorchScript export with symbolic batch and BatchNormalization after ReLU, dynamo at opset 18
  with external data), the opset-8 graph (version_converter from the opset-9 export) and the
  PaddlePaddle-style graph (onnx.helper, Paddle2ONNX's opset-11 patterns);
* a separate virtual environment with ``tensorflow-cpu`` and ``tf2onnx`` builds the Keras
  fixtures; this script re-runs itself there with ``--keras``.

Usage::

    python -m venv /work/tfvenv && /work/tfvenv/bin/pip install tensorflow-cpu tf2onnx
    python tools/make_exporter_fixtures.py --tf-python /work/tfvenv/bin/python

Every model has random weights from fixed seeds, and BatchNormalization statistics that are
not the identity so a wrong slice shows. The tool versions used are written to
``tests/fixtures/VERSIONS.json`` and, with a description of every file, to tests/fixtures/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SEED = 0
MAX_FILE_BYTES = 300_000
MAX_TOTAL_BYTES = 2_000_000

# name -> (builder interpreter, one-line description); the README table is generated from it.
FIXTURE_INFO: dict[str, tuple[str, str]] = {
    "keras_sequential": ("keras", "Keras Sequential CNN, tf2onnx opset 13: NHWC Transpose, dynamic Flatten "
                                  "Reshape, MatMul+Add head"),
    "keras_resnet": ("keras", "Keras functional ResNet-style, tf2onnx opset 13: residual Adds, 1x1 projection, "
                              "BN folded into the Convs, GAP -> Squeeze -> MatMul+Add head"),
    "keras_mobilenet": ("keras", "Keras MobileNet-style, tf2onnx opset 15: DepthwiseConv2D as grouped Conv, "
                                 "ReLU6 (Clip) then BatchNormalization (as Mul+Add)"),
    "keras_densenet": ("keras", "Keras DenseNet-style, tf2onnx opset 17: channel Concats, BN (as Mul+Add) after "
                                "Concat, AveragePool transition"),
    "paddle_se_opset11": ("helper", "PaddlePaddle-style (Paddle2ONNX patterns), opset 11: HardSigmoid "
                                    "squeeze-excite, hard_swish as Add/Clip/Mul/Div, dynamic flatten, MatMul+Add head"),
    "torch_legacy_opset9": ("torch", "PyTorch TorchScript export, opset 9, fixed batch 1, view(1, -1) -> Gemm"),
    "torch_opset8": ("torch", "torch_legacy_opset9 converted to opset 8 with onnx.version_converter"),
    "torch_symbolic_bn_after_relu": ("torch", "PyTorch TorchScript export, opset 13, symbolic batch, "
                                              "BatchNormalization after ReLU, x.view(x.size(0), -1)"),
    "torch_dynamo_opset18": ("torch", "PyTorch dynamo export, opset 18, symbolic batch, SiLU, grouped Conv, "
                                      "Concat, weights in torch_dynamo_opset18.onnx.data"),
    # Issue 14: shapes that ONNX's own inference does not give.
    "cntk_opset8_bias_add": ("helper", "CNTK 2.5-style MNIST CNN, opset 8: flat input reshaped by a shape computed "
                                       "at run time (ONNX inference leaves every later tensor of unknown rank), "
                                       "Conv + bias `Plus` (Add of a [C, 1, 1] parameter), MatMul + Add head"),
    "torch_dynamo_view_opset20": ("torch", "PyTorch dynamo export, opset 20, symbolic batch, x.view(x.size(0), -1) "
                                           "as Reshape to a shape built from Shape, weights in "
                                           "torch_dynamo_view_opset20.onnx.data"),
    "paddle_dynamic_hw_opset11": ("helper", "Paddle2ONNX-style text-direction classifier, opset 11, input "
                                            "[-1, 3, h, w] (batch as dim_value -1, dynamic height and width), fed "
                                            "48x192 lines"),
}

# Input shapes without the batch axis (NHWC for Keras).
KERAS_INPUT = (24, 24, 3)
TORCH_INPUT = (3, 16, 16)


# =========================================================================== Keras (tfvenv)


def _keras_models() -> dict:
    """Keras models with random weights and random BatchNormalization statistics."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(SEED)
    models = {}

    models["keras_sequential"] = keras.Sequential([
        keras.Input(KERAS_INPUT, name="input"),
        layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1"),
        layers.MaxPooling2D(2, name="pool1"),
        layers.Conv2D(12, 3, padding="same", activation="relu", name="conv2"),
        layers.MaxPooling2D(2, name="pool2"),
        layers.Conv2D(16, 3, padding="same", name="conv3"),
        layers.BatchNormalization(name="bn3"),
        layers.ReLU(name="relu3"),
        layers.Flatten(name="flatten"),
        layers.Dense(16, activation="relu", name="fc1"),
        layers.Dense(10, activation="softmax", name="predictions"),
    ], name="sequential")

    def conv_bn(x, filters, kernel, stride, name, relu=True):
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x) if relu else x

    inp = keras.Input(KERAS_INPUT, name="input")
    x = conv_bn(inp, 16, 3, 1, "stem")
    for i in range(2):  # identity blocks
        y = conv_bn(x, 16, 3, 1, f"block{i}a")
        y = conv_bn(y, 16, 3, 1, f"block{i}b", relu=False)
        x = layers.ReLU(name=f"block{i}_out")(layers.Add(name=f"block{i}_add")([x, y]))
    y = conv_bn(x, 24, 3, 2, "down_a")
    y = conv_bn(y, 24, 3, 1, "down_b", relu=False)
    shortcut = conv_bn(x, 24, 1, 2, "down_proj", relu=False)
    x = layers.ReLU(name="down_out")(layers.Add(name="down_add")([shortcut, y]))
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(10, name="logits")(x)
    models["keras_resnet"] = keras.Model(inp, out, name="resnet")

    inp = keras.Input(KERAS_INPUT, name="input")
    x = layers.Conv2D(16, 3, strides=2, padding="same", name="stem_conv")(inp)
    x = layers.ReLU(6.0, name="stem_relu6")(x)
    x = layers.BatchNormalization(name="stem_bn")(x)  # BN after the activation
    for i, (filters, stride) in enumerate([(24, 1), (32, 2)]):
        x = layers.DepthwiseConv2D(3, strides=stride, padding="same", name=f"dw{i}")(x)
        x = layers.ReLU(6.0, name=f"dw{i}_relu6")(x)
        x = layers.BatchNormalization(name=f"dw{i}_bn")(x)
        x = layers.Conv2D(filters, 1, use_bias=False, name=f"pw{i}")(x)
        x = layers.BatchNormalization(name=f"pw{i}_bn")(x)
        x = layers.ReLU(6.0, name=f"pw{i}_relu6")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    out = layers.Dense(10, activation="softmax", name="predictions")(x)
    models["keras_mobilenet"] = keras.Model(inp, out, name="mobilenet")

    inp = keras.Input(KERAS_INPUT, name="input")
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem_conv")(inp)
    for block in range(2):
        for i in range(2):
            y = layers.BatchNormalization(name=f"d{block}_{i}_bn")(x)
            y = layers.ReLU(name=f"d{block}_{i}_relu")(y)
            y = layers.Conv2D(8, 3, padding="same", use_bias=False, name=f"d{block}_{i}_conv")(y)
            x = layers.Concatenate(axis=-1, name=f"d{block}_{i}_concat")([x, y])
        if block == 0:
            x = layers.BatchNormalization(name="trans_bn")(x)
            x = layers.ReLU(name="trans_relu")(x)
            x = layers.Conv2D(16, 1, use_bias=False, name="trans_conv")(x)
            x = layers.AveragePooling2D(2, name="trans_pool")(x)
    x = layers.BatchNormalization(name="final_bn")(x)
    x = layers.ReLU(name="final_relu")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(10, name="logits")(x)
    models["keras_densenet"] = keras.Model(inp, out, name="densenet")

    rng = np.random.default_rng(SEED)
    for model in models.values():
        for layer in model.layers:
            if isinstance(layer, layers.BatchNormalization):
                gamma, beta, mean, var = layer.get_weights()
                n = gamma.shape[0]
                layer.set_weights([rng.uniform(0.5, 1.5, n).astype(np.float32),
                                   rng.normal(0, 0.1, n).astype(np.float32),
                                   rng.normal(0, 0.1, n).astype(np.float32),
                                   rng.uniform(0.5, 1.5, n).astype(np.float32)])
            elif layer.weights and not isinstance(layer, layers.BatchNormalization):
                # Keras initialises biases to zero, which tf2onnx could fold away.
                layer.set_weights([w if w.ndim > 1 else rng.normal(0, 0.1, w.shape).astype(np.float32)
                                   for w in layer.get_weights()])
    return models


KERAS_OPSETS = {"keras_sequential": 13, "keras_resnet": 13, "keras_mobilenet": 15, "keras_densenet": 17}


def build_keras(out_dir: Path, only: set[str] | None) -> dict:
    """Export the Keras models with tf2onnx (inference graph, batch symbolic)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import onnx
    import tensorflow as tf
    import tf2onnx

    # Grappler and tf2onnx's optimiser otherwise vary between runs (generated constant names,
    # and once in a while whether Flatten's Shape chain is folded away).
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.experimental.enable_op_determinism()
    versions = {"tensorflow": tf.__version__, "keras": keras.__version__, "tf2onnx": tf2onnx.__version__}
    for name, model in _keras_models().items():
        if only and name not in only:
            continue
        spec = (tf.TensorSpec((None, *KERAS_INPUT), tf.float32, name="input"),)
        # from_keras trips over Keras 3 tensor names; tracing the call is what it does internally.
        function = tf.function(lambda x, model=model: model(x, training=False))
        proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=KERAS_OPSETS[name])
        proto = canonical_names(proto)
        onnx.save(proto, str(out_dir / f"{name}.onnx"))
        print(f"{name}: {len(proto.graph.node)} nodes, opset {KERAS_OPSETS[name]}")
    return versions


def canonical_names(model):
    """Renumber the ``__N`` counters tf2onnx appends to generated names in order of first use.

    tf2onnx numbers the names it makes (``const_fold_opt__57``, ``Transpose__46:0``,
    ``unk__58``) from a global counter whose order varies between runs; renumbering makes
    the files byte-reproducible without changing the graph.
    """
    import re

    pattern = re.compile(r"__(\d+)(?=(:\d+)?$)")
    mapping: dict[str, str] = {}
    # A constant tf2onnx made and deduplicated keeps the name of whichever user it met first
    # (const_axes__13 or const_starts__13, pw0_.../Relu6_min__178 or dw1_...): call them const__N.
    generated = {t.name for t in model.graph.initializer if pattern.search(t.name)}

    def rename(name: str) -> str:
        if not pattern.search(name):
            return name
        if name not in mapping:
            mapping[name] = pattern.sub(f"__{len(mapping)}", "const__0" if name in generated else name)
        return mapping[name]

    graph = model.graph
    for value in [*graph.input, *graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = rename(dim.dim_param)
    for value in graph.input:
        value.name = rename(value.name)
    for node in graph.node:
        node.name = rename(node.name)
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for value in [*graph.output, *graph.value_info]:
        value.name = rename(value.name)
    for init in graph.initializer:
        init.name = rename(init.name)
    # Initializers in order of first use, not in the optimiser's order.
    order = {name: i for i, name in enumerate(n for node in graph.node for n in node.input)}
    inits = sorted(graph.initializer, key=lambda t: order.get(t.name, len(order)))
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.value_info[:]
    graph.doc_string = ""
    return model


# =========================================================================== PyTorch + onnx.helper


def _torch_models() -> dict:
    import torch
    from torch import nn

    class Legacy(nn.Module):
        """An old-style CNN: fixed batch 1, view(1, -1) head (what opset-9 era exports did)."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(16)
            self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
            self.fc = nn.Linear(16 * 4 * 4, 10)

        def forward(self, x):
            x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
            x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
            x = torch.relu(self.conv3(x))
            return self.fc(x.view(1, -1))

    class BnAfterRelu(nn.Module):
        """Conv -> ReLU -> BatchNorm (the BN cannot fold into the Conv), residual Add, dynamic view."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(12)
            self.conv2 = nn.Conv2d(12, 12, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(12)
            self.conv3 = nn.Conv2d(12, 16, 3, stride=2, padding=1)
            self.bn3 = nn.BatchNorm2d(16)
            self.fc = nn.Linear(16 * 8 * 8, 10)

        def forward(self, x):
            x = self.bn1(torch.relu(self.conv1(x)))
            x = x + self.bn2(torch.relu(self.conv2(x)))
            x = self.bn3(torch.relu(self.conv3(x)))
            return self.fc(x.view(x.size(0), -1))

    class Dynamo(nn.Module):
        """A small modern CNN: SiLU, grouped Conv, Concat, adaptive pool head."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.SiLU())
            self.grouped = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32),
                                         nn.SiLU())
            self.branch = nn.Sequential(nn.Conv2d(32, 16, 1), nn.ReLU())
            self.mix = nn.Sequential(nn.Conv2d(48, 48, 3, stride=2, padding=1), nn.ReLU())
            self.fc = nn.Linear(48, 10)

        def forward(self, x):
            x = self.grouped(self.stem(x))
            x = torch.cat([x, self.branch(x)], dim=1)
            x = torch.nn.functional.adaptive_avg_pool2d(self.mix(x), 1).flatten(1)
            return self.fc(x)

    class ViewHead(nn.Module):
        """A small MNIST CNN flattened with x.view(x.size(0), -1) (issue 14)."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3)
            self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.fc = nn.Linear(16 * 7 * 7, 10)

        def forward(self, x):
            x = torch.relu(self.conv2(torch.max_pool2d(torch.relu(self.conv1(x)), 2, ceil_mode=True)))
            return self.fc(x.view(x.size(0), -1))

    gen = torch.Generator().manual_seed(SEED)
    models = {"legacy": Legacy(), "bn_after_relu": BnAfterRelu(), "dynamo": Dynamo(), "view_head": ViewHead()}
    for model in models.values():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.data = torch.rand(n, generator=gen) + 0.5
                module.bias.data = torch.randn(n, generator=gen) * 0.1
                module.running_mean = torch.randn(n, generator=gen) * 0.1
                module.running_var = torch.rand(n, generator=gen) + 0.5
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.data = torch.randn(module.weight.shape, generator=gen) * (
                    2.0 / module.weight[0].numel()) ** 0.5
                if module.bias is not None:
                    module.bias.data = torch.randn(module.bias.shape, generator=gen) * 0.1
        model.eval()
    return models


def build_torch(out_dir: Path, only: set[str] | None) -> dict:
    import warnings

    import onnx
    import torch
    from onnx import version_converter

    models = _torch_models()
    want = lambda name: not only or name in only  # noqa: E731

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if want("torch_legacy_opset9") or want("torch_opset8"):
            path = out_dir / "torch_legacy_opset9.onnx"
            torch.onnx.export(models["legacy"], (torch.randn(1, *TORCH_INPUT),), str(path), dynamo=False,
                              opset_version=9, input_names=["input"], output_names=["logits"],
                              training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True)
            if want("torch_opset8"):
                legacy = onnx.load(str(path))
                converted = _float_constants(version_converter.convert_version(legacy, 8))
                converted.ir_version = min(converted.ir_version, 4)  # what opset-8 era tools wrote
                onnx.checker.check_model(converted, full_check=True)
                onnx.save(converted, str(out_dir / "torch_opset8.onnx"))
            if not want("torch_legacy_opset9"):
                path.unlink()
        if want("torch_symbolic_bn_after_relu"):
            torch.onnx.export(models["bn_after_relu"], (torch.randn(2, *TORCH_INPUT),),
                              str(out_dir / "torch_symbolic_bn_after_relu.onnx"), dynamo=False, opset_version=13,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True)
        if want("torch_dynamo_opset18"):
            _export_dynamo(models["dynamo"], out_dir / "torch_dynamo_opset18.onnx")
        if want("torch_dynamo_view_opset20"):
            _export_dynamo(models["view_head"], out_dir / "torch_dynamo_view_opset20.onnx", opset=20,
                           sample=(1, 28, 28), optimize=False)
    if want("paddle_se_opset11"):
        onnx.save(paddle_se_graph(), str(out_dir / "paddle_se_opset11.onnx"))
    if want("cntk_opset8_bias_add"):
        onnx.save(cntk_bias_add_graph(), str(out_dir / "cntk_opset8_bias_add.onnx"))
    if want("paddle_dynamic_hw_opset11"):
        onnx.save(paddle_dynamic_hw_graph(), str(out_dir / "paddle_dynamic_hw_opset11.onnx"))
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__}


def _float_constants(model):
    """Finish onnx.version_converter's opset 9 -> 8 Constant adapter.

    Constant-1 holds floating-point tensors only, so the adapter rewrites an int64 Constant as
    a float Constant followed by a Cast back to int64, but leaves the tensor's data type at
    int64, which the full checker rejects; store the values as float32 as intended.
    """
    from onnx import numpy_helper

    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        value = numpy_helper.to_array(node.attribute[0].t)
        users = [n for n in model.graph.node if node.output[0] in n.input]
        if value.dtype.kind in "iu" and users and all(n.op_type == "Cast" for n in users):
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(value.astype(np.float32)))
    return model


def _export_dynamo(model, path: Path, opset: int = 18, sample: tuple[int, ...] = TORCH_INPUT,
                   optimize: bool = True) -> None:
    """torch.export-based exporter at ``opset``, dynamic batch, all initializers in ``<name>.data``.

    ``sample`` is one input without the batch axis, e.g. (C, H, W). ``optimize=False`` keeps
    the graph as the exporter translated it (onnxscript's optimiser folds a Reshape target
    built from Shape into a constant; older exporters and unoptimised exports do not).
    """
    import contextlib
    import io

    import torch

    x = torch.randn(2, *sample)
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=["input"],
                                    output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    verbose=False, optimize=optimize)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    program.save(str(path), external_data=True)
    assert data.exists(), f"the dynamo exporter wrote no {data.name}"


def paddle_se_graph():
    """A PP-LCNet/MobileNetV3-like graph with Paddle2ONNX's opset-11 patterns.

    What Paddle2ONNX's mappers write, node for node: conv2d + batch_norm as Conv without bias
    + BatchNormalization; hard_swish below opset 14 as ``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)``;
    the SE block as GlobalAveragePool (adaptive_avg_pool2d to 1) -> Conv -> Relu -> Conv ->
    HardSigmoid(slope 0.2, offset 0.5) -> Mul; dropout (upscale_in_train) as Identity;
    flatten(start_axis=1) as Reshape to Concat(Slice(Shape(x), 0:1), [-1]); nn.Linear as
    MatMul with a [in, out] weight + Add. Helper constants are Constant nodes, parameters are
    initializers named like ``conv2d_0.w_0`` / ``batch_norm_0.w_1`` / ``linear_0.b_0``.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(SEED)
    nodes, inits = [], []
    counters: dict[str, int] = {}

    def uid(kind: str) -> int:
        counters[kind] = counters.get(kind, -1) + 1
        return counters[kind]

    def param(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def constant(value) -> str:
        name = f"p2o.helper.constant.{uid('constant')}"
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value))))
        return name

    def op(kind: str, inputs: list[str], **attrs) -> str:
        i = uid(kind)
        out = f"p2o.{kind}.{i}"
        nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    def conv(x: str, c_in: int, c_out: int, k: int, stride: int = 1, group: int = 1, bias: bool = False) -> str:
        i = uid("conv2d")
        w = param(f"conv2d_{i}.w_0", rng.normal(0, (2.0 / (c_in // group * k * k)) ** 0.5,
                                                   (c_out, c_in // group, k, k)))
        ins = [x, w] + ([param(f"conv2d_{i}.b_0", rng.normal(0, 0.1, c_out))] if bias else [])
        return op("Conv", ins, dilations=[1, 1], group=group, kernel_shape=[k, k], pads=[k // 2] * 4,
                  strides=[stride, stride])

    def bn(x: str, c: int) -> str:
        i = uid("batch_norm")
        params = [param(f"batch_norm_{i}.w_0", rng.uniform(0.5, 1.5, c)),
                  param(f"batch_norm_{i}.b_0", rng.normal(0, 0.1, c)),
                  param(f"batch_norm_{i}.w_1", rng.normal(0, 0.1, c)),
                  param(f"batch_norm_{i}.w_2", rng.uniform(0.5, 1.5, c))]
        return op("BatchNormalization", [x] + params, epsilon=1e-5, momentum=0.9)

    def hard_swish(x: str) -> str:
        shifted = op("Add", [x, constant(np.float32(3.0))])
        clipped = op("Clip", [shifted, constant(np.float32(0.0)), constant(np.float32(6.0))])
        return op("Div", [op("Mul", [x, clipped]), constant(np.float32(6.0))])

    def se(x: str, c: int) -> str:
        squeezed = op("GlobalAveragePool", [x])
        hidden = op("Relu", [conv(squeezed, c, c // 4, 1, bias=True)])
        gate = op("HardSigmoid", [conv(hidden, c // 4, c, 1, bias=True)], alpha=0.2, beta=0.5)
        return op("Mul", [x, gate])

    def dw_sep(x: str, c_in: int, c_out: int, stride: int, use_se: bool) -> str:
        x = hard_swish(bn(conv(x, c_in, c_in, 3, stride, group=c_in), c_in))
        if use_se:
            x = se(x, c_in)
        return hard_swish(bn(conv(x, c_in, c_out, 1), c_out))

    x = hard_swish(bn(conv("x", 3, 16, 3, 2), 16))
    x = dw_sep(x, 16, 24, 1, False)
    x = dw_sep(x, 24, 32, 2, True)
    x = dw_sep(x, 32, 32, 1, True)
    x = op("GlobalAveragePool", [x])
    x = hard_swish(conv(x, 32, 64, 1, bias=False))  # PP-LCNet's last_conv after the pool
    x = op("Identity", [x])  # dropout, upscale_in_train
    batch = op("Slice", [op("Shape", [x]), constant(np.array([0], np.int64)), constant(np.array([1], np.int64)),
                         constant(np.array([0], np.int64))])
    x = op("Reshape", [x, op("Concat", [batch, constant(np.array([-1], np.int64))], axis=0)])
    i = uid("linear")
    x = op("MatMul", [x, param(f"linear_{i}.w_0", rng.normal(0, 0.1, (64, 10)))])
    op("Add", [x, param(f"linear_{i}.b_0", rng.normal(0, 0.1, 10))])
    nodes[-1].output[0] = "save_infer_model/scale_0.tmp_0"
    graph = helper.make_graph(
        nodes, "paddle-infer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["-1", 3, 32, 32])],
        [helper.make_tensor_value_info("save_infer_model/scale_0.tmp_0", TensorProto.FLOAT, ["-1", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], producer_name="PaddlePaddle")
    model.ir_version = 6
    onnx.checker.check_model(model, full_check=True)
    return model


# =========================================================================== issue 14: shapes


class _HelperGraph:
    """Nodes and initializers for the onnx.helper fixtures, with random weights from one seed."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []

    def param(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, kind: str, inputs: list[str], name: str, **attrs) -> str:
        from onnx import helper

        out = f"{name}_Output_0"
        self.nodes.append(helper.make_node(kind, inputs, [out], name=name, **attrs))
        return out


def cntk_bias_add_graph():
    """A CNTK 2.5-style MNIST CNN at opset 8 whose tensors ONNX's shape inference cannot shape.

    CNTK writes a Convolution's bias as a separate ``Plus`` node adding a [C, 1, 1] parameter
    (``Parameter6``), names nodes ``Convolution28`` / ``Plus30`` / ``ReLU32`` / ``Pooling66``
    and outputs ``<node>_Output_0``, and Dense as ``Times`` (MatMul) + ``Plus``. The flat
    [N, 784] input is reshaped to [N, 1, 28, 28] by a shape computed at run time (Shape ->
    Gather -> Unsqueeze -> Concat with [1, 28, 28]): ONNX has no data propagation for these
    opset-8 operators, so every tensor after the Reshape has unknown rank in ONNX's inference,
    while ONNX Runtime's symbolic inference shapes them all.
    """
    import onnx
    from onnx import TensorProto, helper

    g = _HelperGraph(SEED + 14)
    rng = g.rng
    shape = g.op("Shape", ["Input3"], "Shape1")
    batch = g.op("Gather", [shape, g.param("Constant2", np.array(0, np.int64))], "Gather3", axis=0)
    batch = g.op("Unsqueeze", [batch], "Unsqueeze4", axes=[0])
    target = g.op("Concat", [batch, g.param("Constant5", np.array([1, 28, 28], np.int64))], "Concat6", axis=0)
    x = g.op("Reshape", ["Input3", target], "Reshape7")
    counter = 28
    for c_in, c_out in ((1, 8), (8, 16)):
        w = g.param(f"Parameter{counter - 23}", rng.normal(0, (2.0 / (c_in * 25)) ** 0.5, (c_out, c_in, 5, 5))
                    .astype(np.float32))
        x = g.op("Conv", [x, w], f"Convolution{counter}", kernel_shape=[5, 5], strides=[1, 1],
                 auto_pad="SAME_UPPER", group=1, dilations=[1, 1])
        bias = g.param(f"Parameter{counter - 22}", rng.normal(0, 0.1, (c_out, 1, 1)).astype(np.float32))
        x = g.op("Add", [x, bias], f"Plus{counter + 2}")
        x = g.op("Relu", [x], f"ReLU{counter + 4}")
        x = g.op("MaxPool", [x], f"Pooling{counter + 38}", kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0])
        counter += 82
    x = g.op("Reshape", [x, g.param("Pooling160_Output_0_reshape0_shape", np.array([-1, 16 * 7 * 7], np.int64))],
             "Times212_reshape0")
    x = g.op("MatMul", [x, g.param("Parameter193", rng.normal(0, 0.05, (16 * 7 * 7, 10)).astype(np.float32))],
             "Times212")
    g.op("Add", [x, g.param("Parameter194", rng.normal(0, 0.1, 10).astype(np.float32))], "Plus214")
    graph = helper.make_graph(
        g.nodes, "CNTKGraph",
        [helper.make_tensor_value_info("Input3", TensorProto.FLOAT, ["N", 28 * 28])],
        [helper.make_tensor_value_info("Plus214_Output_0", TensorProto.FLOAT, ["N", 10])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], producer_name="CNTK",
                              producer_version="2.5.1")
    model.ir_version = 4
    onnx.checker.check_model(model, full_check=True)
    return model


def paddle_dynamic_hw_graph():
    """A PaddleOCR text-direction classifier (PP-LCNet-like) as Paddle2ONNX writes it at opset 11,
    with every dimension but the channels dynamic.

    The input ``x`` is [N, 3, H, W]: the batch as ``dim_value -1`` (what the Python
    Paddle2ONNX wrote for an unknown dim; the checker accepts it) and height and width as
    dim_params; it is fed 48 x 192 text lines. Conv + BatchNormalization, hard_swish as
    ``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)``, a depthwise separable block, GlobalAveragePool,
    flatten as Reshape to Concat(Slice(Shape(x), 0:1), [-1]), MatMul + Add, Softmax.
    """
    import onnx
    from onnx import TensorProto, helper

    g = _HelperGraph(SEED + 11)
    rng = g.rng
    count = {"conv2d": 0, "batch_norm": 0, "tmp": 0}

    def op(kind: str, inputs: list[str], **attrs) -> str:
        count["tmp"] += 1
        return g.op(kind, inputs, f"p2o.{kind}.{count['tmp']}", **attrs)

    def conv_bn(x: str, c_in: int, c_out: int, k: int, stride: int, group: int = 1) -> str:
        i = count["conv2d"]
        count["conv2d"] += 1
        w = g.param(f"conv2d_{i}.w_0", rng.normal(0, (2.0 / (c_in // group * k * k)) ** 0.5,
                                                    (c_out, c_in // group, k, k)).astype(np.float32))
        x = op("Conv", [x, w], dilations=[1, 1], group=group, kernel_shape=[k, k], pads=[k // 2] * 4,
               strides=[stride, stride])
        j = count["batch_norm"]
        count["batch_norm"] += 1
        params = [g.param(f"batch_norm_{j}.w_0", rng.uniform(0.5, 1.5, c_out).astype(np.float32)),
                  g.param(f"batch_norm_{j}.b_0", rng.normal(0, 0.1, c_out).astype(np.float32)),
                  g.param(f"batch_norm_{j}.w_1", rng.normal(0, 0.1, c_out).astype(np.float32)),
                  g.param(f"batch_norm_{j}.w_2", rng.uniform(0.5, 1.5, c_out).astype(np.float32))]
        return op("BatchNormalization", [x] + params, epsilon=1e-5, momentum=0.9)

    def number(value: float) -> str:
        return g.param(f"p2o.helper.constant.{len(g.inits)}", np.array(value, np.float32))

    def hard_swish(x: str) -> str:
        clipped = op("Clip", [op("Add", [x, number(3.0)]), number(0.0), number(6.0)])
        return op("Div", [op("Mul", [x, clipped]), number(6.0)])

    x = hard_swish(conv_bn("x", 3, 8, 3, 2))
    x = hard_swish(conv_bn(x, 8, 8, 3, 1, group=8))
    x = hard_swish(conv_bn(x, 8, 16, 1, 1))
    x = hard_swish(conv_bn(x, 16, 16, 3, 2, group=16))
    x = hard_swish(conv_bn(x, 16, 32, 1, 1))
    x = op("GlobalAveragePool", [x])
    batch = op("Slice", [op("Shape", [x]), g.param("p2o.slice.starts", np.array([0], np.int64)),
                         g.param("p2o.slice.ends", np.array([1], np.int64)),
                         g.param("p2o.slice.axes", np.array([0], np.int64))])
    x = op("Reshape", [x, op("Concat", [batch, g.param("p2o.flatten.rest", np.array([-1], np.int64))], axis=0)])
    x = op("MatMul", [x, g.param("linear_0.w_0", rng.normal(0, 0.2, (32, 2)).astype(np.float32))])
    x = op("Add", [x, g.param("linear_0.b_0", rng.normal(0, 0.1, 2).astype(np.float32))])
    g.nodes.append(helper.make_node("Softmax", [x], ["softmax_0.tmp_0"], name="p2o.Softmax.0", axis=1))
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "h", "w"])
    graph = helper.make_graph(g.nodes, "paddle-infer", [value],
                              [helper.make_tensor_value_info("softmax_0.tmp_0", TensorProto.FLOAT, [-1, 2])],
                              g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], producer_name="PaddlePaddle")
    model.ir_version = 6
    onnx.checker.check_model(model, full_check=True)
    return model


# =========================================================================== driver


def _check_sizes(out_dir: Path) -> None:
    total = 0
    for path in sorted(out_dir.glob("*.onnx*")):
        size = path.stat().st_size
        total += size
        if size > MAX_FILE_BYTES:
            raise SystemExit(f"{path.name} is {size} bytes, over the {MAX_FILE_BYTES} byte budget")
    if total > MAX_TOTAL_BYTES:
        raise SystemExit(f"the fixtures take {total} bytes, over the {MAX_TOTAL_BYTES} byte budget")
    print(f"fixtures: {total} bytes in total")


README_HEAD = """# Exporter fixtures

Small ONNX models as other exporters write them (issues 7 and 14), used by tests/test_exporter_fixtures.py.
Weights are random (fixed seeds); BatchNormalization statistics are random too, so a wrong slice
shows in the outputs. Regenerate with

    python -m venv /work/tfvenv && /work/tfvenv/bin/pip install tensorflow-cpu tf2onnx
    python tools/make_exporter_fixtures.py --tf-python /work/tfvenv/bin/python

TensorFlow and tf2onnx live only in that separate environment; the project never imports them.
This file and VERSIONS.json are written by the script.

| file | builder | what it exercises |
|---|---|---|
"""

README_NOTES = """
Notes on what the exporters actually wrote:

- tf2onnx folds a BatchNormalization that directly follows a Conv into the Conv's weights; a
  Keras 3 BatchNormalization anywhere else (after ReLU6, after a Concat) arrives as per-channel
  `Mul` + `Add` constants of shape [1, C, 1, 1], not as a BatchNormalization node. The
  PyTorch fixture `torch_symbolic_bn_after_relu` keeps real BatchNormalization nodes after ReLU.
- tf2onnx writes Keras' Flatten with a symbolic batch as Shape (of the NCHW tensor) -> Gather
  (NHWC order) -> Cast(int32) -> Slice[0:1] -> Concat with the constant H*W*C -> Cast(int64)
  -> Reshape, after a Transpose back to NHWC; Dense is MatMul + Add.
- The PaddlePaddle fixture is written with onnx.helper, following Paddle2ONNX's mappers at
  opset 11 (hard_swish, hard_sigmoid, dropout, flatten_contiguous_range, matmul_v2), its
  Constant-node helper constants, Paddle's parameter names and a `-1` batch (a dim_param).
- `torch_opset8` is `torch_legacy_opset9` passed through `onnx.version_converter`, with IR
  version 4. Constant-1 holds floats only, so the converter writes the Reshape target as a
  float Constant and a Cast to int64; it forgets to change the tensor's type, which the script
  does (the full checker rejects an int64 Constant at opset 8).
- `torch_dynamo_opset18.onnx` keeps every initializer in `torch_dynamo_opset18.onnx.data`.

Issue 14, shapes that ONNX's own inference does not give (each is pruned, not only accepted):

- `cntk_opset8_bias_add` is written with onnx.helper after CNTK 2.5's MNIST export: a bias as a
  `Plus` node adding a [C, 1, 1] parameter, `<node>_Output_0` names, and a flat [N, 784] input
  reshaped to [N, 1, 28, 28] by Shape -> Gather -> Unsqueeze -> Concat. ONNX has no data
  propagation for these opset-8 operators, so its inference leaves every later tensor of
  unknown rank ("Add 'Plus30' has inputs of unknown rank"); ONNX Runtime's symbolic shape
  inference gives them all.
- `torch_dynamo_view_opset20` is exported with `optimize=False`: onnxscript's optimiser would
  fold the target of `x.view(x.size(0), -1)` into a constant; unoptimised (and with older
  exporters) it is Shape(start 0, end 1) -> Squeeze -> Reshape -> Concat with [-1], read by a
  Reshape `node_view` with allowzero=1. Symbolic inference gives its output [batch, 784].
- `paddle_dynamic_hw_opset11` declares its input [-1, 3, h, w] with the batch as dim_value -1;
  calibrated from an [8, 3, 48, 192] array it crashed with a negative number of batches.
"""


def _write_readme(out_dir: Path, versions: dict) -> None:
    rows = []
    for name, (kind, text) in FIXTURE_INFO.items():
        files = ", ".join(f"`{p.name}`" for p in sorted(out_dir.glob(f"{name}.onnx*")))
        builder = {"keras": "Keras + tf2onnx", "torch": "torch.onnx.export", "helper": "onnx.helper"}[kind]
        rows.append(f"| {files} | {builder} | {text} |")
    table = "\n".join(f"| {k} | {v} |" for k, v in versions.items())
    text = (README_HEAD + "\n".join(rows) + "\n" + README_NOTES
            + "\nTool versions used:\n\n| tool | version |\n|---|---|\n" + table + "\n")
    (out_dir / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIXTURES)
    parser.add_argument("--only", nargs="*", choices=sorted(FIXTURE_INFO), help="build only these fixtures")
    parser.add_argument("--tf-python", type=Path, help="interpreter with tensorflow-cpu and tf2onnx (Keras fixtures)")
    parser.add_argument("--keras", action="store_true", help=argparse.SUPPRESS)  # the re-run inside the TF venv
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    only = set(args.only) if args.only else None
    if args.keras:
        (args.out / ".keras_versions.json").write_text(json.dumps(build_keras(args.out, only)))
        return 0
    versions_path = args.out / "VERSIONS.json"
    versions = json.loads(versions_path.read_text()) if versions_path.exists() else {}
    keras_wanted = [n for n, (kind, _) in FIXTURE_INFO.items() if kind == "keras" and (not only or n in only)]
    if keras_wanted:
        if args.tf_python is None:
            raise SystemExit("the Keras fixtures need --tf-python (an interpreter with tensorflow-cpu and tf2onnx)")
        command = [str(args.tf_python), __file__, "--keras", "--out", str(args.out), "--only", *keras_wanted]
        subprocess.run(command, check=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        keras_versions = args.out / ".keras_versions.json"
        versions.update(json.loads(keras_versions.read_text()))
        keras_versions.unlink()
        versions["python (tf venv)"] = subprocess.run(
            [str(args.tf_python), "-c", "import platform; print(platform.python_version())"],
            check=True, capture_output=True, text=True).stdout.strip()
    if any(FIXTURE_INFO[n][0] != "keras" for n in (only or FIXTURE_INFO)):
        versions.update(build_torch(args.out, only))
        import platform

        versions["python"] = platform.python_version()
    versions = dict(sorted(versions.items()))
    versions_path.write_text(json.dumps(versions, indent=1) + "\n")
    _write_readme(args.out, versions)
    _check_sizes(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
