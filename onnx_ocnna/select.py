"""Selection (SPEC section 4): which channels of each group go, given their scores."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from onnx_ocnna.channels.analysis import ChannelAnalysis
from onnx_ocnna.collect import mean_scale
from onnx_ocnna.errors import InputError


@dataclass
class SelectionOptions:
    """Attributes:
        percentile: k in [0, 100): share of each group's channels to remove.
        scope: "per-group" (k in every group) or "global" (one threshold over all groups).
        min_channels: never keep fewer channels than this in a group.
        round_to: round the kept count of every tensor a group feeds (each member's output
            and the whole group) up to a multiple of this; see :func:`ort_block_size`.
        exclude: group ids left untouched.
    """

    percentile: float = 40.0
    scope: str = "per-group"
    min_channels: int = 1
    round_to: int | str = 1
    exclude: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.round_to = resolve_round_to(self.round_to)

    def validate(self) -> None:
        if not 0 <= self.percentile < 100:
            raise InputError(f"--percentile must be in [0, 100), got {self.percentile:g}")
        if self.scope not in ("per-group", "global"):
            raise InputError(f"--scope must be per-group or global, got {self.scope!r}")
        if self.min_channels < 1:
            raise InputError(f"--min-channels must be at least 1, got {self.min_channels}")
        if self.round_to < 1:
            raise InputError(f"--round-to must be at least 1, got {self.round_to}")


def _order(scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Candidates from least to most important; ties broken by channel index (lower first)."""
    values = np.nan_to_num(scores[candidates], nan=-np.inf)
    return candidates[np.lexsort((candidates, values))]


def _kept_floor(channels: int, options: SelectionOptions) -> int:
    return min(channels, options.min_channels)


def _round_kept(kept: int, channels: int, round_to: int) -> int:
    return min(channels, int(math.ceil(kept / round_to) * round_to))


def ort_block_size() -> int:
    """Channel block of ONNX Runtime's NCHWc convolutions on this CPU (16 with AVX-512, else 8).

    ORT pads a Conv's output channels up to this block and runs a Conv whose input channel count
    is at least one block but not a multiple of it outside the blocked kernels, with layout
    reorders around it: on a 2-core AVX-512 machine a ResNet-56 with every block-internal Conv
    cut from 16/32/64 to 8/16/32 ran 1.33x faster, cut to 9/17/34 1.02x (docs/benchmarks.md).
    """
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy moved its private CPU table: assume the common AVX2 block
        return 8
    return 16 if features.get("AVX512F") else 8


def resolve_round_to(value: int | str) -> int:
    """``"auto"`` -> :func:`ort_block_size`; a positive int is returned as is."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return ort_block_size()
        try:
            value = int(value)
        except ValueError:
            raise InputError(f"--round-to must be a positive integer or 'auto', got {value!r}") from None
    return int(value)


def select(analysis: ChannelAnalysis, scores: dict[int, np.ndarray], options: SelectionOptions) -> dict[int, np.ndarray]:
    """Group id -> sorted group channel indices to remove.

    Args:
        scores: group id -> importance per group channel, [channels]; higher = more important.
    """
    options.validate()
    removed: dict[int, np.ndarray] = {}
    active = [g for g in analysis.groups if g.prunable and g.id not in options.exclude and g.id in scores]
    if options.scope == "per-group":
        for group in active:
            want = math.floor(options.percentile * group.channels / 100)
            removed[group.id] = _take(group, scores[group.id], want, options)
    else:
        # One ranking over every group's removable channels on a common scale (each group's
        # scores divided by their mean); ties go to the lower group id, then channel index.
        values, owners, channels = [], [], []
        for group in active:
            s = np.asarray(scores[group.id], dtype=np.float64)
            scale = mean_scale(s)
            candidates = group.removable()
            values.append(np.nan_to_num(s[candidates] / scale, nan=-np.inf))
            owners.append(np.full(len(candidates), group.id))
            channels.append(candidates)
        count = math.floor(options.percentile * sum(g.channels for g in active) / 100)
        if values and count:
            value, owner, channel = (np.concatenate(v) for v in (values, owners, channels))
            first = np.lexsort((channel, owner, value))[:count]
            wanted = {gid: int(n) for gid, n in zip(*np.unique(owner[first], return_counts=True))}
        else:
            wanted = {}
        for group in active:
            removed[group.id] = _take(group, scores[group.id], wanted.get(group.id, 0), options)
    _respect_nonempty(analysis, removed, scores)
    return {gid: idx for gid, idx in removed.items() if idx.size}


def _take(group, scores: np.ndarray, want: int, options: SelectionOptions) -> np.ndarray:
    kept = group.channels - want
    kept = max(kept, _kept_floor(group.channels, options))
    kept = _round_kept(kept, group.channels, options.round_to)
    count = min(group.channels - kept, len(group.removable()))
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    removed = np.sort(_order(scores, group.removable())[:count])
    return _round_members(group, scores, removed, options.round_to)


def _round_members(group, scores: np.ndarray, removed: np.ndarray, round_to: int) -> np.ndarray:
    """Give back removed channels until every member tensor keeps a multiple of ``round_to``.

    A coupled group's members can carry different subsets of its channels (the CIFAR ResNets'
    Pad shortcuts put a 16-channel stage inside the 32- and 64-channel ones), so rounding the
    group's total leaves odd counts in the smaller tensors. Subsets are visited smallest first
    and each takes back its best removed channels that lie in the fewest other subsets, which
    settles nested subsets in one pass; the loop repeats until nothing changes (it only ever
    gives channels back, so it ends, at worst with the whole group).
    """
    if round_to == 1 or removed.size == 0:
        return removed
    subsets = {frozenset(range(group.channels))}
    subsets.update(frozenset(np.unique(idx).tolist()) for idx in group.member_channels.values())
    ordered = sorted(subsets, key=lambda s: (len(s), sorted(s)))
    membership = {c: sum(c in s for s in ordered) for c in range(group.channels)}
    value = np.nan_to_num(scores, nan=-np.inf)
    gone = set(removed.tolist())
    changed = True
    while changed:
        changed = False
        for subset in ordered:
            missing = [c for c in subset if c in gone]
            kept = len(subset) - len(missing)
            need = _round_kept(kept, len(subset), round_to) - kept
            if need > 0:
                missing.sort(key=lambda c: (membership[c], -value[c], -c))
                gone.difference_update(missing[:need])
                changed = True
    return np.array(sorted(gone), dtype=np.int64)


def _respect_nonempty(analysis: ChannelAnalysis, removed: dict[int, np.ndarray], scores: dict[int, np.ndarray]) -> None:
    """Give back the best removed channel of any Split/Slice piece the selection would empty."""
    space = analysis.context.space
    root_to_channel = {int(r): (g.id, c) for g in analysis.groups for c, r in enumerate(g.roots)}
    for ids, _ in analysis.context.nonempty:
        keep = analysis.keep_fn(removed)
        if ids.size == 0 or keep(ids).any():
            continue
        candidates = [root_to_channel[space.find(int(i))] for i in ids if space.find(int(i)) in root_to_channel]
        if not candidates:
            continue
        gid, channel = max(candidates, key=lambda gc: (np.nan_to_num(scores[gc[0]][gc[1]], nan=-np.inf), -gc[1]))
        removed[gid] = removed[gid][removed[gid] != channel]
