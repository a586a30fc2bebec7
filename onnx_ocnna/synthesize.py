"""Calibration data synthesized from the model itself, for a run with no data at all.

The inputs are optimised so that, batch by batch, the mean and standard deviation of every
BatchNormalization input match that layer's running statistics: the "distilled data" of
ZeroQ (Cai et al., CVPR 2020, eq. 4), also the BatchNorm prior of data-free distillation
(DeepInversion, Yin et al., CVPR 2020). The graph runs in PyTorch through the project's
interpreter (:class:`~onnx_ocnna.distill.torch_graph.OnnxModule`) with its BatchNorms on their
running statistics; only the inputs get gradients. A model whose exporter folded its
BatchNorms into the Convs has no statistics to match: :func:`bn_targets` finds none and
:func:`synthesize` refuses with :class:`NoBatchNormError`.

Shapes: N samples, B samples per optimised batch, C channels of a BatchNorm input.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_ocnna.calibration import fixed_batch, model_input_spec
from onnx_ocnna.errors import InputError
from onnx_ocnna.logits import logits_view

#: How the data is made, as the report records it.
METHOD = "BatchNorm statistics matching (ZeroQ distilled data)"


class NoBatchNormError(InputError):
    """The model has no BatchNormalization running statistics to synthesize data from."""


@dataclass(frozen=True)
class BNTarget:
    """One BatchNormalization whose input statistics the synthesis matches.

    Attributes:
        node: the BatchNormalization node's name.
        input: the name of the tensor it normalises, [B, C, ...].
        mean: running mean, [C] float64.
        std: sqrt(running variance + epsilon), [C] float64.
    """

    node: str
    input: str
    mean: np.ndarray
    std: np.ndarray


@dataclass
class Synthesis:
    """The synthesized calibration set and how it was made.

    Attributes:
        arrays: model input name -> [N, ...] float array in the input's dtype (model input space:
            already normalised as the model expects, no preprocessing applies).
        method, samples, batch_size, iterations, lr, seed, seconds: the settings and wall time.
        bn_layers: number of BatchNormalization layers matched.
        bn_loss: the BN-statistics loss (:func:`bn_statistics_loss`) of the result, per batch of
            ``batch_size``, averaged over the batches.
        noise_loss: the same loss for standard Gaussian inputs of the same shape and seed (what
            the optimisation starts from).
        saved: the ``.npz`` the arrays were written to (:func:`save_npz`), else None.
        smoothness: the weight of the image prior (0: ZeroQ's loss alone).
        class_weight: the weight of the class term (0: none); ``classes`` how many classes the
            labels cycle through (0 when the term was off or the output has no class axis).
    """

    arrays: dict[str, np.ndarray]
    method: str
    samples: int
    batch_size: int
    iterations: int
    lr: float
    seed: int
    seconds: float
    bn_layers: int
    bn_loss: float
    noise_loss: float
    saved: str | None = field(default=None)
    smoothness: float = 0.0
    class_weight: float = 0.0
    classes: int = 0

    @property
    def match_ratio(self) -> float:
        """bn_loss / noise_loss: below 1 means closer to the BN statistics than Gaussian noise."""
        return self.bn_loss / self.noise_loss if self.noise_loss > 0 else float("nan")

    def describe(self) -> dict:
        """The report's ``calibration.synthetic`` entry (everything but the arrays)."""
        info = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "arrays"}
        info["match_ratio"] = self.match_ratio
        info["shapes"] = {name: list(a.shape) for name, a in self.arrays.items()}
        return info


def bn_targets(model: onnx.ModelProto) -> list[BNTarget]:
    """The BatchNormalization nodes whose running mean and variance are initializers (or
    Constants), in graph order. Empty for a model whose BatchNorms were folded away."""
    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
    targets = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or len(node.input) < 5:
            continue
        mean, var = constants.get(node.input[3]), constants.get(node.input[4])
        if mean is None or var is None:
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        mean = numpy_helper.to_array(mean).astype(np.float64).reshape(-1)
        var = numpy_helper.to_array(var).astype(np.float64).reshape(-1)
        targets.append(BNTarget(node.name or node.output[0], node.input[0], mean, np.sqrt(np.maximum(var, 0) + eps)))
    return targets


