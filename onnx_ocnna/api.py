"""The Python API: inspect, score, apply_plan and compress. The CLI is a thin layer over it.

Example::

    import onnx_ocnna
    model, report = onnx_ocnna.compress("in.onnx", "images/", percentile=40, preprocess="imagenet")
    onnx_ocnna.save_model(model, "out.onnx")
    print(report.table())
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_ocnna import distributed
from onnx_ocnna.calibration import CalibrationSource, model_fixed_batch, open_calibration
from onnx_ocnna.allocate import DEFAULT_SPEED_FLOOR
from onnx_ocnna.batch_axis import JOINED_ROWS, RelaxedBatch, relax_batch, takes_batch_1_only
from onnx_ocnna.channels.analysis import ChannelAnalysis, _restore_model_fields, analyse, prepare_graph
from onnx_ocnna.channels.context import SHAPE_HINT
from onnx_ocnna.collect import collect, member_scores_to_group
from onnx_ocnna.criteria import MemberInfo, get_criterion
from onnx_ocnna.errors import InputError, ValidationError
from onnx_ocnna.logits import scores_value
from onnx_ocnna.metrics import model_stats
from onnx_ocnna.model_io import load_model, model_sha256, sample_feeds, validate_model
from onnx_ocnna.plan import build_plan, resolve_plan
from onnx_ocnna.report import Report, group_rows
from onnx_ocnna.select import SelectionOptions, select
from onnx_ocnna.surgery import apply_removal

ModelLike = str | os.PathLike | onnx.ModelProto


def as_model(model: ModelLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model)


def as_source(data: Any, model: onnx.ModelProto, **options) -> CalibrationSource:
    """A calibration source from a path, array, reader or an already opened source."""
    if isinstance(data, CalibrationSource):
        return data
    return open_calibration(data, model, **{k: v for k, v in options.items() if v is not None})


@dataclass
class Scores:
    """Per-group channel importances of one model.

    Attributes:
        analysis: the channel analysis the scores index.
        groups: group id -> importance per group channel, [channels]; higher = keep.
        criterion: name of the criterion.
        samples: calibration samples seen (0 for weight-only criteria).
        seconds: wall time of scoring.
        damage_tables: the budget allocation's measured candidate widths per group, kept by
            their settings, so that compressing again with these scores (another budget) does
            not measure them again.
        calibration: what the calibration data was and how it was preprocessed
            (``CalibrationSource.describe``); None for weight-only criteria.
    """

    analysis: ChannelAnalysis
    groups: dict[int, np.ndarray]
    criterion: str
    samples: int = 0
    seconds: float = 0.0
    member_scores: dict[str, np.ndarray] = field(default_factory=dict)
    damage_tables: dict = field(default_factory=dict)
    calibration: dict | None = None


class Pruner:
    """One model prepared for repeated rewrites (a target search applies many removals)."""

    def __init__(self, model: onnx.ModelProto, observed: dict | None = None) -> None:
        """``observed``: run-time shapes (:func:`onnx_ocnna.shapes.observed_shapes`), the last
        source of shapes, used where no other source knows one (see :func:`pruner_for`)."""
        self.model = model
        graph = prepare_graph(model, observed)
        self._prepared = gs.export_onnx(graph, do_type_check=False)
        _restore_model_fields(self._prepared, model)
        self.analysis = analyse(model, gs.import_onnx(self._prepared))
        self.sha256 = model_sha256(model)
        # The batch size the written model takes (its inputs' fixed one, or None): latency is timed at it.
        self.deployed_batch = model_fixed_batch(model)

    def prepared_model(self) -> onnx.ModelProto:
        """The constant-folded model whose tensor names the analysis uses."""
        return self._prepared

    def rewrite(self, removed: dict[int, np.ndarray]) -> onnx.ModelProto:
        # On a copy of the analysed graph: analysing the graph again for every rewrite was half
        # of a rewrite's time (Inception v3: 0.17 of 0.33 s per candidate cut of the allocation).
        return apply_removal(self.model, self.analysis, removed, in_place=False)


def pruner_for(model: onnx.ModelProto, calibration: Any = None, calibration_options: dict | None = None) -> Pruner:
    """A :class:`Pruner`; when a group is frozen only because a shape is unknown and calibration
    data is given, the shapes observed on a calibration batch are the last source of shapes.

    The batch is run whole and without its last sample, so the batch axis shows as dynamic.
    Observed sizes are trusted only when every other input dim is static: a dynamic height or
    width seen at one size would be taken for a constant.
    """
    pruner = Pruner(model)
    if calibration is None or not any(SHAPE_HINT in g.frozen_reason for g in pruner.analysis.groups):
        return pruner
    from onnx_ocnna.calibration import model_input_spec
    from onnx_ocnna.shapes import observed_shapes

    if any(None in spec.shape[1:] for spec in model_input_spec(model)):
        return pruner
    source = as_source(calibration, model, **(calibration_options or {}))
    if source.one_shot:  # a reader read here could not be read again for scoring
        return pruner
    batch = next(iter(source.batches()), None)
    if batch is None:
        return pruner
    feeds = [dict(batch.feeds)]
    rows = {len(v) for v in batch.feeds.values()}
    if len(rows) == 1 and rows.pop() >= 2 and all(s.shape[0] is None for s in model_input_spec(model)):
        feeds.append({k: v[:-1] for k, v in batch.feeds.items()})
    return Pruner(model, observed_shapes(model, feeds))


def member_info(analysis: ChannelAnalysis, name: str) -> MemberInfo:
    producer = next(p for p in analysis.context.producers if p.node.name == name)
    weight = np.asarray(analysis.context.constant(producer.node.inputs[1]))
    if producer.weight_axis:
        weight = np.moveaxis(weight, producer.weight_axis, 0)
    return MemberInfo(name=name, weight=weight, channels=len(producer.ids))


def score(model: ModelLike, calibration: Any = None, *, criterion: str = "ocnna",
          criterion_options: dict | None = None, calibration_options: dict | None = None,
          progress: bool = True, pruner: Pruner | None = None) -> Scores:
    """Score every channel of every prunable group.

    Args:
        calibration: images folder, .npy/.npz, array, ORT CalibrationDataReader or a
            CalibrationSource; required by data-driven criteria.
        criterion_options: e.g. ``{"pca_variance": 0.95, "invert": False, "seed": 0}``.
        calibration_options: passed to :func:`open_calibration` (preprocess, mean, std, ...).

    A model that takes batch 1 only is scored through its copy that takes whole batches
    (:mod:`onnx_ocnna.batch_axis`); the scores index the model's own groups.
    """
    model = as_model(model)
    pruner = pruner or pruner_for(model, calibration, calibration_options)
    analysis = pruner.analysis
    crit = get_criterion(criterion, **(criterion_options or {}))
    members = [m for g in analysis.groups if g.prunable for m in g.members]
    if not members:
        _refuse_quantized(model)
    start = time.perf_counter()
    samples = 0
    described = None
    if crit.needs_data:
        if calibration is None:
            raise InputError(f"the {criterion} criterion needs calibration data (--calib)")
        source = as_source(calibration, model, **(calibration_options or {}))
        # A batch-1 model is scored through its relaxed copy, on whole batches (else one at a time).
        scoring = relax_batch(pruner.prepared_model())
        if scoring is not None:
            source = _whole_batches(source, calibration_options)
        if crit.needs_labels and not source.has_labels:
            raise InputError(f"the {criterion} criterion needs labelled calibration data (class sub-folders or npz 'labels')")
        described = source.describe()
        # Under torchrun each process reads its own block of batches; the statistics are then
        # gathered and merged in rank order (a no-op in a single process).
        source = distributed.shard_source(source)
        accumulators = {m: crit.new_accumulator(member_info(analysis, m)) for m in members}
        try:
            total = len(source)
        except TypeError:
            total = None
        if accumulators:
            scoring_model = pruner.prepared_model() if scoring is None else scoring.model
            samples = collect(scoring_model, analysis, crit, accumulators, source.batches(),
                              total=total, progress=progress and distributed.is_primary(),
                              threads=distributed.cpu_share())
            accumulators = distributed.gather_accumulators(accumulators, crit.options)
            samples = distributed.all_sum(samples)
            _check_sample_count(crit, samples)  # nothing read when no group is prunable
        member_scores = {m: acc.scores() for m, acc in accumulators.items()}
    elif crit.coupled:
        groups = crit.group_scores(analysis)
        member_scores = {m: groups[g.id][g.member_channels[m]] for g in analysis.groups if g.prunable
                         for m in g.members}
    else:
        member_scores = {m: crit.weight_scores(member_info(analysis, m)) for m in members}
    if not crit.coupled:  # each member's scores, scaled and averaged per group channel (SPEC section 1)
        groups = {g.id: member_scores_to_group(g, {m: member_scores[m] for m in g.members})
                  for g in analysis.groups if g.prunable}
    return Scores(analysis, groups, criterion, samples, time.perf_counter() - start, member_scores,
                  calibration=described)


def check_preprocessing(model: onnx.ModelProto, data: Any, options: dict | None, where: str) -> str | None:
    """Warn (and return the warning) when the original model is near chance on labelled ``data``.

    A wrong normalisation prunes and reports without any error, so this runs before any work
    is reported; unlabelled data passes silently.
    """
    import copy
    import warnings

    from onnx_ocnna.evaluate import near_chance_warning

    source = as_source(data, model, **(options or {}))
    if source.one_shot or not source.has_labels:  # a reader must not be consumed here
        return None
    source = copy.copy(source)
    # Image folders list their files class by class: the samples read must span the classes.
    source.shuffle, source.seed = True, 0
    message = near_chance_warning(model, source.batches(), where)
    if message is not None:
        warnings.warn(message, stacklevel=3)
    return message


def check_training_labels(model: onnx.ModelProto, data: Any, options: dict | None) -> None:
    """Refuse, before any pruning, labelled training ``data`` whose labels are not the classes
    of ``model``'s first output [N, K] (distillation with a label term would stop at its first
    batch, after the pruning and reconstruction). Unlabelled data and outputs of unknown width pass."""
    from onnx_ocnna.evaluate import labels_outside

    dims = scores_value(model).type.tensor_type.shape.dim
    classes = dims[1].dim_value if len(dims) == 2 and dims[1].HasField("dim_value") else 0
    labels = getattr(as_source(data, model, **(options or {})), "labels", None)
    if classes and labels is not None:
        outside = labels_outside(labels, classes)
        if outside:
            raise InputError(outside)


def _check_sample_count(crit, samples: int) -> None:
    """Refuse a spread-based criterion on fewer samples than it is defined for; warn when few."""
    import warnings

    from onnx_ocnna.criteria.base import MIN_SAMPLES_ADVISED

    if samples < crit.min_samples:
        raise InputError(f"the {crit.name} criterion compares images with each other and needs at least "
                         f"{crit.min_samples} calibration samples; got {samples}")
    if crit.min_samples > 1 and samples < MIN_SAMPLES_ADVISED:
        warnings.warn(f"only {samples} calibration samples: {crit.name} scores are noisy below "
                      f"{MIN_SAMPLES_ADVISED} (give more with --calib)", stacklevel=3)


def _whole_batches(data: Any, options: dict | None) -> Any:
    """``data`` for a batch-1 model's relaxed copy: a source already opened for the batch-1 model
    (a sweep's, a search's: one sample per batch) as a copy that reads whole batches; any other
    data as it is (paths and arrays are opened for the copy)."""
    if isinstance(data, CalibrationSource) and data.batch_size == 1 and not data.one_shot:
        import copy

        data = copy.copy(data)
        data.batch_size = (options or {}).get("batch_size") or JOINED_ROWS
    return data


def _deployed(model: onnx.ModelProto, relaxed: RelaxedBatch | None) -> onnx.ModelProto:
    """``model`` as the user's graph takes it: at batch 1 again when the passes used a copy."""
    return model if relaxed is None else relaxed.restore(model)


