"""Least-squares reconstruction of the pruned layers: accuracy recovery without training.

Removing channels changes what every later layer sees. Layer by layer, in graph order, each
Conv, Gemm and MatMul whose input lost channels (or changed, because a layer before it was refitted)
gets new weights and bias so that its kept outputs match the original model's on calibration
data: a ridge regression of the original pre-activation outputs on the pruned model's input
patches, at a few sampled output positions per image (He et al. 2017, "Channel Pruning for
Accelerating Very Deep Neural Networks"; Luo et al. 2017, ThiNet). Each layer is fitted on the
inputs that the layers already refitted before it produce, so errors do not pile up, and the
ridge pulls towards the current weights, so directions the data does not determine keep
their values. Only initializer values change (plus a bias input for a Conv that had none and
has no BatchNormalization after it to take the shift, unless ``new_biases=False``): the graph
keeps its structure and every layer its shape.

What the next layer sees is what matters, so a layer followed by a Relu or Clip (directly,
through a BatchNormalization, or after a residual Add) is fitted *through* it: where the
original's value is clipped, any prediction the activation also clips is right, and an
iterated least squares moves those targets to the prediction (:func:`_fit_through_activation`).
Behind a residual Add the layer is fitted to what the original sum needs from it, the
original output plus the original shortcut minus this model's shortcut, so the errors that
the pruned shortcut carries down the residual stream are compensated instead of passed on.
Measured without training (CIFAR-10 ResNet-56 at MACs 0.5, 5,000 test images): 71.84 % top-1
with the plain fit, 73.38 % through the activations alone, 74.66 % with the shortcut too; the
output KL from the original 0.62 -> 0.51 -> 0.41 nats.

Measured on the CIFAR-10 ResNet-20 pruned at k = 40 (2,000 held-out images): top-1 12.1 % after
pruning, 42.0 % after reconstruction on 500 training images, 61.1 % against 38.8 % after one
epoch of distillation on 5,000 images (docs/benchmarks_kd.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnx.utils
import scipy.linalg
from onnx import numpy_helper

from onnx_ocnna.calibration import Batch
from onnx_ocnna.collect import with_outputs
from onnx_ocnna.errors import InputError
from onnx_ocnna.model_io import ort_session
from onnx_ocnna.segments import OriginalPrefix, SegmentRunner, extract, sample_count, take_feeds
from onnx_ocnna.shapes import declared_shapes


# A layer whose relative output error is below this already matches the original (float32
# rounding); refitting it would only fit noise.
_EXACT = 1e-6
# Sampled original outputs up to this many bytes are computed in one pass and kept.
_TARGET_BUDGET = 1 << 30
# Layers with fewer input columns than this keep their full normal equations (<= 128 MiB each).
_KEPT_COLUMNS = 4096
# Sampled rows and targets up to this many bytes are kept per layer for the activation-aware fit.
_KEPT_ROWS = 256 << 20
# Re-solves of the activation-aware fit (each one moves the targets the activation clips).
_ACTIVATION_STEPS = 4
# Images the reconstruction reads when the caller does not say (auto_samples): at least
# MIN_AUTO_SAMPLES, up to MAX_AUTO_SAMPLES while the model's MACs per image x images stay within
# AUTO_WORK_LIMIT and the kept inputs within AUTO_INPUT_BYTES. More images fit better, measured
# without training at --target-macs 0.5 (no speed floor, the same allocation, 5,000 test images):
# ResNet-56 78.62 / 79.54 / 79.94 % top-1 with 512 / 1,024 / 2,048 images, ResNet-20 (BN kept)
# 72.64 / 73.26 / 73.82 %, for about 3x the refit's time at 2,048. At 2,048 images every CIFAR
# ResNet layer's sampled rows still fit _KEPT_ROWS (the activation-aware fit); ResNet-56 x 2,048
# images is the work limit, so a 224 x 224 ResNet stays at 512.
MIN_AUTO_SAMPLES = 512
MAX_AUTO_SAMPLES = 2048
AUTO_WORK_LIMIT = 2.6e11
AUTO_INPUT_BYTES = 512 << 20


def auto_samples(macs: int, sample_bytes: int | None, available: int | None) -> int:
    """Images to refit on when not told: as many as ``available`` (None: unknown), between
    :data:`MIN_AUTO_SAMPLES` and :data:`MAX_AUTO_SAMPLES`, fewer than the maximum when
    ``macs`` (per image) x images would pass :data:`AUTO_WORK_LIMIT` or the kept inputs
    (``sample_bytes`` per image) :data:`AUTO_INPUT_BYTES`."""
    count = MAX_AUTO_SAMPLES
    if macs > 0:
        count = min(count, int(AUTO_WORK_LIMIT // macs))
    if sample_bytes:
        count = min(count, AUTO_INPUT_BYTES // sample_bytes)
    count = max(MIN_AUTO_SAMPLES, count)
    return count if available is None else max(1, min(count, available))


@dataclass
class LayerFit:
    """One refitted (or skipped) layer.

    Attributes:
        error_before, error_after: relative error ||Y - X W|| / ||Y|| of its kept outputs
            on the sampled calibration positions, before and after the fit; with
            ``activation``, of the outputs after the Relu/Clip that follows, clip(Y) - clip(X W).
    """

    node: str
    op_type: str
    rows: int = 0
    error_before: float | None = None
    error_after: float | None = None
    skipped: str = ""
    activation: bool = False  # errors measured after the activation that follows (fitted to it)


@dataclass
class ReconstructionReport:
    samples: int
    positions: int
    ridge: float
    seconds: float = 0.0
    layers: list[LayerFit] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def reconstruct(original: onnx.ModelProto, pruned: onnx.ModelProto, kept: dict[str, np.ndarray],
                batches: Callable[[], Iterable[Batch]], *, samples: int = 512, positions: int = 32,
                ridge: float = 1e-3, seed: int = 0, progress: bool = True, local: bool = False,
                equations: LayerEquations | None = None, kept_inputs: dict[str, np.ndarray] | None = None,
                activation_aware: bool = True, prefix: OriginalPrefix | None = None, new_biases: bool = True
                ) -> tuple[onnx.ModelProto, ReconstructionReport]:
    """Refit the pruned model's Conv, Gemm and MatMul layers to reproduce the original's outputs.

    Args:
        original: the unpruned model, with the same node names as ``pruned``.
        pruned: the pruned model (not modified; a copy is returned).
        kept: layer node name -> original output-channel index of each of its outputs, [C_kept];
            a layer not listed keeps all its outputs.
        batches: calibration batches (labels unused); the first ``samples`` images are read
            once and kept in memory.
        positions: output positions sampled per image and layer (all of them if fewer).
        ridge: regularisation, relative to the mean diagonal of the normal equations.
        local: refit only the layers whose inputs lost channels, not the layers after them
            (the cheap estimate the budget allocation measures each candidate cut with).
        equations: with ``local``, the original's normal equations per layer (computed once,
            see :class:`LayerEquations`); a layer whose input is the original's minus the cut
            channels is then solved from a sub-block of them, without running any model.
        kept_inputs: layer -> boolean mask of its original input channels (features for a
            Gemm) that survive, [C_in]; needed with ``equations`` (:func:`kept_input_masks`).
        activation_aware: a layer whose output goes (through a BatchNormalization or not) into
            a Relu or Clip is fitted to what that activation passes on: an output the
            activation clips in the original may be anything the activation also clips
            (:func:`activation_bounds`; the sliced equations of ``equations`` are fitted plainly).
        prefix: the original's tensors on the same samples (:class:`OriginalPrefix` of
            ``original``): the pruned model and the original's targets are then run from the
            original's tensors before the cut's first change instead of from the inputs.
        new_biases: a Conv without a bias whose fitted intercept no BatchNormalization can take
            gets a bias initializer for it (C_out more parameters); False fits such a Conv
            without intercept, so the parameter count stays that of ``pruned`` (a parameter budget).
    Returns:
        (the reconstructed model, a report with each layer's relative error before/after).
    """
    if samples < 1 or positions < 1:
        raise InputError("reconstruction needs at least one sample and one position")
    if ridge <= 0:
        raise InputError(f"the reconstruction ridge must be positive, got {ridge:g}")
    start = time.perf_counter()
    feeds = take_feeds(batches(), samples)
    if not feeds:
        raise InputError("the calibration data gave no sample to reconstruct with")
    model = onnx.ModelProto()
    model.CopyFrom(pruned)
    report = ReconstructionReport(samples=sample_count(feeds), positions=positions,
                                  ridge=ridge)
    originals = {n.name: n for n in original.graph.node if n.name}
    plan = _plan_layers(model, originals, original, propagate=not local)
    from_equations = ({name for name in _untouched_inputs(model, plan, originals) & set(kept_inputs or {})
                       if equations.covers(originals[name])} if local and equations is not None else set())
    to_fit = [(node, originals[node.name]) for node, reason in plan if not reason and node.name not in from_equations]
    bounds = {node.name: activation_bounds(original, twin, kept.get(node.name))
              for node, twin in to_fit} if activation_aware else {}
    # The prefix's tensors must be of these very batches (the caller's promise; the sizes are checked).
    sizes = [sample_count([f]) for f in feeds]
    same_samples = prefix is not None and [sample_count([f]) for f in prefix.feeds] == sizes
    from_cut = prefix.cut(model) if same_samples and to_fit else None
    targets = _Targets(original, [(twin.output[0], kept.get(node.name)) for node, twin in to_fit], feeds,
                       positions, seed, budget=_TARGET_BUDGET,
                       channels_last={twin.output[0] for _, twin in to_fit if twin.op_type == "MatMul"},
                       addends={twin.output[0]: bounds[node.name].addend for node, twin in to_fit
                                if bounds.get(node.name) is not None and bounds[node.name].addend},
                       start=from_cut[1] if from_cut is not None else None)
    runner = SegmentRunner(model, feeds, start=from_cut)
    with _progress(len(plan), progress) as bar:  # closed on Ctrl-C too
        for node, reason in plan:
            fit = LayerFit(node.name, node.op_type, skipped=reason)
            report.layers.append(fit)
            if not reason:
                twin = originals[node.name]
                try:
                    given = (equations.restricted(twin, kept_inputs[node.name], kept.get(node.name))
                             if node.name in from_equations else None)
                    _FITTERS[node.op_type](model, node, twin.output[0], targets, runner, fit, ridge, given,
                                           bounds.get(node.name), new_biases=new_biases)
                except _NotRefitted as why:  # a rank the model's shapes did not tell
                    fit.skipped = str(why)
            bar.update(1)
            if fit.error_after is not None:
                bar.set_postfix_str(f"{node.name}: {fit.error_before:.3f} -> {fit.error_after:.3f}")
    report.seconds = time.perf_counter() - start
    return model, report


def kept_input_masks(analysis, removed: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Layer node name -> boolean mask of its input channels (a Gemm's input features) that
    survive ``removed``, [C_in], for every Conv, Gemm and MatMul that loses some."""
    from onnx_ocnna.channels.context import SliceInput

    keep = analysis.keep_fn(removed)
    masks = {}
    for edit in analysis.context.edits:
        node = edit.node
        if not isinstance(edit, SliceInput) or edit.index != 1 or node.op not in _FITTERS:
            continue
        # Conv weight [C_out, C_in, kh, kw]; Gemm weight [K, N], or [N, K] with transB.
        input_axis = 1 if node.op == "Conv" else int(bool(node.attrs.get("transB", 0)))
        if edit.axis != input_axis:
            continue
        mask = keep(edit.ids)
        if not mask.all():
            masks[node.name] = mask
    return masks


def kept_outputs(analysis, removed: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Layer node name -> its kept output-channel indices, for every member of a cut group."""
    kept = {}
    for group in analysis.groups:
        gone = np.asarray(removed.get(group.id, []), dtype=np.int64)
        if gone.size == 0:
            continue
        for member, channels in group.member_channels.items():
            kept[member] = np.flatnonzero(~np.isin(channels, gone))
    return kept


# --------------------------------------------------------------------------------------------
# Which layers are refitted


def _plan_layers(model: onnx.ModelProto, originals: dict, original: onnx.ModelProto,
                 propagate: bool = True) -> list[tuple]:
    """(layer node, skip reason or "") for every Conv, Gemm and MatMul, in graph order. A layer is
    refitted when its input lost channels or carries values changed upstream (a refitted layer,
    or any node fed by one); refitting never stops that change, so the walk needs no fit.
    Without ``propagate`` only the layers whose inputs lost channels, or now read another tensor
    (a removed block's readers read its shortcut), are refitted."""
    original_inits = {i.name: i for i in original.graph.initializer}
    inits = {i.name: i for i in model.graph.initializer}
    uses = _initializer_uses(model)
    ranks = {name: len(dims) for name, (_, dims) in declared_shapes(model).items()}
    changed: set[str] = set()  # tensors whose kept values may differ from the original's
    plan = []
    for node in model.graph.node:
        changed.update(_rewired_inputs(node, originals, inits))
        if node.op_type in _FITTERS:
            reason = (_skip_reason(node, originals.get(node.name), uses, inits, original_inits, changed)
                      or (_SEQUENCE if node.op_type == "MatMul" and ranks.get(node.input[0], 2) not in (2, 4) else ""))
            plan.append((node, reason))
            if propagate and (not reason or any(i in changed for i in node.input)):
                changed.update(node.output)
        elif propagate and any(i in changed for i in node.input):
            changed.update(node.output)
    return plan


# A MatMul over the last axis of an image [N, H, W, K] (ConvNeXt's pointwise layers) is a 1 x 1
# convolution in channels-last layout, refitted as one (:func:`_matmul_rows`); over a sequence
# [B, T, K] it is not refitted.
_SEQUENCE = "MatMul over a sequence [B, T, K] is not refitted"


class _NotRefitted(Exception):
    """A layer found at run time to be one the refit does not fit (the reason is the message)."""


def _rewired_inputs(node, originals: dict, inits: dict) -> list[str]:
    """Inputs of ``node`` that are not the tensors its original twin reads: a removed residual
    block's readers read its shortcut, not the Add's output."""
    twin = originals.get(node.name)
    if twin is None:
        return []
    return [i for i, t in zip(node.input, twin.input) if i != t and i and i not in inits]


def _untouched_inputs(model: onnx.ModelProto, plan: list[tuple], originals: dict) -> set[str]:
    """Names of the layers to fit whose input is the original's tensor minus the cut channels:
    not re-wired, and no layer that lost input channels (whose outputs therefore changed) lies
    upstream of it."""
    cut = {node.name for node, reason in plan if not reason}
    inits = {i.name for i in model.graph.initializer}
    changed: set[str] = set()
    untouched = set()
    for node in model.graph.node:
        changed.update(_rewired_inputs(node, originals, inits))
        if node.name in cut and node.input[0] not in changed:
            untouched.add(node.name)
        if node.name in cut or any(i in changed for i in node.input):
            changed.update(node.output)
    return untouched


def _skip_reason(node, twin, uses, inits, original_inits, changed) -> str:
    if twin is None or twin.op_type != node.op_type:
        return "no layer of that name in the original model"
    if len(node.input) < 2 or node.input[1] not in inits:
        return "weights are not an initializer"
    if any(uses.get(name, 0) > 1 for name in node.input[1:] if name):
        return "weights shared with another node"
    weight, original_weight = inits[node.input[1]], original_inits.get(twin.input[1])
    if original_weight is None:
        return "original weights are not an initializer"
    inputs_cut = (list(weight.dims[1:]) != list(original_weight.dims[1:]) if node.op_type == "Conv"
                  else _gemm_in_features(node, weight) != _gemm_in_features(twin, original_weight))
    if not inputs_cut and node.input[0] not in changed:
        return "input unchanged"
    if node.op_type == "Conv":
        if len(weight.dims) != 4:
            return "only 2-D convolutions are refitted"
        if _attr(node, "group", 1) != 1:
            return "grouped or depthwise convolution"
        if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return "auto_pad is not supported by the refit"
    elif node.op_type == "MatMul":
        if len(weight.dims) != 2:
            return "MatMul whose weight is not a matrix"
    else:
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            return "Gemm with transA, alpha or beta"
    return ""


def _gemm_in_features(node, weight) -> int:
    return int(weight.dims[1] if _attr(node, "transB", 0) else weight.dims[0])


def _initializer_uses(model: onnx.ModelProto) -> dict[str, int]:
    names = {i.name for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in names:
                uses[name] = uses.get(name, 0) + 1
    return uses


# --------------------------------------------------------------------------------------------
# Fitting


def _conv_rows(node, kernel: tuple[int, int]) -> Callable[[np.ndarray, tuple], np.ndarray]:
    """rows(x [N, Cin, H, W], (oy, ox) [N, P] each) -> input patches [N * P, Cin * kh * kw] of
    ``node`` at the sampled output positions (columns channel-major, like the weight)."""
    kh, kw = kernel
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    strides = list(_attr(node, "strides", [1, 1]))
    dilations = list(_attr(node, "dilations", [1, 1]))

    def rows(x: np.ndarray, where) -> np.ndarray:
        oy, ox = where
        xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        r = oy[:, :, None, None] * strides[0] + (np.arange(kh) * dilations[0])[None, None, :, None]
        c = ox[:, :, None, None] * strides[1] + (np.arange(kw) * dilations[1])[None, None, None, :]
        patches = xp[np.arange(len(x))[:, None, None, None], :, r, c]  # [N, P, kh, kw, Cin]
        return patches.transpose(0, 1, 4, 2, 3).reshape(len(x) * oy.shape[1], -1)

    return rows


def _gemm_rows(x: np.ndarray, where) -> np.ndarray:
    return x.reshape(len(x), -1)


def _matmul_rows(x: np.ndarray, where) -> np.ndarray:
    """Rows of a MatMul's input: [M, K] as it is; a channels-last image [N, H, W, K] at the
    sampled output positions (oy, ox) [N, P] each, [N * P, K] (a 1 x 1 convolution)."""
    if x.ndim == 2:
        return x
    if x.ndim != 4 or where is None:  # a rank the model's shapes did not tell (see _SEQUENCE)
        raise _NotRefitted(_SEQUENCE)
    oy, ox = where
    return x[np.arange(len(x))[:, None], oy, ox, :].reshape(-1, x.shape[-1])


def _layer_rows(node, weight: onnx.TensorProto) -> Callable[[np.ndarray, tuple], np.ndarray]:
    """The rows function of layer ``node``: input patches (Conv), the input (Gemm), or a
    MatMul's rows (:func:`_matmul_rows`)."""
    if node.op_type == "Conv":
        return _conv_rows(node, tuple(weight.dims[2:4]))
    return _matmul_rows if node.op_type == "MatMul" else _gemm_rows


def _fit_conv(model, node, target, targets, runner, fit, ridge, given=None, bounds=None, new_biases=True) -> None:
    inits = {i.name: i for i in model.graph.initializer}
    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)  # [Cout, Cin, kh, kw]
    cout, cin, kh, kw = w.shape
    has_bias = len(node.input) > 2 and bool(node.input[2])
    b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) if has_bias else np.zeros(cout)
    mean = None if has_bias else _batchnorm_mean_taking_shift(model, node, cout)
    intercept = has_bias or mean is not None or new_biases
    start = np.concatenate([w.reshape(cout, -1), b[:, None]], axis=1).T  # [D + 1, Cout]
    solution = _solve(model, node, target, targets, runner, fit, ridge, _conv_rows(node, (kh, kw)), start,
                      intercept=intercept, given=given, bounds=bounds)
    if solution is None:
        return
    _set(model, node.input[1], (solution[:-1] if intercept else solution).T.reshape(w.shape).astype(np.float32))
    if not intercept:
        return
    new_b = solution[-1].astype(np.float32)
    if has_bias:
        _set(model, node.input[2], new_b)
    elif mean is not None:
        # BN(y + c) with mean m equals BN(y) with mean m - c: the count and the graph stay.
        old = numpy_helper.to_array(inits[mean])
        _set(model, mean, (old.astype(np.float64) - new_b).astype(old.dtype))
    else:
        name = _unique_name(model, f"{node.name or node.output[0]}.bias")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inits[node.input[1]].data_type)  # the weight's
        model.graph.initializer.append(numpy_helper.from_array(new_b.astype(dtype), name))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name


def _batchnorm_mean_taking_shift(model: onnx.ModelProto, node, channels: int) -> str | None:
    """The mean initializer of the BatchNormalization that alone reads a bias-less Conv's
    output and can take its fitted intercept (used by nothing else, [channels]); None if none."""
    consumers = [n for n in model.graph.node if node.output[0] in n.input]
    if len(consumers) != 1 or consumers[0].op_type != "BatchNormalization" or consumers[0].input[0] != node.output[0]:
        return None
    bn = consumers[0]
    inits = {i.name: i for i in model.graph.initializer}
    if len(bn.input) < 5 or bn.input[3] not in inits or _initializer_uses(model).get(bn.input[3], 0) != 1:
        return None
    return bn.input[3] if tuple(inits[bn.input[3]].dims) == (channels,) else None


def _fit_gemm(model, node, target, targets, runner, fit, ridge, given=None, bounds=None, new_biases=True) -> None:
    """A Gemm's weight, and its bias where it has one (``new_biases`` is not needed: a Gemm
    without C is fitted without intercept)."""
    inits = {i.name: i for i in model.graph.initializer}
    trans_b = bool(_attr(node, "transB", 0))
    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    w_kn = w.T if trans_b else w  # [K, N]
    has_bias = len(node.input) > 2 and node.input[2] in inits
    bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) if has_bias else None
    if has_bias and bias.shape != (w_kn.shape[1],):
        fit.skipped = "Gemm bias is not one value per output"
        return
    b = bias if has_bias else np.zeros(w_kn.shape[1])
    start = np.concatenate([w_kn, b[None, :]], axis=0)
    solution = _solve(model, node, target, targets, runner, fit, ridge, _gemm_rows, start, intercept=has_bias,
                      given=given, bounds=bounds)
    if solution is not None:
        new_w = solution[:-1] if has_bias else solution
        _set(model, node.input[1], (new_w.T if trans_b else new_w).astype(np.float32))
        if has_bias:
            _set(model, node.input[2], solution[-1].astype(np.float32))


