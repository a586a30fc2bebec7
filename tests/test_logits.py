"""A model that ends in a Softmax (Keras through tf2onnx) is measured and distilled on its logits,
exactly as the same network without the Softmax."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder
from onnx import helper, numpy_helper

from onnx_ocnna import api
from onnx_ocnna.allocate import DamageMeter
from onnx_ocnna.logits import final_softmax, logits_name, logits_view
from onnx_ocnna.model_io import ort_session


def _net(softmax_axis: int | None = None, label: bool = False) -> onnx.ModelProto:
    """conv-BN-relu x 2, GAP, Gemm -> logits [N, 6]; with ``softmax_axis`` a final Softmax, and
    with ``label`` its ArgMax (int64 [N]) as the first output."""
    g = GraphBuilder(seed=2)
    a = g.relu(g.bn(g.conv("x", 3, 16, name="conv_a"), 16, name="bn_a"))
    b = g.relu(g.bn(g.conv(a, 16, 16, name="conv_b"), 16, name="bn_b"))
    logits = g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [b])[0]])[0], 16, 6, name="fc")
    model = g.model(["N", 3, 8, 8], logits)
    if softmax_axis is not None:
        graph = model.graph
        graph.node.append(helper.make_node("Softmax", [logits], ["probs"], axis=softmax_axis, name="softmax"))
        graph.output[0].name = "probs"
    if label:
        graph.node.append(helper.make_node("ArgMax", ["probs"], ["label"], axis=1, keepdims=0, name="argmax"))
        graph.output.insert(0, helper.make_tensor_value_info("label", onnx.TensorProto.INT64, ["N"]))
    onnx.checker.check_model(model, full_check=True)
    return model


_WITH_SOFTMAX = [pytest.param({"softmax_axis": 1}, id="probabilities"),
                 pytest.param({"softmax_axis": 1, "label": True}, id="label-then-probabilities")]


def _images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("variant", _WITH_SOFTMAX)
def test_the_view_of_a_softmax_model_outputs_its_logits(variant):
    probs, plain = _net(**variant), _net()
    view = logits_view(probs)
    assert [o.name for o in view.graph.output] == [plain.graph.output[0].name]
    onnx.checker.check_model(view, full_check=True)
    assert [n.op_type for n in view.graph.node] == [n.op_type for n in plain.graph.node]
    assert logits_name(probs) == view.graph.output[0].name == plain.graph.output[0].name
    x = _images(4)
    np.testing.assert_allclose(ort_session(view).run(None, {"x": x})[0], ort_session(plain).run(None, {"x": x})[0],
                               rtol=1e-6)
    assert logits_view(plain) is plain and final_softmax(plain) is None
    assert final_softmax(_net(softmax_axis=0)) is None  # across the batch: not class scores
    assert final_softmax(_net(softmax_axis=-1)) is not None


@pytest.mark.parametrize("variant", _WITH_SOFTMAX)
def test_the_damage_of_a_cut_is_the_kl_of_the_logits(variant):
    """Before, the softmax of the probabilities was compared (near uniform, 20-50 times
    smaller), or the labels' (0 for every cut)."""
    x = [{"x": _images(32, seed)} for seed in (1, 2)]
    probs, plain = _net(**variant), _net()
    cut = {}
    for name, model in (("probs", probs), ("plain", plain)):
        damaged = onnx.ModelProto()
        damaged.CopyFrom(model)
        for init in damaged.graph.initializer:
            if init.name == "conv_b.w":  # halve half of the filters: a cut-like change
                w = numpy_helper.to_array(init).copy()
                w[:8] *= 0.5
                init.CopyFrom(numpy_helper.from_array(w, init.name))
        cut[name] = DamageMeter(model, x, refit=False)(damaged)
    assert cut["plain"] > 1e-3
    assert cut["probs"] == pytest.approx(cut["plain"], rel=1e-6)


@pytest.mark.parametrize("variant", _WITH_SOFTMAX)
def test_a_softmax_student_is_distilled_on_its_logits_and_keeps_its_softmax(variant):
    """Before, KD at T = 4 compared softmaxes of probabilities, which taught almost nothing."""
    x = _images(96)
    trained = {}
    for name, model in (("probs", _net(**variant)), ("plain", _net())):
        student, _ = api.compress(model, x, target_macs=0.6, progress=False)
        distilled, report = api.distill(student, model, x, epochs=1, progress=False, threads=1, alpha=0.0)
        assert [o.name for o in distilled.graph.output] == [o.name for o in model.graph.output]
        assert [n.op_type for n in distilled.graph.node] == [n.op_type for n in student.graph.node]
        trained[name] = {i.name: numpy_helper.to_array(i) for i in distilled.graph.initializer}
        if name == "probs":
            assert report.settings["logits"] == logits_name(model)
    assert trained["probs"].keys() == trained["plain"].keys()
    for key, value in trained["plain"].items():
        np.testing.assert_array_equal(trained["probs"][key], value)


def test_the_synthesis_class_term_reads_the_logits():
    from onnx_ocnna.synthesize import synthesize

    made = [synthesize(model, samples=8, batch_size=8, iterations=3, class_weight=1.0, progress=False, threads=1)
            for model in (_net(softmax_axis=1), _net())]
    np.testing.assert_array_equal(made[0].arrays["x"], made[1].arrays["x"])


def test_top_1_is_read_from_the_scores_not_from_a_label_output():
    """Before, the label output [N] was read as one score per sample: every prediction was
    class 0, and the preprocessing check warned that the model was broken."""
    from onnx_ocnna.calibration import Batch
    from onnx_ocnna.evaluate import near_chance_warning, predictions

    x = _images(64)
    plain, labelled = _net(), _net(softmax_axis=1, label=True)
    expected = ort_session(plain).run(None, {"x": x})[0].argmax(axis=1)
    batches = [Batch({"x": x[i : i + 16]}, expected[i : i + 16]) for i in range(0, 64, 16)]
    np.testing.assert_array_equal(predictions(labelled, batches)[0], expected)
    assert near_chance_warning(labelled, batches, "the data") is None


def test_a_model_that_returns_labels_only_is_refused_where_scores_are_needed():
    """Before, a budget measured every cut of a label-only model as free (KL 0)."""
    from onnx_ocnna.errors import InputError

    model = _net(softmax_axis=1, label=True)
    del model.graph.output[1:]  # the label alone
    x = _images(64)
    with pytest.raises(InputError, match=r"outputs \(label\) hold no class scores"):
        api.compress(model, x, target_macs=0.6, progress=False)
    labels = np.arange(64) % 6
    for calibration in (x, {"x": x, "labels": labels}):  # labelled: the preprocessing check is skipped
        pruned, _ = api.compress(model, calibration, percentile=30, progress=False)  # no scores needed
        assert pruned.graph.output[0].name == "label"
