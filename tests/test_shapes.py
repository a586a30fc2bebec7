"""Shapes from the best source (issue 14): the model's value_info, ONNX inference, ONNX Runtime's
symbolic inference, observed run-time shapes; computed Reshape targets; frozen reasons that say
what would unfreeze a group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder
from oracle import check_lossless

from onnx_ocnna import shapes
from onnx_ocnna.channels.analysis import analyse, prepare_graph
from onnx_ocnna.shapes import onnx_inference
from onnx_ocnna.metrics import count_macs, model_stats, static_shapes
from onnx_ocnna.model_io import ort_session, sample_feeds

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _cntk() -> onnx.ModelProto:
    return onnx.load(str(FIXTURES / "cntk_opset8_bias_add.onnx"))


def _dims(model: onnx.ModelProto, name: str):
    for value in list(model.graph.value_info) + list(model.graph.output):
        if value.name == name:
            return shapes._dims_of(value)[1] if shapes._dims_of(value) else None
    return None


def test_symbolic_inference_shapes_what_onnx_cannot():
    """CNTK-style opset 8: ONNX's inference loses the rank after the computed Reshape; ONNX
    Runtime's symbolic inference gives it, and the MACs of both Convs are counted."""
    model = _cntk()
    assert _dims(onnx_inference(model), "Convolution28_Output_0") is None
    inferred = shapes.infer_model(model)
    assert _dims(inferred, "Convolution28_Output_0") == ["N", 8, 28, 28]
    assert _dims(inferred, "Plus112_Output_0") == ["N", 16, 14, 14]
    # 8*28*28*25 + 16*14*14*8*25 + 784*10 MACs at batch 1
    assert model_stats(model).macs == 8 * 28 * 28 * 25 + 16 * 14 * 14 * 8 * 25 + 784 * 10


def test_symbolic_inference_does_not_import_torch():
    """``onnxruntime.tools``'s package init imports torch when it is installed (1.7 s and about
    400 MiB on every scoring run that needs this source); the engine is loaded without it and
    gives the same shapes. A fresh interpreter, since this test process has torch already."""
    import subprocess
    import sys

    code = (
        "import sys, onnx\n"
        "from onnx_ocnna import shapes\n"
        f"model = onnx.load({str(FIXTURES / 'cntk_opset8_bias_add.onnx')!r})\n"
        "found = shapes.symbolic_inference(model)\n"
        "print(found['Convolution28_Output_0'][1], 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['N', 8, 28, 28] False", out


def test_frozen_reason_names_node_operator_and_remedy(monkeypatch):
    """Without a source that shapes the Add, the reason names the node, the operator and what
    would unfreeze it; with ONNX Runtime's symbolic inference nothing is frozen."""
    assert all(group.prunable for group in analyse(_cntk()).groups)
    monkeypatch.setattr(shapes, "symbolic_inference", lambda model: {})
    reasons = {group.frozen_reason for group in analyse(_cntk()).groups}
    assert reasons == {f"Add '{name}' has inputs of unknown rank: {shapes_hint()}" for name in ("Plus30", "Plus112")}


def shapes_hint() -> str:
    from onnx_ocnna.channels.context import SHAPE_HINT

    assert "would unfreeze" in SHAPE_HINT and "value_info" in SHAPE_HINT
    return SHAPE_HINT


def test_value_info_comes_first(monkeypatch):
    """A shape the model declares in value_info is used where no inference gives one."""
    monkeypatch.setattr(shapes, "symbolic_inference", lambda model: {})
    model = _cntk()
    for name, dims in (("Reshape7_Output_0", ["N", 1, 28, 28]),):
        model.graph.value_info.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims))
    inferred = shapes.infer_model(model)
    assert _dims(inferred, "Reshape7_Output_0") == ["N", 1, 28, 28]
    # ONNX's inference goes on from the declared tensor
    assert _dims(inferred, "Plus30_Output_0") == ["N", 8, 28, 28]
    assert all(group.prunable for group in analyse(model).groups)


