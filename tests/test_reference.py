"""Removing *live* channels gives exactly the model an independent reference gives.

The reference is Torch-Pruning: on the PyTorch model that was exported, it prunes the same
output channels of the same Conv (neurons of the same hidden Linear) with its own dependency graph (which finds the coupled layers
itself: BatchNorms, next Convs, residual partners, the Linear head). Our ONNX surgery must
produce the same function.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import zoo_model

from onnx_ocnna.channels.analysis import analyse
from onnx_ocnna.model_io import ort_session
from onnx_ocnna.plan import build_plan
from onnx_ocnna.surgery import apply_removal

tp = pytest.importorskip("torch_pruning", reason="Torch-Pruning is the reference; pip install torch-pruning")
torch = pytest.importorskip("torch")


@pytest.mark.parametrize("name", ["vgg_small", "resnet18", "mobilenet_v2"])
def test_live_channel_removal_matches_torch_pruning(name):
    from export_zoo import input_shape, torch_model

    model = onnx.load(zoo_model(name, "ts", "kept"))
    analysis = analyse(model)
    rng = np.random.default_rng(0)
    removed = {}
    for group in analysis.groups:
        candidates = group.removable()
        if group.prunable and len(candidates) > 1:
            removed[group.id] = np.sort(rng.choice(candidates, size=max(1, len(candidates) // 4), replace=False))
    assert removed
    plan = build_plan(analysis, removed, model_sha256="")
    weights = {p.node.name: p.node.inputs[1].name for p in analysis.context.producers}
    pruned = apply_removal(model, analysis, removed)

    reference = torch_model(name, "kept").eval()
    shape = (2, *input_shape(name))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    graph = tp.DependencyGraph().build_dependency(reference, example_inputs=x)
    modules = dict(reference.named_modules())
    for entry in plan["groups"]:
        if not entry["remove"]:
            continue
        module = modules[weights[entry["members"][0]].removesuffix(".weight")]
        # A hidden Linear's neurons are channels too (vgg_small's classifier.0).
        prune = tp.prune_linear_out_channels if isinstance(module, torch.nn.Linear) else tp.prune_conv_out_channels
        group = graph.get_pruning_group(module, prune, idxs=list(entry["remove"]))
        group.prune()
    with torch.no_grad():
        expected = reference(x).numpy()
    actual = ort_session(pruned).run(None, {model.graph.input[0].name: x.numpy()})[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # The reference and our model have the same number of parameters (scalars such as Clip's
    # ReLU6 bounds are initializers in ONNX but not parameters in PyTorch).
    ours = sum(int(np.prod(i.dims)) for i in pruned.graph.initializer
               if i.data_type == onnx.TensorProto.FLOAT and int(np.prod(i.dims)) > 1)
    theirs = sum(p.numel() for p in reference.parameters()) + sum(
        b.numel() for n, b in reference.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert ours == theirs