def inspect(model: ModelLike) -> dict:
    """Groups, prunability with reasons, and size figures of a model; ``batch_1`` is None for a
    model that takes any batch, else whether its passes can run on whole batches through a copy
    (:mod:`onnx_ocnna.batch_axis`) or go one image at a time; ``quantized`` lists the
    quantization operators present (filters read through them cannot be cut)."""
    model = as_model(model)
    analysis = analyse(model)
    stats = model_stats(model)
    return {
        "stats": stats.as_dict(),
        "groups": group_rows(analysis, {}),
        "prunable_channels": int(sum(len(g.removable()) for g in analysis.groups)),
        "opset": analysis.opset,
        "batch_1": ({"whole_batches": relax_batch(model) is not None} if takes_batch_1_only(model) else None),
        "quantized": quantized_ops(model),
    }


def _finish(model: onnx.ModelProto, pruned: onnx.ModelProto, pruner: Pruner, removed: dict, settings: dict,
            notes: list[str], sizes: dict[str, tuple[int, ...]] | None = None) -> tuple[onnx.ModelProto, Report]:
    """Validate ``pruned`` against ``model`` and report. ``sizes`` (input name -> one calibration
    sample's shape) sets a dynamic height/width for the validation run and the MAC count."""
    feeds = sample_feeds(model, sizes=sizes)
    expected = validate_model(model, feeds)
    actual = validate_model(pruned, feeds)
    for e, a, out in zip(expected, actual, model.graph.output):
        if np.shape(e) != np.shape(a):
            raise ValidationError(f"output '{out.name}' changed shape from {np.shape(e)} to {np.shape(a)}")
    report = Report(before=model_stats(model, sizes=sizes), after=model_stats(pruned, sizes=sizes),
                    groups=group_rows(pruner.analysis, removed), settings=settings, notes=notes)
    return pruned, report


def apply_plan(model: ModelLike, plan: dict) -> tuple[onnx.ModelProto, Report]:
    """Rewrite ``model`` as ``plan`` says (SPEC section 6)."""
    model = as_model(model)
    pruner = Pruner(model)
    removed = resolve_plan(plan, pruner.analysis, pruner.sha256)
    from onnx_ocnna.surgery import check_removal

    check_removal(pruner.analysis, removed)
    if not removed:
        return model, Report(model_stats(model), model_stats(model), group_rows(pruner.analysis, {}),
                             {"plan": True}, ["the plan removes no channel; the model is unchanged"])
    return _finish(model, pruner.rewrite(removed), pruner, removed, {"plan": True}, [])


