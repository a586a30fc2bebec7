"""Streaming activation collection: one ONNX Runtime session that also returns every
measured tensor, run batch by batch; each batch is folded into per-member accumulators and
dropped, so memory does not grow with the calibration set."""

from __future__ import annotations

import queue
import threading
from typing import Iterable

import numpy as np
import onnx

from onnx_ocnna.calibration import Batch
from onnx_ocnna.channels.analysis import ChannelAnalysis
from onnx_ocnna.criteria.base import Accumulator, Criterion
from onnx_ocnna.errors import InputError
from onnx_ocnna.model_io import ort_session


# How often a waiting worker checks for a stop, and how long the consumer waits for it to end.
_POLL_SECONDS = 0.05
_JOIN_SECONDS = 10.0


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the tensors ``names`` (types left to inference)."""
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    present = {o.name for o in extended.graph.output}
    for name in names:
        if name not in present:
            extended.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return extended


def collect(model: onnx.ModelProto, analysis: ChannelAnalysis, criterion: Criterion,
            accumulators: dict[str, Accumulator], batches: Iterable[Batch], *,
            total: int | None = None, progress: bool = True, threads: int | None = None) -> int:
    """Run ``model`` over ``batches`` and update ``accumulators`` (member name -> accumulator).

    ``model`` must be the model the analysis names tensors in (``api.Pruner.prepared_model()``).
    Inference of the next batch overlaps with the statistics of the current one (ONNX
    Runtime and numpy both release the GIL). Returns the number of samples seen.
    """
    from tqdm.auto import tqdm

    groups = {m: analysis.group_of(m) for m in accumulators}
    measured = {m: groups[m].measured[m] for m in accumulators}
    names = sorted(set(measured.values()))
    # Statistics run in this thread while ONNX Runtime works in another: its idle workers must
    # not spin on the cores the statistics need.
    session = ort_session(with_outputs(model, names), threads=threads, spinning=False)
    output_index = {o.name: i for i, o in enumerate(session.get_outputs())}
    feeds_names = {i.name for i in session.get_inputs()}

    results: queue.Queue = queue.Queue(maxsize=2)
    failure: list[BaseException] = []
    stop = threading.Event()  # set by the consumer when it gives up (Ctrl-C, a failed update)

    def hand_over(item) -> bool:
        """Put ``item`` in the queue unless the consumer has stopped; a plain ``put`` into the
        full queue would block this thread forever, and the consumer's join with it."""
        while not stop.is_set():
            try:
                results.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                pass
        return False

    def infer() -> None:
        iterator = iter(batches)
        try:
            for batch in iterator:
                if stop.is_set():
                    break
                feeds = {k: v for k, v in batch.feeds.items() if k in feeds_names}
                outputs = session.run([session.get_outputs()[output_index[n]].name for n in names], feeds)
                if not hand_over((batch.labels, dict(zip(names, outputs)))):
                    break
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)
        finally:
            # Close a generator here, in the thread that ran it, so its clean-up (the image
            # decoder's prefetch) runs now rather than whenever it is collected.
            close = getattr(iterator, "close", None)
            if close is not None:
                try:
                    close()
                except BaseException as exc:
                    failure.append(exc)
            hand_over(None)

    worker = threading.Thread(target=infer, daemon=True, name="ocnna-collect")
    worker.start()
    seen = 0
    bar = tqdm(total=total, desc=f"scoring ({criterion.name})", unit="batch", disable=not progress, leave=False)
    try:
        while (item := results.get()) is not None:
            labels, outputs = item
            for member, accumulator in accumulators.items():
                accumulator.update(outputs[measured[member]], labels)
            seen += len(next(iter(outputs.values()))) if outputs else 0
            bar.update(1)
    except BaseException:
        stop.set()
        _drain(results)  # frees the activations at once; the worker sees the stop within a poll
        raise
    finally:
        bar.close()
        # Bounded: the worker finishes at most the batch it is running. A daemon thread still
        # inside ONNX Runtime cannot hold the exit up, but it would race the runtime's teardown.
        worker.join(_JOIN_SECONDS)
    if failure:
        exc = failure[0]
        if isinstance(exc, InputError):
            raise exc
        raise InputError(f"calibration run failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if seen == 0:
        raise InputError("the calibration data produced no batches")
    return seen


def _drain(items: queue.Queue) -> None:
    while True:
        try:
            items.get_nowait()
        except queue.Empty:
            return


def member_scores_to_group(group, member_scores: dict[str, np.ndarray]) -> np.ndarray:
    """SPEC section 1: each member's scores divided by that member's mean, then averaged per
    group channel over the members that carry it. Returns [group.channels] float64."""
    total = np.zeros(group.channels)
    count = np.zeros(group.channels)
    for member, scores in member_scores.items():
        scores = np.asarray(scores, dtype=np.float64)
        scale = mean_scale(scores)
        index = group.member_channels[member]
        np.add.at(total, index, scores / scale)
        np.add.at(count, index, 1)
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def mean_scale(scores: np.ndarray) -> float:
    """The mean of the finite scores, the divisor that puts members and groups on one scale
    (1 when there is none, e.g. a dead member); +inf scores stay +inf after division."""
    finite = scores[np.isfinite(scores)]
    return float(finite.mean()) if finite.size and finite.mean() > 0 else 1.0
