"""Model zoo for onnx-ocnna's tests and benchmarks: small random-weight CNNs exported to ONNX.

Every model is built from a fixed seed, so ``torch_model(name, bn)`` returns exactly the network
that ``build(name, exporter, bn, out_dir)`` exported. Variants:

- ``exporter``: ``"ts"`` (TorchScript exporter, opset 13, dynamic batch axis), ``"dynamo"``
  (torch.export-based exporter, opset 18, dynamic batch axis via ``torch.export.Dim``), or
  ``"helper"`` (graphs written directly with ``onnx.helper``: ``keras_nhwc``).
- ``bn``: ``"kept"`` (BatchNormalization nodes stay in the graph) or ``"folded"`` (every Conv→BN
  pair fused in PyTorch before export; BNs that follow no Conv, e.g. DenseNet's pre-activation BNs,
  stay).

CLI: ``python tools/export_zoo.py --out DIR [--only NAME ...] [--markdown docs/zoo.md]``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import io
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import torch
import torch.nn as nn

SEED = 0
NUM_CLASSES = 10
TS_OPSET = 13
DYNAMO_OPSET = 18
LEGACY_OPSET = 9
EXPORTERS = ("ts", "dynamo", "helper")
BN_MODES = ("kept", "folded")
INPUT_NAME = "input"
OUTPUT_NAME = "output"


class ZooExportError(RuntimeError):
    """An exporter raised on a zoo model; the message carries the exporter's exact error."""


class ZooCheckError(RuntimeError):
    """An export finished but its graph is not what the zoo promises (a bug here, not a skip)."""


@dataclasses.dataclass(frozen=True)
class ZooSpec:
    """How one zoo entry is built.

    input_shape is one sample without the batch axis (C, H, W), or (H, W, C) for NHWC graphs.
    variants lists the (exporter, bn) pairs that exist for this entry.
    """

    name: str
    input_shape: tuple[int, ...]
    variants: tuple[tuple[str, str], ...]
    factory: Callable[[], nn.Module]
    note: str = ""
    fixed_batch: bool = False
    opset: int | None = None  # overrides the exporter's default opset


# --------------------------------------------------------------------------- model definitions