def compress(model: ModelLike, calibration: Any = None, *, percentile: float = 40.0, criterion: str = "ocnna",
             scope: str = "per-group", min_channels: int = 1, round_to: int | str = 1, exclude: list[str] | None = None,
             target_params: float | None = None, target_macs: float | None = None,
             target_latency: float | None = None, allocation: str = "measured", latency_batch: int = 1,
             latency_threads: int = 1, damage_samples: int | None = None, block_removal: bool = True,
             criterion_options: dict | None = None, calibration_options: dict | None = None,
             progress: bool = True, scores: Scores | None = None, drop_blocks: bool = False,
             si_epsilon: float = 0.0, reconstruct: bool | None = None,
             reconstruct_options: dict | None = None, eval_data: Any = None,
             eval_options: dict | None = None, fc_width: str | None = None,
             csi_tolerance: float = 0.01, speed_floor: float | None = DEFAULT_SPEED_FLOOR
             ) -> tuple[onnx.ModelProto, Report]:
    """Score, select and rewrite. Returns the pruned model (validated) and its report.

    With ``target_params``, ``target_macs`` or ``target_latency`` R the budget is allocated
    (:mod:`onnx_ocnna.allocate`, ``allocation="measured"``): each group gets its own width,
    aligned to ONNX Runtime's channel block, from the damage each candidate width does alone on
    ``damage_samples`` calibration images (None: up to 512, fewer for a large model, see
    :func:`onnx_ocnna.allocate.auto_damage_samples`), so that the result keeps at most R of the parameters
    (MACs, measured latency at ``latency_batch`` / ``latency_threads``); ``percentile`` is then
    ignored; with ``block_removal`` removing a whole identity-shortcut residual block is one
    more candidate. A measured MACs target R must also measure at least ``speed_floor`` / R times
    faster (same latency settings; None or 0: MACs only, see
    :func:`onnx_ocnna.allocate.meet_speed_floor`). ``allocation="uniform"`` instead searches one
    percentile for every group (the paper's setting; params/MACs targets only). With
    ``drop_blocks``, residual blocks that do not raise the Separation Index by ``si_epsilon``
    are removed first (labelled calibration data needed); filters are then selected on the
    remaining network. With ``reconstruct``, the layers after every cut are refitted by least
    squares on the calibration data (:mod:`onnx_ocnna.reconstruct`; ``reconstruct_options``:
    samples (unset: :func:`~onnx_ocnna.reconstruct.auto_samples`), positions, ridge, seed,
    new_biases (unset: False under ``target_params``, so no refit adds parameters; else True));
    by default (None) it is on whenever calibration data is given.
    An allocated budget that is reconstructed then has a final check (:func:`_best_of_recipes`):
    competitors of the same budget are reconstructed too, and the one closest to the original
    (output KL on the calibration images) is written.
    With ``eval_data`` (held-out data read like calibration data with ``eval_options``, or an
    :class:`~onnx_ocnna.evaluate.HeldOut` of the original), ``report.accuracy`` holds the
    held-out top-1 (agreement without labels) after pruning and after reconstruction; this
    costs one pass over it per stage, the un-refitted cut being gone afterwards.
    With ``fc_width="csi"`` (labelled calibration data needed) every hidden Gemm/MatMul layer
    keeps the smallest prefix of its neurons' greedy CSI order whose CSI reaches
    (1 - ``csi_tolerance``) of the whole layer's (:mod:`onnx_ocnna.fc_width`, SPEC section 3);
    the other groups are then selected as usual, a budget counting the FC cut as spent.
    """
    model = original = as_model(model)
    # A batch-1 model's passes run on whole batches through a copy; the file written is at batch 1.
    relaxed = relax_batch(original)
    if relaxed is not None:
        model = relaxed.model
        calibration = _whole_batches(calibration, calibration_options)
    held_out = _held_out(model, eval_data, eval_options or calibration_options)
    if reconstruct is None:
        reconstruct = calibration is not None
    if allocation not in ("measured", "uniform"):
        raise InputError(f"allocation must be 'measured' or 'uniform', got {allocation!r}")
    targets = [t for t in (target_params, target_macs, target_latency) if t is not None]
    if targets and allocation == "measured" and calibration is None:
        raise InputError("the measured allocation of a target needs calibration data (--calib); "
                         "--allocation uniform searches one percentile without it")
    if target_latency is not None and allocation == "uniform":
        raise InputError("--target-latency needs the measured allocation (--allocation measured)")
    if reconstruct and calibration is None:
        raise InputError("--reconstruct needs calibration data (--calib)")
    if speed_floor is not None and not (isinstance(speed_floor, (int, float)) and math.isfinite(speed_floor)
                                        and speed_floor >= 0):
        raise InputError(f"--speed-floor must be a number of 0 or more, got {speed_floor!r}")
    if fc_width not in (None, "csi"):
        raise InputError(f"--fc-width must be 'csi', got {fc_width!r}")
    if fc_width and (calibration is None or not as_source(calibration, model, **(calibration_options or {})).has_labels):
        # Said before scoring, which can take minutes.
        raise InputError("--fc-width csi needs labelled calibration data (--calib with class sub-folders or npz "
                         "'labels')")
    timings = {}
    start = time.perf_counter()
    preprocessing_warning = None
    if calibration is not None and scores is None:
        preprocessing_warning = check_preprocessing(model, calibration, calibration_options, "the calibration data")
    calibration_data = calibration  # as given: --drop-blocks replaces it by the opened source
    blocks = []
    if drop_blocks:
        from onnx_ocnna.blocks import select_blocks

        if calibration is None:
            raise InputError("--drop-blocks needs labelled calibration data (--calib)")
        if scores is not None:
            raise InputError("precomputed scores cannot be combined with block removal")
        source = as_source(calibration, model, **(calibration_options or {}))
        calibration = source
        model, blocks = select_blocks(model, source.batches(), si_epsilon=si_epsilon)
        timings["drop_blocks_s"] = time.perf_counter() - start
    pruner = pruner_for(model, calibration, calibration_options)
    if relaxed is not None:  # plans name the user's model, which latency is timed as
        pruner.sha256, pruner.deployed_batch = model_sha256(original), 1
    excluded = pruner.analysis.excluded(exclude or [])
    nothing_prunable = not any(g.prunable and g.id not in excluded for g in pruner.analysis.groups)
    if nothing_prunable:
        _refuse_quantized(model)
    if scores is None and nothing_prunable:  # nothing to rank: the data is not read
        scores = Scores(pruner.analysis, {}, criterion)
        timings["score_s"] = 0.0
    elif scores is None:
        scores = score(model, calibration, criterion=criterion, criterion_options=criterion_options,
                       calibration_options=calibration_options, progress=progress, pruner=pruner)
        timings["score_s"] = scores.seconds
    else:  # precomputed (a sweep, a search): no scoring time was spent in this call
        timings["score_s"] = 0.0
    calibration_record = _calibration_record(calibration_data, model, calibration_options, scores)
    block_rows = [b.as_dict() for b in blocks]
    options = SelectionOptions(percentile=percentile, scope=scope, min_channels=min_channels, round_to=round_to,
                               exclude=excluded)
    options.validate()
    settings = {"criterion": criterion, "percentile": percentile, "scope": scope, "min_channels": min_channels,
                "drop_blocks": drop_blocks, "si_epsilon": si_epsilon, "reconstruct": reconstruct,
                "reconstruct_options": reconstruct_options or {},
                "round_to": options.round_to, "exclude": exclude or [], "criterion_options": criterion_options or {},
                "calibration_samples": scores.samples}
    notes: list[str] = [preprocessing_warning] if preprocessing_warning else []
    if nothing_prunable:
        reasons = sorted({g.frozen_reason for g in pruner.analysis.groups if g.frozen_reason})
        why = "; ".join(reasons[:5]) if reasons else "the model has no Conv filters whose channels can be removed"
        if blocks and any(b.dropped for b in blocks):
            notes.append(f"no filter is prunable after block removal: {why}")
            pruned, report = _finish(original, _deployed(model, relaxed), pruner, {}, settings, notes,
                                     _sample_shapes(calibration))
            report.extra["blocks"] = block_rows
            report.calibration = calibration_record
            return pruned, report
        notes.append(f"nothing prunable, model written unchanged: {why}")
        report = Report(model_stats(model), model_stats(model), group_rows(pruner.analysis, {}), settings, notes,
                        calibration=calibration_record)
        return _deployed(model, relaxed), report

    # The FC widths the CSI design fixes (group id -> channels), spent before any other selection.
    fixed: dict[int, np.ndarray] = {}
    width_rows: list[dict] = []
    if fc_width == "csi":
        fixed = _csi_cut(model, pruner, calibration, calibration_options, csi_tolerance, options, progress,
                         timings, notes, width_rows)
    sizes = _sample_shapes(calibration_data, original, calibration_options)
    allocated = None
    if targets and allocation == "measured":
        from onnx_ocnna.allocate import allocate, round_block

        options.round_to = round_block(round_to)
        source = as_source(calibration, model, **(calibration_options or {}))
        source.shuffle, source.reshuffle, source.seed = True, False, (reconstruct_options or {}).get("seed", 0)
        allocated = allocate(pruner, scores.groups, options, source.batches(), target_params=target_params,
                             target_macs=target_macs, target_latency=target_latency, latency_batch=latency_batch,
                             latency_threads=latency_threads, damage_samples=damage_samples, progress=progress,
                             cache=scores.damage_tables, blocks=block_removal, fixed=fixed,
                             speed_floor=speed_floor)
        removed = allocated.removed
        pruned = allocated.rewrite(pruner)
        timings["allocate_s"] = allocated.seconds
        settings.update(percentile=None, round_to=options.round_to, allocation="measured",
                        target={allocated.objective: allocated.target},
                        speed_floor=speed_floor if target_macs is not None else None)
        notes.append(f"allocation: {allocated.objective} ratio {allocated.achieved:.3f} for target "
                     f"{allocated.target:g}, widths chosen from measured damage on {allocated.damage_samples} images"
                     f" in {allocated.seconds:.1f} s")
        if allocated.damage_limit:
            limit = allocated.damage_limit
            notes.append(f"damage measured on {limit['used']} of {limit['calibration_samples']} calibration images: "
                         f"{limit['cuts']} candidate cuts of a model of {limit['macs_per_sample'] / 1e9:.2f} GMACs "
                         "per image would take long with all of them (--damage-samples N sets the number)")
    elif targets:
        removed, pruned = _search_target(model, pruner, scores, options, target_params, target_macs, fixed, sizes)
        settings["percentile"] = options.percentile
        settings["allocation"] = "uniform"
        notes.append(f"percentile {options.percentile:.2f} meets the target")
    else:
        removed = {**select(pruner.analysis, scores.groups, options), **fixed}
        pruned = pruner.rewrite(removed) if removed else model
    dropped = allocated.dropped if allocated is not None else []
    if not removed and not dropped:
        notes.append("the selection removes no channel at this percentile")
    reconstruction = None
    cut = pruned  # before any refit, for the held-out story
    if reconstruct and (removed or dropped):
        from onnx_ocnna.reconstruct import kept_outputs
        from onnx_ocnna.reconstruct import reconstruct as refit

        refit_start = time.perf_counter()
        source = as_source(calibration, model, **(calibration_options or {}))
        # Image folders list their files class by class: the first samples must not be one class.
        # One order for every pass: the competitors of the final check are measured on the
        # allocation's images and find its damage table (a new order per pass measured it again).
        source.shuffle, source.reshuffle = True, False
        source.seed = (reconstruct_options or {}).get("seed", 0)
        reconstruct_options = _with_sample_count(reconstruct_options, model, source, sizes)
        if target_params is not None:  # a new bias would be parameters the budget did not count
            reconstruct_options = {"new_biases": False, **reconstruct_options}
        pruned, reconstruction = refit(pruner.prepared_model(), pruned, kept_outputs(pruner.analysis, removed),
                                       source.batches, progress=progress, **reconstruct_options)
        if allocated is not None:
            budget = {"target_params": target_params, "target_macs": target_macs, "target_latency": target_latency,
                      "latency_batch": latency_batch, "latency_threads": latency_threads, "speed_floor": speed_floor}
            removed, pruned, reconstruction = _best_of_recipes(
                model, pruner, scores, round_to, options, source, allocated, (removed, pruned, reconstruction),
                budget, damage_samples, reconstruct_options, progress, notes, fixed, sizes, block_removal)
            chosen = allocated.final_check.get("chosen", "measured")
            if chosen.startswith("measured, "):  # another allocation of the budget won
                cut = allocated.rewrite(pruner)
            elif chosen != "measured":
                cut = pruner.rewrite(removed)  # the uniform cut won: a pure channel removal
        # Wall time, with the uniform competitor's search and refit when there is one.
        timings["reconstruct_s"] = time.perf_counter() - refit_start
        fitted = [f for f in reconstruction.layers if not f.skipped]
        notes.append(f"reconstruction refitted {len(fitted)} of {len(reconstruction.layers)} layers on "
                     f"{reconstruction.samples} samples")
    if allocated is not None and allocated.speed:  # after the final check: it can change what is written
        notes.append(_speed_note(allocated.speed))
    if allocated is not None and (note := _disturbed_timings_note(allocated.latency)):
        notes.append(note)
    if blocks:
        by_si = [b.add for b in blocks if b.dropped]
        notes.append(f"removed {len(by_si)} of {len(blocks)} identity-shortcut blocks by SI: {', '.join(by_si) or 'none'}")
    if allocated is not None and allocated.dropped:
        notes.append(f"the allocation removed {len(allocated.dropped)} residual block(s): "
                     + ", ".join(b.add for b in allocated.dropped)
                     + " (listed in the report, not in the plan: apply_plan cuts channels only)")
    stages = []
    if held_out is not None:
        eval_start = time.perf_counter()
        stages.append(("pruned", held_out.measure(cut)))
        if reconstruction is not None:
            stages.append(("reconstructed", held_out.measure(pruned)))
        timings["evaluate_s"] = time.perf_counter() - eval_start
    timings["rewrite_s"] = (time.perf_counter() - start - timings["score_s"] - timings.get("drop_blocks_s", 0.0)
                            - timings.get("reconstruct_s", 0.0) - timings.get("allocate_s", 0.0)
                            - timings.get("evaluate_s", 0.0))
    settings.update(fc_width=fc_width, csi_tolerance=csi_tolerance if fc_width else None)
    if relaxed is not None:
        notes.append("the model fixes its batch size at 1: its passes ran on whole batches through a copy "
                     "that takes any batch, checked to compute the same per image; the file written is at batch 1")
    pruned, report = _finish(original, _deployed(pruned, relaxed), pruner, removed, settings, notes, sizes)
    report.timings = timings
    report.calibration = calibration_record
    for stage, accuracy in stages:
        report.record_accuracy(stage, accuracy)
    report.extra["plan"] = build_plan(pruner.analysis, removed, pruner.sha256, scores.groups)
    if reconstruction is not None:
        report.extra["reconstruction"] = reconstruction.as_dict()
    if allocated is not None:
        report.extra["allocation"] = allocated.as_dict()
    present = {n.name for n in pruned.graph.node}
    report.extra["widths"] = [{**w, "after": w["after"] if w["layer"] in present else 0}
                              for w in layer_widths(pruner.analysis, removed)]
    if blocks:
        report.extra["blocks"] = block_rows
    if fc_width:
        report.extra["fc_width"] = width_rows
    return pruned, report


