"""Scale-out on PyTorch's own engine: the same command under ``torchrun`` shards the data by rank.

``torchrun --nproc_per_node=N onnx-ocnna ...`` starts N copies of the program with the
environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``. This
module reads them, joins the process group (``gloo`` on CPU; with CUDA present
``cpu:gloo,cuda:nccl``, so CPU tensors -- all onnx-ocnna ever sends -- still go through gloo) and
offers the few collective steps the pipeline needs.

Without torchrun (``WORLD_SIZE`` unset or 1, and no process group initialised by the caller)
every function is a pass-through and torch is not imported: scoring does not need torch.

Choices:

* **Scoring shards** (:func:`shard`, :func:`shard_source`) are disjoint and together cover every
  batch exactly once. With a known batch count K each rank takes one contiguous block of
  batches (sizes differ by at most one), so concatenating the ranks' data in rank order gives
  the single-process order back; that makes :func:`gather_accumulators` reproduce the
  single-process statistics for every criterion, including ``si``, whose per-sample features
  feed a seeded subsample and nearest-neighbour ties that depend on row order. With an unknown
  count (an ONNX Runtime reader) batch i goes to rank ``i % world_size``; the moment-based
  criteria merge exactly in any order, up to float64 rounding (Chan's formula).
* **Training shards** (:func:`round_robin`) follow ``torch.utils.data.DistributedSampler``
  with ``shuffle=False, drop_last=False`` at batch granularity: batch i goes to rank
  ``i % world_size`` and the list is padded by wrapping round to the first batches, so every
  rank runs the same number of steps (DistributedDataParallel needs that: each step is one
  gradient all-reduce). The data are an iterable of ready batches (an image folder decoded as it
  streams, or a one-pass reader), not an indexable Dataset, so the sampler itself cannot be used.
* **Reading only one's own data**: :func:`shard_source` and :func:`subset_source` build a
  source over the chosen batches of an image folder or array source, so a rank decodes only its
  own images; any other iterable is read whole and filtered.
* **Failure**: an error on one rank ends that process; torchrun then stops the others. Checks
  that depend only on shared facts (such as too few batches) fail on every rank alike.
"""

from __future__ import annotations

import atexit
import copy
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from onnx_ocnna.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the workers (all 0 / 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> bool:
    """True when started by torchrun (or a compatible launcher) with more than one process."""
    return _env_int("WORLD_SIZE", 1) > 1 and "RANK" in os.environ


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not an integer") from None


def _initialized_dist():
    """torch.distributed when the caller or :func:`init` has initialised a process group, else None.

    Looks only at modules already imported, so a plain run never imports torch.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def world() -> World:
    """Rank and world size: from the process group if one exists, else from torchrun's environment."""
    dist = _initialized_dist()
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist is not None:
        size = dist.get_world_size()
        return World(dist.get_rank(), size, local_rank, _env_int("LOCAL_WORLD_SIZE", size))
    if not launched():
        return World()
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if not 0 <= rank < size:
        raise InputError(f"RANK={rank} is outside 0..{size - 1} (WORLD_SIZE={size})")
    return World(rank, size, local_rank, _env_int("LOCAL_WORLD_SIZE", size))


def cpu_share() -> int | None:
    """CPU threads for one process: this node's usable CPUs divided among its ranks; None
    (let the library choose) without torchrun. ONNX Runtime ignores the OMP_NUM_THREADS=1 that
    torchrun sets, so sessions need this explicitly, or N processes each start all-core pools."""
    w = world()
    if not w.distributed:
        return None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, w.local_size))


def is_primary() -> bool:
    """Whether this process is rank 0, the one that evaluates and writes files."""
    return world().rank == 0


def init(backend: str | None = None) -> World:
    """Join the process group when launched by torchrun (idempotent; a no-op otherwise).

    Args:
        backend: default ``gloo``, or ``cpu:gloo,cuda:nccl`` when CUDA is available.
    """
    if _initialized_dist() is not None or not launched():
        return world()
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise InputError("this PyTorch build has no torch.distributed, which torchrun runs need")
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if cuda and "nccl" in backend:
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0) % torch.cuda.device_count())
    dist.init_process_group(backend=backend)
    atexit.register(destroy)
    return world()


