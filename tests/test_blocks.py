"""SI block removal: identity-shortcut blocks found, measured and removed (SPEC section 4)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder, residual_net

from onnx_ocnna import api
from onnx_ocnna.blocks import drop_blocks, find_residual_blocks, select_blocks
from onnx_ocnna.calibration import Batch
from onnx_ocnna.channels.analysis import prepare_graph
from onnx_ocnna.errors import InputError
from onnx_ocnna.model_io import ort_session, validate_model


def _resnet(zero_blocks: set[int]) -> onnx.ModelProto:
    return residual_net(zero_blocks)


def _data(n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 3, 6, 6)).astype(np.float32), "labels": rng.integers(0, 4, n)}


def _batches(n: int = 64, seed: int = 0):
    data = _data(n, seed)
    return [Batch({"x": data["x"][i:i + 16]}, data["labels"][i:i + 16]) for i in range(0, n, 16)]


def test_finds_identity_shortcut_blocks_only():
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 4, name="a"))
    b = g.conv("x", 3, 4, name="b")  # two parallel convs: not a residual block
    s = g.node("Add", [a, b], name="not_a_block")[0]
    model = g.model([1, 3, 6, 6], s)
    assert find_residual_blocks(prepare_graph(model)) == []
    blocks = find_residual_blocks(prepare_graph(_resnet(set())))
    assert [b.add for b in blocks] == ["b0_add", "b1_add", "b2_add"]
    assert all(b.output.startswith("relu") for b in blocks)


def test_zero_branch_block_is_dropped_and_outputs_unchanged():
    model = _resnet({1})
    reduced, blocks = select_blocks(model, _batches(), si_epsilon=0.0)
    by_name = {b.add: b for b in blocks}
    assert by_name["b1_add"].si_in == by_name["b1_add"].si_out
    assert by_name["b1_add"].dropped
    only_zero = drop_blocks(model, [by_name["b1_add"]])
    validate_model(only_zero)
    feeds = {"x": np.random.default_rng(3).standard_normal((4, 3, 6, 6)).astype(np.float32)}
    expected = ort_session(model).run(None, feeds)[0]
    np.testing.assert_allclose(ort_session(only_zero).run(None, feeds)[0], expected, rtol=1e-5, atol=1e-6)
    names = {n.name for n in only_zero.graph.node}
    assert "b1_c1" not in names and "b1_c2" not in names and "b1_add" not in names
    assert "b0_c1" in names


@pytest.mark.parametrize("order", [(1, 2), (2, 1)])
def test_consecutive_blocks_without_activation_are_dropped_together(order):
    """MobileNetV2's blocks end at the Add, so the second block's shortcut is the first block's
    Add output: removing both must rewire the second's readers to the first's shortcut."""
    model = residual_net({1, 2}, relu_after_add=False)
    blocks = {b.add: b for b in find_residual_blocks(prepare_graph(model))}
    assert blocks["b2_add"].shortcut == blocks["b1_add"].output  # the chain this test is about
    reduced = drop_blocks(model, [blocks[f"b{i}_add"] for i in order])
    validate_model(reduced)
    names = {n.name for n in reduced.graph.node}
    assert not names & {"b1_add", "b2_add", "b1_c1", "b1_c2", "b2_c1", "b2_c2"}
    feeds = {"x": np.random.default_rng(3).standard_normal((4, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(ort_session(reduced).run(None, feeds)[0], ort_session(model).run(None, feeds)[0],
                               rtol=1e-5, atol=1e-6)


def test_compress_with_drop_blocks_reports_curve():
    model = _resnet({0, 2})
    pruned, report = api.compress(model, _data(), percentile=0, criterion="l1", drop_blocks=True,
                                  si_epsilon=0.0, progress=False)
    blocks = report.extra["blocks"]
    assert [b["add"] for b in blocks] == ["b0_add", "b1_add", "b2_add"]
    assert blocks[0]["dropped"] and blocks[2]["dropped"]
    assert report.after.parameters < report.before.parameters
    validate_model(pruned)


def test_drop_blocks_needs_labels():
    with pytest.raises(InputError, match="labelled"):
        api.compress(_resnet(set()), {"x": _data()["x"]}, criterion="l1", drop_blocks=True, progress=False)