def input_shapes(model: onnx.ModelProto, size: tuple[int, int] | list[int] | None = None) -> dict[str, tuple[int, ...]]:
    """Per model input, the shape of one sample (batch axis dropped), [...].

    Symbolic spatial dims of an image input (rank 4, NCHW or NHWC) are taken from ``size``
    (H, W); any other unknown dim, or a non-float input, cannot be synthesized.
    """
    shapes = {}
    for spec in model_input_spec(model):
        if spec.dtype.kind != "f":
            raise InputError(f"model input {spec.name!r} is {spec.dtype}, not float: calibration data cannot be "
                             "synthesized for it; give --calib")
        dims = list(spec.shape[1:])
        if len(spec.shape) == 4 and size is not None:
            spatial = (2, 3) if spec.layout != "NHWC" else (1, 2)
            for axis, value in zip(spatial, size):
                if dims[axis - 1] is None:
                    dims[axis - 1] = int(value)
        if any(d is None or d < 1 for d in dims):
            shown = "[" + ", ".join("?" if d is None else str(d) for d in spec.shape) + "]"
            raise InputError(f"model input {spec.name!r} has shape {shown}: the synthesized images need a fixed "
                             "size; give --size H,W")
        shapes[spec.name] = tuple(int(d) for d in dims)
    return shapes


class _StatsRecorder:
    """Adds to an :class:`OnnxModule` one output hook per BatchNorm input that accumulates
    ZeroQ's loss, ``||mean_batch - mean||^2 + ||std_batch - std||^2`` summed over the layers."""

    def __init__(self, module, targets: list[BNTarget], input_names: list[str]) -> None:
        import torch

        self.total = None
        self.outputs = None
        self._targets = {}
        for t in targets:
            self._targets.setdefault(t.input, []).append(
                (torch.tensor(t.mean, dtype=torch.float32), torch.tensor(t.std, dtype=torch.float32)))
        self._graph_inputs = [n for n in self._targets if n in input_names]
        for name in self._targets:
            if name not in input_names:
                module.output_hooks[name] = self._hook(name)

    def _hook(self, name: str):
        def hook(ctx, value):
            self.add(name, value)
            return value

        return hook

    def add(self, name: str, value) -> None:
        dims = [0, *range(2, value.dim())]
        targets = self._targets[name]
        # Moments of the input shifted by the running mean instead of torch's var: var and its
        # backward took a third of each step on ResNet-56 (370 of 1,530 ms, plus full-size
        # Sub/Div in the backward). The shift keeps E[y^2] - E[y]^2 free of cancellation once
        # the batch mean nears the running mean, which is what the loss drives it to.
        shift = targets[0][0].reshape(1, -1, *([1] * (value.dim() - 2)))
        shifted = value - shift
        shifted_mean = shifted.mean(dim=dims)
        variance = (shifted.square().mean(dim=dims) - shifted_mean.square()).clamp_min(0.0)
        mean = shifted_mean + targets[0][0]
        std = (variance + 1e-5).sqrt()  # BN's epsilon is in the target
        for target_mean, target_std in targets:
            term = (mean - target_mean).pow(2).sum() + (std - target_std).pow(2).sum()
            self.total = term if self.total is None else self.total + term

    def run(self, module, feeds: dict) -> "torch.Tensor":  # noqa: F821
        """The loss of one batch (graph inputs that feed a BatchNorm directly included)."""
        self.total = None
        self.outputs = module(**feeds)
        for name in self._graph_inputs:
            self.add(name, feeds[name])
        return self.total