def destroy() -> None:
    """Leave the process group if one is initialised (safe to call more than once)."""
    dist = _initialized_dist()
    if dist is not None:
        dist.destroy_process_group()


def _group():
    """torch.distributed with an initialised group of more than one process, else None."""
    if _initialized_dist() is None and launched():
        init()
    dist = _initialized_dist()
    return dist if dist is not None and dist.get_world_size() > 1 else None


def barrier() -> None:
    """Wait until every rank arrives (no-op in a single process)."""
    dist = _group()
    if dist is not None:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (pickled; for small objects)."""
    dist = _group()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    dist = _group()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_sum(value: int | float) -> int | float:
    """Sum of ``value`` over the ranks (e.g. calibration samples seen)."""
    return sum(all_gather_object(value))


# ---------------------------------------------------------------------------------------------
# Sharding


def block(count: int, rank: int, size: int) -> range:
    """The contiguous batch indices of ``rank`` when ``count`` batches are split ``size`` ways
    (the first ``count % size`` ranks get one more)."""
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def strided(count: int, rank: int, size: int) -> list[int]:
    """DistributedSampler(shuffle=False, drop_last=False) at batch level: ``rank``'s batch
    indices, ``ceil(count / size)`` of them, padded by wrapping round to the first batches."""
    total = math.ceil(count / size) * size
    return [j % count for j in range(rank, total, size)] if count else []


def _check_enough(count: int, size: int) -> None:
    if count < size:
        raise InputError(
            f"the data has {count} batch(es), fewer than the {size} processes; use a smaller --batch-size, "
            "more data or fewer processes"
        )


def shard(batches: Iterable[T], count: int | None = None) -> Iterable[T]:
    """This rank's share of ``batches`` for scoring; ``batches`` itself without torchrun.

    The ranks' shares are disjoint and together hold every batch once. ``count`` (the number of
    batches; taken from ``len(batches)`` when that works) selects contiguous blocks, which keep the
    single-process order when gathered in rank order; without it batch i goes to rank
    ``i % world_size``. Every batch is still read, only the others' are dropped: prefer
    :func:`shard_source` for a :class:`~onnx_ocnna.calibration.CalibrationSource`.
    """
    w = world()
    if not w.distributed:
        return batches
    if count is None:
        count = _length(batches)
    if count is None:
        return (b for i, b in enumerate(batches) if i % w.size == w.rank)
    _check_enough(count, w.size)
    mine = block(count, w.rank, w.size)
    return (b for i, b in enumerate(batches) if i in mine)


def round_robin(batches: Iterable[T], copy_batch: Callable[[T], T] | None = None) -> Iterator[T]:
    """This rank's training batches: batch i when ``i % world_size == rank``, then, once the
    count K is known at the end, one wrapped-round batch if the rank is short of ``ceil(K / W)``
    (:func:`strided`). The first ``W - 1`` batches are kept (copied with ``copy_batch``, since a
    reader may reuse its arrays) for that padding. Without torchrun: ``batches`` unchanged.
    """
    w = world()
    if not w.distributed:
        yield from batches
        return
    kept: list[T] = []
    count = 0
    for i, batch in enumerate(batches):
        if i < w.size - 1:
            kept.append(copy_batch(batch) if copy_batch is not None else batch)
        if i % w.size == w.rank:
            yield batch
        count = i + 1
    if count == 0:
        return
    own = len(range(w.rank, count, w.size))
    for index in strided(count, w.rank, w.size)[own:]:
        yield kept[index]


def subset_source(source: Any, indices: Sequence[int]) -> Any:
    """A calibration source yielding batches ``indices`` of ``source``, in that order, without
    reading the others; None when ``source`` is not a folder or array source.

    Every selected batch but the last must be a full one (true for :func:`block` and
    :func:`strided`, whose only short batch, the overall last, comes last), so re-batching the
    concatenated rows reproduces the selected batches exactly.
    """
    from onnx_ocnna.calibration.sources import ArraySource, ImageFolderSource

    if not isinstance(source, (ArraySource, ImageFolderSource)):
        return None
    size, n = source.batch_size, source.num_samples
    rows = [np.arange(i * size, min((i + 1) * size, n)) for i in indices]
    if any(len(r) != size for r in rows[:-1]):
        raise ValueError("only the last selected batch may be a short one")
    rows_all = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    part = copy.copy(source)
    if isinstance(source, ArraySource):
        part.indices = source.indices[rows_all]  # labels stay indexed by the original rows
    else:
        part.files = [source.files[r] for r in rows_all]
        part.labels = None if source.labels is None else source.labels[rows_all]
    part.num_samples = len(rows_all)
    return part


def shard_source(source: Any) -> Any:
    """This rank's share of a :class:`~onnx_ocnna.calibration.CalibrationSource` for scoring:
    the same batches as :func:`shard`, as a source that reads only them when it can (image
    folders, arrays). Without torchrun: ``source`` itself.
    """
    w = world()
    if not w.distributed:
        return source
    count = _length(source)
    if count is not None:
        _check_enough(count, w.size)
        part = subset_source(source, block(count, w.rank, w.size))
        if part is not None:
            return part
    return _FilteredSource(source, count)


class _FilteredSource:
    """A source whose batches() is :func:`shard` of the wrapped one's (for readers)."""

    def __init__(self, source: Any, count: int | None) -> None:
        self._source, self._count = source, count
        for name in ("input_names", "has_labels", "batch_size", "class_names", "one_shot"):
            setattr(self, name, getattr(source, name, None))
        w = world()
        self._len = None if count is None else len(block(count, w.rank, w.size))
        self.num_samples = None

    def batches(self):
        return iter(shard(self._source.batches(), self._count))

    def __iter__(self):
        return self.batches()

    def __len__(self) -> int:
        if self._len is None:
            raise TypeError("the number of batches of this shard is unknown")
        return self._len


