"""Batch-1 models (the dynamo exporter's default) are pruned through a copy that takes whole
batches, and written back at batch 1 with their own constants."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder
from onnx import helper, numpy_helper

from onnx_ocnna import api
from onnx_ocnna.batch_axis import relax_batch
from onnx_ocnna.model_io import ort_session


def _batch1_model(allowzero: int = 1, leading: int = 1) -> onnx.ModelProto:
    """x [1, 3, 8, 8] -> conv -> relu -> conv -> relu -> GAP -> Reshape([leading, -1], allowzero) -> Gemm,
    as torch.onnx's dynamo exporter writes a fixed-batch CNN."""
    g = GraphBuilder(seed=4)
    a = g.relu(g.conv("x", 3, 8, name="a"))
    b = g.relu(g.conv(a, 8, 8, name="b"))
    pooled = g.node("GlobalAveragePool", [b])[0]
    model = g.model([1, 3, 8, 8], pooled)
    for opset in model.opset_import:  # Reshape's allowzero is opset 14's
        if opset.domain in ("", "ai.onnx"):
            opset.version = 18
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.array([leading, -1], np.int64), "flat_shape"))
    graph.initializer.append(numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4))
                                                     .astype(np.float32), "fc_w"))
    graph.node.append(helper.make_node("Reshape", [pooled, "flat_shape"], ["flat"], name="view", allowzero=allowzero))
    graph.node.append(helper.make_node("MatMul", ["flat", "fc_w"], ["logits"], name="fc"))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 4]))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("allowzero", [0, 1])
def test_the_copy_runs_any_batch_and_restores_the_users_graph(allowzero):
    model = _batch1_model(allowzero)
    relaxed = relax_batch(model)
    assert relaxed is not None and relaxed.reshapes == ["flat_shape"]
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    together = ort_session(relaxed.model).run(None, {"x": x})[0]
    one_by_one = np.concatenate([ort_session(model).run(None, {"x": x[i : i + 1]})[0] for i in range(5)])
    np.testing.assert_allclose(together, one_by_one, rtol=1e-5, atol=1e-6)
    back = relaxed.restore(relaxed.model)
    assert [n.SerializeToString() for n in back.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert ([i.SerializeToString() for i in back.graph.initializer]
            == [i.SerializeToString() for i in model.graph.initializer])
    assert [d.dim_value for d in back.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 8, 8]


def test_a_shape_given_by_a_constant_node_is_relaxed_and_restored():
    """Older TorchScript exports feed the Reshape from a Constant node, not an initializer."""
    model = _batch1_model(allowzero=0)
    graph = model.graph
    shape = next(i for i in graph.initializer if i.name == "flat_shape")
    graph.node.insert(0, helper.make_node("Constant", [], ["flat_shape"], name="shape_const",
                                          value=numpy_helper.from_array(numpy_helper.to_array(shape), "flat_shape")))
    graph.initializer.remove(shape)
    onnx.checker.check_model(model, full_check=True)
    relaxed = relax_batch(model)
    assert relaxed is not None and relaxed.reshapes == ["flat_shape"]
    assert ort_session(relaxed.model).run(None, {"x": np.zeros((3, 3, 8, 8), np.float32)})[0].shape == (3, 4)
    back = relaxed.restore(relaxed.model)
    assert [n.SerializeToString() for n in back.graph.node] == [n.SerializeToString() for n in model.graph.node]


def _with_shape(model: onnx.ModelProto, shape: list[int]) -> onnx.ModelProto:
    for init in model.graph.initializer:
        if init.name == "flat_shape":
            init.CopyFrom(numpy_helper.from_array(np.array(shape, np.int64), "flat_shape"))
    return model


def test_a_shape_without_minus_one_is_relaxed_too():
    relaxed = relax_batch(_with_shape(_batch1_model(), [1, 8]))  # [0, 8] copies the batch axis
    assert relaxed is not None
    assert ort_session(relaxed.model).run(None, {"x": np.zeros((3, 3, 8, 8), np.float32)})[0].shape == (3, 4)


def test_a_graph_only_batch_1_satisfies_is_left_alone(capfd):
    """A shape constant something else reads too is not touched, so the copy cannot run two
    images; the model is then pruned as it is, and ONNX Runtime's refusal of the copy is not
    printed to the user."""
    model = _batch1_model()
    model.graph.node.append(helper.make_node("Identity", ["flat_shape"], ["shape_copy"], name="other_reader"))
    model.graph.output.append(helper.make_tensor_value_info("shape_copy", onnx.TensorProto.INT64, [2]))
    capfd.readouterr()
    assert relax_batch(model) is None
    assert "onnxruntime" not in capfd.readouterr().err
    assert relax_batch(onnx.load_from_string(_batch1_model().SerializeToString())) is not None
    dynamic = _batch1_model()
    dynamic.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    assert relax_batch(dynamic) is None  # nothing to relax


def test_compress_of_a_batch_1_model_writes_it_at_batch_1_within_the_budget():
    model = _batch1_model()
    x = np.random.default_rng(2).standard_normal((64, 3, 8, 8)).astype(np.float32)
    pruned, report = api.compress(model, x, target_params=0.7, progress=False)
    onnx.checker.check_model(pruned, full_check=True)
    assert [d.dim_value for d in pruned.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 8, 8]
    assert [d.dim_value for d in pruned.graph.output[0].type.tensor_type.shape.dim] == [1, 4]
    view = next(n for n in pruned.graph.node if n.name == "view")
    assert [(a.name, a.i) for a in view.attribute] == [("allowzero", 1)]
    shape = next(numpy_helper.to_array(i) for i in pruned.graph.initializer if i.name == "flat_shape")
    assert shape.tolist() == [1, -1]
    assert report.rpr <= 0.7 and any("fixes its batch size at 1" in n for n in report.notes)
    assert report.extra["plan"]["model_sha256"] == api.Pruner(model).sha256  # the user's model
    out = ort_session(pruned).run(None, {"x": x[:1]})[0]
    assert out.shape == (1, 4) and np.isfinite(out).all()


class _RunCounter:
    """Counts ONNX Runtime ``session.run`` calls and the samples each fed."""

    def __init__(self, monkeypatch) -> None:
        import onnxruntime as ort

        self.rows: list[int] = []
        run = ort.InferenceSession.run

        def counted(session, output_names, input_feed, *args, **kwargs):
            self.rows.append(len(next(iter(input_feed.values()))))
            return run(session, output_names, input_feed, *args, **kwargs)

        monkeypatch.setattr(ort.InferenceSession, "run", counted)


def _images(count: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 8, 8)).astype(np.float32)