def test_observed_shapes_are_the_last_resort(monkeypatch):
    """Shapes seen in two runs with different batches: the batch becomes a symbol, the rest are
    constants, and the analysis follows them when no other source knows the shapes."""
    monkeypatch.setattr(shapes, "symbolic_inference", lambda model: {})
    model = _cntk()
    feeds = [sample_feeds(model, batch=b, seed=b) for b in (2, 3)]
    seen = shapes.observed_shapes(model, feeds)
    assert seen["Plus30_Output_0"] == (onnx.TensorProto.FLOAT, ["obs_2_3", 8, 28, 28])
    assert seen["Times212_reshape0_Output_0"] == (onnx.TensorProto.FLOAT, ["obs_2_3", 784])
    assert not all(group.prunable for group in analyse(model).groups)
    graph = prepare_graph(model, observed=seen)
    assert all(group.prunable for group in analyse(model, graph).groups)


def test_symbolic_inference_failure_falls_back_cleanly(tmp_path, monkeypatch):
    """An operator symbolic inference has no rule for: no exception, no file left in the
    working directory (its own infer_shapes writes sym_shape_infer_temp.onnx), and the
    shapes found before that node are kept."""
    monkeypatch.chdir(tmp_path)
    g = GraphBuilder(opset=13)
    a = g.relu(g.conv("x", 3, 4, name="a"))
    g.nodes.append(onnx.helper.make_node("Mystery", [a], ["m"], name="mystery", domain="example.custom"))
    graph = onnx.helper.make_graph(
        g.nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("m", onnx.TensorProto.FLOAT, None)], g.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13),
                                                         onnx.helper.make_opsetid("example.custom", 1)])
    found = shapes.symbolic_inference(model)
    assert found[a][1] == ["N", 4, 8, 8]
    assert "m" not in found
    inferred = shapes.infer_model(model, symbolic=True)
    assert _dims(inferred, a) == ["N", 4, 8, 8]
    assert list(tmp_path.iterdir()) == []


