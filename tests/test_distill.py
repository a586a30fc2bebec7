"""ONNX -> PyTorch converter, write-back and the knowledge-distillation loop."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_ocnna.distill import OnnxModule, check_agreement, distill, write_back
from onnx_ocnna.distill.augment import augment as _augment
from onnx_ocnna.errors import InputError, OcnnaError, ValidationError

RNG = np.random.default_rng(0)


@dataclass
class Batch:
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_matches_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], atol: float = 1e-5) -> None:
    expected = ort_run(model, feeds)
    actual = OnnxModule(model).eval().run(feeds)
    assert len(actual) == len(expected)
    for ref, got in zip(expected, actual):
        assert got.shape == ref.shape
        assert got.dtype == ref.dtype
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=atol)


# ---------------------------------------------------------------------------------------
# Hand-built graphs: operator forms the torch exporters never emit


def graph_model(nodes, inputs, initializers=(), outputs=("y",), opset=13) -> onnx.ModelProto:
    """inputs: {name: shape}; every output is declared as a float tensor of unknown shape."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(initializers).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


X4 = {"x": [2, 4, 9, 9]}
CASES = {
    "clip-attr-opset6": (
        [helper.make_node("Clip", ["x"], ["y"], min=-0.5, max=0.7)], X4, {}, 6),
    "clip-inputs-min-only": (
        [helper.make_node("Clip", ["x", "lo"], ["y"])], X4, {"lo": np.float32(-0.3)}, 13),
    "pad-attr-opset2-reflect": (
        [helper.make_node("Pad", ["x"], ["y"], pads=[0, 0, 1, 2, 0, 0, 2, 1], mode="reflect")], X4, {}, 2),
    "pad-input-constant-channel-axis": (
        [helper.make_node("Pad", ["x", "p", "v"], ["y"])], X4,
        {"p": i64(0, 2, 0, 0, 0, 3, 0, 0), "v": np.float32(0.5)}, 13),
    "pad-axes-opset18-edge": (
        [helper.make_node("Pad", ["x", "p", "", "ax"], ["y"], mode="edge")], X4,
        {"p": i64(1, 0, 2, 3), "ax": i64(2, 3)}, 18),
    "split-attr-squeeze-unsqueeze-opset11": (
        [helper.make_node("Split", ["x"], ["a", "b"], axis=1, split=[1, 3]),
         helper.make_node("Squeeze", ["a"], ["s"], axes=[1]),
         helper.make_node("Unsqueeze", ["s"], ["u"], axes=[0, 4]),
         helper.make_node("ReduceMean", ["b"], ["m"], axes=[1], keepdims=1),
         helper.make_node("Mul", ["m", "b"], ["y"])], X4, {}, 11, ("y", "u")),
    "split-num-outputs-reducemean-input-opset18": (
        [helper.make_node("Split", ["x"], ["a", "b", "c"], axis=2, num_outputs=3),
         helper.make_node("ReduceMean", ["b", "ax"], ["m"], keepdims=0),
         helper.make_node("Concat", ["a", "c"], ["y"], axis=3)], X4, {"ax": i64(1, 3)}, 18, ("y", "m")),
    "conv-same-upper-stride2": (  # ORT rejects dilations with SAME_*
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])],
        X4, {"w": f32(6, 4, 3, 2), "b": f32(6)}, 13),
    "conv-same-lower-odd-kernel": (
        [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_LOWER", strides=[1, 2])], X4,
        {"w": f32(3, 4, 2, 4)}, 13),
    "conv-valid-grouped-dilated": (
        [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="VALID", group=2, dilations=[2, 1])], X4,
        {"w": f32(6, 2, 3, 3)}, 13),
    "conv-asymmetric-pads-depthwise": (
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[0, 1, 2, 0], group=4)], X4, {"w": f32(4, 1, 3, 3)}, 13),
    "convtranspose-output-padding": (
        [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 0, 1, 1],
                          output_padding=[1, 1])], X4, {"w": f32(4, 3, 3, 3), "b": f32(3)}, 13),
    "convtranspose-same-upper-grouped": (
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], auto_pad="SAME_UPPER", group=2)],
        X4, {"w": f32(4, 2, 3, 3)}, 13),
    "maxpool-ceil-asymmetric": (
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0],
                          ceil_mode=1)], X4, {}, 13),
    "avgpool-exclude-pad-asymmetric": (
        [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 2, 1])],
        X4, {}, 13),
    "avgpool-include-pad-ceil": (
        [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                          count_include_pad=1, ceil_mode=1)], X4, {}, 13),
    "globalpools-flatten-gemm-trans": (
        [helper.make_node("GlobalMaxPool", ["x"], ["g"]),
         helper.make_node("Flatten", ["g"], ["f"], axis=1),
         helper.make_node("Gemm", ["w", "f"], ["t"], transA=1, transB=1, alpha=0.5),
         helper.make_node("Gemm", ["t", "w2", "c"], ["y"], transA=1, beta=2.0)],
        X4, {"w": f32(4, 5), "w2": f32(5, 3), "c": f32(1, 3)}, 13),
    "reshape-zero-minus-one-transpose": (
        [helper.make_node("Reshape", ["x", "s"], ["r"]),
         helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 1])], X4, {"s": i64(0, -1, 9)}, 13),
    "slice-negative-step-and-clamped": (
        [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["y"])], X4,
        {"st": i64(-1, 1), "en": i64(-100, 2**62), "ax": i64(3, 1), "sp": i64(-2, 2)}, 13),
    "slice-attr-opset9": (
        [helper.make_node("Slice", ["x"], ["y"], starts=[1, 0], ends=[3, -1], axes=[2, 3])], X4, {}, 9),
    "softmax-opset11-coerced-2d": (
        [helper.make_node("Softmax", ["x"], ["y"], axis=1)], X4, {}, 11),
    "activations": (
        [helper.make_node("LeakyRelu", ["x"], ["a"], alpha=0.2),
         helper.make_node("PRelu", ["a", "slope"], ["b"]),
         helper.make_node("HardSigmoid", ["b"], ["c"], alpha=0.3, beta=0.4),
         helper.make_node("HardSwish", ["x"], ["d"]),
         helper.make_node("Tanh", ["d"], ["e"]),
         helper.make_node("Sigmoid", ["e"], ["f"]),
         helper.make_node("Add", ["c", "f"], ["g"]),
         helper.make_node("Sub", ["g", "x"], ["h"]),
         helper.make_node("Abs", ["h"], ["i"]),
         helper.make_node("Sqrt", ["i"], ["j"]),
         helper.make_node("Pow", ["j", "e2"], ["k"]),
         helper.make_node("Div", ["k", "c"], ["y"])],
        X4, {"slope": f32(4, 1, 1), "e2": np.float32(1.5)}, 14),
    "dynamic-shape-subgraph": (
        [helper.make_node("Shape", ["x"], ["sh"]),
         helper.make_node("Gather", ["sh", "zero"], ["n"], axis=0),
         helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
         helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
         helper.make_node("Reshape", ["x", "shape"], ["flat"]),
         helper.make_node("ConstantOfShape", ["n1"], ["ones"],
                          value=numpy_helper.from_array(np.array([2.0], np.float32))),
         helper.make_node("Unsqueeze", ["ones", "one1"], ["col"]),
         helper.make_node("Expand", ["col", "shape2"], ["wide"]),
         helper.make_node("Mul", ["flat", "wide"], ["y"])],
        X4, {"zero": np.array(0, np.int64), "zero1": i64(0), "minus1": i64(-1), "one1": i64(1),
             "shape2": i64(1, 324)}, 13),
    "range-cast-where-equal": (
        [helper.make_node("Shape", ["x"], ["sh"]),
         helper.make_node("Gather", ["sh", "three"], ["w"]),
         helper.make_node("Range", ["zero", "w", "one"], ["r"]),
         helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
         helper.make_node("Equal", ["r", "two"], ["mask"]),
         helper.make_node("Where", ["mask", "x", "rf"], ["y"])],
        X4, {"three": np.array(3, np.int64), "zero": np.array(0, np.int64), "one": np.array(1, np.int64),
             "two": np.array(2, np.int64)}, 13),
    "resize-nearest-asymmetric-floor": (
        [helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="nearest", coordinate_transformation_mode="asymmetric",
                          nearest_mode="floor")], X4, {"sc": np.array([1, 1, 2, 2], np.float32)}, 13),
    "resize-linear-half-pixel-sizes": (
        [helper.make_node("Resize", ["x", "", "", "sz"], ["y"], mode="linear")], X4, {"sz": i64(2, 4, 13, 7)}, 13),
    "resize-linear-align-corners": (
        [helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="linear",
                          coordinate_transformation_mode="align_corners")],
        X4, {"sc": np.array([1, 1, 2, 1.5], np.float32)}, 13),
    "matmul-dropout-identity-constant": (
        [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(f32(9, 5))),
         helper.make_node("MatMul", ["x", "k"], ["m"]),
         helper.make_node("Dropout", ["m"], ["d"]),
         helper.make_node("Identity", ["d"], ["y"])], X4, {}, 13),
    "batchnorm-softmax-axis": (
        [helper.make_node("BatchNormalization", ["x", "s", "b", "mu", "var"], ["bn"], epsilon=1e-3),
         helper.make_node("Softmax", ["bn"], ["y"], axis=1)],
        X4, {"s": f32(4), "b": f32(4), "mu": f32(4), "var": np.abs(f32(4)) + 0.1}, 13),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_handcrafted_graph_matches_ort(case: str) -> None:
    nodes, inputs, inits, opset, *outs = CASES[case]
    model = graph_model(nodes, inputs, inits, outs[0] if outs else ("y",), opset)
    assert_matches_ort(model, {"x": f32(*inputs["x"])})