def test_predictions_of_a_batch_1_model_run_on_whole_batches(monkeypatch):
    """Data opened for a batch-1 model comes one image per batch; the held-out passes join them."""
    from onnx_ocnna.evaluate import HeldOut, predictions

    model = _batch1_model()
    x = _images(70)
    source = api.as_source(x, model)
    assert source.batch_size == 1
    one_by_one = np.array([ort_session(model).run(None, {"x": x[i : i + 1]})[0].argmax() for i in range(70)])
    counter = _RunCounter(monkeypatch)
    pred, _ = predictions(model, source.batches())
    np.testing.assert_array_equal(pred, one_by_one)
    assert [r for r in counter.rows if r > 2] == [32, 32, 6] and len(counter.rows) == 6  # and the copy's 3 probe runs
    # Batches of 32 (opened for a relaxed copy) fed to the batch-1 model give the same answer.
    wide = api.as_source(x, relax_batch(model).model)
    assert wide.batch_size == 32
    np.testing.assert_array_equal(predictions(model, wide.batches())[0], one_by_one)
    assert HeldOut(model, source.batches).measure(model).agreement == 1.0


def test_a_batch_1_model_without_a_relaxed_copy_runs_wide_batches_one_sample_at_a_time():
    from onnx_ocnna.evaluate import predictions

    model = _batch1_model()
    model.graph.node.append(helper.make_node("Identity", ["flat_shape"], ["shape_copy"], name="other_reader"))
    model.graph.output.append(helper.make_tensor_value_info("shape_copy", onnx.TensorProto.INT64, [2]))
    assert relax_batch(model) is None
    x = _images(40)
    wide = api.as_source(x, relax_batch(_batch1_model()).model)
    one_by_one = [ort_session(model).run(None, {"x": x[i : i + 1]})[0].argmax() for i in range(40)]
    np.testing.assert_array_equal(predictions(model, wide.batches())[0], one_by_one)


