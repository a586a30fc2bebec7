"""Least-squares reconstruction: exact where the removed channels are redundant, better
outputs than plain pruning otherwise, structure kept, clear errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder
from onnx import numpy_helper

from onnx_ocnna import api
from onnx_ocnna.calibration import Batch
from onnx_ocnna.cli import main
from onnx_ocnna.errors import InputError
from onnx_ocnna.model_io import ort_session, save_model
from onnx_ocnna.reconstruct import kept_outputs, reconstruct


def _model(duplicate: bool) -> onnx.ModelProto:
    """a (3 -> 6) -> ReLU -> b (6 -> 5) -> ReLU -> GAP -> fc (5 -> 3). With ``duplicate``,
    a's filters 4 and 5 copy filters 0 and 1, so b can absorb their removal exactly."""
    g = GraphBuilder(seed=3)
    a = g.relu(g.conv("x", 3, 6, name="a"))
    b = g.relu(g.conv(a, 6, 5, name="b"))
    out = g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [b])[0]])[0], 5, 3, name="fc")
    model = g.model(["N", 3, 6, 6], out)
    if duplicate:
        inits = {i.name: i for i in model.graph.initializer}
        w, bias = numpy_helper.to_array(inits["a.w"]).copy(), numpy_helper.to_array(inits["a.b"]).copy()
        w[4:6], bias[4:6] = w[0:2], bias[0:2]
        inits["a.w"].CopyFrom(numpy_helper.from_array(w, "a.w"))
        inits["a.b"].CopyFrom(numpy_helper.from_array(bias, "a.b"))
    return model


def _batches(n: int = 64, seed: int = 0):
    x = np.random.default_rng(seed).standard_normal((n, 3, 6, 6)).astype(np.float32)
    return lambda: iter([Batch({"x": x[i:i + 16]}, None) for i in range(0, n, 16)])


def _prune(model: onnx.ModelProto, channels: list[int]):
    pruner = api.Pruner(model)
    group = pruner.analysis.group_of("a")
    removed = {group.id: np.array(channels)}
    return pruner, removed, pruner.rewrite(removed)


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort_session(model).run(None, {"x": x})[0]


def test_redundant_channels_are_absorbed_exactly():
    model = _model(duplicate=True)
    pruner, removed, pruned = _prune(model, [4, 5])
    x = np.random.default_rng(9).standard_normal((32, 3, 6, 6)).astype(np.float32)
    reference = _outputs(model, x)
    assert np.abs(_outputs(pruned, x) - reference).max() > 1e-2  # plain pruning loses b's inputs 4, 5
    refitted, report = reconstruct(pruner.prepared_model(), pruned, kept_outputs(pruner.analysis, removed),
                                   _batches(), samples=64, positions=36, ridge=1e-9, progress=False)
    # b' = b with columns 4, 5 added onto 0, 1 reproduces the original, on unseen inputs too.
    np.testing.assert_allclose(_outputs(refitted, x), reference, rtol=1e-3, atol=1e-4)
    fits = {f.node: f for f in report.layers}
    assert fits["a"].skipped == "input unchanged"
    assert fits["b"].error_after < 1e-4 < fits["b"].error_before
    assert fits["fc"].skipped == "already reproduces the original outputs"  # b restored fc's input


def test_refit_beats_plain_pruning_and_keeps_the_structure():
    model = _model(duplicate=False)
    pruner, removed, pruned = _prune(model, [0, 2, 3])
    refitted, report = reconstruct(pruner.prepared_model(), pruned, kept_outputs(pruner.analysis, removed),
                                   _batches(128), samples=128, progress=False)
    x = np.random.default_rng(5).standard_normal((64, 3, 6, 6)).astype(np.float32)
    reference = _outputs(model, x)
    plain_error = np.linalg.norm(_outputs(pruned, x) - reference)
    refit_error = np.linalg.norm(_outputs(refitted, x) - reference)
    assert refit_error < 0.7 * plain_error
    shapes = lambda m: {i.name: tuple(i.dims) for i in m.graph.initializer}  # noqa: E731
    assert shapes(refitted) == shapes(pruned)
    assert [n.op_type for n in refitted.graph.node] == [n.op_type for n in pruned.graph.node]
    assert report.samples == 128 and all(f.rows for f in report.layers if not f.skipped)
    onnx.checker.check_model(refitted, full_check=True)


def test_cached_and_streamed_targets_give_the_same_fit(monkeypatch):
    import onnx_ocnna.reconstruct as module

    model = _model(duplicate=False)
    pruner, removed, pruned = _prune(model, [0, 2, 3])
    args = (pruner.prepared_model(), pruned, kept_outputs(pruner.analysis, removed), _batches(48))
    cached, _ = reconstruct(*args, samples=48, progress=False)
    monkeypatch.setattr(module, "_TARGET_BUDGET", 0)  # one pass of the original per layer instead
    streamed, _ = reconstruct(*args, samples=48, progress=False)
    for a, b in zip(cached.graph.initializer, streamed.graph.initializer):
        np.testing.assert_allclose(numpy_helper.to_array(a), numpy_helper.to_array(b), rtol=1e-6, atol=1e-7)


def test_conv_without_bias_gets_one():
    g = GraphBuilder(seed=1)
    a = g.relu(g.conv("x", 3, 6, name="a"))
    b = g.relu(g.conv(a, 6, 4, name="b", bias=False))
    out = g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [b])[0]])[0], 4, 2, name="fc")
    model = g.model(["N", 3, 6, 6], out)
    pruner, removed, pruned = _prune(model, [1, 2])
    refitted, _ = reconstruct(pruner.prepared_model(), pruned, kept_outputs(pruner.analysis, removed),
                              _batches(), progress=False)
    conv_b = next(n for n in refitted.graph.node if n.name == "b")
    assert len(conv_b.input) == 3 and conv_b.input[2] in {i.name for i in refitted.graph.initializer}
    onnx.checker.check_model(refitted, full_check=True)


