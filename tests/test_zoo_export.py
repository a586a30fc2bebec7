"""The model zoo (tools/export_zoo.py): every variant exports, passes the full onnx.checker, runs
in ONNX Runtime and matches the PyTorch model it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export_zoo as ez

pytestmark = pytest.mark.zoo

# ez.QUICK variants run by default, all others are marked slow (timings in docs/zoo.md).
FAST_TORCH = {"vgg_small", "resnet18", "mobilenet_v2"}
TORCH_MODELS = [n for n, s in ez.ZOO.items() if ("helper", "kept") not in s.variants]


def _variant_params() -> list:
    return [
        pytest.param(name, exporter, bn, id=f"{name}-{exporter}-{bn}",
                     marks=[] if (name, exporter, bn) in ez.QUICK else [pytest.mark.slow])
        for name, spec in ez.ZOO.items()
        for exporter, bn in spec.variants
    ]


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _run_torch(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("name,exporter,bn", _variant_params())
def test_variant_exports_checks_runs_and_matches_torch(zoo, name: str, exporter: str, bn: str) -> None:
    path = zoo(name, exporter, bn)
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    spec = ez.ZOO[name]

    # batch 3 is neither the export example's batch (2) nor the 1 exporters like to specialise to
    batch = 1 if spec.fixed_batch else 3
    x = np.random.default_rng(7).standard_normal((batch, *spec.input_shape)).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x})
    model = ez.torch_model(name, bn)
    want = _run_torch(model, x)
    assert got.shape == want.shape == (batch, ez.NUM_CLASSES)
    assert _rel_err(got, want) < 1e-4

    n_bn = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    assert n_bn == ez.count_bn_modules(model)
    if bn == "kept" and name != "squeezenet1_1":  # squeezenet has no BN at all
        assert n_bn > 0
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == (spec.opset or {"ts": ez.TS_OPSET, "dynamo": ez.DYNAMO_OPSET, "helper": 13}[exporter])
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert (dim0.dim_value == 1) if spec.fixed_batch else bool(dim0.dim_param)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in FAST_TORCH else [pytest.mark.slow]) for n in TORCH_MODELS]
)
def test_folding_fuses_every_conv_bn_pair_and_keeps_outputs(name: str) -> None:
    kept, folded = ez.torch_model(name, "kept"), ez.torch_model(name, "folded")
    x = np.random.default_rng(3).standard_normal((2, *ez.input_shape(name))).astype(np.float32)
    assert _rel_err(_run_torch(folded, x), _run_torch(kept, x)) < 1e-4
    assert ez._conv_bn_pairs(folded) == []
    fused = ez.count_bn_modules(kept) - ez.count_bn_modules(folded)
    assert sum(isinstance(m, torch.nn.Identity) for m in folded.modules()) - sum(
        isinstance(m, torch.nn.Identity) for m in kept.modules()) == fused
    # DenseNet's BNs that follow a Concat or pool have no Conv to fold into; every other model loses all
    assert ez.count_bn_modules(folded) == (62 if name == "densenet121" else 0)


def test_torch_model_is_seeded_randomised_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = ez.torch_model("vgg_small")
    assert torch.equal(torch.rand(3), before)
    b = ez.torch_model("vgg_small")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    for bn in (m for m in a.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
        assert bn.bias.abs().min() > 0
        assert bn.running_mean.abs().min() > 0
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert not a.training


def test_keras_nhwc_has_the_tf2onnx_layout(zoo) -> None:
    g = onnx.load(str(zoo("keras_nhwc", "helper", "kept"))).graph
    assert [d.dim_value or d.dim_param for d in g.input[0].type.tensor_type.shape.dim] == ["N", 32, 32, 3]
    ops = [n.op_type for n in g.node]
    assert ops == ["Transpose", "Conv", "Relu", "Conv", "Relu", "MaxPool", "Conv", "Relu", "BatchNormalization",
                   "Transpose", "Reshape", "MatMul", "Add", "Softmax"]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    reshape, matmul = g.node[10], g.node[11]
    assert inits[reshape.input[1]].tolist() == [-1, 16 * 16 * 16]
    assert inits[matmul.input[1]].shape == (16 * 16 * 16, ez.NUM_CLASSES)


def test_unknown_model_or_variant_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown zoo model"):
        ez.input_shape("alexnet")
    with pytest.raises(ValueError, match="no variant"):
        ez.build("keras_nhwc", "ts", "kept", tmp_path)
    with pytest.raises(ValueError, match="only with bn='kept'"):
        ez.torch_model("keras_nhwc", "folded")


def test_cache_remembers_a_failed_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_build(name: str, exporter: str, bn: str, out_dir: Path) -> Path:
        calls.append(name)
        raise ez.ZooExportError(f"{exporter} export of {name} (bn={bn}) failed: RuntimeError: boom")

    monkeypatch.setattr(ez, "build", failing_build)
    cache = ez.ZooCache(tmp_path)
    for _ in range(2):
        with pytest.raises(ez.ZooExportError, match="boom"):
            cache("resnet18", "dynamo", "kept")
    assert calls == ["resnet18"]


def test_cli_replaces_only_the_table_in_the_markdown(tmp_path: Path) -> None:
    md = tmp_path / "zoo.md"
    md.write_text(f"intro\n{ez.TABLE_BEGIN}\nold table\n{ez.TABLE_END}\noutro\n")
    assert ez.main(["--out", str(tmp_path / "m"), "--only", "keras_nhwc", "--markdown", str(md)]) == 0
    assert (tmp_path / "m" / "keras_nhwc-helper-kept.onnx").exists()
    text = md.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    row = next(line for line in text.splitlines() if line.startswith("| keras_nhwc"))
    assert "| 14 | 1 |" in row and "MatMul 1" in row
