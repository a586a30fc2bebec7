"""Selection (SPEC section 4): counts, ties, floors, rounding, global scope, Split pieces."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import GraphBuilder

import onnx_ocnna
from onnx_ocnna.channels.analysis import analyse
from onnx_ocnna.errors import InputError
from onnx_ocnna.select import SelectionOptions, select


def _two_groups():
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 10, name="a"))
    b = g.relu(g.conv(a, 10, 4, name="b"))
    out = g.node("Flatten", [g.node("GlobalAveragePool", [b])[0]])[0]
    return analyse(g.model([1, 3, 6, 6], g.gemm(out, 4, 3)))


def test_percentile_removes_floor_of_k_c_over_100_lowest_with_index_ties():
    analysis = _two_groups()
    ga, gb = analysis.group_of("a"), analysis.group_of("b")
    scores = {ga.id: np.array([5, 1, 1, 1, 9, 0, 7, 1, 8, 6], float), gb.id: np.array([3, 2, 1, 4], float)}
    removed = select(analysis, scores, SelectionOptions(percentile=45))
    # floor(0.45 * 10) = 4: channel 5 (score 0), then the score-1 ties in index order 1, 2, 3.
    assert removed[ga.id].tolist() == [1, 2, 3, 5]
    assert removed[gb.id].tolist() == [2]  # floor(0.45 * 4) = 1


def test_min_channels_and_round_to():
    analysis = _two_groups()
    ga, gb = analysis.group_of("a"), analysis.group_of("b")
    scores = {ga.id: np.arange(10, dtype=float), gb.id: np.arange(4, dtype=float)}
    removed = select(analysis, scores, SelectionOptions(percentile=90, min_channels=3))
    assert len(removed[ga.id]) == 7 and len(removed[gb.id]) == 1  # keep 3 of 10, 3 of 4
    removed = select(analysis, scores, SelectionOptions(percentile=45, round_to=4))
    assert len(removed[ga.id]) == 2  # 6 kept -> rounded up to 8
    assert gb.id not in removed  # 3 kept -> rounded up to 4


def _pad_shortcut_group():
    """Conv a (8 channels) padded by 4 on each side into the 16 channels of conv b: one group
    whose member a carries 8 of b's 16 channels."""
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 8, name="a"))
    pads = g.const(np.array([0, 4, 0, 0, 0, 4, 0, 0], dtype=np.int64))
    padded = g.node("Pad", [a, pads], mode="constant")[0]
    out = g.relu(g.node("Add", [g.conv(a, 8, 16, name="b"), padded])[0])
    out = g.node("Flatten", [g.node("GlobalAveragePool", [out])[0]])[0]
    return g.model([1, 3, 6, 6], g.gemm(out, 16, 3))


def test_round_to_rounds_every_member_tensor_not_only_the_group():
    model = _pad_shortcut_group()
    analysis = analyse(model)
    group = analysis.group_of("a")
    assert group is analysis.group_of("b") and group.channels == 16
    inner = set(group.member_channels["a"].tolist())
    # The lowest scores sit inside a's 8 channels: plain selection leaves a with an odd count.
    scores = np.arange(16, dtype=float) + np.array([0 if c in inner else 100 for c in range(16)])
    plain = set(select(analysis, {group.id: scores}, SelectionOptions(percentile=40))[group.id].tolist())
    assert len(plain) == 6 and plain <= inner  # a keeps 2 of 8, b 10 of 16
    rounded = set(select(analysis, {group.id: scores}, SelectionOptions(percentile=40, round_to=4))[group.id].tolist())
    for member in ("a", "b"):
        channels = set(group.member_channels[member].tolist())
        assert (len(channels) - len(channels & rounded)) % 4 == 0, member
    assert rounded <= plain and len(rounded) == 4  # a keeps 4 of 8, b 12 of 16
    # The channels given back are the best-scored of those removed.
    assert sorted(plain - rounded) == sorted(sorted(plain, key=lambda c: -scores[c])[:2])
    pruned, _ = onnx_ocnna.compress(model, percentile=40, round_to=4, criterion="l1", progress=False)
    widths = {init.name: init.dims[0] for init in pruned.graph.initializer if init.name in ("a.w", "b.w")}
    assert widths["a.w"] % 4 == 0 and widths["b.w"] % 4 == 0


