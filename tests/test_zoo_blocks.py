"""Residual-block removal on the model zoo: every identity-shortcut block removed at once.

The oracle is independent of :func:`onnx_ocnna.blocks.drop_blocks`: in a copy of the prepared
model each removed block's Add becomes an Identity of its shortcut (the dead branch stays and
is simply not read). The rewritten model must be valid, compute the same outputs, and have the
parameters and MACs that :class:`~onnx_ocnna.cut_cost.CutCost` counts without rewriting.
Consecutive blocks whose Add output is the next block's shortcut (MobileNetV2, EfficientNet)
are what this protects.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import zoo_model
from export_zoo import ZOO, variants

from onnx_ocnna import api
from onnx_ocnna.allocate import _costs, _rewrite, removable_blocks
from onnx_ocnna.cut_cost import CutCost
from onnx_ocnna.model_io import ort_session, sample_feeds, validate_model

pytestmark = pytest.mark.zoo

# Architectures with identity-shortcut blocks; the default run takes one variant of each.
WITH_BLOCKS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
               "regnet_y_400mf")
DEFAULT = {("ts", "kept"), ("dynamo", "folded")}


def _cases():
    for name in WITH_BLOCKS:
        for exporter, bn in variants(name):
            marks = [] if (exporter, bn) in DEFAULT else [pytest.mark.slow]
            yield pytest.param(name, exporter, bn, marks=marks, id=f"{name}-{exporter}-{bn}")


def _identity_oracle(prepared: onnx.ModelProto, blocks) -> onnx.ModelProto:
    oracle = onnx.ModelProto()
    oracle.CopyFrom(prepared)
    adds = {b.add: b.shortcut for b in blocks}
    for node in oracle.graph.node:
        if node.name in adds:
            node.op_type = "Identity"
            del node.input[:]
            node.input.append(adds[node.name])
    return oracle


@pytest.mark.parametrize("name,exporter,bn", list(_cases()))
def test_every_block_removed_at_once(name, exporter, bn):
    assert name in ZOO
    model = onnx.load(zoo_model(name, exporter, bn))
    pruner = api.Pruner(model)
    blocks = removable_blocks(pruner)
    assert blocks, "the zoo model has identity-shortcut blocks"
    reduced = _rewrite(pruner, {}, blocks)
    validate_model(reduced)
    removed = {b.add for b in blocks}
    assert not removed & {n.name for n in reduced.graph.node}
    feeds = sample_feeds(model, batch=2, seed=0)
    got = ort_session(reduced).run(None, feeds)
    expected = ort_session(_identity_oracle(pruner.prepared_model(), blocks)).run(None, feeds)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(e).max())))
    base, base_blocked = _costs(model, 8)
    stats, blocked = _costs(reduced, 8)
    assert stats.parameters < base.parameters
    counter = CutCost(pruner, None, 8, uncut=(base.parameters, base.macs, base_blocked))
    assert counter.counts({}, blocks) == (stats.parameters, stats.macs, blocked)