def _csi_cut(model, pruner: Pruner, calibration: Any, calibration_options: dict | None, tolerance: float,
             options: SelectionOptions, progress: bool, timings: dict, notes: list[str],
             rows: list[dict]) -> dict[int, np.ndarray]:
    """``--fc-width csi``: the neurons each hidden FC layer drops (group id -> channels); those
    groups join ``options.exclude``, so the other selections leave them as CSI sized them.
    Fills ``rows`` with one :class:`~onnx_ocnna.fc_width.LayerWidth` dict per layer."""
    from onnx_ocnna.fc_width import csi_widths

    source = as_source(calibration, model, **(calibration_options or {}))
    begin = time.perf_counter()
    fixed, widths = csi_widths(pruner, source.batches(), tolerance=tolerance, exclude=options.exclude,
                               progress=progress)
    options.exclude = set(options.exclude) | {w.group for w in widths}
    timings["fc_width_s"] = time.perf_counter() - begin
    rows.extend(w.as_dict() for w in widths)
    if not widths:
        notes.append("--fc-width csi: the model has no prunable hidden fully connected layer")
    for w in widths:
        notes.append(f"fc width (CSI, tolerance {tolerance:g}): {w.layer} keeps {w.kept} of {w.channels} neurons, "
                     f"CSI {w.csi_kept:.4f} of the full layer's {w.csi_full:.4f} on {w.samples} samples")
    return fixed


