"""Accuracy and size against the pruning percentile k (the OCNNA paper's Figure 3).

The channels are scored once; every point then only selects, rewrites and (by default, as the
main command) reconstructs, so a sweep of nine percentiles costs one scoring pass plus nine
rewrites and refits (and, with ``distill_epochs``, nine distillations). Budgets (``targets``)
share the measured damage tables the same way.
"""

from __future__ import annotations

import csv
import os
from typing import Any

import numpy as np
import onnx

from onnx_ocnna import api
from onnx_ocnna.errors import InputError
from onnx_ocnna.evaluate import predictions
from onnx_ocnna.model_io import atomic_output

CSV_FIELDS = ("percentile", "objective", "target", "rpr", "macs_ratio", "parameters", "macs", "top1_before",
              "top1_after", "agreement", "top1_distilled", "agreement_distilled", "distill_seconds")
TARGET_OBJECTIVES = ("params", "macs", "latency")


def run_sweep(model: api.ModelLike, calibration: Any, eval_data: Any, percentiles: list[float] | None = None, *,
              targets: tuple[str, list[float]] | None = None, criterion: str = "ocnna",
              criterion_options: dict | None = None, compress_options: dict | None = None,
              distill_epochs: int = 0, train_data: Any = None, distill_options: dict | None = None,
              calibration_options: dict | None = None, eval_options: dict | None = None,
              out_png: str | os.PathLike | None = None, out_csv: str | os.PathLike | None = None,
              title: str | None = None, progress: bool = False) -> list[dict]:
    """Prune ``model`` at every percentile k, or for every budget of ``targets``, and measure
    it on held-out data.

    Args:
        calibration: data for scoring, reconstruction and the measured allocation (see
            :func:`api.compress`); weight-only criteria without reconstruction may pass None.
        eval_data: held-out data, read like calibration data with ``eval_options``; with labels
            the plot shows top-1, without them top-1 agreement with the original model.
        percentiles: the k values (0-100), plotted in the given order.
        targets: instead of percentiles, ``(objective, ratios)`` with objective "params",
            "macs" or "latency": one point per budget (the measured damage tables are shared
            between points, so extra points cost little more than their rewrite).
        compress_options: the main command's other options, passed to :func:`api.compress`
            for every point (reconstruct, reconstruct_options, scope, min_channels, round_to,
            exclude, allocation, latency_batch, latency_threads, damage_samples, block_removal).
            Reconstruction is on by default whenever ``calibration`` is given, as there.
        distill_epochs: > 0 distils every pruned model (teacher: the original) on ``train_data``
            (default: ``calibration``) with ``distill_options`` (lr, temperature, ... of
            :func:`api.distill`); points that remove nothing are not distilled.
        out_png, out_csv: where to write the plot and the table (parent folders must exist).
    Returns:
        One dict per point with the keys of :data:`CSV_FIELDS` (accuracies are fractions in
        [0, 1], None where they do not apply).
    """
    points = _points(percentiles, targets)
    if distill_epochs < 0:
        raise InputError(f"distill_epochs must be 0 or more, got {distill_epochs}")
    options = dict(compress_options or {})
    taken = {"percentile", "scores", "criterion", "criterion_options", "calibration_options", "progress",
             "target_params", "target_macs", "target_latency"} & set(options)
    if taken:
        raise InputError(f"compress_options may not set {sorted(taken)}; the sweep sets them")
    model = api.as_model(model)
    held_out = api.as_source(eval_data, model, **(eval_options or calibration_options or {}))
    api.check_preprocessing(model, held_out, None, "the evaluation data")
    base_pred, labels = predictions(model, held_out.batches())
    if not len(base_pred):
        raise InputError("the evaluation data holds no samples")
    if calibration is not None:
        calibration = api.as_source(calibration, model, **(calibration_options or {}))
    scores = api.score(model, calibration, criterion=criterion, criterion_options=criterion_options,
                       calibration_options=calibration_options, progress=progress)
    rows = []
    for objective, value in points:
        budget = {} if objective == "percentile" else {f"target_{objective}": value}
        pruned, report = api.compress(model, calibration, scores=scores, criterion=criterion,
                                      percentile=value if objective == "percentile" else 40.0,
                                      criterion_options=criterion_options, progress=progress, **budget, **options)
        row = {"percentile": report.settings.get("percentile"), "objective": objective,
               "target": None if objective == "percentile" else value, "rpr": report.rpr,
               "macs_ratio": report.macs_ratio, "parameters": report.after.parameters, "macs": report.after.macs,
               **_accuracy(model, pruned, held_out, base_pred, labels, "")}
        if distill_epochs:
            row.update(_distil(model, pruned, report, held_out, base_pred, labels, distill_epochs,
                               calibration if train_data is None else train_data, calibration_options,
                               distill_options, progress))
        rows.append(row)
    if out_csv is not None:
        write_csv(rows, out_csv)
    if out_png is not None:
        plot_sweep(rows, out_png, title=title or f"{criterion} sweep")
    return rows


