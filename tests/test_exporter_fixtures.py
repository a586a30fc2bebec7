"""Models from other exporters (issues 7 and 14): Keras through tf2onnx, PaddlePaddle-style,
PyTorch TorchScript at opsets 8-13, dynamo at opsets 18 and 20 with external data, CNTK-style
opset 8 (tests/fixtures/, built by tools/make_exporter_fixtures.py). Issue 14's fixtures have
shapes ONNX's own inference does not give: a Reshape computed at run time at opset 8 (symbolic
inference shapes it), dynamo's unoptimised x.view(x.size(0), -1), and a [-1, 3, h, w] input.

For every fixture: `inspect` runs and says why each frozen group is frozen; the lossless oracle
holds; OCNNA at k = 30 on random calibration data writes a valid model with the same output
shapes that is smaller wherever a group is not frozen; external data in gives external data out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder
from oracle import check_lossless

from onnx_ocnna import api
from onnx_ocnna.channels.analysis import analyse
from onnx_ocnna.cli import main
from onnx_ocnna.model_io import ort_session, sample_feeds, save_model, uses_external_data

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# Fixture -> (opset, batch: an int when fixed, None when symbolic, external data file or None).
EXPECTED = {
    "keras_sequential": (13, None, None),
    "keras_resnet": (13, None, None),
    "keras_mobilenet": (15, None, None),
    "keras_densenet": (17, None, None),
    "paddle_se_opset11": (11, None, None),
    "torch_legacy_opset9": (9, 1, None),
    "torch_opset8": (8, 1, None),
    "torch_symbolic_bn_after_relu": (13, None, None),
    "torch_dynamo_opset18": (18, None, "torch_dynamo_opset18.onnx.data"),
    "cntk_opset8_bias_add": (8, None, None),
    "torch_dynamo_view_opset20": (20, None, "torch_dynamo_view_opset20.onnx.data"),
    "paddle_dynamic_hw_opset11": (11, -1, None),  # Paddle2ONNX's dim_value -1
}
# One sample's shape (no batch axis) for fixtures whose input height and width are dynamic:
# the text-direction classifier reads 48 x 192 lines.
SIZES = {"paddle_dynamic_hw_opset11": {"x": (3, 48, 192)}}
NAMES = sorted(EXPECTED)
# The exporter patterns each fixture is there for: op types it must contain, and (consumer,
# producer) pairs such as a BatchNormalization reading a Relu (tf2onnx writes a Keras
# BatchNormalization that does not follow a Conv as per-channel Mul + Add).
PATTERNS = {
    "keras_sequential": ({"Transpose", "Shape", "Gather", "Slice", "Concat", "Cast", "Reshape", "MatMul"}, []),
    "keras_resnet": ({"Transpose", "Add", "GlobalAveragePool", "Squeeze", "MatMul"}, [("Add", "Conv")]),
    "keras_mobilenet": ({"Transpose", "Clip", "Mul", "Add", "MatMul", "Softmax"}, [("Mul", "Clip")]),
    "keras_densenet": ({"Transpose", "Concat", "AveragePool", "MatMul"}, [("Concat", "Conv")]),
    "paddle_se_opset11": ({"HardSigmoid", "Clip", "Div", "Shape", "Slice", "MatMul"}, [("Mul", "HardSigmoid")]),
    "torch_legacy_opset9": ({"BatchNormalization", "MaxPool", "Reshape", "Gemm"}, []),
    "torch_opset8": ({"BatchNormalization", "Cast", "Reshape", "Gemm"}, []),
    "torch_symbolic_bn_after_relu": ({"Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Gemm"},
                                     [("BatchNormalization", "Relu")]),
    "torch_dynamo_opset18": ({"Sigmoid", "Mul", "Concat", "ReduceMean", "Reshape", "Gemm"}, []),
    "cntk_opset8_bias_add": ({"Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Add", "MatMul"},
                             [("Add", "Conv"), ("Conv", "Reshape")]),
    "torch_dynamo_view_opset20": ({"Shape", "Squeeze", "Concat", "Reshape", "Gemm"}, [("Reshape", "Concat")]),
    "paddle_dynamic_hw_opset11": ({"Clip", "Div", "Shape", "Slice", "MatMul", "Softmax"},
                                  [("Mul", "Clip"), ("Reshape", "Concat")]),
}
DEPTHWISE_OR_GROUPED = {"keras_mobilenet", "paddle_se_opset11", "torch_dynamo_opset18", "paddle_dynamic_hw_opset11"}


def _path(name: str) -> Path:
    return FIXTURES / f"{name}.onnx"


def _load(name: str) -> onnx.ModelProto:
    return onnx.load(str(_path(name)), load_external_data=True)


def _input_dims(model: onnx.ModelProto) -> list:
    inits = {i.name for i in model.graph.initializer}
    value = next(v for v in model.graph.input if v.name not in inits)
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def _calibration(model: onnx.ModelProto, samples: int = 16, seed: int = 0, name: str | None = None) -> np.ndarray:
    """Random N(0, 1) samples shaped like one model input, [samples, *dims without batch]
    (fixture ``name``'s SIZES where the model's height and width are dynamic)."""
    dims = _input_dims(model)[1:]
    if name in SIZES:
        dims = list(next(iter(SIZES[name].values())))
    return np.random.default_rng(seed).standard_normal([samples, *dims]).astype(np.float32)


def _parameters(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer)


def test_fixture_set_is_complete_and_small():
    present = {p.name[: -len(".onnx")] for p in FIXTURES.glob("*.onnx")}
    assert present == set(EXPECTED)
    sizes = {p.name: p.stat().st_size for p in FIXTURES.iterdir() if p.is_file()}
    assert max(sizes.values()) < 300_000, sizes
    assert sum(sizes.values()) < 2_000_000, sizes
    versions = json.loads((FIXTURES / "VERSIONS.json").read_text())
    assert {"tensorflow", "tf2onnx", "torch", "onnx"} <= set(versions)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_is_what_it_claims(name):
    opset, batch, data = EXPECTED[name]
    model = onnx.load(str(_path(name)), load_external_data=False)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == opset
    assert _input_dims(model)[0] == batch
    assert uses_external_data(_path(name)) == (data is not None)
    if data:
        assert (FIXTURES / data).stat().st_size > 0
    onnx.checker.check_model(str(_path(name)), full_check=True)
    ops, pairs = PATTERNS[name]
    assert ops <= {n.op_type for n in model.graph.node}
    producer = {out: n.op_type for n in model.graph.node for out in n.output}
    present = {(n.op_type, producer.get(name)) for n in model.graph.node for name in n.input}
    assert set(pairs) <= present
    grouped = any(a.name == "group" and a.i > 1 for n in model.graph.node if n.op_type == "Conv" for a in n.attribute)
    assert grouped == (name in DEPTHWISE_OR_GROUPED)


@pytest.mark.parametrize("name", NAMES)
def test_inspect_gives_a_reason_for_every_frozen_group(name, capsys):
    assert main(["inspect", str(_path(name))]) == 0
    table = capsys.readouterr().out
    info = api.inspect(_load(name))
    assert info["groups"], "no channel group found"
    for group in info["groups"]:
        if not group["prunable"]:
            assert group["frozen"], f"group {group['id']} frozen without a reason"
            assert f"frozen: {group['frozen']}" in table
    # Every exporter pattern in the fixtures is one the analysis follows (NHWC Transposes,
    # tf2onnx's Flatten, MatMul+Add heads, BN after the activation, opsets 8-18, ...).
    assert all(group["prunable"] for group in info["groups"]), table
    assert f"{len(info['groups'])} of {len(info['groups'])} groups prunable" in table


@pytest.mark.parametrize("name", NAMES)
def test_lossless_oracle(name):
    result = check_lossless(_load(name), fraction=0.3, seed=1, sizes=SIZES.get(name))
    assert result["max_rel_error"] < 1e-5, result
    assert result["removed"] > 0
    assert result["after_params"] < result["before_params"]


@pytest.mark.parametrize("name", NAMES)
def test_ocnna_k30_on_random_calibration(name, tmp_path):
    model = _load(name)
    pruned, report = api.compress(model, _calibration(model, name=name), percentile=30, progress=False)
    path = save_model(pruned, tmp_path / "pruned.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    feeds = sample_feeds(model, batch=2, seed=3, sizes=SIZES.get(name))
    before = ort_session(model).run(None, feeds)
    after = ort_session(path).run(None, feeds)
    assert [a.shape for a in after] == [b.shape for b in before]
    assert all(np.isfinite(a).all() for a in after)
    analysis = analyse(model)
    rows = {row["id"]: row for row in report.groups}
    for group in analysis.groups:
        if group.prunable and int(0.3 * len(group.removable())) >= 1:
            assert rows[group.id]["removed"] > 0, (group.members, rows[group.id])
    assert _parameters(pruned) < _parameters(model)


@pytest.mark.parametrize("budget", [{"target_macs": 0.6}, {"target_params": 0.6, "criterion": "group-l2"}],
                         ids=["macs", "params-group-l2"])
@pytest.mark.parametrize("name", NAMES)
def test_budget_recipes_on_random_calibration(name, budget, tmp_path):
    """The README's budget commands (allocation, reconstruction, the final check) on every
    exporter's graph: a valid model within the budget with the original's output shapes. The
    dynamo view fixture's cut crosses a scalar (the batch size before its Reshape), which the
    budget check of the kept tensors once took for a batch of rows."""
    model = _load(name)
    pruned, report = api.compress(model, _calibration(model, samples=32, name=name), progress=False, **budget)
    path = save_model(pruned, tmp_path / "pruned.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    feeds = sample_feeds(model, batch=2, seed=3, sizes=SIZES.get(name))
    before, after = ort_session(model).run(None, feeds), ort_session(path).run(None, feeds)
    assert [a.shape for a in after] == [b.shape for b in before]
    assert all(np.isfinite(a).all() for a in after)
    achieved = report.macs_ratio if "target_macs" in budget else report.rpr
    assert achieved <= next(v for k, v in budget.items() if k.startswith("target_")) + 1e-9


def test_cli_keeps_external_data(tmp_path, capsys):
    name = "torch_dynamo_opset18"
    model = _load(name)
    calib = tmp_path / "calib.npy"
    np.save(calib, _calibration(model))
    out = tmp_path / "pruned.onnx"
    code = main([str(_path(name)), str(out), "--calib", str(calib), "--percentile", "30", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "pruned.onnx.data").stat().st_size > 0
    assert uses_external_data(out)
    # Checked from its path, as users and ONNX Runtime read it: the small shape and axes
    # tensors that shape inference needs must be readable there.
    onnx.checker.check_model(str(out), full_check=True)
    pruned = onnx.load(str(out))
    assert _parameters(pruned) < _parameters(model)
    feeds = sample_feeds(model, batch=3, seed=0)
    outputs = ort_session(out).run(None, feeds)  # ORT reads the .data file beside the model
    assert outputs[0].shape == ort_session(model).run(None, feeds)[0].shape


def test_cli_writes_one_file_without_external_data(tmp_path, capsys):
    name = "keras_resnet"
    calib = tmp_path / "calib.npy"
    np.save(calib, _calibration(_load(name)))
    out = tmp_path / "pruned.onnx"
    assert main([str(_path(name)), str(out), "--calib", str(calib), "--percentile", "30", "--quiet"]) == 0
    capsys.readouterr()
    assert not uses_external_data(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy", "pruned.onnx"]


def test_tf2onnx_flatten_reads_only_the_batch_size():
    """Keras' Flatten through tf2onnx: Shape of the NCHW tensor -> Gather(NHWC order) -> Cast ->
    Slice[0:1] gives the batch size, Concat with the constant H*W*C -> Cast -> Reshape. The
    Shape does not read the channel count, and the constant is rewritten to the kept size."""
    g = GraphBuilder(opset=13)
    x = g.node("Transpose", ["x"], perm=[0, 3, 1, 2])[0]
    a = g.relu(g.conv(x, 3, 6, name="a"))
    nhwc = g.node("Transpose", [a], perm=[0, 2, 3, 1])[0]
    dims = g.node("Gather", [g.node("Shape", [a])[0], g.const(np.array([0, 2, 3, 1], np.int64))], axis=0)[0]
    dims = g.node("Cast", [dims], to=onnx.TensorProto.INT32)[0]
    batch = g.node("Slice", [dims, g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64)),
                             g.const(np.array([0], np.int64))])[0]
    target = g.node("Concat", [batch, g.const(np.array([4 * 4 * 6], np.int32), "flat_size")], axis=0)[0]
    target = g.node("Cast", [target], to=onnx.TensorProto.INT64)[0]
    flat = g.node("Reshape", [nhwc, target])[0]
    w = g.const(g.rng.standard_normal((96, 5)).astype(np.float32), "head.w")
    out = g.node("Add", [g.node("MatMul", [flat, w])[0], g.const(np.zeros(5, np.float32))])[0]
    model = g.model(["N", 4, 4, 3], out)
    assert [group.frozen_reason for group in analyse(model).groups] == [""]
    result = check_lossless(model, fraction=0.5)
    assert result["max_rel_error"] < 1e-5
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in result["pruned"].graph.initializer}
    assert weights["head.w"].shape == (48, 5)
    assert int(weights["flat_size"][0]) == 48


@pytest.mark.parametrize("entry,frozen", [((3, 4), True), ((0, 1), False), ((1, 3), False)])
def test_shape_vector_followed_through_gather_and_slice(entry, frozen):
    """Shape -> Gather(NHWC order) -> Slice: only the entry holding the channel count (the last
    one in NHWC order) freezes the channels when something reads it (here a Div by it)."""
    g = GraphBuilder(opset=13)
    a = g.relu(g.conv("x", 3, 6, name="a"))
    dims = g.node("Gather", [g.node("Shape", [a])[0], g.const(np.array([0, 2, 3, 1], np.int64))], axis=0)[0]
    start, end = (g.const(np.array([e], np.int64)) for e in entry)
    picked = g.node("Slice", [dims, start, end])[0]
    count = g.node("Cast", [g.node("ReduceMax", [picked], keepdims=1)[0]], to=onnx.TensorProto.FLOAT)[0]
    logits = g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [a])[0]])[0], 6, 3)
    model = g.model(["N", 3, 4, 4], g.node("Div", [logits, count])[0])
    reasons = [group.frozen_reason for group in analyse(model).groups]
    if frozen:
        assert len(reasons) == 1 and "reads the channel count (used by ReduceMax" in reasons[0]
    else:
        assert reasons == [""]


def test_dynamic_height_width_calibrated_from_npy(tmp_path, capsys):
    """Issue 14's crash: a Paddle2ONNX classifier with input [-1, 3, h, w] calibrated from an
    [8, 3, 48, 192] .npy. It is pruned; the output keeps the dynamic height and width (it runs
    at another size with the original's output shapes), and the MACs are counted at 48 x 192."""
    name = "paddle_dynamic_hw_opset11"
    model = _load(name)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((8, 3, 48, 192)).astype(np.float32))
    scores = api.score(model, str(calib), progress=False)
    assert scores.samples == 8
    out, report_path = tmp_path / "pruned.onnx", tmp_path / "report.json"
    code = main([str(_path(name)), str(out), "--calib", str(calib), "--percentile", "30", "--quiet",
                 "--report", str(report_path)])
    assert code == 0, capsys.readouterr().err
    pruned = onnx.load(str(out))
    assert _parameters(pruned) < _parameters(model)
    for size in ((48, 192), (32, 100)):
        feeds = sample_feeds(model, batch=3, sizes={"x": (3, *size)})
        before, after = ort_session(model).run(None, feeds), ort_session(pruned).run(None, feeds)
        assert [a.shape for a in after] == [b.shape for b in before] == [(3, 2)]
    report = json.loads(report_path.read_text())
    expected = api.model_stats(model, sizes={"x": (3, 48, 192)}).macs
    assert report["before"]["macs"] == expected > 1000 * api.model_stats(model).macs
    # Latency at the data's size; the -1 batch is dynamic, not a batch that excludes every row.
    from onnx_ocnna.evaluate import compare_latency

    rows = compare_latency(model, pruned, batches=(1,), runs=1, sizes={"x": (3, 48, 192)})
    assert [row["batch"] for row in rows] == [1]
