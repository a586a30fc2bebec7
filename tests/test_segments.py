"""Running a model segment by segment: every pass gives what a full run of the model as it now
is gives, starts from the last cut it kept, and falls back to the model's inputs where a cut
cannot be kept."""

from __future__ import annotations

import numpy as np
import onnx
from graphs import residual_net
from onnx import TensorProto, helper, numpy_helper

from onnx_ocnna import segments
from onnx_ocnna.collect import with_outputs
from onnx_ocnna.model_io import SharedWeights, ort_session
from onnx_ocnna.segments import SegmentRunner

LAYERS = ["stem", "b0_c1", "b0_c2", "b1_c1", "b1_c2", "b2_c1", "b2_c2"]


def _feeds(batches: int = 3, size: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal((size, 3, 6, 6)).astype(np.float32)} for _ in range(batches)]


def _full_run(model: onnx.ModelProto, names: list[str], feeds) -> list[dict[str, np.ndarray]]:
    session = ort_session(with_outputs(model, names), spinning=False)
    return [dict(zip(names, session.run(names, feed))) for feed in feeds]


def _position(model: onnx.ModelProto, name: str) -> int:
    return next(i for i, n in enumerate(model.graph.node) if n.name == name)


def _scale_weight(model: onnx.ModelProto, layer: str, factor: float) -> None:
    init = next(i for i in model.graph.initializer if i.name == f"{layer}.w")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))


def _walk(model: onnx.ModelProto, runner: SegmentRunner, feeds) -> None:
    """Visit the layers in graph order as a refit does: read each one's input (and, for a block's
    last Conv, the shortcut its Add reads), compare with a full run, then change its weights."""
    for layer in LAYERS:
        node = model.graph.node[_position(model, layer)]
        wanted = [node.input[0]]
        if layer.endswith("c2"):
            wanted.append(model.graph.node[_position(model, layer[:2] + "_add")].input[1])
        got = list(runner.run(model, wanted, _position(model, layer)))
        expected = _full_run(model, wanted, feeds)
        assert len(got) == len(feeds)
        for mine, theirs in zip(got, expected):
            for name in wanted:  # float rounding of other kernel choices, relative to the scale
                np.testing.assert_allclose(mine[name], theirs[name], rtol=1e-5,
                                           atol=1e-5 * np.abs(theirs[name]).max())
        _scale_weight(model, layer, 1.5)  # what the refit of this layer would do


def test_every_pass_sees_the_changes_made_before_it_and_starts_from_the_last_cut():
    model, feeds = residual_net(set()), _feeds()
    runner = SegmentRunner(model, feeds)
    _walk(model, runner, feeds)
    assert runner.passes_from_inputs == 0
    assert runner.position == _position(model, LAYERS[-1])


def test_a_cut_over_the_budget_is_not_kept_and_the_values_stay_right():
    model, feeds = residual_net(set()), _feeds()
    runner = SegmentRunner(model, feeds, budget=0)
    _walk(model, runner, feeds)
    assert runner.position == 0  # every pass ran from the model's inputs


def test_the_tensors_a_later_node_reads_cross_the_cut():
    model = residual_net(set())
    crossing = segments._crossing(list(model.graph.node), _position(model, "b0_c2"),
                                  {i.name for i in model.graph.initializer})
    # b0_c2 reads the first block's hidden activation; the block's Add reads the stem's output.
    hidden = model.graph.node[_position(model, "b0_c2")].input[0]
    shortcut = model.graph.node[_position(model, "b0_add")].input[1]
    assert sorted(crossing) == sorted([hidden, shortcut])


def test_an_abandoned_pass_starts_the_next_one_from_the_inputs():
    model, feeds = residual_net(set()), _feeds()
    runner = SegmentRunner(model, feeds)
    node = model.graph.node[_position(model, "b1_c1")]
    list(runner.run(model, [node.input[0]], _position(model, "b1_c1")))
    assert runner.position == _position(model, "b1_c1")
    later = model.graph.node[_position(model, "b2_c1")]
    passes = runner.run(model, [later.input[0]], _position(model, "b2_c1"))
    next(passes)
    passes.close()
    assert runner.position == 0
    _scale_weight(model, "b1_c1", 2.0)
    got = list(runner.run(model, [later.input[0]], _position(model, "b2_c1")))
    expected = _full_run(model, [later.input[0]], feeds)
    for mine, theirs in zip(got, expected):
        np.testing.assert_allclose(mine[later.input[0]], theirs[later.input[0]], rtol=1e-5, atol=1e-5)


