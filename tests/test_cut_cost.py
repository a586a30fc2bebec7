"""Counting a cut from the channel analysis gives the parameters, MACs and blocked MACs of the
rewritten model, with residual blocks removed or not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import residual_net

from onnx_ocnna import api
from onnx_ocnna.allocate import _costs, _rewrite, removable_blocks
from onnx_ocnna.cut_cost import CutCost
from onnx_ocnna.errors import OcnnaError

FIXTURES = Path(__file__).parent / "fixtures"


def _random_cuts(pruner, blocks, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        removed = {}
        for group in pruner.analysis.groups:
            free = group.removable()
            if free.size and rng.random() < 0.6:
                most = free.size if free.size < group.channels else free.size - 1
                if most >= 1:
                    removed[group.id] = np.sort(rng.choice(free, int(rng.integers(1, most + 1)), replace=False))
        yield removed, [b for b in blocks if rng.random() < 0.4]


@pytest.mark.parametrize("model", ["residual", "keras_resnet.onnx", "keras_densenet.onnx", "keras_mobilenet.onnx",
                                   "paddle_se_opset11.onnx", "torch_dynamo_opset18.onnx", "torch_opset8.onnx"])
def test_counts_match_the_rewritten_model(model):
    model = residual_net(set(), channels=16) if model == "residual" else onnx.load(FIXTURES / model)
    pruner = api.Pruner(model)
    base, base_blocked = _costs(model, 8)
    counter = CutCost(pruner, None, 8, uncut=(base.parameters, base.macs, base_blocked))
    assert counter.countable
    blocks = removable_blocks(pruner)
    checked = 0
    for removed, dropped in _random_cuts(pruner, blocks, 12):
        try:
            cut = _rewrite(pruner, removed, dropped)
        except OcnnaError:  # a random cut the rewrite refuses (a member emptied): no model to count
            continue
        stats, blocked = _costs(cut, 8)
        assert counter.counts(removed, dropped) == (stats.parameters, stats.macs, blocked)
        checked += 1
    assert checked >= 6
    assert counter.counts({}, []) == (base.parameters, base.macs, base_blocked)


def test_a_removed_block_takes_its_branch_with_it():
    model = residual_net(set(), channels=16)
    pruner = api.Pruner(model)
    counter = CutCost(pruner, None, 1)
    block = removable_blocks(pruner)[0]
    whole, without = counter.counts({}, []), counter.counts({}, [block])
    stats, _ = _costs(_rewrite(pruner, {}, [block]), 1)
    assert without == (stats.parameters, stats.macs, stats.macs)
    # Two 16 x 16 x 3 x 3 Convs with their biases leave.
    assert whole[0] - without[0] == 2 * (16 * 16 * 9 + 16)


def test_the_allocation_rewrites_when_the_counts_cannot_follow(monkeypatch):
    """A count that fails or disagrees with the rewrite is given up for the rewrite: the budget
    is still met exactly."""
    import onnx_ocnna
    from onnx_ocnna import cut_cost

    model = residual_net(set(), channels=16)
    data = {"x": np.random.default_rng(0).standard_normal((64, 3, 6, 6)).astype(np.float32)}
    real = cut_cost.CutCost.counts
    for broken in (lambda self, removed, dropped=(): (_ for _ in ()).throw(KeyError("add")),
                   lambda self, removed, dropped=(): tuple(v // 2 for v in real(self, removed, dropped))):
        monkeypatch.setattr(cut_cost.CutCost, "counts", broken)
        _, report = onnx_ocnna.compress(model, data, round_to=4, target_params=0.6, progress=False,
                                        reconstruct=False)
        assert 0 < report.rpr <= 0.6 + 1e-9


@pytest.mark.parametrize("model,sizes", [("residual", None), ("keras_resnet.onnx", None),
                                         ("paddle_dynamic_hw_opset11.onnx", {"x": (3, 32, 64)})])
def test_candidate_and_block_savings_counted_equal_the_rewrites(model, sizes):
    """The damage table's savings, counted by CutCost, are those of each rewritten cut (a
    dynamic height and width counted at the data's size)."""
    from onnx_ocnna.allocate import DamageMeter, dynamic_sizes, measure_blocks, measure_candidates
    from onnx_ocnna.model_io import sample_feeds

    model = residual_net(set(), channels=16) if model == "residual" else onnx.load(FIXTURES / model)
    pruner = api.Pruner(model)
    feeds = [sample_feeds(model, batch=4, seed=0, sizes=sizes)]
    sizes = dynamic_sizes(model, feeds)
    meter = DamageMeter(model, feeds, pruner.prepared_model(), refit=False)
    base, base_blocked = _costs(model, 8, sizes)
    counter = CutCost(pruner, sizes, 8, uncut=(base.parameters, base.macs, base_blocked))
    assert counter.countable
    groups = [g for g in pruner.analysis.groups if g.prunable]
    scores = {g.id: np.arange(g.channels, dtype=float) for g in groups}

    def rows(table):
        return {gid: [(c.kept, c.saved_params, c.saved_macs, c.saved_blocked) for c in cands]
                for gid, cands in table.items()}

    counted = measure_candidates(pruner, scores, groups, meter, 8, 1, progress=False, counter=counter)
    rewritten = measure_candidates(pruner, scores, groups, meter, 8, 1, progress=False)
    assert rows(counted) == rows(rewritten)
    assert sum(len(c) for c in counted.values()) > len(groups)
    blocks = removable_blocks(pruner)
    with_counter = measure_blocks(pruner, meter, 8, progress=False, found=blocks, counter=counter)
    without = measure_blocks(pruner, meter, 8, progress=False, found=blocks)
    assert [(b.add, c.saved_params, c.saved_macs, c.saved_blocked) for b, c in with_counter] == \
        [(b.add, c.saved_params, c.saved_macs, c.saved_blocked) for b, c in without]
