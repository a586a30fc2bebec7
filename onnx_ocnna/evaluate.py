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


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The static batch size of the first input, or None if it is dynamic."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None


def interleaved_latency(before: onnx.ModelProto, after: onnx.ModelProto, batch: int, threads: int,
                        runs: int = 20, warmup: int = 3) -> dict:
    """Median ``session.run`` time (ms) of both models on the same random input (SPEC section 9).

    The two sessions alternate run by run (the order flips every round), so load from other
    processes hits both alike, and intra-op spinning is off: otherwise the idle session's pool
    threads spin on the cores the running one needs (measured: up to 3x swings at 2 threads).
    """
    feeds = sample_feeds(before, batch=batch)
    sessions = [ort_session(before, threads=threads, spinning=False), ort_session(after, threads=threads, spinning=False)]
    for _ in range(warmup):
        for session in sessions:
            session.run(None, feeds)
    times: list[list[float]] = [[], []]
    for i in range(runs):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            sessions[j].run(None, feeds)
            times[j].append((time.perf_counter() - start) * 1000)
    b, a = statistics.median(times[0]), statistics.median(times[1])
    return {"batch": batch, "threads": threads, "before_ms": b, "after_ms": a, "speedup": b / a, "runs": runs}


def compare_latency(before: onnx.ModelProto, after: onnx.ModelProto, batches=(1, 32), threads=(1,),
                    runs: int = 20) -> list[dict]:
    """Before/after latency for each batch size and thread count (interleaved); rows with speed-up."""
    fixed = fixed_batch(before)
    return [interleaved_latency(before, after, batch, threads_n, runs)
            for threads_n in threads for batch in batches if fixed is None or batch == fixed]
