"""Statistics reduced inside the scoring graph (onnx_ocnna.reductions, collect.with_reductions):
the same OCNNA scores as from the returned maps, exact zeros for constant maps, packing of the
outputs, and slicing of large batches."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import GraphBuilder
from onnx import TensorProto, helper, numpy_helper

from onnx_ocnna import api, collect
from onnx_ocnna.criteria.ocnna import OCNNAAccumulator, energy_from_column_moments, ocnna_frobenius
from onnx_ocnna.reductions import ColumnMoments


def _net(batch="N", constant_filter: bool = True, height: int = 12, width: int = 10) -> onnx.ModelProto:
    """conv-relu-conv-relu-pool-gemm on [batch, 3, height, width]. With ``constant_filter``
    the first conv's filter 0 has zero weights and a positive bias, so its ReLU map is the
    constant 0.7 on every image (F = 0: a dead filter for OCNNA)."""
    g = GraphBuilder(seed=3)
    h = g.relu(g.conv("x", 3, 16, name="c1"))
    h = g.relu(g.conv(h, 16, 16, name="c2"))
    out = g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [h])[0]])[0], 16, 4)
    model = g.model([batch, 3, height, width], out)
    if constant_filter:
        for init in model.graph.initializer:
            values = numpy_helper.to_array(init).copy()
            if init.name == "c1.w":
                values[0] = 0.0
            elif init.name == "c1.b":
                values[0] = 0.7
            else:
                continue
            init.CopyFrom(numpy_helper.from_array(values, init.name))
    return model


def _flat_net() -> onnx.ModelProto:
    """conv-relu-conv-relu-flatten-gemm on [N, 3, 8, 8]: every measured map is 8 x 8, so with
    OCNNA at tau = 1 every one is reduced and nothing comes back whole."""
    g = GraphBuilder(seed=5)
    h = g.relu(g.conv("x", 3, 16, name="c1"))
    h = g.relu(g.conv(h, 16, 16, name="c2"))
    return g.model(["N", 3, 8, 8], g.gemm(g.node("Flatten", [h])[0], 16 * 8 * 8, 4))


def _data(samples: int = 96, height: int = 12, width: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((samples, 3, height, width), dtype=np.float32)


def test_in_graph_scores_match_the_maps_and_a_constant_map_stays_dead() -> None:
    model, data = _net(), _data()
    in_graph = api.score(model, data, progress=False).groups
    maps = api.score(model, data, progress=False, criterion_options={"in_graph": False}).groups
    assert in_graph.keys() == maps.keys()
    for gid in maps:
        np.testing.assert_allclose(in_graph[gid], maps[gid], rtol=1e-5)
    conv1 = next(gid for gid, s in maps.items() if s[0] == 0.0)
    # Rounding noise in the constant map would give a steady F > 0, the score of the most
    # important filter (+inf); the column test keeps it at exactly 0.
    assert in_graph[conv1][0] == 0.0


def test_in_graph_reduction_is_used_where_it_applies() -> None:
    acc = OCNNAAccumulator(16)
    assert acc.reduction(["N", 16, 12, 10]) == ColumnMoments(16, 12, 10)
    assert acc.reduction(["N", 16, 2, 1]) == ColumnMoments(16, 2, 1)
    for shape in (["N", 16, "H", 10], ["N", 16, 12, None], ["N", 16, 1, 10], ["N", 16], ["N", 16, 5],
                  ["N", 8, 12, 10]):
        assert acc.reduction(shape) is None, shape
    assert OCNNAAccumulator(16, pca_variance=0.95).reduction(["N", 16, 12, 10]) is None
    assert OCNNAAccumulator(16, in_graph=False).reduction(["N", 16, 12, 10]) is None


@pytest.mark.parametrize(("height", "width"), [(2, 1), (2, 6), (7, 6), (32, 32), (224, 7), (8, 224), (224, 224)])
def test_column_moments_from_onnx_runtime_give_exact_zero_for_constant_columns(height: int, width: int) -> None:
    """Where every column is constant the float32 means differ by rounding only; that must read
    as 0, while a map with a real spread keeps its float64 energy."""
    channels = 16
    g = GraphBuilder()
    out = g.node("Relu", ["x"])[0]
    model = g.model(["N", channels, height, width], out)
    reduction = ColumnMoments(channels, height, width)
    names = reduction.add_to(model.graph, out, "r")
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(height * width)
    x = np.broadcast_to(rng.uniform(0.01, 300.0, (8, channels, 1, width)), (8, channels, height, width))
    x = x.astype(np.float32).copy()
    x[:, 3::4] = x[:, 3::4, :1, :1]  # constant maps
    x[:, 1::2] += rng.normal(0.0, 1.0, (8, channels // 2, height, width)).astype(np.float32) * x[:, 1::2]
    x = np.maximum(x, 0.0)
    mean_square, squared_mean = session.run(names, {"x": x})
    energy = energy_from_column_moments(mean_square, squared_mean, height, width)
    assert np.all(energy[:, 0::2] == 0.0)
    exact = ocnna_frobenius(x.astype(np.float64), 1.0, dtype=np.float64) ** 2
    # The stated bound: each float32 mean is within about (H + W) units of 2^-24 of its mean square.
    bound = 4 * (height + width) * 2.0 ** -24 * height * width * mean_square[:, :, 0, 0]
    assert np.all(np.abs(energy - exact) <= bound)
    assert np.all(energy[exact > 2 * bound] > 0)


def test_reduction_outputs_are_packed_by_their_trailing_dims() -> None:
    """Tensors of two sizes reduce to [N, C, 1, 1] each: one graph output in all, and every
    slice of it is where it is said to be."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[2, 2],
                                                                 strides=[2, 2]),
         helper.make_node("Relu", ["p"], ["b"]), helper.make_node("Identity", ["b"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    reductions = {"a": ColumnMoments(16, 6, 6), "b": ColumnMoments(16, 3, 3)}
    extended, located = collect.with_reductions(model, reductions)
    added = [o.name for o in extended.graph.output][1:]
    assert len(added) == 1
    session = ort.InferenceSession(extended.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 16, 6, 6)).astype(np.float32)
    outputs = dict(zip(added, session.run(added, {"x": x})))
    relu = np.maximum(x, 0)
    tensors = {"a": relu, "b": np.maximum(x.reshape(5, 16, 3, 2, 3, 2).mean(axis=(3, 5)), 0)}
    for tensor, places in located.items():
        (q_out, q0, q1), (m_out, m0, m1) = places
        t = tensors[tensor]
        np.testing.assert_allclose(outputs[q_out][:, q0:q1, 0, 0], (t ** 2).mean(axis=(2, 3)), rtol=1e-5)
        np.testing.assert_allclose(outputs[m_out][:, m0:m1, 0, 0], (t.mean(axis=2) ** 2).mean(axis=2), rtol=1e-5)


def test_a_graph_naming_the_reduction_prefix_keeps_its_tensors() -> None:
    taken = "onnx_ocnna_reduce/0/column_mean"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], [taken]), helper.make_node("Identity", [taken], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    extended, located = collect.with_reductions(model, {taken: ColumnMoments(16, 4, 4)})
    produced = [o for n in extended.graph.node for o in n.output]
    assert len(produced) == len(set(produced))
    session = ort.InferenceSession(extended.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((3, 16, 4, 4)).astype(np.float32)
    (packed, start, end), _ = located[taken]
    y, mean_square = session.run(["y", packed], {"x": x})
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    np.testing.assert_allclose(mean_square[:, start:end, 0, 0], (np.maximum(x, 0) ** 2).mean(axis=(2, 3)), rtol=1e-5)


def test_large_batches_run_in_slices_with_the_same_scores(monkeypatch) -> None:
    model, data = _net(), _data(samples=100)
    calls = []
    real = collect.ort_session

    def counting_session(*args, **kwargs):
        session = real(*args, **kwargs)

        class Counting:
            def __getattr__(self, name):
                return getattr(session, name)

            def run(self, names, feeds):
                calls.append(len(next(iter(feeds.values()))))
                return session.run(names, feeds)

        return Counting()

    monkeypatch.setattr(collect, "ort_session", counting_session)
    whole = api.score(model, data, progress=False, calibration_options={"batch_size": 100}).groups
    assert calls == [collect.MAX_RUN_ROWS] * 3 + [100 - 3 * collect.MAX_RUN_ROWS]
    calls.clear()
    small = api.score(model, data, progress=False, calibration_options={"batch_size": 10}).groups
    assert calls == [10] * 10
    for gid in whole:
        np.testing.assert_allclose(whole[gid], small[gid], rtol=1e-9)
    # Returned maps of more than a vector's size are sliced too, and each slice goes to the
    # statistics on its own: gluing them back would copy them and hold the whole batch.
    calls.clear()
    seen = []
    real_update = OCNNAAccumulator.update

    def recording_update(self, activations, labels=None):
        seen.append(len(activations))
        return real_update(self, activations, labels)

    monkeypatch.setattr(OCNNAAccumulator, "update", recording_update)
    big_model, big_data = _net(height=32, width=32), _data(samples=100, height=32, width=32)
    maps = api.score(big_model, big_data, progress=False, criterion_options={"in_graph": False},
                     calibration_options={"batch_size": 100}).groups
    assert calls == [collect.MAX_RUN_ROWS] * 3 + [4]
    assert max(seen) == collect.MAX_RUN_ROWS
    reference = api.score(big_model, big_data, progress=False, criterion_options={"in_graph": False},
                          calibration_options={"batch_size": 10}).groups
    for gid in maps:
        np.testing.assert_allclose(maps[gid], reference[gid], rtol=1e-9)


def test_runs_hold_fewer_images_as_the_measured_maps_grow() -> None:
    assert collect.run_rows(2e6) == collect.MAX_RUN_ROWS  # ResNet-56: 2 MB of maps per image
    assert collect.run_rows(16.5 * 2**20) == 4  # MobileNetV2 at 224
    assert collect.run_rows(40 * 2**20) == 2  # ResNet-50 at 224
    assert collect.run_rows(1e9) == 1
    sizes = [collect.run_rows(b) for b in np.geomspace(1e5, 1e9, 30)]
    assert sizes == sorted(sizes, reverse=True)


def test_a_static_batch_is_not_sliced() -> None:
    model, data = _net(batch=40), _data(samples=80)
    scores = api.score(model, data, progress=False, calibration_options={"batch_size": 40})
    assert scores.samples == 80


def test_reduced_maps_and_returned_vectors_are_gathered_together(monkeypatch) -> None:
    """A hidden fully connected layer's [N, C] output comes back whole while the first Conv's
    map is reduced; the runs of a sliced batch are gathered into groups of GLUE_ROWS rows and
    scored like the maps path."""
    g = GraphBuilder(seed=4)
    h = g.relu(g.conv("x", 3, 16, name="c1"))
    h = g.relu(g.conv(h, 16, 16, name="c2"))
    flat = g.node("Flatten", [g.node("GlobalAveragePool", [h])[0]])[0]
    hidden = g.relu(g.gemm(flat, 16, 32, name="fc1"))
    model = g.model(["N", 3, 12, 10], g.gemm(hidden, 32, 4, name="fc2"))
    data = _data(samples=100)
    rows = {"reduced": [], "returned": []}
    real_reduced, real_update = OCNNAAccumulator.update_reduced, OCNNAAccumulator.update
    monkeypatch.setattr(OCNNAAccumulator, "update_reduced", lambda self, r, reduced, labels=None: (
        rows["reduced"].append(len(reduced[0])), real_reduced(self, r, reduced, labels))[1])
    monkeypatch.setattr(OCNNAAccumulator, "update", lambda self, a, labels=None: (
        rows["returned"].append(np.ndim(a)), real_update(self, a, labels))[1])
    sliced = api.score(model, data, progress=False, calibration_options={"batch_size": 100})
    assert rows["reduced"] == [collect.GLUE_ROWS, 100 - collect.GLUE_ROWS]
    assert sorted(rows["returned"]) == [2, 2, 4, 4]  # fc1 [N, 32] and c2's 1 x 1 map, per group
    whole = api.score(model, data, progress=False, calibration_options={"batch_size": 10},
                      criterion_options={"in_graph": False})
    assert len(sliced.groups) == 3 and sliced.samples == 100
    for gid in whole.groups:
        np.testing.assert_allclose(sliced.groups[gid], whole.groups[gid], rtol=1e-5)


@pytest.mark.parametrize("in_graph", [True, False])  # all reduced: one thread; maps: a worker
def test_a_failing_calibration_source_is_reported_and_closed(in_graph: bool) -> None:
    from onnx_ocnna.calibration import Batch
    from onnx_ocnna.criteria import get_criterion
    from onnx_ocnna.errors import InputError

    pruner = api.Pruner(_flat_net())
    crit = get_criterion("ocnna", in_graph=in_graph)
    accumulators = {m: crit.new_accumulator(api.member_info(pruner.analysis, m))
                    for g in pruner.analysis.groups if g.prunable for m in g.members}
    closed = []

    def batches():
        try:
            for i in range(3):
                yield Batch({"x": np.zeros((4, 3, 8, 8), np.float32)}, None)
            raise OSError("disk gone\nsecond line")
        finally:
            closed.append(True)

    with pytest.raises(InputError, match="calibration run failed: disk gone$"):
        collect.collect(pruner.prepared_model(), pruner.analysis, crit, accumulators, batches(), progress=False)
    assert closed == [True]


def test_an_interrupt_in_the_statistics_closes_the_source_at_once(monkeypatch) -> None:
    """With the statistics in the calling thread (reductions), a Ctrl-C in them stops the run
    and closes the calibration source before collect returns."""
    from onnx_ocnna.calibration import Batch
    from onnx_ocnna.criteria import get_criterion

    pruner = api.Pruner(_flat_net())
    crit = get_criterion("ocnna")
    accumulators = {m: crit.new_accumulator(api.member_info(pruner.analysis, m))
                    for g in pruner.analysis.groups if g.prunable for m in g.members}
    calls = []

    def interrupting(self, reduction, reduced, labels=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(OCNNAAccumulator, "update_reduced", interrupting)
    produced, closed = [], []

    def batches():
        try:
            for i in range(1000):
                produced.append(i)
                yield Batch({"x": np.zeros((collect.GLUE_ROWS, 3, 8, 8), np.float32)}, None)
        finally:
            closed.append(True)

    before = set(threading.enumerate())
    with pytest.raises(KeyboardInterrupt):
        collect.collect(pruner.prepared_model(), pruner.analysis, crit, accumulators, batches(), progress=False)
    assert closed == [True] and len(produced) == 1  # two members: the second update of batch 0
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive() and t.name != "tqdm_monitor"]


def test_small_outputs_of_small_batches_reach_the_statistics_in_groups(monkeypatch) -> None:
    """A static batch of 1 runs one image at a time; the statistics get GLUE_ROWS rows at once,
    and the scores and sample count are those of large batches."""
    model, data = _net(batch=1, height=8, width=8), _data(samples=150, height=8, width=8)
    seen = []
    real = OCNNAAccumulator.update_reduced

    def recording(self, reduction, reduced, labels=None):
        seen.append(len(reduced[0]))
        return real(self, reduction, reduced, labels)

    monkeypatch.setattr(OCNNAAccumulator, "update_reduced", recording)
    one = api.score(model, data, progress=False, calibration_options={"batch_size": 1})
    assert seen == [collect.GLUE_ROWS, collect.GLUE_ROWS, 150 - 2 * collect.GLUE_ROWS]
    assert one.samples == 150
    whole = api.score(_net(height=8, width=8), data, progress=False, calibration_options={"batch_size": 150})
    for gid in whole.groups:
        np.testing.assert_allclose(one.groups[gid], whole.groups[gid], rtol=1e-9)