class SmallVGG(nn.Module):
    """VGG-style chain: 4×(Conv3x3+BN+ReLU) with 3 MaxPools, Flatten → Linear → ReLU → Linear.

    No global pooling, so Flatten→Gemm reads C×H×W = 32×8×8 features at 64×64 input and pruning a
    channel must remove 64 consecutive Gemm input columns. Input [N, 3, 64, 64] → logits [N, 10].
    """

    def __init__(self, num_classes: int = NUM_CLASSES, size: int = 64) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, 16), nn.MaxPool2d(2),
            *block(16, 32), nn.MaxPool2d(2),
            *block(32, 32), *block(32, 32), nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        spatial = size // 8
        self.classifier = nn.Sequential(
            nn.Linear(32 * spatial * spatial, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


class KerasNHWC(nn.Module):
    """PyTorch reference of the ``keras_nhwc`` graph (tf2onnx export of a small Keras model).

    Input [N, 32, 32, 3] NHWC → Conv8+ReLU → Conv16+ReLU → MaxPool2 → Conv16+ReLU → BN (after the
    ReLU, Keras MobileNet style) → back to NHWC → Reshape [N, 16·16·16] → MatMul [4096, 10] + bias
    → Softmax. Weights come from ``numpy.random.default_rng(SEED)``.
    """

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(SEED)

        def conv(cin: int, cout: int) -> nn.Conv2d:
            c = nn.Conv2d(cin, cout, 3, padding=1)
            fan_in = cin * 9
            c.weight.data = torch.from_numpy(rng.normal(0, math.sqrt(2 / fan_in), (cout, cin, 3, 3)).astype(np.float32))
            c.bias.data = torch.from_numpy(rng.normal(0, 0.05, cout).astype(np.float32))
            return c

        self.conv1, self.conv2, self.conv3 = conv(3, 8), conv(8, 16), conv(16, 16)
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(16, eps=1e-3)  # Keras' default epsilon
        self.bn.weight.data = torch.from_numpy(rng.uniform(0.5, 1.5, 16).astype(np.float32))
        self.bn.bias.data = torch.from_numpy(rng.normal(0, 0.1, 16).astype(np.float32))
        self.bn.running_mean.data = torch.from_numpy(rng.uniform(0.0, 0.5, 16).astype(np.float32))
        self.bn.running_var.data = torch.from_numpy(rng.uniform(0.2, 1.0, 16).astype(np.float32))
        k = 16 * 16 * 16
        self.dense_w = nn.Parameter(torch.from_numpy(rng.normal(0, math.sqrt(1 / k), (k, NUM_CLASSES)).astype(np.float32)))
        self.dense_b = nn.Parameter(torch.from_numpy(rng.normal(0, 0.05, NUM_CLASSES).astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = self.bn(torch.relu(self.conv3(self.pool(x))))
        x = x.permute(0, 2, 3, 1).reshape(-1, self.dense_w.shape[0])
        return torch.softmax(x @ self.dense_w + self.dense_b, dim=-1)


def _torchvision(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES, **kwargs)

    return make


_TORCH_VARIANTS = tuple((e, b) for e in ("ts", "dynamo") for b in BN_MODES)
_C64 = (3, 64, 64)

ZOO: dict[str, ZooSpec] = {
    s.name: s
    for s in (
        ZooSpec("vgg_small", _C64, _TORCH_VARIANTS, SmallVGG, "Flatten→Gemm over 32×8×8"),
        ZooSpec("resnet18", _C64, _TORCH_VARIANTS, _torchvision("resnet18")),
        ZooSpec("resnet50", _C64, _TORCH_VARIANTS, _torchvision("resnet50")),
        ZooSpec("mobilenet_v2", _C64, _TORCH_VARIANTS, _torchvision("mobilenet_v2"), "depthwise, Clip(0,6)"),
        ZooSpec("mobilenet_v3_small", _C64, _TORCH_VARIANTS, _torchvision("mobilenet_v3_small"),
                "depthwise, SE, hard-swish"),
        ZooSpec("efficientnet_b0", _C64, _TORCH_VARIANTS, _torchvision("efficientnet_b0"), "depthwise, SE, SiLU"),
        ZooSpec("densenet121", _C64, _TORCH_VARIANTS, _torchvision("densenet121"),
                "Concat; pre-activation BNs cannot fold (min input 29)"),
        ZooSpec("googlenet", _C64, _TORCH_VARIANTS,
                _torchvision("googlenet", aux_logits=False, init_weights=True), "Inception Concat (min input 15)"),
        ZooSpec("squeezenet1_1", _C64, _TORCH_VARIANTS, _torchvision("squeezenet1_1"),
                "no BN: kept == folded (min input 17)"),
        ZooSpec("regnet_x_400mf", _C64, _TORCH_VARIANTS, _torchvision("regnet_x_400mf"), "grouped conv"),
        ZooSpec("regnet_y_400mf", _C64, _TORCH_VARIANTS, _torchvision("regnet_y_400mf"), "grouped conv, SE"),
        ZooSpec("shufflenet_v2_x0_5", _C64, _TORCH_VARIANTS, _torchvision("shufflenet_v2_x0_5"),
                "channel shuffle (Reshape/Transpose), Split"),
        ZooSpec("keras_nhwc", (32, 32, 3), (("helper", "kept"),), KerasNHWC,
                "tf2onnx pattern: NHWC Transposes, BN after ReLU, Reshape→MatMul+Add"),
        ZooSpec("legacy_opset9", _C64, (("ts", "kept"), ("ts", "folded")), SmallVGG,
                "vgg_small, TorchScript exporter at opset 9, batch fixed to 1", fixed_batch=True,
                opset=LEGACY_OPSET),
    )
}


# Variants cheap enough for the default test run (~25 s CPU together, see docs/zoo.md): both
# exporters and both BN modes on vgg_small, a residual and a depthwise net, the two hand-made fixtures.
QUICK: frozenset[tuple[str, str, str]] = frozenset({
    ("vgg_small", "ts", "kept"), ("vgg_small", "ts", "folded"),
    ("vgg_small", "dynamo", "kept"), ("vgg_small", "dynamo", "folded"),
    ("resnet18", "ts", "kept"), ("resnet18", "ts", "folded"),
    ("mobilenet_v2", "ts", "kept"),
    ("keras_nhwc", "helper", "kept"),
    ("legacy_opset9", "ts", "kept"),
})


def input_shape(name: str) -> tuple[int, ...]:
    """Shape of one input sample without the batch axis: (C, H, W), or (H, W, C) for keras_nhwc."""
    return _spec(name).input_shape


def variants(name: str) -> tuple[tuple[str, str], ...]:
    """The (exporter, bn) pairs that exist for ``name``."""
    return _spec(name).variants


def _spec(name: str) -> ZooSpec:
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}") from None


# --------------------------------------------------------------------------- PyTorch side


def _randomise(model: nn.Module, shape: tuple[int, ...], gen: torch.Generator) -> None:
    """Replace torchvision's trivial initial values: all-zero biases and identity BatchNorms.

    Zero biases become N(0, 0.01): identical zero initializers would be merged by the TorchScript
    exporter into one tensor shared through Identity nodes, tying unrelated layers together as no
    trained model does. Every BatchNorm2d gets random affine parameters and running stats equal to
    the batch statistics of 4 seeded noise images (one pass with only the BN layers in training
    mode, cumulative average), so activations stay well scaled through 50+ layers instead of
    exploding or vanishing as hand-drawn random stats would make them.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None and not m.bias.any():
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.01)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return
    with torch.no_grad():
        for bn in bns:
            c = bn.num_features
            bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)  # U(0.5, 1.5)
            bn.bias.copy_(torch.randn(c, generator=gen) * 0.1)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one pass sets the stats exactly
            bn.train()
        model(torch.randn(4, *shape, generator=gen))
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) submodule names where a Conv2d output feeds only one BatchNorm2d, found by torch.fx."""
    import torch.fx

    graph = torch.fx.symbolic_trace(model).graph
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules[src.target], nn.Conv2d)
            and len(src.users) == 1
            and calls[src.target] == 1
            and calls[node.target] == 1
        ):
            pairs.append((src.target, node.target))
    return pairs


def fold_batchnorm(model: nn.Module) -> int:
    """Fuse every Conv2d→BatchNorm2d pair in place (eval mode); the fused BN becomes Identity.

    Module names are kept, so a folded model can be sliced like the kept one. Returns the number
    of pairs fused; BNs with no Conv directly before them are left as they are.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    pairs = _conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        fused = fuse_conv_bn_eval(model.get_submodule(conv_name), model.get_submodule(bn_name))
        _set_submodule(model, conv_name, fused)
        _set_submodule(model, bn_name, nn.Identity())
    return len(pairs)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def torch_model(name: str, bn: str = "kept") -> nn.Module:
    """The eval-mode PyTorch model that ``build(name, *, bn)`` exports, rebuilt from the fixed seed.

    Each call returns a fresh copy (callers may modify it); the global RNG state is not disturbed.
    """
    return copy.deepcopy(_seeded_model(name, bn))


@functools.lru_cache(maxsize=4)  # build() and the test that compares against it ask for the same model
def _seeded_model(name: str, bn: str) -> nn.Module:
    spec = _spec(name)
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, not {bn!r}")
    if bn == "folded" and ("helper", "kept") in spec.variants:
        raise ValueError(f"{name} exists only with bn='kept' (its BN follows a ReLU, nothing to fold into)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = spec.factory().eval()
        gen = torch.Generator().manual_seed(SEED + 1)
        if not isinstance(model, KerasNHWC):  # its BN stats are part of its numpy-seeded definition
            _randomise(model, spec.input_shape, gen)
        if bn == "folded":
            fold_batchnorm(model)
    return model


def count_bn_modules(model: nn.Module) -> int:
    """Number of BatchNorm2d modules in ``model``."""
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


# --------------------------------------------------------------------------- exporters


def _export_ts(model: nn.Module, spec: ZooSpec, path: Path) -> None:
    """TorchScript exporter. TrainingMode.PRESERVE skips the eval-mode Conv+BN fusion pass, so a
    'kept' model keeps its BatchNormalization nodes; the model itself is in eval mode, so BN still
    uses running stats. Constant folding stays on so the rest of the graph matches EVAL exports."""
    x = torch.randn(1 if spec.fixed_batch else 2, *spec.input_shape)
    dynamic = None if spec.fixed_batch else {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation + the constant-folding-in-training-mode hint
        torch.onnx.export(
            model, (x,), str(path), dynamo=False, opset_version=spec.opset or TS_OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=dynamic,
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
        )


@contextlib.contextmanager
def _without_bn_fusion() -> Iterator[None]:
    """Drop onnxscript's Conv/Gemm+BatchNormalization fusion rules from the default optimizer.

    The dynamo exporter's optimizer folds BN into the preceding Conv; every other rewrite stays.
    """
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import _fuse_batchnorm

    fusion = set(_fuse_batchnorm.rules)
    kept = tuple(r for r in rewriter._DEFAULT_REWRITE_RULES if r not in fusion)
    with mock.patch.object(rewriter, "_DEFAULT_REWRITE_RULES", kept):
        yield


def _export_dynamo(model: nn.Module, spec: ZooSpec, path: Path) -> None:
    """torch.export-based exporter at opset 18 with a dynamic batch Dim (example batch 2 so the
    exporter cannot specialise it to 1), optimised with the default passes minus BN fusion."""
    x = torch.randn(2, *spec.input_shape)
    dynamic = None if spec.fixed_batch else ({0: torch.export.Dim("batch")},)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (x,), dynamo=True, opset_version=spec.opset or DYNAMO_OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=dynamic,
            optimize=False, verbose=False,
        )
        with _without_bn_fusion():
            program.optimize()
        program.save(str(path), external_data=False)


def keras_nhwc_graph(model: KerasNHWC) -> onnx.ModelProto:
    """Write the tf2onnx-style graph of ``model`` with onnx.helper (opset 13, batch symbolic 'N')."""
    p = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    inits = [
        onh.from_array(p["conv1.weight"], "model/conv2d/Conv2D/ReadVariableOp:0"),
        onh.from_array(p["conv1.bias"], "model/conv2d/BiasAdd/ReadVariableOp:0"),
        onh.from_array(p["conv2.weight"], "model/conv2d_1/Conv2D/ReadVariableOp:0"),
        onh.from_array(p["conv2.bias"], "model/conv2d_1/BiasAdd/ReadVariableOp:0"),
        onh.from_array(p["conv3.weight"], "model/conv2d_2/Conv2D/ReadVariableOp:0"),
        onh.from_array(p["conv3.bias"], "model/conv2d_2/BiasAdd/ReadVariableOp:0"),
        onh.from_array(p["bn.weight"], "model/batch_normalization/gamma:0"),
        onh.from_array(p["bn.bias"], "model/batch_normalization/beta:0"),
        onh.from_array(p["bn.running_mean"], "model/batch_normalization/moving_mean:0"),
        onh.from_array(p["bn.running_var"], "model/batch_normalization/moving_variance:0"),
        onh.from_array(np.array([-1, p["dense_w"].shape[0]], np.int64), "const_fold_opt__flatten_shape"),
        onh.from_array(p["dense_w"], "model/dense/MatMul/ReadVariableOp:0"),
        onh.from_array(p["dense_b"], "model/dense/BiasAdd/ReadVariableOp:0"),
    ]
    conv = dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=1)
    nodes = [
        oh.make_node("Transpose", ["input_1"], ["nchw"], "model/conv2d/Conv2D__6", perm=[0, 3, 1, 2]),
        oh.make_node("Conv", ["nchw", inits[0].name, inits[1].name], ["c1"], "model/conv2d/BiasAdd", **conv),
        oh.make_node("Relu", ["c1"], ["r1"], "model/conv2d/Relu"),
        oh.make_node("Conv", ["r1", inits[2].name, inits[3].name], ["c2"], "model/conv2d_1/BiasAdd", **conv),
        oh.make_node("Relu", ["c2"], ["r2"], "model/conv2d_1/Relu"),
        oh.make_node("MaxPool", ["r2"], ["p2"], "model/max_pooling2d/MaxPool", kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("Conv", ["p2", inits[4].name, inits[5].name], ["c3"], "model/conv2d_2/BiasAdd", **conv),
        oh.make_node("Relu", ["c3"], ["r3"], "model/conv2d_2/Relu"),
        oh.make_node("BatchNormalization", ["r3", *(i.name for i in inits[6:10])], ["bn"],
                     "model/batch_normalization/FusedBatchNormV3", epsilon=float(model.bn.eps)),
        oh.make_node("Transpose", ["bn"], ["nhwc"], "model/batch_normalization/FusedBatchNormV3__20", perm=[0, 2, 3, 1]),
        oh.make_node("Reshape", ["nhwc", inits[10].name], ["flat"], "model/flatten/Reshape"),
        oh.make_node("MatMul", ["flat", inits[11].name], ["mm"], "model/dense/MatMul"),
        oh.make_node("Add", ["mm", inits[12].name], ["logits"], "model/dense/BiasAdd"),
        oh.make_node("Softmax", ["logits"], ["predictions"], "model/dense/Softmax", axis=-1),
    ]
    h, w, c = ZOO["keras_nhwc"].input_shape
    graph = oh.make_graph(
        nodes, "tf2onnx",
        [oh.make_tensor_value_info("input_1", onnx.TensorProto.FLOAT, ["N", h, w, c])],
        [oh.make_tensor_value_info("predictions", onnx.TensorProto.FLOAT, ["N", NUM_CLASSES])],
        inits,
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], producer_name="tf2onnx",
                          producer_version="1.16.1")
    proto.ir_version = 8
    return proto


# --------------------------------------------------------------------------- build + stats


def model_filename(name: str, exporter: str, bn: str) -> str:
    return f"{name}-{exporter}-{bn}.onnx"


def build(name: str, exporter: str, bn: str, out_dir: Path) -> Path:
    """Export one zoo variant to ``out_dir/<name>-<exporter>-<bn>.onnx`` and return its path.

    Writes to a temporary file first, so concurrent builders never see a partial model. Raises
    ZooExportError (with the exporter's own error text) if the exporter fails, ZooCheckError if
    the graph's BatchNormalization count differs from the PyTorch model's BatchNorm2d count.
    """
    return build_with_stats(name, exporter, bn, out_dir)["path"]


def build_with_stats(name: str, exporter: str, bn: str, out_dir: Path) -> dict:
    """``build`` plus measurements: model_s (PyTorch model), export_s (wall) and export_cpu_s (this
    process's CPU time) of the export alone, size_mb, nodes, bn_nodes, ops (Counter of op types)."""
    spec = _spec(name)
    if (exporter, bn) not in spec.variants:
        raise ValueError(f"{name} has no variant exporter={exporter!r} bn={bn!r}; it has {list(spec.variants)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / model_filename(name, exporter, bn)

    t0 = time.perf_counter()
    model = torch_model(name, bn)
    t1, c1 = time.perf_counter(), time.process_time()
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            if exporter == "ts":
                _export_ts(model, spec, tmp)
            elif exporter == "dynamo":
                _export_dynamo(model, spec, tmp)
            else:
                onnx.save(keras_nhwc_graph(model), str(tmp))
        except Exception as e:  # the exporter's own error is the information we want to keep
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ZooExportError(f"{exporter} export of {name} (bn={bn}) failed: {type(e).__name__}: {first}") from e
        t2, c2 = time.perf_counter(), time.process_time()
        proto = onnx.load(str(tmp))
        ops = collections.Counter(n.op_type for n in proto.graph.node)
        want_bn = count_bn_modules(model)
        if ops["BatchNormalization"] != want_bn:
            raise ZooCheckError(
                f"{exporter} export of {name} (bn={bn}) has {ops['BatchNormalization']} BatchNormalization "
                f"nodes, the PyTorch model has {want_bn} BatchNorm2d modules"
            )
        tmp.chmod(0o644)  # mkstemp creates 0600; the cache may be shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "name": name, "exporter": exporter, "bn": bn, "path": path,
        "opset": _default_opset(proto), "model_s": t1 - t0, "export_s": t2 - t1, "export_cpu_s": c2 - c1,
        "size_mb": path.stat().st_size / 2**20, "nodes": len(proto.graph.node),
        "bn_nodes": ops["BatchNormalization"], "ops": ops,
    }


def _default_opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


# --------------------------------------------------------------------------- cache used by tests


def cache_key() -> str:
    """Changes whenever this file or the exporting libraries change, so stale models are not reused."""
    import onnxscript

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(f"{torch.__version__}|{onnx.__version__}|{onnxscript.__version__}".encode())
    return h.hexdigest()[:12]


class ZooCache:
    """Builds zoo models on first use into ``root/<cache_key>/`` and remembers failures.

    ``cache(name, exporter, bn) -> Path``; a failed export raises the same ZooExportError again
    without retrying it.
    """

    def __init__(self, root: Path) -> None:
        self.dir = Path(root) / cache_key()
        self._failed: dict[tuple[str, str, str], ZooExportError] = {}

    def __call__(self, name: str, exporter: str = "ts", bn: str = "kept") -> Path:
        key = (name, exporter, bn)
        if key in self._failed:
            raise self._failed[key]
        path = self.dir / model_filename(*key)
        if path.exists():
            return path
        try:
            return build(name, exporter, bn, self.dir)
        except ZooExportError as e:
            self._failed[key] = e
            raise


# --------------------------------------------------------------------------- CLI


def format_table(rows: list[dict], failures: list[tuple[str, str, str, str]]) -> str:
    """Markdown table of build_with_stats rows, then the failed exports with their errors."""
    lines = [
        "| model | exporter | bn | opset | export s | export CPU s | model s | MB | nodes | BN | op types |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(r["ops"].items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(
            f"| {r['name']} | {r['exporter']} | {r['bn']} | {r['opset']} | {r['export_s']:.2f} | {r['export_cpu_s']:.2f} "
            f"| {r['model_s']:.2f} "
            f"| {r['size_mb']:.2f} | {r['nodes']} | {r['bn_nodes']} | {ops} |"
        )
    if failures:
        lines += ["", "Failed exports:", ""]
        lines += [f"- {n} / {e} / {b}: `{msg}`" for n, e, b, msg in failures]
    return "\n".join(lines)


TABLE_BEGIN, TABLE_END = "<!-- zoo-table -->", "<!-- /zoo-table -->"


def write_markdown(path: Path, table: str) -> None:
    """Put ``table`` between the TABLE_BEGIN/TABLE_END markers of an existing file (the prose
    around them stays), or write a file holding only the table."""
    block = f"{TABLE_BEGIN}\n{table}\n{TABLE_END}"
    text = path.read_text() if path.exists() else ""
    if TABLE_BEGIN in text and TABLE_END in text:
        head, rest = text.split(TABLE_BEGIN, 1)
        text = head + block + rest.split(TABLE_END, 1)[1]
    else:
        text = block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for the .onnx files")
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=list(ZOO), help="build only these models")
    ap.add_argument("--exporter", nargs="+", choices=EXPORTERS, help="build only these exporters")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, onnx {onnx.__version__}, {torch.get_num_threads()} torch threads, "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)

    rows, failures = [], []
    for name in args.only or list(ZOO):
        for exporter, bn in variants(name):
            if args.exporter and exporter not in args.exporter:
                continue
            try:
                r = build_with_stats(name, exporter, bn, args.out)
                rows.append(r)
                print(f"{name:20s} {exporter:6s} {bn:6s} {r['export_s']:6.2f}s {r['size_mb']:7.2f} MB "
                      f"{r['nodes']:5d} nodes {r['bn_nodes']:3d} BN", flush=True)
            except (ZooExportError, ZooCheckError) as e:
                failures.append((name, exporter, bn, str(e)))
                print(f"{name:20s} {exporter:6s} {bn:6s} FAILED: {e}", flush=True)
    table = format_table(rows, failures)
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    print(table)
    if args.markdown:
        write_markdown(args.markdown, table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
