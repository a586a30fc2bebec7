"""Accuracy and latency of ONNX models in ONNX Runtime (SPEC section 9)."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np
import onnx

from onnx_ocnna.calibration import Batch
from onnx_ocnna.model_io import ort_session, sample_feeds


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
    """Arg-max class of the first output for every sample, [N], and labels [N] or None."""
    session = ort_session(model)
    names = {i.name for i in session.get_inputs()}
    preds, labels = [], []
    for batch in batches:
        logits = session.run([session.get_outputs()[0].name], {k: v for k, v in batch.feeds.items() if k in names})[0]
        preds.append(np.asarray(logits).reshape(len(logits), -1).argmax(axis=1))
        if batch.labels is not None:
            labels.append(np.asarray(batch.labels))
    pred = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    return pred, (np.concatenate(labels) if labels and len(labels) == len(preds) else None)


def compare_accuracy(before: onnx.ModelProto, after: onnx.ModelProto, batches: Callable[[], Iterable[Batch]]) -> Accuracy:
    pred_before, labels = predictions(before, batches())
    pred_after, _ = predictions(after, batches())
    n = len(pred_before)
    return Accuracy(
        samples=n,
        top1_before=float(np.mean(pred_before == labels)) if labels is not None else None,
        top1_after=float(np.mean(pred_after == labels)) if labels is not None else None,
        agreement=float(np.mean(pred_before == pred_after)) if n else 0.0,
    )


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The static batch size of the first input, or None if it is dynamic."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None


def latency_ms(model: onnx.ModelProto, batch: int, threads: int, runs: int = 20, warmup: int = 3) -> float:
    """Median wall time of one ``session.run`` in milliseconds."""
    session = ort_session(model, threads=threads)
    feeds = sample_feeds(model, batch=batch)
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def compare_latency(before: onnx.ModelProto, after: onnx.ModelProto, batches=(1, 32), threads=(1,),
                    runs: int = 20) -> list[dict]:
    """Before/after latency for each batch size and thread count; rows with speed-up."""
    fixed = fixed_batch(before)
    rows = []
    for threads_n in threads:
        for batch in batches:
            if fixed is not None and batch != fixed:
                continue
            b = latency_ms(before, batch, threads_n, runs)
            a = latency_ms(after, batch, threads_n, runs)
            rows.append({"batch": batch, "threads": threads_n, "before_ms": b, "after_ms": a, "speedup": b / a})
    return rows