def _fit_matmul(model, node, target, targets, runner, fit, ridge, given=None, bounds=None,
                new_biases=True) -> None:
    """A MatMul with a constant B [K, N], like a Gemm; its intercept goes into the bias Add that
    alone reads its output (tf2onnx's Dense), and without one it is fitted without intercept
    (so ``new_biases`` changes nothing)."""
    inits = {i.name: i for i in model.graph.initializer}
    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)  # [K, N]
    bias = _bias_add(model, node, inits)
    start = np.concatenate([w, np.zeros((1, w.shape[1]))], axis=0)  # the intercept is a change of the bias
    solution = _solve(model, node, target, targets, runner, fit, ridge, _matmul_rows, start,
                      intercept=bias is not None, given=given, bounds=bounds)
    if solution is not None:
        _set(model, node.input[1], (solution[:-1] if bias is not None else solution).astype(np.float32))
        if bias is not None:
            old = numpy_helper.to_array(inits[bias])
            _set(model, bias, (old + solution[-1].reshape(old.shape)).astype(old.dtype))


def _bias_add(model: onnx.ModelProto, node, inits: dict) -> str | None:
    """The initializer of the Add that alone reads ``node``'s output and adds one constant per
    output column ([N] or [1, N], used by no other node), else None."""
    readers = [n for n in model.graph.node if node.output[0] in n.input]
    if len(readers) != 1 or readers[0].op_type != "Add" or len(readers[0].input) != 2:
        return None
    add = readers[0]
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    if other not in inits or _initializer_uses(model).get(other, 0) != 1:
        return None
    dims = list(inits[other].dims)
    neurons = int(inits[node.input[1]].dims[1])
    return other if dims in ([neurons], [1, neurons]) else None