def _length(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


# ---------------------------------------------------------------------------------------------
# Statistics


def merge_states(template: Mapping[str, Any], states: Sequence[Mapping[str, Mapping[str, np.ndarray]]],
                 options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Rebuild each rank's accumulators from their ``state()`` and merge them in rank order.

    Args:
        template: member name -> this rank's accumulator (gives each member's class).
        states: per rank (in rank order), member name -> ``state()``.
        options: the criterion's options, passed to ``from_state`` (``invert``, ``si_*``, ...).
    Returns:
        member name -> an accumulator holding every rank's statistics.
    """
    options = dict(options or {})
    for rank, part in enumerate(states):
        if set(part) != set(template):
            raise InputError(f"rank {rank} scored other layers than this one: is every rank given the same model?")
    merged = {}
    for name, local in template.items():
        cls = type(local)
        acc = cls.from_state(states[0][name], **options)
        for part in states[1:]:
            acc.merge(cls.from_state(part[name], **options))
        merged[name] = acc
    return merged


def gather_accumulators(accumulators: dict[str, Any], options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every rank's statistics, merged in rank order with each accumulator's own ``merge``
    (Chan's formula for moments), so all ranks end with the same full statistics.

    Without torchrun: ``accumulators`` unchanged. ``options`` must be the criterion's options
    (``Criterion.options``): ``state()`` holds statistics only, and settings such as ``invert``
    are restored from them.
    """
    if _group() is None:
        return accumulators
    states = all_gather_object({name: acc.state() for name, acc in accumulators.items()})
    return merge_states(accumulators, states, options)


__all__ = [
    "World", "all_gather_object", "all_sum", "barrier", "block", "broadcast_object", "cpu_share", "destroy",
    "gather_accumulators", "init", "is_primary", "launched", "merge_states", "round_robin", "shard",
    "shard_source", "strided", "subset_source", "world",
]
