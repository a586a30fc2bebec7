"""Separation Index criterion (Saffar, Kalhor, Habibnia, Sci. Rep. 2024; SPEC section 3).

SI(X, y) is the fraction of samples whose nearest *other* sample (Euclidean) has the same
label. A filter's feature is its spatially averaged response; filters are ordered by greedy
forward selection maximising the SI of the chosen set, and a filter's score is the reverse of
its selection order.

Conventions (the project's choices):

* Ties between equidistant neighbours go to the lowest sample index (``argmin`` order).
* Ties between candidate filters with the same SI go to the filter whose feature *alone*
  separates best (its single-feature SI, known from the first step), then to the lowest
  channel index. Late in the selection SI saturates and ties are common, so the second key
  keeps the tail of the order meaningful instead of index-driven.
* Features are used raw (no per-channel standardisation), as in the SI definition.
* Squared distances are additive over features: the chosen set's n x n matrix is kept in
  float64 and updated once per step; candidates are scored in float32 on top of it (one
  rounding per step, no accumulated error). Memory is O(n^2).
* Adding a feature never shortens a distance, so a candidate is first scored on each sample's
  24 current nearest neighbours; only rows where the shortlist cannot prove the minimum are
  rescanned in full. The result is exact (bit-identical to the full scan); the cost falls from
  O(C^2 n^2 / 2) towards O(C^2 n K / 2) once the chosen set spreads the samples.
* When the accumulator holds more than ``si_max_samples`` images (default 2000) it scores a
  seeded random subset of that size (``si_seed``, default 0), taken in the order the batches
  were accumulated.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from onnx_ocnna.criteria import register
from onnx_ocnna.criteria.base import Accumulator, Criterion, MemberInfo
from onnx_ocnna.errors import InputError

# Per-thread scratch for one block of candidate distances; bounds memory for large n.
_SCRATCH_BYTES = 32 << 20
# Shortlist length per sample for the pruned candidate search (see _candidate_counts).
_PRUNE_K = 24
# Below this many candidates, finding the shortlists (a partition of the n x n matrix) costs
# more than scanning the full rows.
_PRUNE_MIN_CANDIDATES = 16
_LABELS_MESSAGE = "the si criterion needs labelled calibration data (images in class folders, or arrays with labels)"


def nearest_other(features: np.ndarray) -> np.ndarray:
    """Index of each sample's nearest other sample.

    Args:
        features: shape [n, d], n >= 2.

    Returns:
        shape [n] int64; equidistant neighbours resolve to the lowest index.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    x = x.reshape(len(x), -1)
    n = len(x)
    if n < 2:
        raise InputError(f"the separation index needs at least 2 samples, got {n}")
    # Centring does not change distances but shrinks the norms the Gram form cancels.
    x = x - x.mean(axis=0)
    sq = np.einsum("ij,ij->i", x, x)
    out = np.empty(n, dtype=np.int64)
    rows = max(1, _SCRATCH_BYTES // (8 * n))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        d = sq[r0:r1, None] + sq[None, :] - 2.0 * (x[r0:r1] @ x.T)
        d[np.arange(r1 - r0), np.arange(r0, r1)] = np.inf
        out[r0:r1] = d.argmin(axis=1)
    return out


def separation_index(features: np.ndarray, labels: np.ndarray) -> float:
    """SI: fraction of samples whose nearest other sample has the same label.

    Args:
        features: shape [n, d] (any trailing shape is flattened to d).
        labels: shape [n] integer class labels.
    """
    y = np.asarray(labels).reshape(-1)
    features = np.asarray(features)
    if len(y) != len(features):
        raise InputError(f"{len(features)} feature rows but {len(y)} labels")
    return float(np.mean(y[nearest_other(features)] == y))


def si_of_tensor_batches(
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    reduce: str = "mean",
    max_samples: int | None = 2000,
    seed: int = 0,
) -> float:
    """SI of one tensor's features over a stream of batches (e.g. a block's input or output).

    Args:
        batches: pairs (activations [N, C, ...] or [N, C], labels [N]).
        reduce: ``"mean"`` averages every axis after the channel axis (features [n, C]);
            ``"flatten"`` keeps every element (features [n, C*H*W]).
        max_samples: score a seeded random subset of this size when more samples arrive.
        seed: seed of that subset.
    """
    if reduce not in ("mean", "flatten"):
        raise InputError(f"unknown SI reduction {reduce!r}; use 'mean' or 'flatten'")
    feats, ys = [], []
    for act, lab in batches:
        if lab is None:
            raise InputError(_LABELS_MESSAGE)
        a = np.asarray(act)
        f = a.reshape(a.shape[0], a.shape[1], -1).mean(axis=2) if reduce == "mean" else a.reshape(a.shape[0], -1)
        feats.append(f.astype(np.float32, copy=False))
        ys.append(np.asarray(lab).reshape(-1))
    if not feats:
        raise InputError("no calibration batches to compute the separation index on")
    x, y = np.concatenate(feats), np.concatenate(ys)
    keep = _subsample(len(x), max_samples, seed)
    return separation_index(x[keep], y[keep])


def greedy_si_order(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    max_steps: int | None = None,
    dtype: type = np.float32,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy forward selection of features by Separation Index.

    Args:
        features: shape [n, C], one column per channel.
        labels: shape [n] integer labels.
        max_steps: stop after this many selections (default: all C).
        dtype: precision of the candidate evaluation (float32 default, float64 exact).
        threads: worker threads for candidate evaluation (default: available cores, max 8).

    Returns:
        order: shape [steps] channel indices in selection order.
        si_curve: shape [steps], SI of the chosen set after each step.
    """
    order, curve, _ = _greedy(features, labels, max_steps=max_steps, dtype=dtype, threads=threads)
    return order, curve


def _greedy(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    max_steps: int | None,
    dtype: type,
    threads: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`greedy_si_order` plus each channel's single-feature SI, shape [C]."""
    x = np.array(features, dtype=np.float64)  # a copy: it is centred in place below
    y = np.asarray(labels).reshape(-1)
    if x.ndim != 2:
        raise InputError(f"SI features must be [n, C], got shape {x.shape}")
    n, c = x.shape
    if len(y) != n:
        raise InputError(f"{n} feature rows but {len(y)} labels")
    if n < 2:
        raise InputError(f"the separation index needs at least 2 samples, got {n}")
    steps = c if max_steps is None else max(0, min(int(max_steps), c))
    threads = threads or _default_threads()

    x -= x.mean(axis=0)
    cols = np.ascontiguousarray(x.T)  # [C, n] float64, for exact updates
    cols_w = cols.astype(dtype)
    dist = np.zeros((n, n), dtype=np.float64)
    np.fill_diagonal(dist, np.inf)  # inf + anything stays inf: a sample never picks itself
    dist_w = dist.astype(dtype)

    remaining = list(range(c))
    order: list[int] = []
    curve: list[float] = []
    single = np.zeros(c, dtype=np.float64)
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        for step in range(steps):
            counts = _candidate_counts(dist_w, cols_w, y, remaining, pool, threads)
            if step == 0:
                single[remaining] = counts / n
            # Highest count, then best single-feature SI, then lowest index.
            best_pos = max(range(len(remaining)), key=lambda i: (counts[i], single[remaining[i]], -remaining[i]))
            best = remaining.pop(best_pos)
            order.append(best)
            curve.append(counts[best_pos] / n)
            if step + 1 < steps:
                diff = cols[best][:, None] - cols[best][None, :]
                dist += diff * diff
                dist_w = dist.astype(dtype)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)  # after a Ctrl-C, do not run the queued candidates
    if steps == 0:
        # Single-feature SI is still useful for ranking channels that were never selected.
        single = _counts_full(dist_w, cols_w, y, list(range(c))) / n
    return np.asarray(order, dtype=np.int64), np.asarray(curve, dtype=np.float64), single


def _default_threads() -> int:
    """Cores this process may use, capped at 8 (more were never measured)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cores)


def _candidate_counts(
    dist: np.ndarray,
    cols: np.ndarray,
    labels: np.ndarray,
    candidates: list[int],
    pool: ThreadPoolExecutor | None,
    threads: int,
) -> np.ndarray:
    """Same-label nearest-neighbour counts of the chosen set plus each candidate, shape [len(candidates)].

    Args:
        dist: [n, n] squared distances of the chosen set (diagonal inf), work dtype.
        cols: [C, n] centred features, work dtype.
        labels: [n].
    """
    n = dist.shape[0]
    shortlist = None
    # Adding a feature only increases distances, so once the chosen set spreads the samples
    # (any off-diagonal entry > 0) each sample's new nearest neighbour is almost always among
    # its _PRUNE_K current nearest; rows where that is not provable fall back to the full row.
    if n > _PRUNE_K + 1 and len(candidates) >= _PRUNE_MIN_CANDIDATES and np.any(dist[0, 1:] > 0):
        part = np.argpartition(dist, _PRUNE_K, axis=1)
        near = np.sort(part[:, :_PRUNE_K], axis=1)  # sorted: argmin ties go to the lowest index
        bound = np.take_along_axis(dist, part[:, _PRUNE_K : _PRUNE_K + 1], axis=1)[:, 0]
        shortlist = (near, bound, np.take_along_axis(dist, near, axis=1))

    def run(part: list[int]) -> np.ndarray:
        if shortlist is None:
            return _counts_full(dist, cols, labels, part)
        return _counts_shortlist(dist, cols, labels, part, *shortlist)

    if pool is None or len(candidates) < 2:
        return run(candidates)
    # numpy's elementwise kernels release the GIL, so threads split the candidates.
    parts = [candidates[i::threads] for i in range(threads) if candidates[i::threads]]
    out = np.empty(len(candidates), dtype=np.int64)
    for i, res in enumerate(pool.map(run, parts)):
        out[i::threads] = res
    return out


def _counts_full(dist: np.ndarray, cols: np.ndarray, labels: np.ndarray, candidates: list[int]) -> np.ndarray:
    """Exact counts scanning every n x n entry per candidate."""
    n = dist.shape[0]
    rows = max(1, min(n, _SCRATCH_BYTES // (dist.itemsize * n)))
    scratch = np.empty((rows, n), dtype=dist.dtype)
    out = np.zeros(len(candidates), dtype=np.int64)
    for k, ch in enumerate(candidates):
        f = cols[ch]
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            block = scratch[: r1 - r0]
            # In-place ops on a reused buffer: the step is memory-bound, so avoid temporaries.
            np.subtract(f[r0:r1, None], f[None, :], out=block)
            np.multiply(block, block, out=block)
            block += dist[r0:r1]
            out[k] += np.count_nonzero(labels[block.argmin(axis=1)] == labels[r0:r1])
    return out


def _counts_shortlist(
    dist: np.ndarray,
    cols: np.ndarray,
    labels: np.ndarray,
    candidates: list[int],
    near: np.ndarray,
    bound: np.ndarray,
    near_dist: np.ndarray,
) -> np.ndarray:
    """Exact counts searching each row's shortlist first.

    Args:
        near: [n, K] each row's K nearest samples under ``dist``, ascending index.
        bound: [n] the (K+1)-th smallest entry of each row: every sample off the shortlist
            is at least this far once the candidate's (non-negative) term is added.
        near_dist: [n, K] ``dist`` at ``near``.
    """
    n, k = near.shape
    step = max(1, _SCRATCH_BYTES // (dist.itemsize * n))
    batch = max(1, _SCRATCH_BYTES // (dist.itemsize * n * k))
    out = np.zeros(len(candidates), dtype=np.int64)
    for b0 in range(0, len(candidates), batch):
        chans = candidates[b0 : b0 + batch]
        f = cols[chans]  # [B, n]
        # Same float ops as _counts_full, so both paths give bit-identical distances.
        cand = f[:, :, None] - f[:, near]  # [B, n, K]
        np.multiply(cand, cand, out=cand)
        cand += near_dist
        pos = cand.argmin(axis=2)  # [B, n]
        nn = np.take_along_axis(near, pos.T, axis=1).T
        # Strictly below the bound: no off-list sample can be nearer or tie.
        best = np.take_along_axis(cand, pos[:, :, None], axis=2)[:, :, 0]
        unsure = best >= bound
        out[b0 : b0 + len(chans)] = np.count_nonzero(labels[nn] == labels, axis=1)
        # Gathering rows costs more than a contiguous scan once many rows are unsure.
        rescan = np.flatnonzero(unsure.sum(axis=1) > n // 8)
        if len(rescan):
            unsure[rescan] = False
            out[b0 + rescan] = _counts_full(dist, cols, labels, [chans[i] for i in rescan])
        unsure_b, unsure_r = np.nonzero(unsure)
        for u0 in range(0, len(unsure_r), step):
            ub, ur = unsure_b[u0 : u0 + step], unsure_r[u0 : u0 + step]
            full = f[ub, ur, None] - f[ub]
            np.multiply(full, full, out=full)
            full += dist[ur]
            fixed = full.argmin(axis=1)
            # Correct the counts for the rows whose neighbour changed.
            np.add.at(out, b0 + ub, (labels[fixed] == labels[ur]).astype(np.int64) - (labels[nn[ub, ur]] == labels[ur]))
    return out


def _subsample(n: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of size ``max_samples`` (all when n fits)."""
    if max_samples is None or n <= max_samples:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=int(max_samples), replace=False))