def test_scores_of_a_batch_1_model_are_computed_on_whole_batches(monkeypatch):
    """`score` (and the scoring of a sweep or a search) given data opened for the batch-1 model."""
    model = _batch1_model()
    x = _images(64)
    free = api.score(relax_batch(model).model, x, progress=False)
    counter = _RunCounter(monkeypatch)
    fixed = api.score(model, api.as_source(x, model), progress=False)
    assert fixed.samples == 64 and max(counter.rows) == 32 and len(counter.rows) < 16
    assert fixed.groups.keys() == free.groups.keys()
    for group, values in free.groups.items():
        np.testing.assert_allclose(fixed.groups[group], values, rtol=1e-4)


def test_a_sweep_of_a_batch_1_model_reads_whole_batches_and_matches_its_free_batch_copy(monkeypatch):
    """Every pass of a sweep (scoring, allocation, refit, held-out) over a batch-1 model runs
    whole batches: as few ORT runs as for the same network with a free batch, the same rows."""
    from onnx_ocnna.sweep import run_sweep

    model = _batch1_model()
    free = relax_batch(model).model
    calibration, held_out = _images(96, seed=3), _images(64, seed=4)
    runs = {}
    rows = {}
    for name, network in (("fixed", model), ("free", free)):
        counter = _RunCounter(monkeypatch)
        rows[name] = run_sweep(network, calibration, held_out, targets=("params", [0.7]), progress=False)
        runs[name] = counter.rows
        monkeypatch.undo()
    assert [r["rpr"] for r in rows["fixed"]] == [r["rpr"] for r in rows["free"]]
    assert rows["fixed"][0]["agreement"] == pytest.approx(rows["free"][0]["agreement"], abs=1 / 64)
    # The copies' probes add a few two-image runs; one image per run would be hundreds more.
    assert sum(r == 1 for r in runs["fixed"]) <= sum(r == 1 for r in runs["free"]) + 10
    assert len(runs["fixed"]) < 2 * len(runs["free"])


def test_a_batch_1_student_is_distilled_on_whole_batches_and_written_at_batch_1(monkeypatch):
    """Data opened for batch 1 would make every optimiser step (and every training BatchNorm's
    statistics) one image's."""
    import onnx_ocnna.distill as kd

    teacher = _batch1_model()
    student, _ = api.compress(teacher, _images(64), percentile=50, progress=False)
    assert [d.dim_value for d in student.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 8, 8]
    first_batch_rows = []
    train = kd.distill

    def spy(student_model, teacher_model, batches, **options):
        first_batch_rows.append(len(next(iter(batches())).feeds["x"]))
        return train(student_model, teacher_model, batches, **options)

    monkeypatch.setattr(kd, "distill", spy)
    distilled, report = api.distill(student, teacher, _images(64, seed=5), epochs=1, alpha=0, progress=False,
                                    threads=1)
    # Data already opened for the batch-1 model (a sweep's calibration source) is read whole too.
    api.distill(student, teacher, api.as_source(_images(64, seed=5), teacher), epochs=1, alpha=0, progress=False,
                threads=1)
    assert first_batch_rows == [32, 32]
    onnx.checker.check_model(distilled, full_check=True)
    assert [d.dim_value for d in distilled.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 8, 8]
    view = next(n for n in distilled.graph.node if n.name == "view")
    assert [(a.name, a.i) for a in view.attribute] == [("allowzero", 1)]
    assert next(numpy_helper.to_array(i) for i in distilled.graph.initializer if i.name == "flat_shape").tolist() == [1, -1]
    x = _images(1, seed=6)
    assert not np.allclose(ort_session(distilled).run(None, {"x": x})[0], ort_session(student).run(None, {"x": x})[0])


def _unbatched_output_model() -> onnx.ModelProto:
    """The batch-1 model with its logits reshaped to [-1]: an output of [4], no batch axis."""
    model = _batch1_model()
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "flat_all"))
    model.graph.node.append(helper.make_node("Reshape", ["logits", "flat_all"], ["scores"], name="unbatch"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [4]))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_model_whose_output_has_no_batch_axis_keeps_batch_1():
    """[4] for one image and [8] for two: the two images' outputs joined, but 8 rows are not 8
    images; no copy is made, the model runs one image at a time, each giving one prediction."""
    model = _unbatched_output_model()
    assert relax_batch(model) is None
    from onnx_ocnna.evaluate import predictions

    x = _images(5)
    pred, _ = predictions(model, api.as_source(x, model).batches())  # one prediction per image, not 4
    np.testing.assert_array_equal(pred, [ort_session(model).run(None, {"x": x[i : i + 1]})[0].argmax() for i in range(5)])