def test_dynamic_batch_shape_subgraph_with_other_batch() -> None:
    nodes, inputs, inits, opset = CASES["dynamic-shape-subgraph"]
    model = graph_model(nodes, {"x": ["N", 4, 9, 9]}, inits, ("y",), opset)
    module = OnnxModule(model)
    for n in (1, 5):
        x = f32(n, 4, 9, 9)
        np.testing.assert_allclose(module.run({"x": x})[0], ort_run(model, {"x": x})[0], rtol=1e-6)


def test_unknown_operator_names_it() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Hardmax", ["r"], ["y"], name="hm")]
    model = graph_model(nodes, X4)
    with pytest.raises(InputError, match="Hardmax") as info:
        OnnxModule(model)
    assert isinstance(info.value, OcnnaError)


def test_custom_domain_operator_is_rejected() -> None:
    node = helper.make_node("Foo", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    with pytest.raises(InputError, match="com.example:Foo"):
        OnnxModule(model)


# ---------------------------------------------------------------------------------------
# Graphs exported from torch by both exporters


class Zoo(torch.nn.Module):
    """Small net touching grouped/strided/dilated conv, BN, pools, concat, split, upsample, residuals."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16)
        self.bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(8, 8, 1)
        self.act = nn.Hardswish()
        self.prelu = nn.PReLU(16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.act(self.bn(self.dw(x))) + x
        a, b = torch.chunk(y, 2, dim=1)
        y = torch.cat([self.pw(a) * torch.sigmoid(b.mean((2, 3), keepdim=True)), torch.tanh(b)], dim=1)
        y = torch.nn.functional.leaky_relu(self.prelu(y), 0.1)
        y = torch.nn.functional.max_pool2d(y, 3, 2, 1, ceil_mode=True)
        y = torch.nn.functional.avg_pool2d(y, 2, 2)
        y = self.up(y)
        y = torch.nn.functional.interpolate(y, scale_factor=2, mode="nearest")
        y = torch.nn.functional.adaptive_avg_pool2d(y, 4)
        return torch.softmax(self.head(y.flatten(1)), dim=-1)


def _randomised_zoo() -> torch.nn.Module:
    torch.manual_seed(0)
    model = Zoo()
    for bn in (model.stem[1], model.bn):  # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def zoo_exports(tmp_path_factory) -> dict[str, onnx.ModelProto]:
    model, x = _randomised_zoo(), torch.randn(2, 3, 32, 32)
    out = {}
    path = tmp_path_factory.mktemp("zoo")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path / "ts.onnx"), dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["out"],
                          dynamic_axes={"input": {0: "N"}, "out": {0: "N"}},
                          training=torch.onnx.TrainingMode.PRESERVE)
        torch.onnx.export(model, (x,), str(path / "dynamo.onnx"), dynamo=True, opset_version=18,
                          input_names=["input"], output_names=["out"], verbose=False)
    for name in ("ts", "dynamo"):
        out[name] = onnx.load(str(path / f"{name}.onnx"), load_external_data=True)
        out[name].graph.ClearField("value_info")
    return out


@pytest.mark.parametrize("exporter", ["ts", "dynamo"])
def test_torch_exports_match_ort(zoo_exports, exporter: str) -> None:
    model = zoo_exports[exporter]
    x = RNG.standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert_matches_ort(model, {"input": x})
    # And the interpreter computes the same function as the torch model it came from.
    with torch.no_grad():
        ref = _randomised_zoo()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(OnnxModule(model).run({"input": x})[0], ref, rtol=1e-4, atol=1e-6)


def test_ts_export_dynamic_batch(zoo_exports) -> None:
    model = zoo_exports["ts"]
    x = RNG.standard_normal((5, 3, 32, 32)).astype(np.float32)
    assert_matches_ort(model, {"input": x})


# ---------------------------------------------------------------------------------------
# The embedded digits model


def batches_of(images, labels, index, batch=64, with_labels=True):
    index = np.asarray(index)

    def gen():
        for start in range(0, len(index), batch):
            part = index[start : start + batch]
            yield Batch({"input": images[part]}, labels[part] if with_labels else None)

    return gen


def test_digits_model_and_split(digits) -> None:
    model, split, images, labels = digits
    assert {n.op_type for n in model.graph.node} >= {"Conv", "BatchNormalization", "Relu", "MaxPool", "Gemm"}
    parts = [set(split[k]) for k in ("train", "calibration", "test")]
    assert sum(map(len, parts)) == len(images)
    assert len(parts[0] | parts[1] | parts[2]) == len(images)  # disjoint
    test = np.array(split["test"])
    logits = ort_run(model, {"input": images[test]})[0]
    assert (logits.argmax(1) == labels[test]).mean() > 0.95
    assert_matches_ort(model, {"input": images[test]}, atol=1e-4)


def test_batchnorm_uses_frozen_statistics_in_train_mode(digits) -> None:
    model, split, images, _ = digits
    module = OnnxModule(model)
    x = torch.from_numpy(images[:16])
    with torch.no_grad():
        train_out = module.train()(x)
        eval_out = module.eval()(x)
    torch.testing.assert_close(train_out, eval_out)
    names = set(module.param_names.values())
    assert "bn1.weight" in names and "conv2.weight" in names
    assert "bn1.running_mean" not in names and "bn1.running_mean" in module.buffer_names.values()


def test_write_back_round_trip(digits) -> None:
    model, split, images, _ = digits
    module = OnnxModule(model)
    with torch.no_grad():
        for p in module.params.values():
            p.mul_(1.1).add_(0.01 * torch.randn_like(p))
    new = write_back(module, model)
    # Same structure: nodes, inputs/outputs and initializer names, dtypes, shapes, order.
    assert [n.SerializeToString() for n in new.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert [(t.name, t.data_type, list(t.dims)) for t in new.graph.initializer] == [
        (t.name, t.data_type, list(t.dims)) for t in model.graph.initializer
    ]
    feeds = {"input": images[np.array(split["test"][:64])]}
    ort_out = ort_run(new, feeds)[0]
    torch_out = module.eval().run(feeds)[0]
    assert np.abs(ort_out - torch_out).max() < 1e-5
    assert np.abs(ort_out - ort_run(model, feeds)[0]).max() > 1e-2  # the values really changed
    assert check_agreement(new, module, feeds) < 1e-5
    # Running mean/var are buffers: untouched.
    old = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for t in new.graph.initializer:
        if "running" in t.name:
            np.testing.assert_array_equal(numpy_helper.to_array(t), old[t.name])


def test_check_agreement_detects_mismatch(digits) -> None:
    model, _, images, _ = digits
    module = OnnxModule(model)
    with torch.no_grad():
        module.params[next(k for k, v in module.param_names.items() if v == "fc.bias")].add_(1.0)
    with pytest.raises(ValidationError, match="differs"):
        check_agreement(model, module, {"input": images[:8]})


def _damaged_student(model: onnx.ModelProto, fraction: float) -> onnx.ModelProto:
    """The same graph with a fraction of conv2's and conv3's filters zeroed: a crude 'pruned' model."""
    student = onnx.ModelProto()
    student.CopyFrom(model)
    rng = np.random.default_rng(1)
    for init in student.graph.initializer:
        if init.name in ("conv2.weight", "conv3.weight"):
            w = numpy_helper.to_array(init).copy()
            w[rng.permutation(len(w))[: int(fraction * len(w))]] = 0
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    return student


def test_distillation_improves_agreement(digits) -> None:
    model, split, images, labels = digits
    student = _damaged_student(model, 0.5)
    distilled, report = distill(
        student, model, batches_of(images, labels, split["train"]), epochs=2, hflip=False,
        eval_batches=batches_of(images, labels, split["test"], batch=256), progress=False,
    )
    assert report.initial_agreement < 0.8
    assert report.epochs[-1].eval_agreement > report.initial_agreement + 0.15
    assert report.epochs[-1].eval_accuracy > report.initial_accuracy + 0.15
    assert report.teacher_accuracy > 0.95
    assert len(report.epochs) == 2 and all(e.seconds > 0 for e in report.epochs)
    assert report.check_max_diff < 1e-4
    # The written-back graph alone reproduces the reported held-out agreement in ONNX Runtime.
    test = np.array(split["test"])
    t_pred = ort_run(model, {"input": images[test]})[0].argmax(1)
    s_pred = ort_run(distilled, {"input": images[test]})[0].argmax(1)
    assert (s_pred == t_pred).mean() == pytest.approx(report.epochs[-1].eval_agreement)
    assert [n.op_type for n in distilled.graph.node] == [n.op_type for n in student.graph.node]


def test_distillation_without_labels_or_augmentation(digits) -> None:
    model, split, images, labels = digits
    student = _damaged_student(model, 0.4)
    distilled, report = distill(
        student, model, batches_of(images, labels, split["calibration"], with_labels=False), epochs=3,
        augment=False, eval_batches=batches_of(images, labels, split["test"], with_labels=False),
        progress=False, threads=1,
    )
    assert report.epochs[0].ce_loss is None and report.epochs[-1].eval_accuracy is None
    assert report.epochs[-1].eval_agreement > report.initial_agreement
    assert report.epochs[-1].loss < report.epochs[0].loss


def test_distill_rejects_bad_settings(digits) -> None:
    model, split, images, labels = digits
    with pytest.raises(InputError, match="epochs"):
        distill(model, model, batches_of(images, labels, split["train"]), epochs=0, progress=False)
    with pytest.raises(InputError, match="no batches"):
        distill(model, model, lambda: iter(()), progress=False)
    bad = np.full(len(labels), 12)
    with pytest.raises(InputError, match=r"0\.\.9 for a 10-class output, and the training data has label 12: .*--alpha 0"):
        distill(model, model, batches_of(images, bad, split["calibration"]), progress=False)


# ---------------------------------------------------------------------------------------
# Augmentation


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_augment_is_a_padded_translation(layout: str) -> None:
    x = torch.arange(4 * 3 * 32 * 32, dtype=torch.float32).reshape(4, 3, 32, 32) + 1
    inp = x if layout == "NCHW" else x.permute(0, 2, 3, 1).contiguous()
    out = _augment(inp, layout, torch.Generator().manual_seed(0), hflip=False)
    assert out.shape == inp.shape
    out = out if layout == "NCHW" else out.permute(0, 3, 1, 2)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(4):
        shifts = [(dy, dx) for dy in range(9) for dx in range(9)
                  if torch.equal(padded[i, :, dy : dy + 32, dx : dx + 32], out[i])]
        assert len(shifts) == 1
    assert not torch.equal(out, x)  # four random offsets are not all the centre


def test_augment_flip_and_passthrough() -> None:
    x = torch.randn(64, 1, 8, 8)
    out = _augment(x, None, torch.Generator().manual_seed(0), hflip=True)  # layout from the shape: NCHW
    assert out.shape == x.shape
    vec = torch.randn(5, 7)
    assert _augment(vec, None, torch.Generator(), hflip=True) is vec


def test_thread_chooser_keeps_the_faster_count() -> None:
    from onnx_ocnna.distill.runtime import ThreadChooser as _ThreadChooser

    def run(chooser: _ThreadChooser, seconds: dict[int, float]) -> list[int]:
        used = []
        while chooser.chosen is None:
            used.append(chooser.current())
            chooser.record(seconds[used[-1]])
        return used

    contended = _ThreadChooser([2, 1])
    used = run(contended, {1: 1.0, 2: 10.0})
    assert contended.chosen == 1 and used == [1, 1, 1, 2]  # warm-up, two trials, one slow trial cut short
    idle = _ThreadChooser([2, 1])
    run(idle, {1: 1.0, 2: 0.6})
    assert idle.chosen == 2
    assert _ThreadChooser([3]).chosen == 3


from shared_data import MODELS as SHARED_MODELS  # noqa: E402


@pytest.mark.shared
@pytest.mark.parametrize("name", [
    "resnet20_ts_opset13.onnx", "resnet20_ts_opset13_bn.onnx", "resnet20_dynamo_opset18.onnx",
    "resnet32_ts_opset13_bn.onnx", "resnet56_ts_opset13.onnx", "resnet56_ts_opset13_bn.onnx",
])
def test_shared_cifar_resnets_match_ort(name: str) -> None:
    path = SHARED_MODELS / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    model = onnx.load(str(path))
    batch = 1 if "dynamo" in name else 3  # the dynamo export fixes the batch at 1
    x = RNG.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    assert_matches_ort(model, {"input": x}, atol=2e-5)
    module = OnnxModule(model)
    floats = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) > 1}
    assert floats <= set(module.param_names.values())  # every weight is trainable under its own name