def _solve(model, node, target, targets, runner, fit, ridge, rows, start, intercept: bool = True,
           given: Equations | None = None, bounds: ActivationBounds | None = None):
    """Accumulate the normal equations over the samples (or take ``given`` ones) and solve;
    None if not better. With ``bounds`` (and the sampled rows kept) the fit is refined to the
    activation that follows (:func:`_fit_through_activation`)."""
    if not intercept:
        start = start[:-1]
    if given is None:
        given = _accumulate(model, node, target, targets, runner, rows, bounds)
    gram, rhs, target_energy = given.gram, given.rhs, given.energy
    if not intercept:
        gram, rhs = gram[:-1, :-1], rhs[:-1]
    fit.rows += given.rows
    if rhs.shape[1] != start.shape[1] or gram.shape[0] != start.shape[0]:
        fit.skipped = f"shapes do not match the original layer ({rhs.shape[1]} outputs, {gram.shape[0]} inputs)"
        return None
    lam = ridge * float(np.trace(gram)) / gram.shape[0]
    try:
        factor = scipy.linalg.cho_factor(gram + lam * np.eye(gram.shape[0]))
        solution = scipy.linalg.cho_solve(factor, rhs + lam * start)
    except np.linalg.LinAlgError:  # not positive definite in floating point: the general solver
        factor, solution = None, np.linalg.solve(gram + lam * np.eye(gram.shape[0]), rhs + lam * start)

    def error(wb: np.ndarray) -> float:
        residual = np.sum(wb * (gram @ wb)) - 2 * np.sum(wb * rhs) + target_energy
        return float(np.sqrt(max(residual, 0.0) / target_energy)) if target_energy > 0 else 0.0

    fit.error_before, fit.error_after = error(start), error(solution)
    if fit.error_before <= _EXACT:
        fit.error_after = fit.error_before
        fit.skipped = "already reproduces the original outputs"
        return None
    if given.samples is not None and bounds is not None and factor is not None and np.isfinite(solution).all():
        a, t, added = given.samples
        if not intercept:
            a = a[:, :-1]
        solution, fit.error_before, fit.error_after = _fit_through_activation(
            a, t, bounds.in_output_space(added), factor, lam * start, start, solution)
        fit.activation = True
    if not np.isfinite(solution).all() or fit.error_after >= fit.error_before:
        fit.error_after = fit.error_before
        fit.skipped = "the refit did not lower the error"
        return None
    return solution