def test_bias_free_conv_before_batchnorm_shifts_the_mean_instead():
    g = GraphBuilder(seed=2)
    a = g.relu(g.conv("x", 3, 6, name="a"))
    b = g.relu(g.bn(g.conv(a, 6, 4, name="b", bias=False), 4, name="bn_b"))
    out = g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [b])[0]])[0], 4, 2, name="fc")
    model = g.model(["N", 3, 6, 6], out)
    pruner, removed, pruned = _prune(model, [1, 2])
    refitted, report = reconstruct(pruner.prepared_model(), pruned, kept_outputs(pruner.analysis, removed),
                                   _batches(), progress=False)
    shapes = lambda m: {i.name: tuple(i.dims) for i in m.graph.initializer}  # noqa: E731
    assert shapes(refitted) == shapes(pruned)  # no new bias: the BatchNorm's mean took the intercept
    before = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in refitted.graph.initializer}
    assert not np.allclose(before["bn_b.mean"], after["bn_b.mean"])
    x = np.random.default_rng(4).standard_normal((64, 3, 6, 6)).astype(np.float32)
    reference = _outputs(model, x)
    assert np.linalg.norm(_outputs(refitted, x) - reference) < np.linalg.norm(_outputs(pruned, x) - reference)


def test_compress_reconstructs_and_reports(tmp_path):
    model = _model(duplicate=False)
    data = {"x": np.random.default_rng(0).standard_normal((96, 3, 6, 6)).astype(np.float32)}
    plain, plain_report = api.compress(model, data, percentile=50, criterion="mean-activation", progress=False,
                                       reconstruct=False)
    assert "reconstruction" not in plain_report.extra
    default, default_report = api.compress(model, data, percentile=50, criterion="mean-activation", progress=False)
    assert default_report.settings["reconstruct"] is True  # on by default with calibration data
    refitted, report = api.compress(model, data, percentile=50, criterion="mean-activation", progress=False,
                                    reconstruct=True, reconstruct_options={"samples": 96})
    assert report.settings["reconstruct"] is True
    layers = report.extra["reconstruction"]["layers"]
    assert any(not f["skipped"] and f["error_after"] < f["error_before"] for f in layers)
    x = np.random.default_rng(1).standard_normal((64, 3, 6, 6)).astype(np.float32)
    reference = _outputs(model, x)
    assert np.linalg.norm(_outputs(refitted, x) - reference) < np.linalg.norm(_outputs(plain, x) - reference)
    with pytest.raises(InputError, match="calibration"):
        api.compress(model, None, percentile=50, criterion="l1", reconstruct=True, progress=False)


def test_cli_reconstruct(tmp_path, capsys):
    path, data = tmp_path / "in.onnx", tmp_path / "calib.npz"
    save_model(_model(duplicate=False), path)
    np.savez(data, x=np.random.default_rng(0).standard_normal((64, 3, 6, 6)).astype(np.float32))
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main([str(path), str(out), "--calib", str(data), "--criterion", "mean-activation", "--percentile", "50",
                 "--reconstruct", "--reconstruct-samples", "32", "--report", str(report), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(report.read_text())["extra"]["reconstruction"]["samples"] == 32
    code = main([str(path), str(tmp_path / "o2.onnx"), "--plan", str(tmp_path / "p.json"), "--reconstruct"])
    err = capsys.readouterr().err
    assert code == 2 and "--plan" in err and not (tmp_path / "o2.onnx").exists()


@pytest.mark.parametrize("cut", ["a", "b"])
def test_local_refit_from_sliced_equations_equals_the_refit_that_runs_the_model(cut, monkeypatch):
    """Cutting ``a`` leaves ``b`` (a Conv) reading the original input minus channels; cutting
    ``b`` does the same to ``fc`` (a Gemm). With every output position sampled the sliced
    normal equations are the ones the model run accumulates, so the weights must agree."""
    import onnx_ocnna.reconstruct as module
    from onnx_ocnna.reconstruct import LayerEquations, kept_input_masks

    model = _model(duplicate=False)
    pruner = api.Pruner(model)
    removed = {pruner.analysis.group_of(cut).id: np.array([1, 3])}
    pruned = pruner.rewrite(removed)
    feeds = [b.feeds for b in _batches()()]
    args = (pruner.prepared_model(), pruned, kept_outputs(pruner.analysis, removed), _batches())
    ran, _ = reconstruct(*args, positions=36, local=True, progress=False)
    masks = kept_input_masks(pruner.analysis, removed)
    reader = "b" if cut == "a" else "fc"
    assert list(masks) == [reader] and masks[reader].sum() == masks[reader].size - 2

    def no_model_run(*_, **__):
        raise AssertionError("the refit ran the model instead of slicing the kept equations")

    monkeypatch.setattr(module, "_accumulate", no_model_run)
    sliced, report = reconstruct(*args, positions=36, local=True, progress=False,
                                 equations=LayerEquations(pruner.prepared_model(), feeds, positions=36),
                                 kept_inputs=masks)
    assert [f.node for f in report.layers if not f.skipped] == [reader]
    got = {i.name: numpy_helper.to_array(i) for i in sliced.graph.initializer}
    for init in ran.graph.initializer:
        np.testing.assert_allclose(got[init.name], numpy_helper.to_array(init), rtol=1e-4, atol=1e-5)
