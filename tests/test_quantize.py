"""Static INT8 quantization of a small CNN trained on scikit-learn's digits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnx_ocnna.calibration import Batch, CalibrationSource, open_calibration
from onnx_ocnna.errors import InputError
from onnx_ocnna.calibration import OrtReaderAdapter
from onnx_ocnna.quantize import quantize_int8
from shared_data import CIFAR_TEST, CIFAR_TRAIN, MODELS, needs_shared

torch = pytest.importorskip("torch")


class _ListSource(CalibrationSource):
    """The structural interface: batches() yields Batch(feeds, labels)."""

    def __init__(self, arrays: list[np.ndarray], name: str = "input") -> None:
        self.arrays = arrays
        self.input_names = [name]

    def batches(self) -> Iterator[Batch]:
        for a in self.arrays:
            yield Batch({self.input_names[0]: a}, None)


def _net() -> "torch.nn.Module":
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A CNN trained briefly on the digits, exported with a dynamic and with a fixed batch of 1."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]  # [1797, 1, 8, 8]
    y = data.target.astype(np.int64)
    torch.manual_seed(0)
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add contention
    try:
        for _ in range(120):
            idx = torch.randint(0, len(x), (64,), generator=gen)
            loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    root = tmp_path_factory.mktemp("quant")
    dynamic, fixed = root / "digits.onnx", root / "digits_b1.onnx"
    example = xt[:1]
    torch.onnx.export(net, (example,), str(dynamic), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, dynamo=False)  # fmt: skip
    torch.onnx.export(net, (example,), str(fixed), input_names=["input"], output_names=["logits"], dynamo=False)
    with torch.no_grad():
        accuracy = float((net(xt).argmax(1) == yt).float().mean())
    return {"x": x, "y": y, "dynamic": dynamic, "fixed": fixed, "root": root, "accuracy": accuracy}


def _logits(path: Path, x: np.ndarray, batch: int | None = None) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    step = batch or len(x)
    return np.concatenate([sess.run(None, {"input": x[i : i + step]})[0] for i in range(0, len(x), step)])


def test_quantized_model_is_per_channel_qdq_small_and_close(digits: dict) -> None:
    assert digits["accuracy"] > 0.8  # the float model learnt something, so agreement is meaningful
    calib_x = digits["x"][:512]
    model = onnx.load(str(digits["dynamic"]))
    source = open_calibration(calib_x, model, batch_size=64)
    out = quantize_int8(digits["dynamic"], source, digits["root"] / "q" / "digits_int8.onnx")
    assert out.is_file()

    q = onnx.load(str(out))
    onnx.checker.check_model(q, full_check=True)
    ops = [n.op_type for n in q.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    producers = {o: n for n in q.graph.node for o in n.output}
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3
    for conv in convs:
        dq = producers[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        weight, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert weight.dtype == np.int8
        assert scale.shape == (weight.shape[0],)  # one scale per output channel
        assert {a.name: a.i for a in dq.attribute}.get("axis", 1) == 0
    assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4 for i in q.graph.initializer)

    assert out.stat().st_size < 0.35 * digits["dynamic"].stat().st_size

    ref, got = _logits(digits["dynamic"], calib_x), _logits(out, calib_x)
    assert np.mean(ref.argmax(1) == got.argmax(1)) >= 0.9
    held_out = slice(1000, None)
    acc_q = np.mean(_logits(out, digits["x"][held_out]).argmax(1) == digits["y"][held_out])
    acc_f = np.mean(_logits(digits["dynamic"], digits["x"][held_out]).argmax(1) == digits["y"][held_out])
    assert acc_q >= acc_f - 0.05


@pytest.mark.parametrize("fixture, opset", [("paddle_se_opset11", 11), ("torch_opset8", 8)])
def test_a_model_older_than_opset_13_is_converted_for_per_channel_weights(tmp_path: Path, fixture: str,
                                                                          opset: int) -> None:
    """ORT's quantizer writes per-axis DequantizeLinear (opset 13) into an opset-11 graph, which
    then does not load; below opset 10 it converts to 11 itself, with the same result."""
    path = Path(__file__).resolve().parent / "fixtures" / f"{fixture}.onnx"
    model = onnx.load(str(path))
    spec = model.graph.input[0]
    shape = [d.dim_value or 1 for d in spec.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal([8, *shape[1:]]).astype(np.float32)
    batches = [x[i : i + shape[0]] for i in range(0, 8, shape[0] if shape[0] > 1 else 1)]
    with pytest.warns(UserWarning, match=f"opset {opset} has no per-channel QuantizeLinear; the INT8 model is "
                                         "converted to opset 13"):
        out = quantize_int8(model, _ListSource(batches, spec.name), tmp_path / "old_int8.onnx")
    q = onnx.load(str(out))
    onnx.checker.check_model(q, full_check=True)
    assert next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) >= 13
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    producers = {o: n for n in q.graph.node for o in n.output}
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    weight_dq = producers[conv.input[1]]
    assert inits[weight_dq.input[1]].shape == (inits[weight_dq.input[0]].shape[0],)  # per channel
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert all(np.isfinite(session.run(None, {spec.name: b})[0]).all() for b in batches)


def test_per_tensor_option_and_caller_model_untouched(digits: dict) -> None:
    import os
    import stat

    source = _ListSource([digits["x"][:128]])
    model = onnx.load(str(digits["dynamic"]))
    before = model.SerializeToString()
    mask = os.umask(0o022)
    try:
        out = quantize_int8(model, source, digits["root"] / "per_tensor.onnx", per_channel=False)
    finally:
        os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # like every other output, not mkstemp's 0600
    assert model.SerializeToString() == before
    q = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    producers = {o: n for n in q.graph.node for o in n.output}
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    assert inits[producers[conv.input[1]].input[1]].size == 1


def test_fixed_batch_model_is_fed_one_sample_at_a_time(digits: dict) -> None:
    x = digits["x"]
    source = _ListSource([x[:16], x[16:32], x[32:40]])
    reader = OrtReaderAdapter(source, fixed_batch=1, max_batches=2)
    feeds = list(iter(reader.get_next, None))
    assert len(feeds) == 32 and all(f["input"].shape == (1, 1, 8, 8) for f in feeds)
    np.testing.assert_array_equal(feeds[17]["input"][0], x[17])

    out = quantize_int8(digits["fixed"], source, digits["root"] / "b1_int8.onnx", max_batches=2)
    ref, got = _logits(digits["fixed"], x[:200], batch=1), _logits(out, x[:200], batch=1)
    assert np.mean(ref.argmax(1) == got.argmax(1)) >= 0.9


def test_no_calibration_data_is_an_input_error_and_writes_nothing(digits: dict, tmp_path: Path) -> None:
    target = tmp_path / "never.onnx"
    with pytest.raises(InputError):
        quantize_int8(digits["dynamic"], _ListSource([]), target)
    assert list(tmp_path.iterdir()) == []


def test_bad_options_are_input_errors(digits: dict, tmp_path: Path) -> None:
    source = _ListSource([digits["x"][:8]])
    with pytest.raises(InputError):
        quantize_int8(digits["dynamic"], source, tmp_path / "a.onnx", activation_type="int4")
    with pytest.raises(InputError):
        quantize_int8(digits["dynamic"], source, tmp_path / "a.onnx", calibrate_method="median")


@pytest.mark.shared
@needs_shared
def test_shared_dynamo_resnet20_fixed_batch(tmp_path: Path) -> None:
    """The dynamo-exported CIFAR ResNet-20 (batch fixed at 1, opset 18) on real images."""
    path = MODELS / "resnet20_dynamo_opset18.onnx"
    model = onnx.load(str(path))
    norm = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    calib = open_calibration(CIFAR_TRAIN, model, max_samples=64, **norm)
    out = quantize_int8(path, calib, tmp_path / "r20_int8.onnx")
    assert out.stat().st_size < 0.35 * path.stat().st_size
    test = open_calibration(CIFAR_TEST, model, max_samples=100, **norm)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    quant = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    agree = [ref.run(None, b.feeds)[0].argmax(1) == quant.run(None, b.feeds)[0].argmax(1) for b in test.batches()]
    assert np.mean(np.concatenate(agree)) >= 0.9


def test_a_quantized_model_is_refused_with_the_reason(digits: dict, tmp_path: Path, capsys) -> None:
    """Its filters reach the Convs through DequantizeLinear, so no group exists. Before, the
    default command stopped with 'needs at least 2 calibration samples; got 0', and a weight-only
    criterion wrote the model back unchanged under a budget."""
    from onnx_ocnna import api
    from onnx_ocnna.cli import main

    x = digits["x"][:256]
    quantized = quantize_int8(digits["dynamic"], open_calibration(x, onnx.load(str(digits["dynamic"]))),
                              tmp_path / "digits_int8.onnx")
    for call in (lambda: api.compress(quantized, x, progress=False),
                 lambda: api.compress(quantized, x, criterion="l1", target_macs=0.5, progress=False),
                 lambda: api.score(quantized, x, progress=False)):
        with pytest.raises(InputError, match=r"quantized \(DequantizeLinear, QuantizeLinear nodes\).*float model"):
            call()
    assert api.inspect(quantized)["quantized"] == ["DequantizeLinear", "QuantizeLinear"]
    assert api.inspect(digits["dynamic"])["quantized"] == []
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.onnx"
    assert main([str(quantized), str(out), "--calib", str(tmp_path / "x.npy"), "--quiet"]) == 2
    assert "prune the float model" in capsys.readouterr().err and not out.exists()
