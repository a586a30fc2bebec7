"""Accuracy and latency of ONNX models in ONNX Runtime (SPEC section 9)."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx

from onnx_ocnna.batch_axis import for_passes
from onnx_ocnna.calibration import Batch, model_fixed_batch
from onnx_ocnna.logits import has_scores, scores_output
from onnx_ocnna.model_io import ort_session, sample_feeds
from onnx_ocnna.segments import sample_count


@dataclass
class Accuracy:
    """Top-1 on labelled data (``top1``), and top-1 agreement of the pruned model with the
    original (``agreement``); fractions in [0, 1]; ``samples`` evaluated."""

    samples: int
    top1_before: float | None
    top1_after: float | None
    agreement: float

    def as_dict(self) -> dict:
        return asdict(self)


def predictions(model: onnx.ModelProto, batches: Iterable[Batch]) -> tuple[np.ndarray, np.ndarray | None]:
    """Arg-max class of every sample, [N], and labels [N] or None (see :func:`class_scores`)."""
    preds, labels = [], []
    for scores, batch in class_scores(model, batches):
        preds.append(scores.argmax(axis=1))
        if batch.labels is not None:
            labels.append(np.asarray(batch.labels))
    pred = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    return pred, (np.concatenate(labels) if labels and len(labels) == len(preds) else None)


def class_scores(model: onnx.ModelProto, batches: Iterable[Batch]) -> Iterator[tuple[np.ndarray, Batch]]:
    """(scores [samples, K], the batch) for every batch: the scores output
    (:func:`onnx_ocnna.logits.scores_output`, the first output unless that is not float scores
    [N, K]), run on whole batches (a model that takes batch 1 only through its relaxed copy,
    :func:`for_passes`)."""
    scores = scores_output(model)
    model, batches = for_passes(model, batches)
    session = ort_session(model)
    names = {i.name for i in session.get_inputs()}
    for batch in batches:
        values = session.run([scores], {k: v for k, v in batch.feeds.items() if k in names})[0]
        yield _per_sample(values, batch), batch


def _per_sample(logits: np.ndarray, batch: Batch) -> np.ndarray:
    """``logits`` as [samples of ``batch``, K]: also for a batch-1 model whose output has no
    batch axis ([K] for one image, which would otherwise read as K samples)."""
    logits = np.asarray(logits)
    rows = sample_count([batch.feeds])
    return logits.reshape(rows, -1) if logits.size % rows == 0 else logits.reshape(len(logits), -1)


class HeldOut:
    """Held-out data and the original model's predictions on it, computed once, so that every
    stage of a run (pruned, reconstructed, distilled, INT8) is measured against one reference."""

    def __init__(self, original: onnx.ModelProto, batches: Callable[[], Iterable[Batch]]) -> None:
        self.batches = batches
        self.reference, self.labels = predictions(original, batches())

    @property
    def samples(self) -> int:
        return len(self.reference)

    def measure(self, model: onnx.ModelProto) -> Accuracy:
        """Top-1 of the original and of ``model`` (None without labels), and their agreement."""
        pred, _ = predictions(model, self.batches())
        labels, n = self.labels, self.samples
        return Accuracy(
            samples=n,
            top1_before=float(np.mean(self.reference == labels)) if labels is not None else None,
            top1_after=float(np.mean(pred == labels)) if labels is not None else None,
            agreement=float(np.mean(self.reference == pred)) if n else 0.0,
        )


def compare_accuracy(before: onnx.ModelProto, after: onnx.ModelProto, batches: Callable[[], Iterable[Batch]]) -> Accuracy:
    return HeldOut(before, batches).measure(after)


#: Labelled samples the preprocessing check reads, and how few make it meaningful.
SANITY_SAMPLES = 256
_SANITY_MIN = 20


def labels_outside(labels: np.ndarray, classes: int) -> str | None:
    """Why ``labels`` [N] cannot be the classes of a ``classes``-way output, or None if they can."""
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        return None
    low, high = int(labels.min()), int(labels.max())
    if low >= 0 and high < classes:
        return None
    return (f"labels must lie in 0..{classes - 1} for a {classes}-class output, and the training data has label "
            f"{high if high >= classes else low}: they are not the model's classes; distil without them with --alpha 0")


def near_chance_warning(model: onnx.ModelProto, batches: Iterable[Batch], where: str) -> str | None:
    """A warning when the *original* model looks broken on the first labelled samples.

    Reads up to :data:`SANITY_SAMPLES` samples of ``batches``; returns None without labels or
    with fewer than 20 of them. Two signs, either is enough: top-1 below twice chance (1/C, C the
    model's output width, else the number of label values), or predictions collapsed onto one
    class (at least half of them, and twice that class's share of the labels). A model fed the
    wrong normalisation shows one or both (measured on the digits CNN: 10 % and 29 % top-1 with
    75-100 % of the predictions on one class, against 99.8 % spread evenly when right).
    """
    if not has_scores(model):  # labels only: nothing to judge the preprocessing by
        return None
    predicted, expected = [], []
    classes = 0
    for logits, batch in class_scores(model, batches):
        if batch.labels is None:
            return None
        classes = max(classes, logits.shape[1] if logits.shape[1] > 1 else 0)
        predicted.append(logits.argmax(axis=1))
        expected.append(np.asarray(batch.labels).reshape(-1))
        if sum(map(len, predicted)) >= SANITY_SAMPLES:
            break
    if not predicted:
        return None
    pred = np.concatenate(predicted)[:SANITY_SAMPLES]
    labels = np.concatenate(expected)[:SANITY_SAMPLES].astype(np.int64)
    classes = max(classes, int(labels.max(initial=0)) + 1)
    if len(pred) < _SANITY_MIN or classes < 2:
        return None
    top1, chance = float(np.mean(pred == labels)), 1.0 / classes
    values, counts = np.unique(pred, return_counts=True)
    mode, mode_share = int(values[counts.argmax()]), float(counts.max() / len(pred))
    collapsed = mode_share >= 0.5 and mode_share >= 2 * float(np.mean(labels == mode))
    if top1 >= 2 * chance and not collapsed:
        return None
    sign = (f"{100 * mode_share:.0f} % of its predictions are class {mode}" if collapsed
            else f"chance is {100 * chance:.1f} %")
    return (f"the original model scores {100 * top1:.1f} % top-1 on {len(pred)} labelled samples of {where} "
            f"({sign}): the preprocessing is probably wrong (--preprocess, --mean/--std) "
            "or the labels are not the model's classes (class sub-folders sort to the model's class order)")


def interleaved_latency(before: onnx.ModelProto, after: onnx.ModelProto, batch: int, threads: int,
                        runs: int = 20, warmup: int = 3, sizes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """Median ``session.run`` time (ms) of both models on the same random input (SPEC section 9),
    the fastest run of each (``before_min_ms``, ``after_min_ms``, ``speedup_fastest``) and, at
    one thread, the median CPU time of the running thread (``before_cpu_ms``, ``after_cpu_ms``,
    ``speedup_cpu``).

    The two sessions alternate run by run (the order flips every round), so load from other
    processes hits both alike, and intra-op spinning is off: otherwise the idle session's pool
    threads spin on the cores the running one needs (measured: up to 3x swings at 2 threads).
    Interleaving evens out load only while the cores are not oversubscribed: with more runnable
    processes than cores a run is often preempted, the longer model's more often, and the median
    is then an interrupted run. At one thread ONNX Runtime computes on the calling thread, whose
    CPU time a preemption does not add to. Measured on ResNet-56 against a cut that runs 1.46x
    faster, five processes on the 2 cores: by medians 1.00-2.28x at batch 1, by the fastest runs
    1.42-1.44x, by thread CPU time 1.39-1.44x (batch 32: 1.30-1.43x, 1.48-1.68x, 1.46-1.48x;
    tools/bench_latency_load.py, docs/measurements.md).
    :func:`timed_ratio` reads the CPU time, else the fastest runs.
    ``sizes`` (input name -> one sample's shape, e.g. the calibration data's) sets a dynamic
    input height and width, which are otherwise 1.
    """
    feeds = sample_feeds(before, batch=batch, sizes=sizes)
    sessions = [ort_session(before, threads=threads, spinning=False), ort_session(after, threads=threads, spinning=False)]
    for _ in range(warmup):
        for session in sessions:
            session.run(None, feeds)
    times: list[list[float]] = [[], []]
    cpu: list[list[float]] = [[], []]
    for i in range(runs):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            start, start_cpu = time.perf_counter(), time.thread_time()
            sessions[j].run(None, feeds)
            cpu[j].append((time.thread_time() - start_cpu) * 1000)
            times[j].append((time.perf_counter() - start) * 1000)
    b, a = statistics.median(times[0]), statistics.median(times[1])
    b_min, a_min = min(times[0]), min(times[1])
    row = {"batch": batch, "threads": threads, "before_ms": b, "after_ms": a, "speedup": b / a, "runs": runs,
           "before_min_ms": b_min, "after_min_ms": a_min, "speedup_fastest": b_min / a_min}
    b_cpu, a_cpu = statistics.median(cpu[0]), statistics.median(cpu[1])
    # Only where the run's work was on this thread: a CPU time far below the fastest wall time
    # means ONNX Runtime computed elsewhere (a thread pool), and it measures nothing. Loosely: with
    # five processes on 2 cores every 50 ms run was preempted, and its CPU time was 0.49 of the
    # fastest wall time.
    if threads == 1 and b_cpu >= 0.2 * b_min and a_cpu >= 0.2 * a_min and a_cpu > 0:
        row.update(before_cpu_ms=b_cpu, after_cpu_ms=a_cpu, speedup_cpu=b_cpu / a_cpu)
    return row


def robust_speedup(row: dict) -> tuple[float, str] | None:
    """The speed-up of an :func:`interleaved_latency` row that other processes' load disturbs
    least, and what it is read from: the thread's CPU time, else the fastest runs; None for a
    row with neither."""
    if "speedup_cpu" in row:
        return row["speedup_cpu"], "CPU time"
    if "speedup_fastest" in row:
        return row["speedup_fastest"], "fastest runs"
    return None


def timed_ratio(row: dict) -> float:
    """Latency ratio (pruned / original) of an :func:`interleaved_latency` row by
    :func:`robust_speedup`; by the medians for a row without it."""
    robust = robust_speedup(row)
    return 1 / robust[0] if robust is not None else row["after_ms"] / row["before_ms"]


def disturbed(row: dict, tolerance: float = 0.1) -> bool:
    """Whether a row's median speed-up and its :func:`robust_speedup` disagree by more than
    ``tolerance`` (relative): the timing was disturbed by other load and the median is not to be
    trusted."""
    robust = robust_speedup(row)
    return robust is not None and abs(row["speedup"] / robust[0] - 1) > tolerance


def compare_latency(before: onnx.ModelProto, after: onnx.ModelProto, batches=(1, 32), threads=(1,),
                    runs: int = 20, sizes: dict[str, tuple[int, ...]] | None = None) -> list[dict]:
    """Before/after latency for each batch size and thread count (interleaved); rows with speed-up.
    ``sizes``: see :func:`interleaved_latency`."""
    fixed = model_fixed_batch(before)
    return [interleaved_latency(before, after, batch, threads_n, runs, sizes=sizes)
            for threads_n in threads for batch in batches if fixed is None or batch == fixed]