def test_negative_input_dims_become_symbols():
    """Paddle2ONNX's dim_value -1 is a dynamic dim, not a size, for every source."""
    model = onnx.load(str(FIXTURES / "paddle_dynamic_hw_opset11.onnx"))
    inferred = shapes.infer_model(model)
    dims = [d.dim_param or d.dim_value for d in inferred.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["x_dim0", 3, "h", "w"]
    first_conv = next(n for n in model.graph.node if n.op_type == "Conv").output[0]
    assert _dims(inferred, first_conv)[:2] == ["x_dim0", 8]


def test_macs_of_a_dynamic_input_at_the_data_size():
    """Height and width from the calibration data: MACs are counted at that size (a dynamic
    spatial dim otherwise drops every Conv from the count)."""
    model = onnx.load(str(FIXTURES / "paddle_dynamic_hw_opset11.onnx"))
    small = count_macs(model, shapes=static_shapes(model, {"x": (3, 48, 192)}))
    large = count_macs(model, shapes=static_shapes(model, {"x": (3, 96, 384)}))
    assert model_stats(model).macs == 32 * 2  # the MatMul alone
    assert small > 100 * 32 * 2
    assert large - 32 * 2 == 4 * (small - 32 * 2)


def _computed_flatten() -> onnx.ModelProto:
    """conv -> relu -> Reshape to [N, (N / N) * 96], the channel entry computed at run time from
    the batch: not foldable (the batch is dynamic), not a constant piece, but symbolic inference
    reduces the target to [N, 96] (ONNX's data propagation does not)."""
    g = GraphBuilder(opset=13)
    a = g.relu(g.conv("x", 3, 6, name="a", stride=2))
    batch = g.node("Slice", [g.node("Shape", [a])[0], g.const(np.array([0], np.int64)),
                             g.const(np.array([1], np.int64))])[0]
    one = g.node("Div", [batch, batch])[0]
    flat = g.node("Mul", [one, g.const(np.array([6 * 4 * 4], np.int64), "flat_size")])[0]
    target = g.node("Concat", [batch, flat], axis=0)[0]
    out = g.gemm(g.node("Reshape", [a, target], name="flatten")[0], 6 * 4 * 4, 5)
    return g.model(["N", 3, 8, 8], out)


def test_computed_reshape_target_becomes_a_constant():
    model = _computed_flatten()
    assert [group.frozen_reason for group in analyse(model).groups] == [""]
    result = check_lossless(model, fraction=0.5)
    assert result["max_rel_error"] < 1e-5
    pruned = result["pruned"]
    reshape = next(n for n in pruned.graph.node if n.op_type == "Reshape")
    target = next(i for i in pruned.graph.initializer if i.name == reshape.input[1])
    assert onnx.numpy_helper.to_array(target).tolist() == [-1, 3 * 4 * 4]
    assert "Div" not in {n.op_type for n in pruned.graph.node}  # the computed target is gone
    feeds = sample_feeds(model, batch=3)
    assert ort_session(pruned).run(None, feeds)[0].shape == (3, 5)


def test_computed_reshape_unfreeze_hint(monkeypatch):
    """Without symbolic inference the same target is frozen, and the reason says what would
    unfreeze it."""
    monkeypatch.setattr(shapes, "symbolic_inference", lambda model: {})
    reason = analyse(_computed_flatten()).groups[0].frozen_reason
    assert reason.startswith("Reshape 'flatten' reshapes channels to a shape computed at run time")
    assert "would unfreeze it" in reason


@pytest.mark.parametrize("name", ["cntk_opset8_bias_add", "torch_dynamo_view_opset20"])
def test_fixture_frozen_by_onnx_inference_alone(name, monkeypatch):
    """The issue-14 fixtures keep what they are for: with ONNX's inference alone (the model's
    value_info cleared) a group is frozen for a shape reason."""
    def onnx_only(model, observed=None, symbolic=None):
        return onnx_inference(model)

    import onnx_ocnna.channels.analysis as analysis_module

    monkeypatch.setattr(analysis_module, "infer_model", onnx_only)
    model = onnx.load(str(FIXTURES / f"{name}.onnx"))
    assert not all(group.prunable for group in analyse(model).groups)


def test_compress_uses_shapes_observed_on_the_calibration_run(monkeypatch):
    """The last resort: with no other source of the shapes, the calibration batch's run gives
    them, and the model is pruned losslessly where channels are dead."""
    from onnx_ocnna import api

    monkeypatch.setattr(shapes, "symbolic_inference", lambda model: {})
    model = _cntk()
    calibration = np.random.default_rng(0).standard_normal((16, 784)).astype(np.float32)
    assert not any(group.prunable for group in api.Pruner(model).analysis.groups)
    pruner = api.pruner_for(model, calibration)
    assert all(group.prunable for group in pruner.analysis.groups)
    pruned, report = api.compress(model, calibration, percentile=30, criterion="l1", progress=False)
    assert report.after.parameters < report.before.parameters
    feeds = sample_feeds(model, batch=3)
    assert ort_session(pruned).run(None, feeds)[0].shape == (3, 10)


def test_observed_shapes_are_not_used_for_a_dynamic_input_dim(monkeypatch):
    """A dynamic non-batch input dim seen at one size would pass for a constant: not trusted."""
    from onnx_ocnna import api

    monkeypatch.setattr(shapes, "symbolic_inference", lambda model: {})
    model = _cntk()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "pixels"
    assert all(shapes_hint() in group.frozen_reason for group in api.Pruner(model).analysis.groups)
    calls = []
    monkeypatch.setattr(shapes, "observed_shapes", lambda *a, **k: calls.append(1) or {})
    pruner = api.pruner_for(model, np.zeros((4, 784), np.float32))
    assert calls == []
    assert not any(group.prunable for group in pruner.analysis.groups)


def _expanded_gate(constant_target: bool) -> onnx.ModelProto:
    """A squeeze-excite gate [N, 6, 1, 1] expanded to [N, 6, 8, 8] before it scales the feature
    map: the target is a constant, or computed at run time from the input's batch and size."""
    g = GraphBuilder(opset=13)
    a = g.relu(g.conv("x", 3, 6, name="a"))
    gate = g.node("Sigmoid", [g.conv(g.node("GlobalAveragePool", [a])[0], 6, 6, k=1, name="gate")])[0]
    if constant_target:
        target = g.const(np.array([1, 6, 8, 8], np.int64), "expand_to")
    else:
        shape = g.node("Shape", ["x"])[0]
        batch = g.node("Slice", [shape, g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64))])[0]
        size = g.node("Slice", [shape, g.const(np.array([2], np.int64)), g.const(np.array([4], np.int64))])[0]
        target = g.node("Concat", [batch, g.const(np.array([6], np.int64)), size], axis=0)[0]
    scaled = g.node("Mul", [a, g.node("Expand", [gate, target], name="expand")[0]])[0]
    out = g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [scaled])[0]])[0], 6, 4)
    return g.model(["N", 3, 8, 8], out)