def _held_out(original: onnx.ModelProto, data: Any, options: dict | None):
    """``data`` as a HeldOut of ``original`` (None stays None; a HeldOut is used as it is)."""
    from onnx_ocnna.evaluate import HeldOut

    if data is None or isinstance(data, HeldOut):
        return data
    return HeldOut(original, as_source(data, original, **(options or {})).batches)


def _sample_shapes(data: Any, model: onnx.ModelProto | None = None,
                   options: dict | None = None) -> dict[str, tuple[int, ...]] | None:
    """One calibration sample's shape per input (without the batch axis), None when unknown
    (no data, a reader): a dynamic input height and width take their size from the data."""
    if data is None:
        return None
    if not isinstance(data, CalibrationSource):
        data = as_source(data, model, **(options or {}))
    return data.sample_shapes()


# Operators of a quantized graph: their integer weights are behind nodes no channel cut follows.
_QUANTIZED_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DequantizeLinear",
                  "QuantizeLinear", "DynamicQuantizeLinear")


def quantized_ops(model: onnx.ModelProto) -> list[str]:
    """The quantization operator types in ``model`` (sorted; empty for a float model)."""
    return sorted({n.op_type for n in model.graph.node} & set(_QUANTIZED_OPS))


def _refuse_quantized(model: onnx.ModelProto) -> None:
    """InputError for a quantized model (QDQ or QOperator) with nothing prunable: its filters
    reach the layers through DequantizeLinear or QLinear* nodes, so no group exists, and the
    float model is what can be pruned (then quantized with ``--quantize``)."""
    present = quantized_ops(model)
    if present:
        raise InputError(f"the model is quantized ({', '.join(present)} nodes): its filters reach the layers "
                         "through those nodes, which no channel cut follows, so nothing can be removed; prune "
                         "the float model and quantize the result (--quantize int8)")


