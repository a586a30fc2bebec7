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
        round_to: round each group's kept count up to a multiple of this.
        exclude: group ids left untouched.
    """

    percentile: float = 40.0
    scope: str = "per-group"
    min_channels: int = 1
    round_to: int = 1
    exclude: set[int] = field(default_factory=set)

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
    return np.sort(_order(np.asarray(scores, dtype=np.float64), group.removable())[:count])


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