def _taking_any_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A batch-1 export's copy that takes whole batches (:func:`onnx_ocnna.batch_axis.relax_batch`),
    so that its statistics are matched over batches as for any other model; else ``model``."""
    from onnx_ocnna.batch_axis import relax_batch

    relaxed = relax_batch(model)
    return relaxed.model if relaxed is not None else model


def bn_statistics_loss(model: onnx.ModelProto, arrays: dict[str, np.ndarray], batch_size: int = 64) -> float:
    """ZeroQ's BN-statistics loss of ``arrays`` (input name -> [N, ...]), per batch of
    ``batch_size`` samples, averaged over the batches (the last, smaller batch weighted by its size)."""
    import torch

    from onnx_ocnna.distill.torch_graph import OnnxModule

    model = _taking_any_batch(model)
    targets = bn_targets(model)
    if not targets:
        raise NoBatchNormError("the model has no BatchNormalization statistics")
    module = OnnxModule(model).eval()
    recorder = _StatsRecorder(module, targets, module.input_names)
    count = len(next(iter(arrays.values())))
    total = 0.0
    with torch.no_grad():
        for start in range(0, count, batch_size):
            feeds = {k: torch.from_numpy(np.ascontiguousarray(v[start:start + batch_size], dtype=np.float32))
                     for k, v in arrays.items()}
            rows = len(next(iter(feeds.values())))
            total += float(recorder.run(module, feeds)) * rows
    return total / count


def synthesize(model: onnx.ModelProto, samples: int = 256, *, batch_size: int = 64, iterations: int = 50,
               lr: float = 0.25, seed: int = 0, size: tuple[int, int] | list[int] | None = None,
               smoothness: float = 0.0, class_weight: float = 0.0, progress: bool = True,
               threads: int | None = None) -> Synthesis:
    """Synthesize ``samples`` calibration inputs whose BatchNorm statistics match the model's.

    Each batch of ``batch_size`` samples starts from standard Gaussian noise (seeded) and is
    optimised with Adam (``lr``, cosine decay to zero, ``iterations`` steps) on ZeroQ's loss,
    ``sum over BatchNorms of ||mean_batch - running_mean||^2 + ||std_batch - running_std||^2``,
    with the model's BatchNorms on their running statistics and its weights fixed.

    Args:
        model: the ONNX model (a float input; BatchNormalization nodes with running statistics).
        samples: N, how many samples to make.
        batch_size: B, samples optimised together (their statistics are matched jointly); the
            model's own batch size when it fixes one, except batch 1 where the copy that takes
            any batch (:func:`onnx_ocnna.batch_axis.relax_batch`) computes the same.
        size: (H, W) for an image input whose spatial dims are symbolic.
        smoothness: weight of an image prior added to the loss (DeepInversion's): the mean squared
            difference of neighbouring pixels of every rank-4 input; 0 (the default) is ZeroQ's loss.
        class_weight: weight of a class term added to the loss (DeepInversion's and GDFQ's): the
            cross-entropy of the model's first output [B, K] against labels that cycle through
            the K classes (seeded order), so each class gets about N / K samples the model
            itself assigns to it. Ignored (and recorded as 0) when that output is not [B, K].
        threads: torch intra-op threads for the optimisation (default: torch's).

    Returns:
        A :class:`Synthesis` whose ``arrays`` map each input name to [N, ...] float arrays.

    Raises:
        NoBatchNormError: the model has no BatchNorm statistics (folded by the exporter).
        InputError: a non-float input, an input of unknown size, or a bad setting.
    """
    import torch
    from tqdm.auto import tqdm

    from onnx_ocnna.distill.torch_graph import OnnxModule

    for what, value in (("samples", samples), ("batch_size", batch_size), ("iterations", iterations)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{what} must be a positive integer, got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InputError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(class_weight, (int, float)) and math.isfinite(class_weight) and class_weight >= 0):
        raise InputError(f"class_weight must be a non-negative number, got {class_weight!r}")
    model = _taking_any_batch(model)
    targets = bn_targets(model)
    if not targets:
        raise NoBatchNormError("the model has no BatchNormalization statistics to synthesize calibration data from "
                               "(the exporter folded them into the Convs)")
    shapes = input_shapes(model, size)
    specs = model_input_spec(model)
    fixed = fixed_batch(specs)
    batch_size = fixed or min(batch_size, samples)
    dtypes = {s.name: s.dtype for s in specs}
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        # The class term's cross-entropy needs logits: a final Softmax's probabilities are near flat.
        module = OnnxModule(logits_view(model) if class_weight else model).eval()
        for p in module.parameters():
            p.requires_grad_(False)
        recorder = _StatsRecorder(module, targets, module.input_names)
        generator = torch.Generator().manual_seed(seed)
        out = {name: np.empty((samples, *shape), dtype=dtypes[name]) for name, shape in shapes.items()}
        batches = math.ceil(samples / batch_size)
        classes = _class_count(module, recorder, shapes, fixed or 2) if class_weight else 0
        labels = _cycled_labels(samples, classes, generator) if classes else None
        bn_loss = noise_loss = 0.0
        bar = tqdm(total=batches * iterations, desc=f"synthesizing {samples} calibration samples", unit="step",
                   disable=not progress, leave=False)
        try:
            for b in range(batches):
                rows = min(batch_size, samples - b * batch_size)
                # A fixed model batch still needs full batches: the spare rows are dropped at the end.
                run_rows = batch_size if fixed else rows
                x = {name: torch.randn((run_rows, *shape), generator=generator).requires_grad_(True)
                     for name, shape in shapes.items()}
                with torch.no_grad():
                    noise_loss += float(recorder.run(module, x)) * rows
                optimiser = torch.optim.Adam(list(x.values()), lr=lr)
                schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=iterations)
                for _ in range(iterations):
                    optimiser.zero_grad(set_to_none=True)
                    loss = recorder.run(module, x)
                    if smoothness:
                        loss = loss + smoothness * sum(_total_variation(x[s.name], s.layout) for s in specs
                                                       if len(s.shape) == 4)
                    if labels is not None:
                        target = labels[b * batch_size: b * batch_size + run_rows]
                        logits = _first_output(recorder.outputs)[:len(target)]
                        loss = loss + class_weight * torch.nn.functional.cross_entropy(logits, target)
                    loss.backward()
                    optimiser.step()
                    schedule.step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3g}", refresh=False)
                with torch.no_grad():
                    bn_loss += float(recorder.run(module, x)) * rows
                for name, value in x.items():
                    out[name][b * batch_size: b * batch_size + rows] = value.detach()[:rows].numpy()
        finally:
            bar.close()
    finally:
        torch.set_num_threads(previous_threads)
    for name, array in out.items():
        if not np.isfinite(array).all():
            raise InputError(f"the synthesis diverged (non-finite values in input {name!r}); try a smaller lr")
    return Synthesis(out, METHOD, samples, batch_size, iterations, float(lr), seed, time.perf_counter() - start,
                     len(targets), bn_loss / samples, noise_loss / samples, smoothness=float(smoothness),
                     class_weight=float(class_weight) if classes else 0.0, classes=classes)


def _first_output(outputs):
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def _class_count(module, recorder: _StatsRecorder, shapes: dict[str, tuple[int, ...]], batch: int) -> int:
    """K when the model's first output is [B, K] logits (K >= 2), else 0; one probe of ``batch`` zeros."""
    import torch

    with torch.no_grad():
        recorder.run(module, {name: torch.zeros((batch, *shape)) for name, shape in shapes.items()})
    out = _first_output(recorder.outputs)
    return int(out.shape[1]) if out.dim() == 2 and out.shape[0] == batch and out.shape[1] >= 2 else 0


def _cycled_labels(samples: int, classes: int, generator):
    """[N] int64 labels: 0..K-1 repeated (each class N / K times, give or take one), seeded order."""
    import torch

    return torch.arange(samples, dtype=torch.int64).remainder(classes)[torch.randperm(samples, generator=generator)]


def _total_variation(x, layout: str | None):
    """Mean squared difference of vertically and horizontally neighbouring pixels of [B, C, H, W]
    (or [B, H, W, C] for an NHWC input)."""
    h, w = (1, 2) if layout == "NHWC" else (2, 3)
    return x.diff(dim=h).pow(2).mean() + x.diff(dim=w).pow(2).mean()


def save_npz(synthesis: Synthesis, path) -> None:
    """Write the arrays as a ``.npz`` keyed by input name (what ``--calib FILE.npz`` reads),
    atomically: a Ctrl-C while writing leaves no file."""
    from onnx_ocnna.model_io import atomic_output

    with atomic_output(path) as staged:
        with open(staged, "wb") as handle:
            np.savez(handle, **synthesis.arrays)
    synthesis.saved = str(path)