def test_round_to_auto_is_the_ort_channel_block():
    from onnx_ocnna.select import ort_block_size

    assert SelectionOptions(round_to="auto").round_to in (8, 16)
    assert SelectionOptions(round_to="auto").round_to == ort_block_size()
    with pytest.raises(InputError, match="round-to"):
        select(_two_groups(), {}, SelectionOptions(round_to="fast"))


def test_dead_filters_go_first_and_inf_scores_last():
    analysis = _two_groups()
    ga = analysis.group_of("a")
    scores = {ga.id: np.array([np.inf, 0, 3, 0, 2, 1, np.inf, 5, 4, 6], float)}
    removed = select(analysis, scores, SelectionOptions(percentile=30))
    assert removed[ga.id].tolist() == [1, 3, 5]


def test_global_scope_uses_one_threshold():
    analysis = _two_groups()
    ga, gb = analysis.group_of("a"), analysis.group_of("b")
    # Group b's channels are all weak relative to a's on the normalised scale.
    scores = {ga.id: np.array([10, 10, 10, 10, 10, 10, 10, 10, 10, 10], float), gb.id: np.array([1, 1, 1, 9], float)}
    removed = select(analysis, scores, SelectionOptions(percentile=20, scope="global"))
    assert ga.id not in removed  # 14 channels, floor(2.8) = 2 removed, both from b
    assert removed[gb.id].tolist() == [0, 1]


def test_exclude_and_invalid_options():
    analysis = _two_groups()
    ga = analysis.group_of("a")
    scores = {g.id: np.arange(g.channels, dtype=float) for g in analysis.groups}
    assert analysis.excluded(["a"]) == {ga.id}
    assert analysis.excluded(["b.w"]) == {analysis.group_of("b").id}
    removed = select(analysis, scores, SelectionOptions(percentile=50, exclude={ga.id}))
    assert ga.id not in removed
    for bad in (SelectionOptions(percentile=100), SelectionOptions(scope="all"), SelectionOptions(min_channels=0)):
        with pytest.raises(InputError):
            select(analysis, scores, bad)


def test_split_pieces_keep_a_channel():
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 6, name="a"))
    left, right = g.node("Split", [a, g.const(np.array([2, 4], dtype=np.int64))], n_out=2, axis=1)
    out = g.node("Add", [g.conv(left, 2, 3, name="l"), g.conv(right, 4, 3, name="r")])[0]
    analysis = analyse(g.model([1, 3, 6, 6], g.node("Flatten", [g.node("GlobalAveragePool", [out])[0]])[0]))
    ga = analysis.group_of("a")
    scores = {g_.id: np.ones(g_.channels) for g_ in analysis.groups}
    scores[ga.id] = np.array([0, 0.1, 5, 6, 7, 8])
    removed = select(analysis, scores, SelectionOptions(percentile=50))
    # The two lowest channels make up the whole left piece: the better one is given back.
    assert 1 not in removed[ga.id].tolist() and 0 in removed[ga.id].tolist()


def test_top_level_api_and_target_params():
    g = GraphBuilder()
    a = g.relu(g.conv("x", 3, 16, name="a"))
    b = g.relu(g.conv(a, 16, 16, name="b"))
    out = g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [b])[0]])[0], 16, 3)
    model = g.model(["N", 3, 6, 6], out)
    pruned, report = onnx_ocnna.compress(model, criterion="l1", target_params=0.5, allocation="uniform",
                                         progress=False)
    assert report.rpr <= 0.5
    # The search takes the smallest k that meets the target: 0.1 less would not.
    k = report.settings["percentile"]
    _, looser = onnx_ocnna.compress(model, criterion="l1", percentile=max(k - 0.1, 0), progress=False)
    assert looser.rpr > 0.5
