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
    pruned, report = onnx_ocnna.compress(model, criterion="l1", target_params=0.5, progress=False)
    assert report.rpr <= 0.5
    # The search takes the smallest k that meets the target: 0.1 less would not.
    k = report.settings["percentile"]
    _, looser = onnx_ocnna.compress(model, criterion="l1", percentile=max(k - 0.1, 0), progress=False)
    assert looser.rpr > 0.5