def _fit_through_activation(a: np.ndarray, t: np.ndarray, bounds: tuple[np.ndarray, np.ndarray], factor,
                            pull: np.ndarray, start: np.ndarray, solution: np.ndarray
                            ) -> tuple[np.ndarray, float, float]:
    """Refit a layer to what the activation after it passes on, by iterated least squares.

    Where the original output ``t`` lies at or below the activation's lower bound (a Relu's
    zero), any prediction at or below it gives the same activation, so the target there is
    moved to the prediction clipped to the bound; likewise above an upper bound. Each step keeps
    the factorised normal matrix (the rows do not change, only the right-hand side), and every
    step can only lower the activation-space squared error it majorises.

    Args:
        a: sampled input rows [R, D] (intercept column included when fitted), float32.
        t: original outputs at those rows, [R, C_out].
        bounds: (low, high), [1 or R, C_out] each, in the layer's output space; -inf/+inf for
            none (:meth:`ActivationBounds.in_output_space`).
        factor: Cholesky factor of gram + ridge; ``pull`` = ridge * start, [D, C_out].
        start: the current weights; ``solution``: the plain least-squares fit, [D, C_out] each.
    Returns:
        (weights, relative activation-space error of ``start``, of the weights).
    """
    low, high = (np.asarray(b, dtype=np.float32) for b in bounds)
    clipped_t = np.clip(t, low, high)
    energy = float(np.sum(np.square(clipped_t, dtype=np.float64)))

    def predict(w: np.ndarray) -> np.ndarray:
        return a @ w.astype(np.float32)

    def error(predicted: np.ndarray) -> float:
        clipped = np.clip(predicted, low, high)
        return float(np.sqrt(np.sum(np.square(clipped - clipped_t, dtype=np.float64)) / energy)) if energy else 0.0

    # Each step's predictions serve both its error and the next step's targets: one product of
    # the rows per step fewer (ResNet-50's reconstruction spent 40 % of its time here).
    predicted = predict(solution)
    best, best_error = solution, error(predicted)
    for _ in range(_ACTIVATION_STEPS):
        moved = np.where(t <= low, np.minimum(predicted, low), np.where(t >= high, np.maximum(predicted, high), t))
        # Float32 products (the rows are float32): the step is checked by its error below.
        w = scipy.linalg.cho_solve(factor, (a.T @ moved).astype(np.float64) + pull)
        predicted = predict(w)
        current = error(predicted)
        if not np.isfinite(current) or current >= best_error:
            break
        best, best_error = w, current
    return best, error(predict(start)), best_error


