"""The lossless oracle on the model zoo: torchvision architectures with random weights,
exported with both torch exporters, BatchNormalization folded and kept.

For each model, random channels of every prunable group are made exactly zero after their
activation, a plan removes them, and the outputs must not change (relative error < 1e-5) while
the channels are really gone. Groups that cannot be pruned must say why.
"""

from __future__ import annotations

import onnx
import pytest
from conftest import zoo_model
from export_zoo import ZOO, variants
from oracle import check_lossless

from onnx_ocnna.channels.analysis import analyse

pytestmark = pytest.mark.zoo

# Default run: every architecture through both exporters (TorchScript with BN kept, dynamo with BN
# folded), vgg_small in all four variants; the rest of the matrix runs with --run-slow.
DEFAULT = {("ts", "kept"), ("dynamo", "folded"), ("helper", "kept"), ("ts", "folded")}


def _case(name: str, exporter: str, bn: str):
    default = (exporter, bn) in DEFAULT if name not in ("vgg_small", "legacy_opset9") else True
    if (exporter, bn) == ("ts", "folded") and name not in ("vgg_small", "legacy_opset9"):
        default = False
    marks = [] if default else [pytest.mark.slow]
    return pytest.param(name, exporter, bn, marks=marks, id=f"{name}-{exporter}-{bn}")


CASES = [_case(name, exporter, bn) for name in ZOO for exporter, bn in variants(name)]
# Models whose every group may be frozen for a stated reason instead of pruned.
MAY_FREEZE = {"shufflenet_v2_x0_5"}


@pytest.mark.parametrize("name,exporter,bn", CASES)
def test_zoo_lossless(name, exporter, bn):
    model = onnx.load(zoo_model(name, exporter, bn))
    analysis = analyse(model)
    prunable = [g for g in analysis.groups if g.prunable]
    for group in analysis.groups:
        if not group.prunable:
            assert group.frozen_reason, f"group {group.id} frozen without a reason"
    if name not in MAY_FREEZE:
        assert prunable, [g.frozen_reason for g in analysis.groups]
    result = check_lossless(model, fraction=0.3, seed=1)
    assert result["max_rel_error"] < 1e-5, result
    if prunable:
        assert result["removed"] > 0
        assert result["after_params"] < result["before_params"]
