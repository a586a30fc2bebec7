"""Channel analysis and surgery on hand-built graphs: one test per coupling pattern, each
checked by the lossless oracle (killed channels removed, outputs unchanged)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder
from oracle import check_lossless

from onnx_ocnna.channels.analysis import analyse
from onnx_ocnna.channels.registry import HANDLERS


def _weights(model: onnx.ModelProto) -> dict[str, tuple]:
    return {i.name: tuple(i.dims) for i in model.graph.initializer}


def test_chain_into_flatten_gemm_expands_spatial_positions():
    g = GraphBuilder()
    h = g.relu(g.conv("x", 3, 8, name="c1"))
    h = g.relu(g.conv(h, 8, 6, name="c2"))
    flat = g.node("Flatten", [h], axis=1)[0]
    out = g.gemm(flat, 6 * 5 * 5, 4, name="fc")
    model = g.model([2, 3, 5, 5], out)
    analysis = analyse(model)
    assert [g.channels for g in analysis.groups] == [8, 6]
    result = check_lossless(model, fraction=0.5)
    assert result["max_rel_error"] < 1e-5
    shapes = _weights(result["pruned"])
    assert shapes["c2.w"] == (3, 4, 3, 3)
    assert shapes["fc.w"] == (4, 3 * 25)  # 3 kept channels x 25 positions


def test_residual_add_couples_members():
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 8, name="stem"))
    b = g.conv(g.relu(g.conv(a, 8, 4, name="inner")), 4, 8, name="outer")
    s = g.relu(g.node("Add", [a, b])[0])
    out = g.node("GlobalAveragePool", [s])[0]
    out = g.node("Flatten", [out])[0]
    out = g.gemm(out, 8, 3)
    model = g.model([1, 3, 6, 6], out)
    analysis = analyse(model)
    residual = analysis.group_of("stem")
    assert residual is analysis.group_of("outer") and residual.channels == 8
    result = check_lossless(model, fraction=0.4)
    assert result["max_rel_error"] < 1e-5
    shapes = _weights(result["pruned"])
    assert shapes["stem.w"][0] == shapes["outer.w"][0] < 8


def test_concat_offsets_and_consumer_slices():
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 5, name="a"))
    b = g.relu(g.conv("x", 3, 7, name="b"))
    cat = g.node("Concat", [a, b], axis=1)[0]
    cat = g.bn(cat, 12, name="bn_after_concat")
    out = g.relu(g.conv(cat, 12, 4, name="consumer"))
    out = g.node("Flatten", [g.node("GlobalAveragePool", [out])[0]])[0]
    model = g.model([1, 3, 6, 6], out)
    analysis = analyse(model)
    assert analysis.group_of("a") is not analysis.group_of("b")
    result = check_lossless(model, fraction=0.5)
    assert result["max_rel_error"] < 1e-5
    shapes = _weights(result["pruned"])
    assert shapes["consumer.w"][1] == shapes["a.w"][0] + shapes["b.w"][0] < 12
    assert shapes["bn_after_concat.scale"][0] == shapes["consumer.w"][1]


def test_split_sizes_are_rewritten():
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 10, name="a"))
    split = g.const(np.array([4, 6], dtype=np.int64))
    left, right = g.node("Split", [a, split], n_out=2, axis=1)
    l2 = g.conv(left, 4, 3, name="left")
    r2 = g.conv(right, 6, 3, name="right")
    out = g.node("Flatten", [g.node("GlobalAveragePool", [g.node("Add", [l2, r2])[0]])[0]])[0]
    model = g.model([1, 3, 6, 6], out)
    result = check_lossless(model, fraction=0.5)
    assert result["max_rel_error"] < 1e-5
    shapes = _weights(result["pruned"])
    assert shapes["left.w"][1] + shapes["right.w"][1] == shapes["a.w"][0] < 10


def test_depthwise_and_grouped_conv():
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 8, k=1, name="expand"))
    d = g.relu(g.conv(a, 8, 8, group=8, name="dw"))
    grouped = g.relu(g.conv(d, 8, 12, group=4, name="grouped"))
    out = g.conv(grouped, 12, 5, k=1, name="project")
    out = g.node("Flatten", [g.node("GlobalAveragePool", [out])[0]])[0]
    model = g.model([1, 3, 6, 6], out)
    analysis = analyse(model)
    assert analysis.group_of("expand").channels == 2  # grouped conv ties channel j of its 4 groups
    assert analysis.group_of("grouped").channels == 3
    result = check_lossless(model, fraction=0.5, seed=3)
    assert result["max_rel_error"] < 1e-5
    pruned = result["pruned"]
    shapes = _weights(pruned)
    dw = next(n for n in pruned.graph.node if n.name == "dw")
    group_attr = next(a.i for a in dw.attribute if a.name == "group")
    assert shapes["dw.w"][0] == group_attr == shapes["expand.w"][0] == 4
    grouped_node = next(n for n in pruned.graph.node if n.name == "grouped")
    assert next(a.i for a in grouped_node.attribute if a.name == "group") == 4
    assert shapes["grouped.w"] == (4, 1, 3, 3)  # 1 of 3 output classes x 4 groups, 1 input per group


def test_channel_pad_shrinks_and_couples():
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 4, name="a"))
    pads = g.const(np.array([0, 2, 0, 0, 0, 2, 0, 0], dtype=np.int64))
    padded = g.node("Pad", [a, pads], mode="constant")[0]
    b = g.conv(a, 4, 8, name="b")
    out = g.relu(g.node("Add", [b, padded])[0])
    out = g.node("Flatten", [g.node("GlobalAveragePool", [out])[0]])[0]
    model = g.model([1, 3, 6, 6], out)
    analysis = analyse(model)
    assert analysis.group_of("a") is analysis.group_of("b")
    result = check_lossless(model, fraction=0.5, seed=1)
    assert result["max_rel_error"] < 1e-5


def test_squeeze_excite_gate_couples_expand_conv():
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 8, name="body"))
    pooled = g.node("GlobalAveragePool", [a])[0]
    squeeze = g.relu(g.conv(pooled, 8, 2, k=1, name="se_reduce"))
    gate = g.node("Sigmoid", [g.conv(squeeze, 2, 8, k=1, name="se_expand")])[0]
    scaled = g.node("Mul", [a, gate])[0]
    out = g.conv(scaled, 8, 4, name="next")
    out = g.node("Flatten", [g.node("GlobalAveragePool", [out])[0]])[0]
    model = g.model([1, 3, 6, 6], out)
    analysis = analyse(model)
    assert analysis.group_of("body") is analysis.group_of("se_expand")
    assert check_lossless(model, fraction=0.5)["max_rel_error"] < 1e-5


def test_unknown_operator_freezes_with_reason():
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 6, name="a"))
    odd = g.node("LpNormalization", [a], axis=1)[0]
    out = g.node("Flatten", [g.node("GlobalAveragePool", [g.conv(odd, 6, 4, name="b")])[0]])[0]
    model = g.model([1, 3, 6, 6], out)
    analysis = analyse(model)
    group = analysis.group_of("a")
    assert not group.prunable
    assert "LpNormalization" in group.frozen_reason and "not supported" in group.frozen_reason
    assert "LpNormalization" not in HANDLERS


def test_channel_shuffle_reshape_is_frozen():
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 8, name="a"))
    shape1 = g.const(np.array([1, 2, 4, 6, 6], dtype=np.int64))
    r = g.node("Reshape", [a, shape1])[0]
    t = g.node("Transpose", [r], perm=[0, 2, 1, 3, 4])[0]
    shape2 = g.const(np.array([1, 8, 6, 6], dtype=np.int64))
    r2 = g.node("Reshape", [t, shape2])[0]
    out = g.node("Flatten", [g.node("GlobalAveragePool", [g.conv(r2, 8, 4, name="b")])[0]])[0]
    model = g.model([1, 3, 6, 6], out)
    group = analyse(model).group_of("a")
    assert not group.prunable and "channel shuffle" in group.frozen_reason


def test_graph_output_channels_are_frozen():
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 6, name="a"))
    out = g.conv(a, 6, 10, k=1, name="classifier")
    model = g.model([1, 3, 6, 6], out)
    analysis = analyse(model)
    assert not analysis.group_of("classifier").prunable
    assert "graph output" in analysis.group_of("classifier").frozen_reason
    assert analysis.group_of("a").prunable


def test_nhwc_transpose_reshape_matmul_head():
    g = GraphBuilder()
    x = g.node("Transpose", ["x"], perm=[0, 3, 1, 2])[0]
    a = g.relu(g.conv(x, 3, 6, name="a"))
    nhwc = g.node("Transpose", [a], perm=[0, 2, 3, 1])[0]
    flat = g.node("Reshape", [nhwc, g.const(np.array([-1, 4 * 4 * 6], dtype=np.int64))])[0]
    w = g.const(g.rng.standard_normal((96, 5)).astype(np.float32), "head.w")
    out = g.node("Add", [g.node("MatMul", [flat, w])[0], g.const(np.zeros(5, np.float32))])[0]
    model = g.model([2, 4, 4, 3], out)
    result = check_lossless(model, fraction=0.5)
    assert result["max_rel_error"] < 1e-5
    assert _weights(result["pruned"])["head.w"] == (48, 5)


@pytest.mark.parametrize("opset", [9, 11])
def test_legacy_opsets(opset):
    g = GraphBuilder(opset=opset)
    a = g.relu(g.bn(g.conv("x", 3, 6, name="a"), 6))
    b = g.relu(g.conv(a, 6, 5, name="b"))
    flat = g.node("Flatten", [b], axis=1)[0]
    out = g.gemm(flat, 5 * 4 * 4, 3)
    model = g.model([1, 3, 4, 4], out)
    assert check_lossless(model, fraction=0.5)["max_rel_error"] < 1e-5