def _calibration_record(data: Any, model: onnx.ModelProto, options: dict | None, scores: Scores) -> dict | None:
    """Where the calibration data came from, how it was preprocessed, how much scoring read."""
    if data is None:
        return None
    options = {k: v for k, v in (options or {}).items() if v is not None}
    # A weight-only criterion read nothing: the data is opened once more just to describe it.
    described = scores.calibration or as_source(data, model, **options).describe()
    record = {"source": os.fspath(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__,
              **described, "scored_samples": scores.samples,
              "max_samples": options.get("max_samples"), "seed": options.get("seed")}
    if record.get("preprocessing") is not None:  # images: the preset the mean/std/size came from
        # No preset: --mean/--std were given on 0-1 pixels.
        record["preprocessing"] = {"preset": options.get("preprocess"), **record["preprocessing"]}
    return record


def _with_sample_count(options: dict | None, model: onnx.ModelProto, source: CalibrationSource,
                       sizes: dict | None) -> dict:
    """``reconstruct_options`` with the number of images to refit on: the caller's, else as
    many as the data has within :func:`onnx_ocnna.reconstruct.auto_samples`'s limits."""
    from onnx_ocnna.reconstruct import auto_samples

    options = dict(options or {})
    if options.get("samples") is None:
        shapes = source.sample_shapes()
        sample_bytes = 4 * sum(int(np.prod(shape)) for shape in shapes.values()) if shapes else None
        options["samples"] = auto_samples(model_stats(model, sizes=sizes).macs, sample_bytes, source.num_samples)
    return options


def _best_of_recipes(model, pruner, scores, round_to, options, source, allocated, measured, budget: dict,
                     damage_samples, reconstruct_options, progress, notes, fixed=None, sizes=None,
                     block_removal=True):
    """Reconstruct the competitors of the allocated cut for the same budget, and keep whichever
    reconstructed model is closer to the original on the calibration images (mean output KL):
    the uniform-percentile cut (parameter and MACs budgets), the allocation with the coupled
    groups kept whole (its latency searched and measured like the allocation's own), the
    allocation that spends the budget on residual blocks alone (:func:`_allocation_of_blocks_only`),
    and those that give removed blocks back (:func:`_compete_keeping_blocks`).
    ``budget``: the ``target_*`` and ``latency_*`` arguments of :func:`compress`.

    The allocation's damage is measured one group at a time, after refitting only the layers
    that read the cut; the full reconstruction of a joint cut can recover differently (measured
    on ResNet-20 at MACs 0.5: the allocation lost to the uniform cut after reconstruction), so
    the finished candidates are compared on the same measure and the best one is written.
    A coupled group (producers joined by a residual Add: a ResNet's spine) is where the sum of
    one-group damages misleads most: on ResNet-20 at RPR 0.8 the allocation cut the spine of
    the last two stages to 28/32 and 56/64 and kept 75.50 % top-1, the same budget spent on the
    block-internal groups alone 78.00 % (2,000 test images, no training).
    """
    from onnx_ocnna.allocate import DamageMeter, round_block, take_feeds, width_step
    from onnx_ocnna.reconstruct import kept_outputs
    from onnx_ocnna.reconstruct import reconstruct as refit

    # Aligned like the allocation, so either way the widths buy time in ONNX Runtime: to the
    # block, else to the allocation's width step (with 16-channel blocks a 16-channel layer can
    # lose no block, so no uniform percentile reaches MACs 0.5 on a CIFAR ResNet).
    def uniform_cut(align: int) -> tuple[float, dict, onnx.ModelProto]:
        uniform_options = replace(options, round_to=align)  # a copy: the search sets its percentile
        removed_u, pruned_u = _search_target(model, pruner, scores, uniform_options, budget["target_params"],
                                             budget["target_macs"], fixed, sizes)
        return uniform_options.percentile, removed_u, pruned_u

    block = round_block(round_to)
    uniform: dict[int, tuple] = {}
    failure = "a latency budget has no uniform search" if budget["target_latency"] is not None else ""
    # One aligned competitor: the block's, else the width step's; a parameter budget is about
    # size, so the unaligned uniform cut competes too. A latency budget has no uniform search.
    alignments = () if budget["target_latency"] is not None else (
        (block, width_step(block)), (1,) if budget["target_params"] is not None else ())
    floor = budget["speed_floor"] if budget["target_macs"] is not None else None
    for aligns in alignments:
        for align in aligns:
            if align in uniform:
                continue
            try:
                cut = uniform_cut(align)
            except InputError as exc:
                failure = str(exc)
                continue
            if cut[1] and floor and not _fast_enough(pruner, cut[2], budget, sizes):
                failure = f"the uniform cut at round-to {align} is slower than the speed floor {floor:g}"
                continue
            if cut[1]:  # a cut that removes nothing is no competitor
                uniform[align] = cut
                break
    # The images the allocation measured on, not a new choice: the table is then reused.
    damage_samples = allocated.damage_samples
    inner, coupled, coupled_options = _allocation_without_coupled(pruner, scores, options, source, allocated,
                                                                  budget, damage_samples, fixed, block_removal)
    blocks_only, blocks_options = _allocation_of_blocks_only(pruner, scores, options, source, allocated, budget,
                                                             damage_samples, fixed, block_removal)
    uniform_skipped = f"no aligned uniform cut to compare: {failure or 'it removes nothing'}"
    removes_blocks = any(row["removed"] for a in (allocated, inner) if a is not None for row in a.blocks)
    if not uniform and inner is None and blocks_only is None and not removes_blocks:
        allocated.final_check = {"chosen": "measured", "skipped": uniform_skipped}
        return measured
    meter = DamageMeter(pruner.model, take_feeds(source.batches(), damage_samples), refit=False)
    finished = {"measured": measured}
    damage = {"measured": meter(measured[1])}

    def compete(name: str, removed: dict, cut: onnx.ModelProto) -> None:
        """Reconstruct a competitor's cut and measure it like the allocated one."""
        fitted, reconstruction = refit(pruner.prepared_model(), cut, kept_outputs(pruner.analysis, removed),
                                       source.batches, progress=progress, **(reconstruct_options or {}))
        finished[name] = (removed, fitted, reconstruction)
        damage[name] = meter(fitted)

    # Allocations of the same budget the final check may write instead: name -> allocation.
    allocations = {}
    if inner is not None:
        compete(_COUPLED_KEPT, inner.removed, inner.rewrite(pruner))
        allocations[_COUPLED_KEPT] = inner
    if blocks_only is not None and not any(_same_cut(blocks_only, a) for a in (allocated, inner) if a is not None):
        compete(_BLOCKS_ONLY, blocks_only.removed, blocks_only.rewrite(pruner))
        allocations[_BLOCKS_ONLY] = blocks_only
    for align, (percentile, removed_u, pruned_u) in uniform.items():
        compete(f"uniform k={percentile:.2f} round-to {align}", removed_u, pruned_u)
    # Blocks are given back from the better of the two allocations that cut channels, with its
    # groups, and from the blocks-only one: either chain can end closest (ResNet-20 at MACs 0.5:
    # the blocks-only allocation was closer than the measured one, but with the last stage's
    # blocks kept the measured one was closer still).
    base, base_options = "measured", options
    if inner is not None and damage[_COUPLED_KEPT] < damage["measured"]:
        base, base_options = _COUPLED_KEPT, coupled_options
    kept_blocks = _compete_keeping_blocks(pruner, scores, base_options, source, allocations.get(base, allocated),
                                          base, budget, damage_samples, fixed, block_removal, compete, damage,
                                          allocations)
    if _BLOCKS_ONLY in allocations:
        kept_blocks.update(_compete_keeping_blocks(pruner, scores, blocks_options, source, blocks_only, _BLOCKS_ONLY,
                                                   budget, damage_samples, fixed, block_removal, compete, damage,
                                                   allocations))
    chosen = min(damage, key=lambda k: (damage[k], k != "measured"))
    allocated.final_check = {"damage_after_reconstruction": damage, "chosen": chosen}
    if not uniform:
        allocated.final_check["uniform_skipped"] = uniform_skipped
    if chosen in allocations:
        # Still the measured allocation, on fewer groups or blocks: its widths and blocks are reported.
        winner = allocations[chosen]
        for name in ("removed", "groups", "achieved", "dropped", "blocks", "latency", "speed"):
            setattr(allocated, name, getattr(winner, name))
        if chosen.startswith(_COUPLED_KEPT):
            allocated.final_check["coupled_kept"] = sorted(coupled)
        if chosen.startswith(_BLOCKS_ONLY):
            allocated.final_check["widths_kept"] = True
        if chosen in kept_blocks:
            allocated.final_check["blocks_kept"] = sorted(kept_blocks[chosen])
    elif chosen != "measured":
        if allocated.speed:
            allocated.speed["written"] = chosen
        allocated.dropped = []
        for row in allocated.blocks:
            row["removed"], row["why"] = False, f"kept: the {chosen} cut was written"
    notes.append("after reconstruction the closest to the original (output KL) is the "
                 f"{'allocated' if chosen == 'measured' else chosen} cut: "
                 # KL >= 0: a value rounding made slightly negative prints as 0
                 + ", ".join(f"{k} {max(v, 0.0):.4f}" for k, v in damage.items()) + "; it is the one written")
    return finished[chosen]


_COUPLED_KEPT = "measured, coupled groups kept"
_BLOCKS_ONLY = "measured, blocks only"
# At most this many competitors keep removed blocks (each costs an allocation and a reconstruction).
MAX_BLOCK_COMPETITORS = 3


def _compete_keeping_blocks(pruner, scores, options, source, base, base_name: str, budget: dict, damage_samples,
                            fixed, block_removal, compete, damage: dict, allocations: dict) -> dict[str, set]:
    """Competitors that keep some of the residual blocks the allocation ``base`` (made with
    ``options``, named ``base_name`` in ``damage``) removed, the same budget spent elsewhere; each
    is reconstructed and measured by ``compete`` (which fills ``damage``) and added to
    ``allocations``. Returns name -> the blocks it keeps.

    A block's damage is measured alone, after refitting only the layers that read its shortcut;
    that underestimates what several removals do together, most for the blocks that hold the
    most parameters. Measured on ResNet-20 (BN kept) at MACs 0.4 with the speed floor: the
    allocation removed 5 of 9 blocks, the last stage's among them, and kept 62.18 % top-1 after
    reconstruction (RPR 0.485); the same budget with the last stage's blocks kept removed 4
    blocks and kept 71.70 % (RPR 0.699), 80.68 % against 79.96 % after 4 epochs of
    distillation (5,000 test images). So the blocks are kept by saving, the largest first (the
    blocks of a stage save alike and go together), while each step measures closer to the
    original after reconstruction than the step before (the first: than ``base``).
    """
    kept: dict[str, set] = {}
    levels = sorted({row["saved_params"] for row in base.blocks if row["removed"]}, reverse=True)
    best = damage[base_name]
    for level in levels[:MAX_BLOCK_COMPETITORS]:
        # Every block that saves as much, not only the removed ones: with the last stage's
        # removed block kept, the allocation removed its neighbour instead (66.18 %).
        keep = {row["add"] for row in base.blocks if row["saved_params"] >= level}
        inner = _allocate_again(pruner, scores, options, source, budget, damage_samples, fixed, block_removal, keep)
        if inner is None:  # the budget cannot be met with these blocks kept
            break
        if base.speed.get("met") and not inner.speed.get("met"):
            break  # slower than the speed floor: not a competitor
        name = f"{base_name}, {len(keep)} block(s) kept"
        same = next((other for other, a in allocations.items() if _same_cut(a, inner)), None)
        if same is None:  # not reconstructed again when another chain found the same cut
            compete(name, inner.removed, inner.rewrite(pruner))
            allocations[name], kept[name] = inner, keep
        if damage[same or name] >= best:
            break
        best = damage[same or name]
    return kept


def _fast_enough(pruner: Pruner, cut: onnx.ModelProto, budget: dict, sizes: dict | None) -> bool:
    """Whether ``cut`` meets the MACs target's speed floor, judged like the allocation's own
    selections (a pass is confirmed by a second timing; the slower counts)."""
    from onnx_ocnna.allocate import floor_judge

    judge = floor_judge(pruner, lambda _: cut, budget["target_macs"], budget["speed_floor"], budget["latency_batch"],
                        budget["latency_threads"], sizes)
    return judge({}) <= judge.target


def _disturbed_timings_note(rows: list[dict]) -> str | None:
    """A warning when the timings behind the written allocation were disturbed by other load (their
    medians and :func:`evaluate.robust_speedup` disagree); the judge reads the latter, which held
    at one thread (tools/bench_latency_load.py) but is a reading of a disturbed machine all the same."""
    from onnx_ocnna.evaluate import disturbed

    shaky = [row for row in rows or [] if disturbed(row)]
    if not shaky:
        return None
    return (f"{len(shaky)} of {len(rows)} latency timings were disturbed by other load (their medians and CPU times "
            "or fastest runs disagree by more than 10 %); the speed was judged by the latter, so time the written model "
            "on a quiet machine (--bench) before trusting it")


def _speed_note(speed: dict) -> str:
    """One line on a MACs target's speed floor for the report."""
    head = (f"speed floor {speed['floor']:g} (a speed-up of {speed['speedup_needed']:.2f}x or more): "
            f"{1 / speed['latency_ratio']:.2f}x measured at batch {speed['batch']}, {speed['threads']} thread(s), "
            f"latency ratio {speed['latency_ratio']:.3f} against {speed['latency_target']:.3f} aimed at")
    if "written" in speed:  # a uniform competitor won the final check; it was timed within the floor
        return f"{head}; the {speed['written']} cut written instead was timed within the floor too"
    if not speed["met"]:
        return f"{head}; NOT met ({speed['why']}), the MACs-only allocation is written"
    return head + ("; the MACs-only allocation was slower, so the budget was searched for time too"
                   if speed.get("searched") else "; met by the MACs-only allocation")


def _allocation_without_coupled(pruner, scores, options, source, allocated, budget: dict, damage_samples, fixed,
                                block_removal):
    """The allocation of the same budget with every coupled group the allocation cut kept whole
    (from the same damage table, so nothing is measured again), those groups' ids and the options
    it was allocated with; (None, set(), None) when it cut none or the budget cannot be met
    without them."""
    coupled = {g.id for g in pruner.analysis.groups
               if len(g.members) > 1 and len(allocated.removed.get(g.id, ())) > 0}
    if not coupled:
        return None, set(), None
    coupled_options = replace(options, exclude=set(options.exclude) | coupled)
    inner = _allocate_again(pruner, scores, coupled_options, source, budget, damage_samples, fixed, block_removal)
    return (inner, coupled, coupled_options) if inner is not None else (None, set(), None)


def _allocation_of_blocks_only(pruner, scores, options, source, allocated, budget: dict, damage_samples, fixed,
                               block_removal):
    """The allocation of the same budget spent on removing residual blocks alone, every channel
    group kept whole (from the same damage table), and the options it was allocated with (every
    group excluded); (None, None) when the model has no removable block, or blocks alone cannot
    meet the budget (or, for a MACs target, its speed floor when the allocation met it).

    One group at a time, a width cut measures less damage per unit saved than a block's
    removal, and the greedy spends the budget on widths; together the cuts do far more. Measured
    on ResNet-56 (BN folded) at ``--target-latency 0.5``: the allocation removed 11 blocks and cut
    the last stage's widths (output KL 0.449 after reconstruction, RPR 0.460, 73.16 % top-1 on
    5,000 test images). The same budget spent on blocks alone measured 0.319; with the last
    stage's blocks then given back (:func:`_compete_keeping_blocks`) it removed 14 of the first
    two stages' blocks: 0.179, RPR 0.793, 78.00 %, 1.99 / 2.13x measured, and 83.52 % against
    82.62 % after 3 epochs of distillation.
    """
    if not block_removal or not allocated.blocks:
        return None, None
    every_group = {g.id for g in pruner.analysis.groups if g.prunable}
    blocks_options = replace(options, exclude=set(options.exclude) | every_group)
    inner = _allocate_again(pruner, scores, blocks_options, source, budget, damage_samples, fixed, block_removal)
    if inner is None or (allocated.speed.get("met") and not inner.speed.get("met")):
        return None, None
    return inner, blocks_options


def _same_cut(a, b) -> bool:
    """Whether two allocations remove the same channels and the same blocks (one model)."""
    return (a.removed.keys() == b.removed.keys() and all(np.array_equal(a.removed[g], b.removed[g]) for g in a.removed)
            and [block.add for block in a.dropped] == [block.add for block in b.dropped])


def _allocate_again(pruner, scores, options, source, budget: dict, damage_samples, fixed, block_removal,
                    keep_blocks: Iterable[str] = ()):
    """The allocation of the same ``budget`` under other ``options`` or with ``keep_blocks`` kept,
    from the run's cached damage table (nothing is measured again); None when the budget cannot
    be met so."""
    from onnx_ocnna.allocate import allocate

    try:
        return allocate(pruner, scores.groups, options, source.batches(), **budget, damage_samples=damage_samples,
                        progress=False, cache=scores.damage_tables, blocks=block_removal, fixed=fixed,
                        keep_blocks=keep_blocks)
    except InputError:
        return None


def layer_widths(analysis: ChannelAnalysis, removed: dict[int, np.ndarray]) -> list[dict]:
    """Output channels of every Conv/Gemm producer before and after ``removed``, in graph order."""
    from onnx_ocnna.reconstruct import kept_outputs

    kept = kept_outputs(analysis, removed)
    rows = []
    for producer in analysis.context.producers:
        name = producer.node.name
        before = len(producer.ids)
        rows.append({"layer": name, "before": before, "after": int(len(kept[name])) if name in kept else before})
    return rows


def _search_target(model, pruner: Pruner, scores: Scores, options: SelectionOptions,
                   target_params: float | None, target_macs: float | None, fixed: dict | None = None,
                   sizes: dict | None = None):
    """Smallest percentile (bisection to 0.1) whose rewrite, with the ``fixed`` removal (group id
    -> channels) on top, meets the ratio targets; MACs counted at ``sizes`` (see
    :func:`~onnx_ocnna.metrics.static_shapes`) when the input's height and width are dynamic."""
    before = model_stats(model, sizes=sizes)
    for name, value in (("--target-params", target_params), ("--target-macs", target_macs)):
        if value is not None and not 0 < value <= 1:
            raise InputError(f"{name} must be a ratio in (0, 1], got {value:g}")

    def attempt(k: float):
        options.percentile = k
        removed = {**select(pruner.analysis, scores.groups, options), **(fixed or {})}
        pruned = pruner.rewrite(removed) if removed else model
        stats = model_stats(pruned, sizes=sizes)
        ok = (target_params is None or stats.parameters <= target_params * before.parameters) and \
             (target_macs is None or stats.macs <= target_macs * before.macs)
        return ok, removed, pruned

    lo, hi = 0.0, 99.9
    ok, removed, pruned = attempt(hi)
    if not ok:
        raise InputError("the target cannot be reached even at percentile 99.9 (frozen groups keep too much)")
    best = (hi, removed, pruned)
    ok0, removed0, pruned0 = attempt(lo)
    if ok0:
        options.percentile = lo
        return removed0, pruned0
    while hi - lo > 0.1:
        mid = (lo + hi) / 2
        ok, removed, pruned = attempt(mid)
        if ok:
            hi, best = mid, (mid, removed, pruned)
        else:
            lo = mid
    options.percentile = best[0]
    return best[1], best[2]


def _distillation_pair(student: onnx.ModelProto, teacher: onnx.ModelProto
                       ) -> tuple[onnx.ModelProto, onnx.ModelProto, RelaxedBatch | None, bool]:
    """The student and teacher distillation trains and runs, the student's relaxed copy to
    restore the result through (None when it trains as given), and whether either is a copy.

    A batch-1 export trains and teaches through its copy that takes whole batches: data opened
    for batch 1 would make every optimiser step, and every training BatchNorm's statistics, one
    image's. When one of the two runs batch 1 only (it has no copy), both stay as given, because
    they read the same batches.
    """
    copies = [relax_batch(student), relax_batch(teacher)]
    if any(copy is None and takes_batch_1_only(model) for model, copy in zip((student, teacher), copies)):
        return student, teacher, None, False
    student_run, teacher_run = (copy.model if copy is not None else model
                                for model, copy in zip((student, teacher), copies))
    return student_run, teacher_run, copies[0], any(copy is not None for copy in copies)


def distill(student: ModelLike, teacher: ModelLike, train: Any, *, epochs: int = 1, lr: float = 0.01,
            temperature: float = 4.0, alpha: float = 0.5, augment: bool = True, hflip: bool = True,
            eval_data: Any = None, calibration_options: dict | None = None, eval_options: dict | None = None,
            progress: bool = True, seed: int = 0, checkpoint_dir: str | os.PathLike | None = None,
            resume: bool = False, optimizer: str = "sgd", bn: str = "train", threads: int | None = None):
    """Knowledge distillation (SPEC section 7): the pruned ``student`` learns from ``teacher``.

    Args:
        train: training data, read like calibration data (labels optional).
        optimizer: "sgd" (Nesterov, the default) or "adamw"; ``lr`` is its initial rate.
        bn: BatchNormalization statistics: "frozen" (as given), "recompute" (re-estimated on
            ``train`` before distilling) or "train" (batch statistics while training; folded
            BatchNorms are restored around their Convs meanwhile); see :mod:`onnx_ocnna.distill.batchnorm`.
        eval_data: held-out data for per-epoch accuracy (or agreement without labels).
        checkpoint_dir: save a checkpoint after every epoch; ``resume`` continues from it.
        threads: CPU threads for training and the teacher. None: the first steps are timed with
            each candidate count and the fastest is kept, so the count follows the machine's load;
            PyTorch's sums differ in their last bits between thread counts and training amplifies
            that, so only a fixed count makes a run repeatable bit for bit.
    Returns:
        (the student with trained initializers, same graph structure; a DistillReport).

    Models that take batch 1 only (the dynamo exporter's default) train and teach through their
    copies that take whole batches (:mod:`onnx_ocnna.batch_axis`); the student is returned at batch 1.
    """
    from onnx_ocnna.distill import distill as run_distill

    student, teacher, student_copy, relaxed = _distillation_pair(as_model(student), as_model(teacher))
    if relaxed:  # sources opened for batch 1 (a sweep's) are read again for the copies
        train = _whole_batches(train, calibration_options)
        eval_data = _whole_batches(eval_data, eval_options or calibration_options)
    opened_for = student if takes_batch_1_only(student) else teacher
    source = as_source(train, opened_for, **(calibration_options or {}))
    # A new sample order every epoch: image folders list their files class by class, and
    # single-class batches make the student collapse to one prediction.
    source.shuffle, source.seed = True, seed
    held_out = (as_source(eval_data, opened_for, **(eval_options or calibration_options or {}))
                if eval_data is not None else None)
    distilled, report = run_distill(
        student, teacher, source.batches, epochs=epochs, lr=lr, temperature=temperature, alpha=alpha,
        augment=augment, hflip=hflip, eval_batches=held_out.batches if held_out else None, progress=progress,
        seed=seed, checkpoint_dir=checkpoint_dir, resume=resume, optimizer=optimizer, bn=bn, threads=threads)
    return (distilled if student_copy is None else student_copy.restore(distilled)), report