def _points(percentiles: list[float] | None, targets: tuple[str, list[float]] | None) -> list[tuple[str, float]]:
    """The sweep's points as (objective, value): ("percentile", k) or (objective, ratio)."""
    if (percentiles is None) == (targets is None):
        raise InputError("the sweep needs either percentiles or targets, not both")
    if percentiles is not None:
        if not percentiles:
            raise InputError("the sweep needs at least one percentile")
        bad = [k for k in percentiles if not 0 <= k <= 100]
        if bad:
            raise InputError(f"percentiles must lie in 0..100, got {bad[0]:g}")
        return [("percentile", float(k)) for k in percentiles]
    objective, ratios = targets
    if objective not in TARGET_OBJECTIVES:
        raise InputError(f"a sweep target is one of {', '.join(TARGET_OBJECTIVES)}, got {objective!r}")
    if not ratios:
        raise InputError(f"the sweep needs at least one --target-{objective} ratio")
    bad = [r for r in ratios if not 0 < r <= 1]
    if bad:
        raise InputError(f"--target-{objective} ratios must lie in (0, 1], got {bad[0]:g}")
    return [(objective, float(r)) for r in ratios]


def _accuracy(model: onnx.ModelProto, pruned: onnx.ModelProto, source, base_pred: np.ndarray,
              labels: np.ndarray | None, suffix: str) -> dict:
    pred = base_pred if pruned is model else predictions(pruned, source.batches())[0]
    out = {f"agreement{suffix}": float(np.mean(pred == base_pred))}
    if labels is not None:
        out[f"top1{suffix}" if suffix else "top1_after"] = float(np.mean(pred == labels))
        if not suffix:
            out["top1_before"] = float(np.mean(base_pred == labels))
    return out


def _distil(model, pruned, report, held_out, base_pred, labels, epochs, train_data, calibration_options,
            distill_options, progress) -> dict:
    if report.after.parameters == report.before.parameters and report.after.macs == report.before.macs:
        # Nothing was removed: the model is the original, distilling it would only add noise.
        result = _accuracy(model, model, held_out, base_pred, labels, "_distilled")
        return {**result, "distill_seconds": 0.0}
    distilled, kd = api.distill(pruned, model, train_data, epochs=epochs, calibration_options=calibration_options,
                                progress=progress, **(distill_options or {}))
    return {**_accuracy(model, distilled, held_out, base_pred, labels, "_distilled"), "distill_seconds": kd.seconds}


def write_csv(rows: list[dict], path: str | os.PathLike) -> None:
    """The sweep table, one line per k, columns :data:`CSV_FIELDS` (empty where not measured)."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})


def plot_sweep(rows: list[dict], path: str | os.PathLike, title: str = "sweep") -> None:
    """Accuracy (left axis, %) and RPR / MACs ratio (right axis) against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_target = rows[0]["objective"] != "percentile"
    ks = [r["target"] if by_target else r["percentile"] for r in rows]
    labelled = rows[0].get("top1_after") is not None
    key, name = ("top1", "top-1") if labelled else ("agreement", "agreement with original")
    fig, left = plt.subplots(figsize=(7, 4.2), dpi=120)
    after = [100 * r["top1_after" if labelled else "agreement"] for r in rows]
    left.plot(ks, after, "o-", color="tab:blue", label=f"{name}, pruned")
    if rows[0].get(f"{key}_distilled") is not None:
        left.plot(ks, [100 * r[f"{key}_distilled"] for r in rows], "s-", color="tab:green",
                  label=f"{name}, pruned + distilled")
    if labelled:
        left.axhline(100 * rows[0]["top1_before"], color="tab:blue", ls=":", lw=1, label="original model")
    left.set_xlabel(f"target {rows[0]['objective']} ratio" if by_target
                    else "percentile k (channels removed per group, %)")
    if by_target:
        left.invert_xaxis()  # smaller budgets to the right, as larger k are
    left.set_ylabel(f"{name} (%)")
    left.set_ylim(0, 105)  # 105 % and 1.05 keep the two axes' grids aligned
    right = left.twinx()
    right.plot(ks, [r["rpr"] for r in rows], "^--", color="tab:red", label="RPR (parameters left)")
    right.plot(ks, [r["macs_ratio"] for r in rows], "v--", color="tab:orange", label="MACs ratio")
    right.set_ylabel("ratio to the original")
    right.set_ylim(0, 1.05)
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels_ = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    left.legend(handles, labels_, loc="lower left", fontsize=8)
    left.set_title(title)
    left.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
