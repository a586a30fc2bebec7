"""Streaming activation collection: one ONNX Runtime session that also returns every
measured tensor, or what an accumulator asked ONNX Runtime to reduce it to
(:mod:`onnx_ocnna.reductions`), run batch by batch; each batch is folded into per-member
accumulators and dropped, so memory does not grow with the calibration set."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generator, Iterable

import numpy as np
import onnx

from onnx_ocnna.calibration import Batch
from onnx_ocnna.channels.analysis import ChannelAnalysis
from onnx_ocnna.criteria.base import Accumulator, Criterion
from onnx_ocnna.errors import InputError
from onnx_ocnna.model_io import ort_session
from onnx_ocnna.reductions import Reduction


# How often a waiting worker checks for a stop, and how long the consumer waits for it to end.
_POLL_SECONDS = 0.05
_JOIN_SECONDS = 10.0
# Images per ONNX Runtime run when a batch may run in slices: about RUN_BYTES of measured
# tensors per run, at most MAX_RUN_ROWS images. Measured with the reductions in the graph (2
# threads, scoring seconds at 2 / 4 / 8 / 32 images per run): torchvision ResNet-50 at 224,
# 40 MB of measured maps per image, 8.7 / 9.5 / 10.1 / 12.7 (plain pass 6.2); MobileNetV2,
# 16 MB, 2.0 / 2.0 / 2.1 / 2.7; ResNet-18, 7 MB, 3.4 / 3.3 / 3.3 / 3.5; ResNet-56 (CIFAR), 2 MB,
# ORT alone 1.29x a plain pass at 32 against 1.42x at 64. A plain pass is level from 32 to 64.
RUN_BYTES = 64 << 20
MAX_RUN_ROWS = 32
# Small outputs (reductions, vectors) of successive runs reach the statistics in groups of at
# least this many rows: each update costs some microseconds of NumPy per member whatever its
# size (a model with a static batch of 1 runs one image at a time).
GLUE_ROWS = 64
# A returned tensor of at most this many values per sample counts as small (a [N, C] vector).
_SMALL_ELEMENTS = 4096


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


def with_reductions(model: onnx.ModelProto, reductions: dict[str, Reduction]) -> tuple[onnx.ModelProto, dict[str, list]]:
    """A copy of ``model`` that also returns each reduction of its tensor (tensor name ->
    reduction).

    Reduction outputs with the same dims after the channel axis are concatenated on that axis
    into one graph output: ONNX Runtime reorders every returned tensor out of its blocked
    layout at a cost per tensor (ResNet-56, 4,096 images, with the column means returned
    whole: 110 outputs packed into 3, 3.94 s against 4.12 s for the ORT pass).

    Returns:
        the model, and tensor name -> where each of its reduction's outputs lies, in order:
        (graph output name, first channel, end channel).
    """
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    graph = extended.graph
    taken = {name for node in graph.node for name in node.output} | {v.name for v in graph.input} \
        | {i.name for i in graph.initializer}
    base = "onnx_ocnna_reduce"
    while any(name.startswith(base + "/") for name in taken):
        base += "_"
    pieces: dict[tuple[int, ...], list[tuple[str, int, str, int]]] = {}
    located: dict[str, list] = {}
    for index, tensor in enumerate(sorted(reductions)):
        reduction = reductions[tensor]
        names = reduction.add_to(graph, tensor, f"{base}/{index}")
        located[tensor] = [None] * len(names)
        for position, (name, dims) in enumerate(zip(names, reduction.output_dims())):
            pieces.setdefault(tuple(dims[1:]), []).append((tensor, position, name, dims[0]))
    for number, trailing in enumerate(sorted(pieces)):
        packed = f"{base}/packed_{number}"
        graph.node.append(onnx.helper.make_node("Concat", [name for _, _, name, _ in pieces[trailing]], [packed],
                                                name=packed, axis=1))
        graph.output.append(onnx.ValueInfoProto(name=packed))
        start = 0
        for tensor, position, _, channels in pieces[trailing]:
            located[tensor][position] = (packed, start, start + channels)
            start += channels
    return extended, located


def _reductions(shapes: dict[str, tuple], accumulators: dict[str, Accumulator],
                measured: dict[str, str]) -> dict[str, Reduction]:
    """Measured tensor -> the reduction every accumulator reading it asked for, for float32
    tensors of known shape (the reductions' rounding is stated for float32).

    ``shapes``: measured tensor -> (dtype, shape or None), as :func:`channels_first` gives."""
    readers: dict[str, list[Accumulator]] = {}
    for member, accumulator in accumulators.items():
        readers.setdefault(measured[member], []).append(accumulator)
    chosen = {}
    for name, accs in readers.items():
        dtype, shape = shapes.get(name, (None, None))
        if dtype != np.float32 or shape is None:
            continue
        wanted = {acc.reduction(list(shape)) for acc in accs}
        if len(wanted) == 1 and None not in wanted:
            chosen[name] = wanted.pop()
    return chosen


def channels_first(model: onnx.ModelProto, analysis: ChannelAnalysis, names: set[str]
                   ) -> tuple[onnx.ModelProto, dict[str, str], dict[str, tuple]]:
    """``model`` (the one the analysis names tensors in) with a Transpose that moves the channel
    axis to 1 for each tensor of ``names`` whose channels lie elsewhere (a channels-last
    [N, H, W, C] map, as ConvNeXt's pointwise MatMuls make), so every criterion reads maps
    [N, C, ...]; tensor -> the tensor to measure, and measured tensor -> (dtype, shape or None)."""
    tensors = analysis.graph.tensors()
    renamed: dict[str, str] = {}
    shapes: dict[str, tuple] = {}
    moved: list[onnx.NodeProto] = []
    for name in sorted(names):
        tensor = tensors.get(name)
        shape = analysis.context.shape(tensor) if tensor is not None else None
        dtype = tensor.dtype if tensor is not None else None
        layout = analysis.context.layout(tensor) if tensor is not None else None
        if layout is None or layout.axis in (0, 1):
            renamed[name], shapes[name] = name, (dtype, shape)
            continue
        perm = [0, layout.axis] + [a for a in range(1, layout.rank) if a != layout.axis]
        first = f"{name}__channels_first"
        moved.append(onnx.helper.make_node("Transpose", [name], [first], name=first, perm=perm))
        renamed[name] = first
        shapes[first] = (dtype, None if shape is None else [shape[a] for a in perm])
    if not moved:
        return model, renamed, shapes
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    extended.graph.node.extend(moved)
    return extended, renamed, shapes


def collect(model: onnx.ModelProto, analysis: ChannelAnalysis, criterion: Criterion,
            accumulators: dict[str, Accumulator], batches: Iterable[Batch], *,
            total: int | None = None, progress: bool = True, threads: int | None = None) -> int:
    """Run ``model`` over ``batches`` and update ``accumulators`` (member name -> accumulator).

    ``model`` must be the model the analysis names tensors in (``api.Pruner.prepared_model()``).
    When maps come back, inference of the next batch overlaps with the statistics of the
    current one (ONNX Runtime and numpy both release the GIL). Returns the number of samples
    seen.
    """
    from tqdm.auto import tqdm

    groups = {m: analysis.group_of(m) for m in accumulators}
    model, renamed, shapes = channels_first(model, analysis, {groups[m].measured[m] for m in accumulators})
    measured = {m: renamed[groups[m].measured[m]] for m in accumulators}
    reductions = _reductions(shapes, accumulators, measured)
    names = sorted(set(measured.values()) - set(reductions))
    scoring_model, reduced_outputs = with_reductions(with_outputs(model, names), reductions)
    # Statistics of returned maps run while ONNX Runtime works: its idle workers must not spin on
    # the cores the statistics need. Reduced tensors leave little to compute besides ORT.
    session = ort_session(scoring_model, threads=threads, spinning=not names)
    fetch = names + sorted({packed for places in reduced_outputs.values() for packed, _, _ in places})
    feeds_names = {i.name for i in session.get_inputs()}
    # A batch runs in slices of run_rows() images when every input's batch axis is dynamic and
    # the measured tensors' sizes are known. Small outputs (reductions, [N, C] vectors, 1 x 1
    # maps) are gathered into groups of GLUE_ROWS rows; maps go to the statistics run by run,
    # so no more than a few runs of them are ever held.
    dynamic_batch = all(isinstance(i.shape[0], str) or i.shape[0] is None for i in session.get_inputs() if i.shape)
    sizes = {n: _elements_per_sample(shapes[n][1]) for n in set(measured.values())}
    measured_bytes = 4 * sum(sizes.values())
    step = run_rows(measured_bytes) if dynamic_batch and np.isfinite(measured_bytes) else None
    glue = all(sizes[n] <= _SMALL_ELEMENTS for n in names)

    def items() -> Generator[tuple, None, None]:
        """(labels, outputs by name, batches completed) for the runs over ``batches``; small
        outputs are handed on in groups of at least GLUE_ROWS rows."""
        iterator = iter(batches)
        pending: list[tuple] = []
        pending_rows = 0
        try:
            for batch in iterator:
                feeds = {k: v for k, v in batch.feeds.items() if k in feeds_names}
                for labels, outputs, finished in _runs(session, fetch, feeds, batch.labels, step):
                    if not glue:
                        yield labels, outputs, int(finished)
                        continue
                    pending.append((labels, outputs, int(finished)))
                    pending_rows += _rows(outputs)
                    if pending_rows >= GLUE_ROWS:
                        yield _merged(pending)
                        pending, pending_rows = [], 0
            if pending:
                yield _merged(pending)
        finally:
            # Close a generator here, in the thread that ran it, so its clean-up (the image
            # decoder's prefetch) runs now rather than whenever it is collected.
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    # Returned maps: their statistics run in this thread while ONNX Runtime computes the next
    # batch in another. Reductions leave little to overlap, and a third busy thread would only
    # take cores from ONNX Runtime's (ResNet-56: 5.3-5.8 s in one thread against 5.7-6.1 s).
    stream = _in_background(items) if names else items()
    seen = 0
    bar = tqdm(total=total, desc=f"scoring ({criterion.name})", unit="batch", disable=not progress, leave=False)
    try:
        while True:
            try:
                labels, outputs, batches_done = next(stream)
            except StopIteration:
                break
            except InputError:
                raise
            except Exception as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise InputError(f"calibration run failed: {first}") from exc
            for member, accumulator in accumulators.items():
                tensor = measured[member]
                if tensor in reductions:
                    reduced = [outputs[packed][:, start:end] for packed, start, end in reduced_outputs[tensor]]
                    accumulator.update_reduced(reductions[tensor], reduced, labels)
                else:
                    accumulator.update(outputs[tensor], labels)
            seen += _rows(outputs)
            bar.update(batches_done)
    finally:
        bar.close()
        stream.close()
    if seen == 0:
        raise InputError("the calibration data produced no batches")
    return seen


def _runs(session, fetch: list[str], feeds: dict[str, np.ndarray], labels: np.ndarray | None,
          step: int | None):
    """Run one batch, in slices of ``step`` rows when given; yields (labels, outputs by name,
    whether the batch is done) per run."""
    rows = _rows(feeds)
    if step is None or rows <= step:
        yield labels, dict(zip(fetch, session.run(fetch, feeds))), True
        return
    for start in range(0, rows, step):
        outputs = session.run(fetch, {k: v[start:start + step] for k, v in feeds.items()})
        yield (None if labels is None else labels[start:start + step]), dict(zip(fetch, outputs)), \
            start + step >= rows


def _rows(arrays: dict[str, np.ndarray]) -> int:
    """Rows (samples) of a dict of batch-first arrays, 0 when empty."""
    return len(next(iter(arrays.values()))) if arrays else 0


def _merged(pending: list[tuple]) -> tuple:
    """One (labels, outputs, batches completed) from several, rows in order."""
    labels = [lab for lab, _, _ in pending]
    outputs = [out for _, out, _ in pending]
    joined = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]} if len(outputs) > 1 else outputs[0]
    return (None if any(lab is None for lab in labels) else np.concatenate(labels)), joined, \
        sum(done for _, _, done in pending)


def run_rows(measured_bytes: float) -> int:
    """Images per ONNX Runtime run for ``measured_bytes`` (finite) of measured tensors per image."""
    if not measured_bytes:
        return MAX_RUN_ROWS
    return int(max(1, min(MAX_RUN_ROWS, round(RUN_BYTES / measured_bytes))))


def _elements_per_sample(shape: list | None) -> float:
    """Values per sample of a tensor [N, ...]; infinite when a dim is unknown."""
    if not shape or any(not isinstance(d, int) for d in shape[1:]):
        return float("inf")
    return float(np.prod(shape[1:]))


_DONE = object()


def _in_background(produce: Callable[[], Generator]) -> Generator:
    """The items of the generator ``produce()``, computed one or two ahead in a worker thread
    (which also closes it, so its clean-up runs there); its exception,
    if any, is raised here after the items before it. Closing this generator (or an exception
    in the consumer) stops the worker within a poll and waits for it, bounded."""
    results: queue.Queue = queue.Queue(maxsize=2)
    failure: list[BaseException] = []
    stop = threading.Event()  # set when the consumer gives up (Ctrl-C, a failed update)

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

    def work() -> None:
        iterator = produce()
        try:
            for item in iterator:
                if stop.is_set() or not hand_over(item):
                    break
        except BaseException as exc:  # raised in the consumer's thread
            failure.append(exc)
        finally:
            try:
                iterator.close()  # its clean-up runs in this thread, the one that ran it
            except BaseException as exc:
                failure.append(exc)
            hand_over(_DONE)

    worker = threading.Thread(target=work, daemon=True, name="ocnna-collect")
    worker.start()
    try:
        while (item := results.get()) is not _DONE:
            yield item
    finally:
        stop.set()
        _drain(results)  # frees the activations at once; the worker sees the stop within a poll
        # Bounded: the worker finishes at most the run it is in. A daemon thread still inside
        # ONNX Runtime cannot hold the exit up, but it would race the runtime's teardown.
        worker.join(_JOIN_SECONDS)
    if failure:
        raise failure[0]


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