@dataclass
class ActivationBounds:
    """The activation after a layer, seen from the layer's output y: z = scale * y + shift
    (a BatchNormalization, or none), plus the tensor ``addend`` when a residual Add comes
    first, is clipped to [low, high] (a Relu: [0, inf)).

    Attributes:
        scale, shift: [C_kept] each, or None for no BatchNormalization.
        addend: name of the original model's tensor added to z before the activation, or None.
    """

    low: float
    high: float
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    addend: str | None = None

    def in_output_space(self, added: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) on y, [1, C_kept] or, with ``added`` (the addend at the sampled rows,
        [R, C_kept]), [R, C_kept]. Where scale < 0 the two swap; scale = 0 gives no bounds."""
        low, high = np.full((1, 1), self.low), np.full((1, 1), self.high)
        if self.shift is not None:
            low, high = low - self.shift[None], high - self.shift[None]
        if added is not None:
            low, high = low - added, high - added
        if self.scale is None:
            return low, high
        scale = self.scale[None]
        with np.errstate(divide="ignore", invalid="ignore"):
            a, b = low / scale, high / scale
        low, high = np.where(scale > 0, a, b), np.where(scale > 0, b, a)
        return (np.where((scale == 0) | np.isnan(low), -np.inf, low),
                np.where((scale == 0) | np.isnan(high), np.inf, high))


def activation_bounds(original: onnx.ModelProto, twin, kept: np.ndarray | None) -> ActivationBounds | None:
    """How the Relu or Clip after layer ``twin`` sees its output, for its kept output channels
    ``kept`` (indices; None for all): directly, through a BatchNormalization, then through a
    residual Add of another tensor of the same shape, each the only reader of what it reads.
    None when no such activation follows."""
    readers = _consumers(original)
    inits = {i.name: i for i in original.graph.initializer}
    output = twin.output[0]
    bounds = ActivationBounds(-np.inf, np.inf)
    channels = _channels_of(twin, inits)
    follow = readers.get(output, [])
    bias = None
    if len(follow) == 1 and follow[0].op_type == "Add" and len(follow[0].input) == 2:
        # A bias Add of one constant per output (tf2onnx's MatMul + Add): a shift.
        other = follow[0].input[1] if follow[0].input[0] == output else follow[0].input[0]
        if other in inits and numpy_helper.to_array(inits[other]).size == channels:
            bias = numpy_helper.to_array(inits[other]).astype(np.float64).reshape(-1)
            output, follow = follow[0].output[0], readers.get(follow[0].output[0], [])
    if len(follow) == 1 and follow[0].op_type == "BatchNormalization" and follow[0].input[0] == output:
        bn = follow[0]
        if any(name not in inits for name in bn.input[1:5]):
            return None
        gamma, beta, mean, var = (numpy_helper.to_array(inits[name]).astype(np.float64) for name in bn.input[1:5])
        bounds.scale = gamma / np.sqrt(var + _attr(bn, "epsilon", 1e-5))
        bounds.shift = beta - bounds.scale * mean
        if bounds.scale.shape != (channels,):
            return None
        output, follow = bn.output[0], readers.get(bn.output[0], [])
    if bias is not None:
        bounds.shift = bias if bounds.scale is None else bounds.shift + bounds.scale * bias
    if len(follow) == 1 and follow[0].op_type == "Add" and len(follow[0].input) == 2:
        add = follow[0]
        other = add.input[1] if add.input[0] == output else add.input[0]
        if other == output or other in inits:
            return None  # a bias or the tensor itself: not a residual sum
        bounds.addend = other
        output, follow = add.output[0], readers.get(add.output[0], [])
    if len(follow) != 1:
        return None
    act = follow[0]
    if act.op_type == "Relu":
        bounds.low, bounds.high = 0.0, np.inf
    elif act.op_type == "Clip":
        low, high = _clip_range(act, inits)
        if low is None:
            return None
        bounds.low, bounds.high = low, high
    else:
        return None
    if kept is not None:
        if bounds.scale is not None:
            bounds.scale = bounds.scale[kept]
        if bounds.shift is not None:
            bounds.shift = bounds.shift[kept]
    return bounds


def _consumers(model: onnx.ModelProto) -> dict[str, list]:
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    return readers


def _clip_range(node, inits) -> tuple[float | None, float]:
    """(low, high) of a Clip (attributes before opset 11, optional inputs after); (None, _)
    when a bound is not a constant."""
    low, high = _attr(node, "min", -np.inf), _attr(node, "max", np.inf)
    for index in (1, 2):
        if len(node.input) > index and node.input[index]:
            if node.input[index] not in inits:
                return None, np.inf
            value = float(numpy_helper.to_array(inits[node.input[index]]))
            low, high = (value, high) if index == 1 else (low, value)
    return float(low), float(high)


def _channels_of(node, inits) -> int | None:
    weight = inits.get(node.input[1]) if len(node.input) > 1 else None
    if weight is None:
        return None
    if node.op_type == "Conv":
        return int(weight.dims[0])
    return int(weight.dims[0] if _attr(node, "transB", 0) else weight.dims[1])


@dataclass
class Equations:
    """Normal equations of one layer: ``gram`` [D + 1, D + 1] of the input rows with an
    intercept column last, ``rhs`` [D + 1, C_out] against the targets, ``energy`` the targets'
    summed squares, ``rows`` how many sampled rows they hold; ``samples`` the rows themselves
    (with the intercept column), their targets and the activation's addend there (or None),
    float32, when they were kept."""

    gram: np.ndarray
    rhs: np.ndarray
    energy: float
    rows: int
    samples: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None


class _NormalSums:
    """Running sums of the normal equations: rows a [R, D] (the intercept column is added
    here), targets t [R, C_out]; with ``keep_limit`` bytes, the rows, targets and addends
    themselves too (dropped when they outgrow it)."""

    def __init__(self, keep_limit: int = 0) -> None:
        self.gram = self.rhs = self.energy = None
        self.rows = 0
        self.keep_limit = keep_limit
        self.kept: list[tuple] | None = [] if keep_limit > 0 else None
        self.kept_bytes = 0

    def add(self, a: np.ndarray, t: np.ndarray, added: np.ndarray | None = None) -> None:
        a = np.concatenate([a.astype(np.float64), np.ones((len(a), 1))], axis=1)
        if self.kept is not None:
            self.kept_bytes += 4 * (a.size + 2 * t.size)
            if self.kept_bytes > self.keep_limit:
                self.kept = None  # too large: the plain fit only
            else:
                self.kept.append((a.astype(np.float32), t.astype(np.float32),
                                  None if added is None else added.astype(np.float32)))
        t = t.astype(np.float64)
        gram, rhs, energy = a.T @ a, a.T @ t, np.sum(t * t, axis=0)
        if self.gram is None:
            self.gram, self.rhs, self.energy = gram, rhs, energy
        else:
            self.gram += gram
            self.rhs += rhs
            self.energy += energy
        self.rows += len(a)

    def equations(self) -> Equations:
        samples = None
        if self.kept:
            a, t, added = zip(*self.kept)
            samples = (np.concatenate(a), np.concatenate(t),
                       None if any(x is None for x in added) else np.concatenate(added))
        return Equations(self.gram, self.rhs, float(self.energy.sum()), self.rows, samples)


def _accumulate(model, node, target, targets, runner: SegmentRunner, rows,
                bounds: ActivationBounds | None = None) -> Equations:
    """The normal equations of ``node``'s input in ``model`` against the original's ``target``.

    With ``bounds`` the sampled rows are kept too (when they fit in ``_KEPT_ROWS``), and a layer
    whose activation adds a shortcut is fitted to what the original's sum needs from it: the
    original output plus the original shortcut minus this model's shortcut (divided by the
    BatchNormalization's scale between them), with this model's shortcut as the addend."""
    addend = bounds.addend if bounds is not None else None
    if addend is not None and addend not in _tensor_names(model):
        addend = None
    wanted = [node.input[0]] + ([addend] if addend else [])
    position = next((i for i, n in enumerate(model.graph.node) if n.name == node.name), None) if node.name else None
    sums = _NormalSums(_KEPT_ROWS if bounds is not None else 0)
    for index, values in enumerate(runner.run(model, wanted, position)):
        t, where = targets.get(target, index)
        added = targets.added(target, index) if bounds is not None else None
        if addend is not None and added is not None:
            mine = targets.sample_like(target, index, values[addend])
            if mine.shape == added.shape:
                scale = np.ones(t.shape[1]) if bounds.scale is None else bounds.scale
                with np.errstate(divide="ignore", invalid="ignore"):
                    shift = np.where(scale != 0, (added - mine) / scale[None], 0.0)
                t, added = (t + shift).astype(np.float32), mine
        sums.add(rows(values[node.input[0]], where), t, added)
    return sums.equations()


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    return {name for n in model.graph.node for name in n.output} | {i.name for i in model.graph.input}


class LayerEquations:
    """The original model's normal equations per layer over its *full* input, on fixed samples,
    computed on first use and kept.

    A cut that removes some input channels of a layer and leaves everything upstream as it was
    gives that layer the original input minus those channels, so its normal equations are a
    sub-block of the full ones. The budget allocation tries every group at several widths; with
    this, the refit of a block-internal cut costs one small solve instead of a model run per
    layer and batch (ResNet-56: most candidate cuts are of this kind).

    Args:
        original: the unpruned (prepared) model.
        feeds: the calibration feeds every layer is measured on.
    """

    def __init__(self, original: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], positions: int = 16,
                 seed: int = 0) -> None:
        self.original, self.feeds, self.positions, self.seed = original, feeds, positions, seed
        self.order = {n.name: i for i, n in enumerate(original.graph.node)}
        self._full: dict[str, tuple[Equations, np.ndarray]] = {}
        self._inits = {i.name: i for i in original.graph.initializer}
        # Layers are asked for mostly in graph order: each pass starts where the last one stopped.
        self._runner = SegmentRunner(original, feeds)

    def covers(self, twin) -> bool:
        """Whether ``twin``'s equations are small enough to keep (a Gemm reading 25,088
        flattened features would hold 5 GB; such layers are refitted the usual way)."""
        weight = self._inits.get(twin.input[1]) if len(twin.input) > 1 else None
        return weight is not None and int(np.prod(weight.dims[1:] if twin.op_type == "Conv" else
                                                  weight.dims[1 if _attr(twin, "transB", 0) else 0])) < _KEPT_COLUMNS

    def full(self, twin) -> tuple[Equations, np.ndarray]:
        """(equations over every input channel and output, per-output target energy [C_out])."""
        if twin.name not in self._full:
            weight = self._inits[twin.input[1]]
            rows = _layer_rows(twin, weight)
            sums = _NormalSums()
            passes = self._runner.run(self.original, [twin.input[0], twin.output[0]], self.order.get(twin.name))
            for index, values in enumerate(passes):
                t, where = _sample_outputs(values[twin.output[0]], None, self.positions,
                                           (self.seed, self.order[twin.name], index),
                                           channels_last=twin.op_type == "MatMul")
                sums.add(rows(values[twin.input[0]], where), t)
            self._full[twin.name] = (sums.equations(), sums.energy)
        return self._full[twin.name]

    def restricted(self, twin, kept_in: np.ndarray, kept_out: np.ndarray | None) -> Equations:
        """The equations of ``twin`` cut to the input channels ``kept_in`` (mask, [C_in]) and the
        outputs ``kept_out`` (indices; None for all)."""
        full, energy = self.full(twin)
        per_channel = (full.gram.shape[0] - 1) // len(kept_in)
        columns = np.append(np.repeat(np.asarray(kept_in, dtype=bool), per_channel), True)
        outputs = slice(None) if kept_out is None else np.asarray(kept_out, dtype=np.int64)
        return Equations(full.gram[np.ix_(columns, columns)], full.rhs[columns][:, outputs],
                         float(energy[outputs].sum()), full.rows)


_FITTERS = {"Conv": _fit_conv, "Gemm": _fit_gemm, "MatMul": _fit_matmul}


class _Targets:
    """The original model's outputs of the layers to refit, kept channels only, at sampled
    output positions, for every calibration batch; for a layer whose activation adds another
    tensor first (``addends``: layer output -> that tensor), that tensor at the same positions.

    The layers are split, in the order given (the order they are asked for), into chunks whose
    samples fit ``budget`` bytes together. Asked for a layer, one pass of the original computes
    every output of its chunk (in sub-batches small enough for ``transient`` bytes of outputs)
    and keeps their samples in place of the previous chunk's: a few passes of the original for
    the whole refit instead of one per layer (ResNet-50 at 224 x 224 on 512 images: 3 chunks
    against 53 passes, which were 60 % of its refit's time). A layer whose samples alone pass
    the budget runs the part of the original that computes it, batch by batch, when asked.
    Positions are drawn from (seed, layer, batch), so both ways sample the same ones.
    """

    def __init__(self, original: onnx.ModelProto, layers: list[tuple[str, np.ndarray | None]],
                 feeds: list[dict[str, np.ndarray]], positions: int, seed: int,
                 budget: int = 1 << 30, transient: int = 256 << 20, addends: dict[str, str] | None = None,
                 start: list[dict[str, np.ndarray]] | None = None, channels_last: set[str] | None = None) -> None:
        self.original, self.feeds, self.positions, self.seed = original, feeds, positions, seed
        # MatMul outputs: an image one [N, H, W, C] has its channels last
        self.channels_last = set(channels_last or ())
        self.start = start  # the original's tensors at a cut, per feed: the chunk passes run from there
        self.kept = dict(layers)
        self.order = {name: i for i, (name, _) in enumerate(layers)}
        self.addends = dict(addends or {})
        self.transient = transient
        self.chunks: list[list[str]] = []
        self.chunk_of: dict[str, int] = {}
        self.passes = 0  # passes of (part of) the original over all feeds so far
        self.cache: dict[str, list] = {}  # the chunk in memory: layer -> per batch (rows, positions)
        self.added_cache: dict[str, list] = {}
        self._sessions: dict[str, object] = {}
        self._last: tuple | None = None  # (layer, batch, its addend's samples) of the last uncached get
        self._image_bytes: dict[str, int] = {}
        self._whole: tuple | None = None
        if layers and feeds:
            self._plan_chunks(budget)

    def get(self, name: str, batch: int) -> tuple[np.ndarray, tuple | None]:
        """(targets [rows, C_kept], (oy, ox) [N, P] each or None for 2-D outputs)."""
        if self._in_chunk(name):
            return self.cache[name][batch]
        if name not in self._sessions:
            wanted = [name] + ([self.addends[name]] if name in self.addends else [])
            self._sessions = {name: ort_session(_up_to(self.original, *wanted), spinning=False)}
            self.passes += 1
        session = self._sessions[name]
        values = dict(zip([o.name for o in session.get_outputs()],
                          session.run(None, _inputs(session, self.feeds[batch]))))
        if name in self.addends:
            self._last = (name, batch, self._sample_addend(name, batch, values[name], values[self.addends[name]]))
        return self._sample(name, batch, values[name])

    def added(self, name: str, batch: int) -> np.ndarray | None:
        """The addend of layer ``name``'s activation at the rows of :meth:`get`, [rows, C_kept]
        (call after ``get(name, batch)``); None without one."""
        if name not in self.addends:
            return None
        if self._in_chunk(name):
            return self.added_cache[name][batch]
        return self._last[2] if self._last is not None and self._last[:2] == (name, batch) else None

    def _in_chunk(self, name: str) -> bool:
        """Whether ``name``'s samples come from a chunk; that chunk is then in memory."""
        if name not in self.chunk_of:
            return False
        if name not in self.cache:
            self._fill(self.chunks[self.chunk_of[name]])
        return True

    def _plan_chunks(self, budget: int) -> None:
        """Split the layers into consecutive chunks whose samples over all feeds fit ``budget``,
        from their sizes on the first image."""
        names = list(self.kept)
        wanted = list(dict.fromkeys(names + sorted(self.addends.values())))
        session, feeds = self._session(wanted)
        first = {k: v[:1] for k, v in feeds[0].items()}
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, _inputs(session, first))))
        self._image_bytes = {n: v.nbytes for n, v in outputs.items()}  # whole outputs of one image
        samples = sample_count(self.feeds)
        chunk: list[str] = []
        used = 0
        for name in names:
            size = samples * self._sample(name, 0, outputs[name])[0].nbytes * (2 if name in self.addends else 1)
            if size > budget:  # alone too large: computed when asked, batch by batch
                continue
            if chunk and used + size > budget:
                self.chunks.append(chunk)
                chunk, used = [], 0
            chunk.append(name)
            used += size
            self.chunk_of[name] = len(self.chunks)
        if chunk:
            self.chunks.append(chunk)
        if self.chunks == [names]:  # one chunk of everything (the usual case): its pass reuses the session
            self._whole = (session, feeds)

    def _session(self, wanted: list[str]) -> tuple[object, list[dict[str, np.ndarray]]]:
        """(a session of the part of the original that computes ``wanted``, the feeds it reads):
        from the cut's tensors when there are some, else from the model's inputs."""
        if self.start is not None and all(len(v) == len(next(iter(f.values())))
                                          for s, f in zip(self.start, self.feeds) for v in s.values()):
            try:
                model = extract(self.original, list(self.original.graph.node), self.start[0], wanted)
                return ort_session(model, spinning=False), self.start
            except KeyError:  # a target not reachable from the cut: run from the inputs
                pass
        return ort_session(_up_to(self.original, *wanted), spinning=False), self.feeds

    def _fill(self, names: list[str]) -> None:
        """One pass of the original computing the samples of ``names`` (one chunk), kept in
        place of the chunk before."""
        self.cache, self.added_cache = {}, {}  # the chunk before is not asked for again
        addends = {n: self.addends[n] for n in names if n in self.addends}
        wanted = list(dict.fromkeys(names + sorted(set(addends.values()))))
        session, feeds = self._whole if self._whole is not None else self._session(wanted)
        self._whole = None  # its memory arena is not held through the refit
        out_names = [o.name for o in session.get_outputs()]
        self.passes += 1
        cache: dict[str, list] = {n: [] for n in names}
        added: dict[str, list] = {n: [] for n in addends}
        step = max(1, self.transient // max(sum(self._image_bytes.get(n, 0) for n in out_names), 1))
        for batch, feed in enumerate(feeds):
            size = len(next(iter(feed.values())))
            # Sampled piece by piece: concatenating whole outputs costs more than the sampling.
            samples: dict[str, list] = {n: [] for n in names}
            addend_samples: dict[str, list] = {n: [] for n in addends}
            for lo in range(0, size, step):
                part = {k: v[lo:lo + step] for k, v in feed.items()}
                values = dict(zip(out_names, session.run(None, _inputs(session, part))))
                for n in names:
                    samples[n].append(self._sample(n, batch, values[n], (lo, size)))
                for n, addend in addends.items():
                    addend_samples[n].append(self._sample_addend(n, batch, values[n], values[addend], (lo, size)))
            for n, pieces in samples.items():
                cache[n].append(_joined(pieces))
            for n, pieces in addend_samples.items():
                added[n].append(None if any(p is None for p in pieces) else np.concatenate(pieces))
        self.cache, self.added_cache = cache, added

    def _sample(self, name: str, batch: int, y: np.ndarray,
                part: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple | None]:
        return _sample_outputs(y, self.kept[name], self.positions, (self.seed, self.order[name], batch), part,
                               channels_last=name in self.channels_last)

    def sample_like(self, name: str, batch: int, y: np.ndarray) -> np.ndarray:
        """All channels of ``y`` (a tensor of the pruned model, already cut) at the positions
        sampled for layer ``name``, [rows, C]."""
        return _sample_outputs(y, None, self.positions, (self.seed, self.order[name], batch),
                               channels_last=name in self.channels_last)[0]

    def _sample_addend(self, name: str, batch: int, y: np.ndarray, added: np.ndarray,
                       part: tuple[int, int] | None = None) -> np.ndarray | None:
        """``added`` at the positions and kept channels sampled for layer ``name`` (same key);
        None when it is not shaped like the layer's output (a broadcast Add)."""
        if added.shape != y.shape:
            return None
        return self._sample(name, batch, added, part)[0]


def _joined(pieces: list[tuple[np.ndarray, tuple | None]]) -> tuple[np.ndarray, tuple | None]:
    """The samples of consecutive parts of a batch (:func:`_sample_outputs`) as one."""
    if len(pieces) == 1:
        return pieces[0]
    rows = np.concatenate([p[0] for p in pieces])
    if pieces[0][1] is None:
        return rows, None
    return rows, tuple(np.concatenate([p[1][axis] for p in pieces]) for axis in range(2))


def _sample_outputs(y: np.ndarray, kept: np.ndarray | None, positions: int, key: tuple[int, int, int],
                    part: tuple[int, int] | None = None, channels_last: bool = False) -> tuple[np.ndarray, tuple | None]:
    """(the kept channels of ``y`` at ``positions`` output positions per image drawn from
    ``key`` = (seed, layer, batch), [N * P, C_kept]; (oy, ox) [N, P] each, None for 2-D).

    ``part`` = (first, size): ``y`` holds images first ... first + N - 1 of a batch of ``size``;
    they get the positions the whole batch would give them. ``channels_last``: a 4-D ``y`` is
    [N, H, W, C] (a MatMul's output), sampled as its [N, C, H, W] view."""
    if channels_last and y.ndim == 4:
        y = np.moveaxis(y, -1, 1)
    if kept is not None:
        y = y[:, kept]
    if y.ndim != 4:
        return y.reshape(len(y), -1).astype(np.float32), None
    n, _, hout, wout = y.shape
    first, size = part if part is not None else (0, n)
    count = min(positions, hout * wout)
    rng = np.random.default_rng(list(key))
    flat = np.stack([rng.choice(hout * wout, size=count, replace=False) for _ in range(size)])  # [size, P]
    flat = flat[first:first + n]
    oy, ox = flat // wout, flat % wout
    return y[np.arange(n)[:, None], :, oy, ox].reshape(n * count, -1).astype(np.float32), (oy, ox)


# --------------------------------------------------------------------------------------------
# Helpers


def _up_to(model: onnx.ModelProto, *tensors: str) -> onnx.ModelProto:
    """The part of ``model`` that computes ``tensors`` (ONNX Runtime runs every node of a graph
    whatever the requested outputs; cutting the rest halves the cost of a refit on average)."""
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if all(t in inputs for t in tensors):
        return with_outputs(model, list(tensors))
    try:
        return onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(inputs, list(tensors))
    except Exception:  # noqa: BLE001 - shape inference gaps: run the whole model instead
        return with_outputs(model, list(tensors))


def _inputs(session, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feed.items() if k in names}


def _set(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Initializer ``name`` := ``value``, in the initializer's own element type (the fits are
    computed in float64; a float16 model stays float16)."""
    for init in model.graph.initializer:
        if init.name == name:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            init.CopyFrom(numpy_helper.from_array(np.asarray(value).astype(dtype), name))
            return


def _unique_name(model: onnx.ModelProto, base: str) -> str:
    taken = {i.name for i in model.graph.initializer} | {v for n in model.graph.node for v in (*n.input, *n.output)}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="reconstruct", unit="layer", disable=not enabled, leave=False)