@pytest.mark.parametrize("constant_target", [True, False])
def test_expand_of_a_channel_gate(constant_target):
    """Expand (not followed before: every channel reaching it was frozen) passes channels
    through; its target is rewritten or replaced by a constant, and pruning stays lossless."""
    model = _expanded_gate(constant_target)
    groups = analyse(model).groups
    assert [group.frozen_reason for group in groups] == [""]  # the gate ties both Convs
    result = check_lossless(model, fraction=0.5)
    assert result["max_rel_error"] < 1e-5
    assert result["removed"] > 0
    expand = next(n for n in result["pruned"].graph.node if n.op_type == "Expand")
    target = next(i for i in result["pruned"].graph.initializer if i.name == expand.input[1])
    kept = onnx.numpy_helper.to_array(next(i for i in result["pruned"].graph.initializer if i.name == "a.w")).shape[0]
    expected = [1, kept, 8, 8] if constant_target else [1, 1, 8, 8]
    assert onnx.numpy_helper.to_array(target).tolist() == expected


@pytest.mark.parametrize("tracked_gate", [True, False])
def test_expand_as_ties_the_gate_to_the_map(tracked_gate):
    """x * y.expand_as(x) (the common squeeze-excite code) exports Expand(y, Shape(x)): the
    Shape reads x's channel count at run time, which is right after pruning as long as y keeps
    the same channels, so the two are tied; a constant y cannot follow and freezes x."""
    g = GraphBuilder(opset=13)
    a = g.relu(g.conv("x", 3, 6, name="a"))
    if tracked_gate:
        gate = g.node("Sigmoid", [g.conv(g.node("GlobalAveragePool", [a])[0], 6, 6, k=1, name="gate")])[0]
    else:
        gate = g.const(np.full((1, 6, 1, 1), 0.5, np.float32), "fixed_gate")
    scaled = g.node("Mul", [a, g.node("Expand", [gate, g.node("Shape", [a])[0]], name="expand")[0]])[0]
    out = g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [scaled])[0]])[0], 6, 4)
    model = g.model(["N", 3, 8, 8], out)
    groups = analyse(model).groups
    if not tracked_gate:
        assert [group.frozen_reason for group in groups] == [
            "Expand 'expand' expands an untracked tensor to the shape of these channels"]
        return
    assert [group.frozen_reason for group in groups] == [""]
    assert sorted(groups[0].members) == ["a", "gate"]
    result = check_lossless(model, fraction=0.5)
    assert result["max_rel_error"] < 1e-5 and result["removed"] > 0


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.onnx")))
def test_inference_without_weight_values_is_onnx_inference(fixture):
    """Large weights go to ONNX's inference as type and dims only: the result, weights put
    back, is byte for byte what ONNX infers from the whole model."""
    model = onnx.load(FIXTURES / fixture)
    cleared = onnx.ModelProto()
    cleared.CopyFrom(model)
    del cleared.graph.value_info[:]
    try:
        expected = onnx.shape_inference.infer_shapes(cleared, data_prop=True)
    except Exception:  # noqa: BLE001 - as onnx_inference falls back
        expected = onnx.shape_inference.infer_shapes(cleared)
    got = onnx_inference(model)
    assert got.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
    light = onnx_inference(model, values=False)
    assert list(light.graph.value_info) == list(expected.graph.value_info)
    assert [(i.name, list(i.dims)) for i in light.graph.initializer] == \
        [(i.name, list(i.dims)) for i in model.graph.initializer]


def test_weights_without_values_include_a_large_one():
    g = GraphBuilder()
    model = g.model([1, 64, 6, 6], g.conv("x", 64, 128, name="wide"))  # 73,728 weights
    assert max(int(np.prod(i.dims)) for i in model.graph.initializer) > shapes._VALUELESS_ELEMENTS
    light = shapes._without_weight_values(model)
    assert light.ByteSize() < model.ByteSize() / 10
    assert onnx_inference(model).graph.initializer[0] == model.graph.initializer[0]


def test_a_model_over_the_in_memory_limit_is_refused_by_its_serialised_size(monkeypatch):
    from onnx_ocnna import model_io
    from onnx_ocnna.errors import ValidationError

    g = GraphBuilder()
    model = g.model([1, 64, 6, 6], g.conv("x", 64, 128, name="wide"))
    size = len(model.SerializeToString())
    monkeypatch.setattr(model_io, "_EXTERNAL_DATA_THRESHOLD", size - 1)
    with pytest.raises(ValidationError, match="too large"):
        ort_session(model)
    monkeypatch.setattr(model_io, "_EXTERNAL_DATA_THRESHOLD", size)
    assert ort_session(model).get_outputs()
