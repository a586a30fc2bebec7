"""The most compressed model within an accepted accuracy drop (SPEC section 4, ``--max-drop``).

The Sobolewski & Szyc question as one call: which technique -- structured pruning at which
budget, post-training INT8 quantization, or both -- serves a given accepted drop. Candidates are
budgets of the objective's own axis (``--target-latency`` for latency, ``--target-macs`` for
MACs, ``--target-params`` for parameters and file size), each compressed with the main
command's recipe (allocation, reconstruction, optional distillation) and, with
``quantize="auto"``, also quantized to INT8; every candidate is measured on the held-out data
and the one that is smallest by the objective while at most ``max_drop`` points below the
original is returned, with the whole table of candidates.

Search: a descending grid of budgets until no variant of a budget stays within the drop, then
bisection between the last budget that did and the first that did not. Accuracy against budget
is close to monotonic but not exactly, so every point tried is kept and the best measured one
wins, not the last one tried. Scores and the allocation's damage tables are computed once and
shared by all candidates.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnx_ocnna import api
from onnx_ocnna.errors import InputError
from onnx_ocnna.evaluate import Accuracy, HeldOut, compare_latency, timed_ratio
from onnx_ocnna.report import Report

OBJECTIVES = ("latency", "macs", "params", "size")
#: The budget option each objective is searched along (file size follows the parameters).
BUDGET_AXIS = {"latency": "latency", "macs": "macs", "params": "params", "size": "params"}
GRID = (0.8, 0.6, 0.45, 0.3, 0.2)
REFINE_STEPS = 2


@dataclass
class Candidate:
    """One model the search measured. Ratios are against the original; ``drop`` in points."""

    budget: float | None  # the target ratio asked (None: the original's weights, unpruned)
    int8: bool
    rpr: float
    macs_ratio: float
    size_bytes: int
    size_ratio: float
    latency_ratio: float | None
    top1: float | None
    agreement: float
    drop: float
    objective_value: float
    status: str = ""
    seconds: float = 0.0
    model: onnx.ModelProto | None = field(default=None, repr=False)  # the float model (of an INT8 one too)
    path: Path | None = field(default=None, repr=False)  # INT8 candidates: the file in the work dir
    report: Report | None = field(default=None, repr=False)

    @property
    def setting(self) -> str:
        base = "original" if self.budget is None else f"budget {self.budget:.3f}"
        return f"{base}, {'INT8' if self.int8 else 'float'}"

    def as_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("model", "path", "report")}
        data["setting"] = self.setting
        return data


@dataclass
class SearchResult:
    chosen: Candidate
    candidates: list[Candidate]
    objective: str
    max_drop: float
    labelled: bool
    seconds: float

    def as_dict(self) -> dict:
        return {"objective": self.objective, "max_drop": self.max_drop, "labelled": self.labelled,
                "seconds": self.seconds, "chosen": self.candidates.index(self.chosen),
                "candidates": [c.as_dict() for c in self.candidates]}


def same_data(a: Any, b: Any) -> bool:
    """Whether two data arguments name the same files (one path, or a folder inside the other)."""
    if not isinstance(a, (str, os.PathLike)) or not isinstance(b, (str, os.PathLike)):
        return a is b
    pa, pb = Path(a).resolve(), Path(b).resolve()
    return pa == pb or pa in pb.parents or pb in pa.parents


def most_compressed(model: api.ModelLike, calibration: Any, held_out: HeldOut, max_drop: float, *,
                    objective: str = "latency", quantize: str = "none", criterion: str = "ocnna",
                    criterion_options: dict | None = None, calibration_options: dict | None = None,
                    compress_options: dict | None = None, distill_options: dict | None = None,
                    latency_batch: int = 1, latency_threads: int = 1, work_dir: str | os.PathLike | None = None,
                    scores: api.Scores | None = None, progress: bool = True) -> SearchResult:
    """Search the budget (and INT8) for the smallest model within ``max_drop`` points.

    Args:
        held_out: the data the drop is measured on (top-1 points with labels, else 100 minus
            the agreement with the original in percent); never the calibration or training data.
        objective: "latency" (measured in ONNX Runtime at ``latency_batch`` / ``latency_threads``),
            "macs", "params" or "size" (bytes of the written file); ties go to the smaller file.
        quantize: "auto" adds an INT8 (QDQ) copy of the original and of every pruned candidate.
        compress_options: passed to :func:`api.compress` for every candidate (reconstruct,
            round_to, allocation, damage_samples, block_removal, ...).
        distill_options: when given, every pruned candidate is distilled (keyword arguments of
            :func:`api.distill`, ``train`` included) before it is measured.
        scores: precomputed scores of ``model`` (their cached damage tables are reused and
            extended, so searches for several drops cost one scoring and one damage measurement).
        work_dir: where INT8 candidates are written (default: a temporary folder that lives
            as long as the returned result's paths are needed -- pass one to keep them).
    Returns:
        The chosen candidate and all candidates, in the order they were tried.
    """
    if objective not in OBJECTIVES:
        raise InputError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if not max_drop > 0:
        raise InputError(f"--max-drop must be a positive number of points, got {max_drop:g}")
    if quantize not in ("none", "auto"):
        raise InputError(f"quantize must be 'none' or 'auto' in the search, got {quantize!r}")
    if calibration is None:
        raise InputError("--max-drop needs calibration data (--calib) for scoring and the allocation")
    from tqdm.auto import tqdm

    start = time.perf_counter()
    model = api.as_model(model)
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="ocnna-search-"))
    source = api.as_source(calibration, model, **(calibration_options or {}))
    if scores is None:
        api.check_preprocessing(model, source, None, "the calibration data")
        scores = api.score(model, source, criterion=criterion, criterion_options=criterion_options,
                           progress=progress)
    original_bytes = model.ByteSize()
    labelled = held_out.labels is not None
    baseline = held_out.measure(model)
    candidates: list[Candidate] = []

    def measure(float_model: onnx.ModelProto, path: Path | None, budget: float | None,
                report: Report | None, began: float) -> Candidate:
        """Measure ``float_model``, or its INT8 copy at ``path`` when given."""
        loaded = float_model if path is None else onnx.load(str(path))
        accuracy = held_out.measure(loaded)
        size = path.stat().st_size if path is not None else loaded.ByteSize()
        latency = None
        if objective == "latency":
            (row,) = compare_latency(model, loaded, batches=(latency_batch,), threads=(latency_threads,))
            latency = timed_ratio(row)
        rpr = report.rpr if report is not None else 1.0
        macs = report.macs_ratio if report is not None else 1.0
        value = {"latency": latency, "macs": macs, "params": rpr, "size": size / original_bytes}[objective]
        candidate = Candidate(budget, path is not None, rpr, macs, size, size / original_bytes, latency,
                              accuracy.top1_after, accuracy.agreement, _drop(baseline, accuracy), float(value),
                              seconds=time.perf_counter() - began, model=float_model, path=path,
                              report=report)
        candidates.append(candidate)
        return candidate

    def int8_of(float_model: onnx.ModelProto, name: str) -> Path:
        from onnx_ocnna.quantize import quantize_int8

        return quantize_int8(float_model, source, work / f"{name}.int8.onnx")

    def try_budget(budget: float | None) -> list[Candidate]:
        """Compress (unless ``budget`` is None: the original), measure, and the INT8 copy."""
        began = time.perf_counter()
        tried: list[Candidate] = []
        if budget is None:
            if quantize == "auto":
                tried.append(measure(model, int8_of(model, "original"), None, None, began))
            return tried
        try:
            pruned, report = api.compress(model, source, scores=scores, criterion=criterion,
                                          criterion_options=criterion_options, progress=False,
                                          **{f"target_{BUDGET_AXIS[objective]}": budget}, **(compress_options or {}))
        except InputError as exc:  # e.g. a latency the allocation cannot reach: no candidate here
            if progress:
                print(f"max-drop search: budget {budget:.3f} gives no model ({exc})")
            return tried
        if distill_options is not None:
            # The search measures on its own held-out data; per-epoch evaluation would only cost time.
            pruned, kd = api.distill(pruned, model, **{**distill_options, "progress": progress, "eval_data": None})
            report.extra["distillation"] = kd.to_dict()
        tried.append(measure(pruned, None, budget, report, began))
        if quantize == "auto":
            tried.append(measure(pruned, int8_of(pruned, f"budget_{budget:.3f}"), budget, report, began))
        return tried

    def within(tried: list[Candidate]) -> bool:
        return any(c.drop <= max_drop for c in tried)

    bar = tqdm(total=1 + len(GRID) + REFINE_STEPS, desc="max-drop search", unit="budget", disable=not progress,
               leave=False)
    try:
        try_budget(None)
        bar.update(1)
        last_within, first_beyond = 1.0, None
        for budget in GRID:
            tried = try_budget(budget)
            bar.update(1)
            _say(progress, bar, tried, max_drop, labelled)
            if within(tried):
                last_within = budget
            else:
                first_beyond = budget
                break
        bar.total = bar.n + (REFINE_STEPS if first_beyond is not None else 0)
        bar.refresh()
        for _ in range(REFINE_STEPS if first_beyond is not None else 0):
            budget = round((last_within + first_beyond) / 2, 4)
            tried = try_budget(budget)
            bar.update(1)
            _say(progress, bar, tried, max_drop, labelled)
            if within(tried):
                last_within = budget
            else:
                first_beyond = budget
    finally:
        bar.close()
    chosen = _choose(candidates, max_drop)
    if chosen is None:
        best = min(candidates, key=lambda c: c.drop, default=None)
        raise InputError(f"no compressed candidate stays within {max_drop:g} points"
                         + (f" (the closest, {best.setting}, drops {best.drop:.2f})" if best else "")
                         + "; nothing was written")
    return SearchResult(chosen, candidates, objective, max_drop, labelled, time.perf_counter() - start)


def _drop(baseline: Accuracy, accuracy: Accuracy) -> float:
    """Points below the original: top-1 with labels, else disagreement with the original."""
    if baseline.top1_after is not None and accuracy.top1_after is not None:
        return 100.0 * (baseline.top1_after - accuracy.top1_after)
    return 100.0 * (1.0 - accuracy.agreement)


def _choose(candidates: list[Candidate], max_drop: float) -> Candidate | None:
    """The smallest by the objective among those within the drop (then the smaller file, then
    the smaller drop); every other candidate gets the reason it was not chosen."""
    allowed = [c for c in candidates if c.drop <= max_drop]
    chosen = min(allowed, key=lambda c: (round(c.objective_value, 4), c.size_bytes, c.drop), default=None)
    for c in candidates:
        if c is chosen:
            c.status = "chosen"
        elif c.drop > max_drop:
            c.status = f"drop {c.drop:.2f} > {max_drop:g}"
        else:
            c.status = "within the drop, larger by the objective"
    return chosen


def _say(progress: bool, bar, tried: list[Candidate], max_drop: float, labelled: bool) -> None:
    if not progress:
        return
    what = "top-1" if labelled else "agreement"
    for c in tried:
        value = 100 * (c.top1 if labelled else c.agreement)
        bar.write(f"max-drop search: {c.setting}: {what} {value:.2f} % (drop {c.drop:.2f} pt, "
                  f"{'within' if c.drop <= max_drop else 'beyond'} {max_drop:g}), objective {c.objective_value:.3f}")


def candidates_table(result: SearchResult) -> str:
    """The study's table: every candidate, its figures and whether it was chosen."""
    what = "top-1" if result.labelled else "agreement"
    lines = [f"max-drop search ({result.objective}, at most {result.max_drop:g} points): "
             f"{len(result.candidates)} candidates in {result.seconds:.1f} s",
             f"  {'setting':<22} {'RPR':>6} {'MACs':>6} {'size':>6} {'latency':>8} {what:>10} {'drop':>9}  status"]
    for c in result.candidates:
        value = 100 * (c.top1 if result.labelled else c.agreement)
        latency = "-" if c.latency_ratio is None else f"{c.latency_ratio:.3f}"
        lines.append(f"  {c.setting:<22} {c.rpr:>6.3f} {c.macs_ratio:>6.3f} {c.size_ratio:>6.3f} {latency:>8} "
                     f"{value:>8.2f} % {c.drop:>6.2f} pt  {c.status}")
    return "\n".join(lines)


def plot_pareto(result: SearchResult, path: str | os.PathLike, original: float) -> None:
    """Accuracy against the objective, float and INT8 marked, the chosen one ringed; ``original``
    is the original's accuracy in percent (the line the drop is measured from)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from onnx_ocnna.model_io import atomic_output

    what = "top-1" if result.labelled else "agreement with the original"
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for int8, marker, label in ((False, "o", "float"), (True, "s", "INT8")):
        points = [c for c in result.candidates if c.int8 == int8]
        if points:
            ax.scatter([c.objective_value for c in points],
                       [100 * (c.top1 if result.labelled else c.agreement) for c in points],
                       marker=marker, label=label, zorder=3)
    chosen = result.chosen
    ax.scatter([chosen.objective_value], [100 * (chosen.top1 if result.labelled else chosen.agreement)],
               s=220, facecolors="none", edgecolors="black", label="chosen", zorder=4)
    ax.axhline(original - result.max_drop, color="tab:red", ls=":", lw=1, label=f"original - {result.max_drop:g} pt")
    ax.axhline(original, color="gray", ls="--", lw=1, label="original")
    ax.set_xlabel(f"{result.objective} ratio to the original (smaller is better)")
    ax.set_ylabel(f"{what} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"--max-drop {result.max_drop:g}: candidates")
    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