def test_the_damage_of_a_cut_is_measured_on_an_output_without_a_batch_axis():
    """Each image's [4] output is one distribution over 4 classes, not 4 one-class ones (whose
    KL is 0 for every cut, which left the allocation blind)."""
    from onnx_ocnna.allocate import DamageMeter

    model = _unbatched_output_model()
    feeds = [{"x": x[None]} for x in _images(16)]
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    weight = next(i for i in cut.graph.initializer if i.name == "fc_w")
    weight.CopyFrom(numpy_helper.from_array(np.zeros((8, 4), np.float32), "fc_w"))
    meter = DamageMeter(model, feeds, refit=False)
    assert meter(model) == pytest.approx(0.0, abs=1e-9) and meter(cut) > 1e-3


def test_inspect_says_how_a_batch_1_model_is_run(tmp_path, capsys):
    from onnx_ocnna.cli import main

    assert api.inspect(_batch1_model())["batch_1"] == {"whole_batches": True}
    assert api.inspect(_unbatched_output_model())["batch_1"] == {"whole_batches": False}
    free = relax_batch(_batch1_model()).model
    assert api.inspect(free)["batch_1"] is None
    path = tmp_path / "b1.onnx"
    onnx.save(_batch1_model(), str(path))
    assert main(["inspect", str(path)]) == 0
    assert "fixes its batch size at 1: its passes run on whole batches" in capsys.readouterr().out


def _batch1_model_with_a_free_gain() -> onnx.ModelProto:
    """:func:`_batch1_model` whose logits are scaled by a second input ``gain`` [N, 1] that
    leaves its batch free, listed before ``x``: only the second input fixes batch 1."""
    model = _batch1_model()
    graph = model.graph
    graph.node.append(helper.make_node("Mul", ["logits", "gain"], ["scaled"], name="gain_mul"))
    graph.input.insert(0, helper.make_tensor_value_info("gain", onnx.TensorProto.FLOAT, ["N", 1]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("scaled", onnx.TensorProto.FLOAT, [1, 4]))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_one_input_fixing_batch_1_makes_the_model_batch_1():
    """Any data input that fixes batch 1 limits every feed to one sample, whichever input it is;
    the passes then run the relaxed copy on joined batches, with the original's outputs."""
    from onnx_ocnna.batch_axis import for_passes, takes_batch_1_only
    from onnx_ocnna.calibration import Batch

    model = _batch1_model_with_a_free_gain()
    assert takes_batch_1_only(model)
    x, gain = _images(40), np.linspace(0.5, 2.0, 40, dtype=np.float32)[:, None]
    singles = [Batch({"gain": gain[i : i + 1], "x": x[i : i + 1]}, None) for i in range(40)]
    copy, batches = for_passes(model, singles)
    assert copy is not model and not copy.graph.input[1].type.tensor_type.shape.dim[0].HasField("dim_value")
    batches = list(batches)
    assert [b.feeds["x"].shape[0] for b in batches] == [32, 8]
    together = np.concatenate([ort_session(copy).run(None, b.feeds)[0] for b in batches])
    one_by_one = np.concatenate([ort_session(model).run(None, b.feeds)[0] for b in singles])
    np.testing.assert_allclose(together, one_by_one, rtol=1e-5, atol=1e-6)


def test_latency_is_timed_at_the_batch_any_input_fixes():
    from onnx_ocnna.evaluate import compare_latency

    model = _batch1_model_with_a_free_gain()  # the first input, gain, is free
    rows = compare_latency(model, model, batches=(1, 32), runs=2)
    assert [row["batch"] for row in rows] == [1]


def test_inputs_that_fix_different_batches_are_refused():
    from onnx_ocnna.calibration import model_fixed_batch
    from onnx_ocnna.errors import InputError

    model = _batch1_model_with_a_free_gain()
    assert model_fixed_batch(model) == 1
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1  # Paddle's free batch
    assert model_fixed_batch(model) == 1
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    with pytest.raises(InputError, match=r"different batch sizes \[1, 2\]"):
        model_fixed_batch(model)
    with pytest.raises(InputError, match="different batch sizes"):
        api.as_source({"gain": np.ones((4, 1), np.float32), "x": np.zeros((4, 3, 8, 8), np.float32)}, model)