def test_a_model_with_a_subgraph_always_runs_from_its_inputs():
    """A branch of the If reads the outer tensor 'h' without naming it as an input of the If."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(np.ones((2, 4, 1, 1), np.float32), "w2")
    branch = helper.make_graph([helper.make_node("Relu", ["h"], ["r"])], "branch", [],
                               [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"),
             helper.make_node("Constant", [], ["flag"], name="flag", value=numpy_helper.from_array(np.array(True))),
             helper.make_node("If", ["flag"], ["y"], name="if", then_branch=branch, else_branch=branch),
             helper.make_node("Conv", ["y", "w2"], ["z"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    feeds = [{"x": rng.standard_normal((2, 3, 4, 4)).astype(np.float32)}]
    runner = SegmentRunner(model, feeds)
    assert not runner.enabled
    got = list(runner.run(model, ["y"], 3))
    np.testing.assert_allclose(got[0]["y"], _full_run(model, ["y"], feeds)[0]["y"], rtol=1e-6)
    assert runner.passes_from_inputs == 1


def test_reconstruction_is_the_same_from_kept_cuts_as_from_the_inputs(monkeypatch):
    from onnx_ocnna import api, reconstruct as reconstruct_module
    from onnx_ocnna.calibration import Batch
    from onnx_ocnna.reconstruct import kept_outputs, reconstruct

    model = residual_net(set())
    pruner = api.Pruner(model)
    removed = {pruner.analysis.group_of(f"b{i}_c1").id: np.array([0, 3, 5]) for i in range(3)}
    pruned = pruner.rewrite(removed)
    x = np.random.default_rng(3).standard_normal((96, 3, 6, 6)).astype(np.float32)
    runners: list[SegmentRunner] = []

    class Recorded(SegmentRunner):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            runners.append(self)

    monkeypatch.setattr(reconstruct_module, "SegmentRunner", Recorded)
    results = []
    for budget in (segments.FRONTIER_BUDGET, 0):
        monkeypatch.setattr(segments, "FRONTIER_BUDGET", budget)
        fitted, report = reconstruct(pruner.prepared_model(), pruned, kept_outputs(pruner.analysis, removed),
                                     lambda: iter([Batch({"x": x[i:i + 32]}, None) for i in range(0, 96, 32)]),
                                     samples=96, progress=False)
        assert sum(1 for f in report.layers if not f.skipped) >= 3
        results.append({i.name: numpy_helper.to_array(i) for i in fitted.graph.initializer})
    assert runners[0].position > 0 and runners[1].position == 0  # kept cuts, then none
    for name, value in results[0].items():
        np.testing.assert_allclose(value, results[1][name], rtol=1e-4, atol=1e-5, err_msg=name)


def _cuts_in_graph_order(model: onnx.ModelProto):
    from onnx_ocnna import api

    pruner = api.Pruner(model)
    cuts = []
    for layer in ["b0_c1", "b1_c1", "b2_c1"]:
        group = pruner.analysis.group_of(layer)
        for removed in ([1], [0, 2, 4]):
            cuts.append(pruner.rewrite({group.id: np.array(removed)}))
    return pruner.prepared_model(), cuts


def test_cuts_run_from_the_original_before_their_first_change():
    original, cuts = _cuts_in_graph_order(residual_net(set()))
    feeds = _feeds()
    prefix = segments.OriginalPrefix(original, feeds)
    output = original.graph.output[0].name
    for cut in cuts:
        got = list(prefix.run(cut, [output]))
        expected = _full_run(cut, [output], feeds)
        for mine, theirs in zip(got, expected):
            np.testing.assert_allclose(mine[output], theirs[output], rtol=1e-5, atol=1e-6)
    assert prefix.passes_from_inputs == 0 and prefix.runner.passes_from_inputs == 0
    assert prefix.runner.position == _position(original, "b2_c1")


def test_a_changed_weight_or_attribute_is_not_taken_from_the_original():
    original = residual_net(set())
    feeds = _feeds()
    prefix = segments.OriginalPrefix(original, feeds)
    assert prefix.unchanged(original) >= {o for n in original.graph.node for o in n.output}
    changed = onnx.ModelProto()
    changed.CopyFrom(original)
    _scale_weight(changed, "stem", 0.5)
    assert not prefix.unchanged(changed) & {o for n in changed.graph.node for o in n.output}
    strided = onnx.ModelProto()
    strided.CopyFrom(original)
    node = strided.graph.node[_position(strided, "b1_c1")]
    hidden = node.output[0]
    for attribute in node.attribute:
        if attribute.name == "pads":
            attribute.ints[:] = [0, 0, 2, 2]  # same output shape, other values
    same = prefix.unchanged(strided)
    assert node.input[0] in same and hidden not in same
    output = strided.graph.output[0].name
    got = list(prefix.run(strided, [output]))
    for mine, theirs in zip(got, _full_run(strided, [output], feeds)):
        np.testing.assert_allclose(mine[output], theirs[output], rtol=1e-5, atol=1e-6)


def test_a_local_refit_from_the_original_prefix_equals_the_one_from_the_inputs(monkeypatch):
    from onnx_ocnna import api, reconstruct as reconstruct_module
    from onnx_ocnna.calibration import Batch
    from onnx_ocnna.reconstruct import kept_outputs, reconstruct

    model = residual_net(set())
    pruner = api.Pruner(model)
    removed = {pruner.analysis.group_of("b2_c1").id: np.array([1, 4, 6])}
    cut = pruner.rewrite(removed)
    x = np.random.default_rng(4).standard_normal((64, 3, 6, 6)).astype(np.float32)

    def batches():
        return iter([Batch({"x": x[i:i + 32]}, None) for i in range(0, 64, 32)])

    starts = []

    class Recorded(SegmentRunner):
        def __init__(self, *args, start=None, **kwargs) -> None:
            super().__init__(*args, start=start, **kwargs)
            starts.append(None if start is None else start[0])

    monkeypatch.setattr(reconstruct_module, "SegmentRunner", Recorded)
    prepared = pruner.prepared_model()
    prefix = segments.OriginalPrefix(prepared, [{"x": x[:32]}, {"x": x[32:]}])
    kept = kept_outputs(pruner.analysis, removed)
    fitted = [reconstruct(prepared, cut, kept, batches, samples=64, progress=False, local=True, prefix=p)[0]
              for p in (prefix, None)]
    assert starts == [_position(prepared, "b2_c1"), None]
    for mine, theirs in zip(*(sorted(f.graph.initializer, key=lambda i: i.name) for f in fitted)):
        # float rounding of other kernel choices, moved a little by the solve
        np.testing.assert_allclose(numpy_helper.to_array(mine), numpy_helper.to_array(theirs), rtol=1e-3, atol=1e-4)
    assert any(not np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
               for a, b in zip(sorted(fitted[0].graph.initializer, key=lambda i: i.name),
                               sorted(cut.graph.initializer, key=lambda i: i.name)) if a.name == b.name)


def test_weights_a_cut_kept_reach_onnx_runtime_as_arrays_and_changed_ones_as_values():
    original, cuts = _cuts_in_graph_order(residual_net(set()))
    feeds = _feeds()
    prefix = segments.OriginalPrefix(original, feeds)
    prefix.shared = SharedWeights(original, min_bytes=0)  # the test net's weights are small
    output = original.graph.output[0].name
    for cut in cuts:
        got = list(prefix.run(cut, [output]))
        for mine, theirs in zip(got, _full_run(cut, [output], feeds)):
            np.testing.assert_allclose(mine[output], theirs[output], rtol=1e-5, atol=1e-6)
    # A cut of the second block: its sliced weights travel with their values, the last block's
    # weights (the original's) as stubs without data.
    cut = cuts[2]
    first, crossing = prefix.cut(cut)
    segment = segments.extract(cut, list(cut.graph.node), crossing[0], [output], prefix.shared)
    theirs = {i.name: i for i in original.graph.initializer}
    stubs = {t.name for t in segment.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert {"b2_c1.w", "b2_c2.w"} <= stubs
    mine = {i.name: i for i in cut.graph.initializer}
    for tensor in segment.graph.initializer:
        assert (tensor.name in stubs) == (mine[tensor.name] == theirs.get(tensor.name)), tensor.name
        if tensor.name in stubs:
            assert not tensor.raw_data
    assert set(prefix.shared.external(segment)) == stubs
    changed = {t.name for t in segment.graph.initializer if t.name not in stubs}
    assert {"b1_c1.w", "b1_c2.w"} <= changed