def _integer(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _positive_or_none(value: object, name: str) -> int | None:
    if value is None:
        return None
    if _integer(value, name) < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class SIAccumulator(Accumulator):
    """Keeps each image's spatial mean per channel ([N, C]) and its label ([N])."""

    def __init__(self, channels: int, **options) -> None:
        self.channels = channels
        # The generic "seed" / "threads" options apply unless the si_ ones are given.
        self.max_samples = _positive_or_none(options.get("si_max_samples", 2000), "si_max_samples")
        self.seed = _integer(options.get("si_seed", options.get("seed", 0)), "si_seed")
        self.max_steps = _positive_or_none(options.get("si_max_steps"), "si_max_steps")
        self.threads = _positive_or_none(options.get("si_threads", options.get("threads")), "si_threads")
        self._features: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self.order: np.ndarray | None = None
        self.si_curve: np.ndarray | None = None

    def _options(self) -> dict:
        return {
            "si_max_samples": self.max_samples,
            "si_seed": self.seed,
            "si_max_steps": self.max_steps,
            "si_threads": self.threads,
        }

    def update(self, activations: np.ndarray, labels: np.ndarray | None = None) -> None:
        if labels is None:
            raise InputError(_LABELS_MESSAGE)
        a = np.asarray(activations)
        if a.ndim < 2 or a.shape[1] != self.channels:
            raise InputError(f"expected activations [N, {self.channels}, ...], got shape {a.shape}")
        y = np.asarray(labels).reshape(-1)
        if len(y) != a.shape[0]:
            raise InputError(f"batch of {a.shape[0]} activations but {len(y)} labels")
        self._features.append(a.reshape(a.shape[0], self.channels, -1).mean(axis=2, dtype=np.float64))
        self._labels.append(y.astype(np.int64))

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._features:
            return np.zeros((0, self.channels)), np.zeros(0, dtype=np.int64)
        if len(self._features) > 1:
            self._features = [np.concatenate(self._features)]
            self._labels = [np.concatenate(self._labels)]
        return self._features[0], self._labels[0]

    def features(self) -> tuple[np.ndarray, np.ndarray]:
        """(each image's spatial mean per channel [n, C] float64, its label [n]) as accumulated."""
        return self._arrays()

    def merge(self, other: Accumulator) -> None:
        if not isinstance(other, SIAccumulator) or other.channels != self.channels:
            raise InputError("can only merge si accumulators with the same channel count")
        feats, labels = other._arrays()
        self._features.append(feats)
        self._labels.append(labels)

    def state(self) -> dict[str, np.ndarray]:
        feats, labels = self._arrays()
        return {"features": feats.copy(), "labels": labels.copy()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], **options) -> "SIAccumulator":
        feats = np.asarray(state["features"], dtype=np.float64)
        acc = cls(feats.shape[1], **options)
        acc._features = [feats]
        acc._labels = [np.asarray(state["labels"], dtype=np.int64).reshape(-1)]
        return acc

    def scores(self) -> np.ndarray:
        """C - rank for the selected channels (first selected = C); never-selected channels
        (only with ``si_max_steps``) get their single-feature SI, in [0, 1], below all of them."""
        feats, labels = self._arrays()
        if len(feats) < 2:
            raise InputError(f"the si criterion needs at least 2 labelled images, got {len(feats)}")
        keep = _subsample(len(feats), self.max_samples, self.seed)
        order, curve, single = _greedy(
            feats[keep], labels[keep], max_steps=self.max_steps, dtype=np.float32, threads=self.threads
        )
        self.order, self.si_curve = order, curve
        scores = single.astype(np.float64).copy()
        scores[order] = self.channels - np.arange(len(order), dtype=np.float64)
        return scores


@register
class SeparationIndex(Criterion):
    """``si``: channels ranked by greedy Separation Index forward selection.

    Options: ``si_max_samples`` (2000), ``si_seed`` (0), ``si_max_steps`` (all), ``si_threads``.
    """

    name = "si"
    needs_data = True
    min_samples = 2
    needs_labels = True

    def new_accumulator(self, member: MemberInfo) -> SIAccumulator:
        return SIAccumulator(member.channels, **self.options)
