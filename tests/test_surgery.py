"""A rewrite on a copy of the analysed graph (the allocation's many cuts) gives, byte for byte,
the model a rewrite of a freshly analysed graph gives, and leaves the analysis reusable."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import zoo_model

from onnx_ocnna.api import Pruner
from onnx_ocnna.channels.analysis import analyse
from onnx_ocnna.surgery import apply_removal


@pytest.mark.parametrize("name,exporter,bn", [("resnet18", "ts", "kept"), ("mobilenet_v2", "ts", "kept"),
                                              ("keras_nhwc", "helper", "kept"), ("vgg_small", "dynamo", "folded")])
def test_a_rewrite_of_a_copy_equals_one_of_a_fresh_analysis(name, exporter, bn):
    import onnx_graphsurgeon as gs

    model = onnx.load(zoo_model(name, exporter, bn))
    pruner = Pruner(model)
    untouched = gs.export_onnx(pruner.analysis.graph, do_type_check=False).SerializeToString()
    groups = [g for g in pruner.analysis.groups if g.prunable and len(g.removable()) > 1]
    rng = np.random.default_rng(3)
    for trial in range(4):
        removed = {}
        for group in rng.choice(groups, size=min(len(groups), 1 + 2 * trial), replace=False):
            removable = group.removable()
            removed[group.id] = np.sort(rng.choice(removable, size=int(rng.integers(1, len(removable))), replace=False))
        fresh = analyse(model, gs.import_onnx(pruner.prepared_model()))
        expected = apply_removal(model, fresh, removed)
        assert pruner.rewrite(removed).SerializeToString() == expected.SerializeToString()
        assert apply_removal(model, pruner.analysis, removed, in_place=False).SerializeToString() \
            == expected.SerializeToString()
    assert gs.export_onnx(pruner.analysis.graph, do_type_check=False).SerializeToString() == untouched
