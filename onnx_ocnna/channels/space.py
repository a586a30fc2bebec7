"""Channel elements, their equivalence classes, and tensor layouts.

Every channel that some operator creates (a Conv's output channel, a zero channel a Pad
inserts, a graph input channel) is an *element*, an integer id. A tensor's channel axis is
described by a :class:`Layout`: the element id at each position of that axis. Operators
that tie channels together (a residual Add, a squeeze-excite Mul, a grouped Conv) unite
elements into equivalence classes with a union-find; a class is removed as a whole.

Keeping the ids explicit per position makes Concat offsets, Split sizes, Slice ranges and
the spatial expansion of Flatten->Gemm plain array operations (concatenate, slice,
repeat), which is where index bookkeeping usually goes wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Owner:
    """Who created an element.

    Attributes:
        kind: "producer" (a Conv's output channel), "pad" (inserted by Pad on the channel
            axis), "input" (a graph input channel) or "opaque" (an operator whose channels
            the analysis does not track).
        node: name of the node that created it.
        index: position among the node's created channels.
    """

    kind: str
    node: str
    index: int


@dataclass
class Layout:
    """The channel axis of one tensor.

    Attributes:
        axis: the axis (non-negative) that carries channels.
        rank: the tensor's rank.
        ids: element id at each position of that axis, shape [size of the axis].
    """

    axis: int
    rank: int
    ids: np.ndarray

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])


class ChannelSpace:
    """Union-find over channel elements, with a freeze reason per class."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self.owners: list[Owner] = []
        self._frozen: dict[int, str] = {}
        # The root of every element, computed once the classes stop changing (the analysis asks
        # for roots only after its handlers ran, the surgery once per edit); reset by new/union.
        self._root_cache: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._parent)

    def new(self, count: int, kind: str, node: str) -> np.ndarray:
        """Create ``count`` fresh elements; returns their ids, shape [count]."""
        start = len(self._parent)
        self._root_cache = None
        self._parent.extend(range(start, start + count))
        self.owners.extend(Owner(kind, node, i) for i in range(count))
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, element: int) -> int:
        parent = self._parent
        root = element
        while parent[root] != root:
            root = parent[root]
        while parent[element] != root:  # path compression
            parent[element], element = root, parent[element]
        return root

    def roots(self, ids: np.ndarray) -> np.ndarray:
        """Class representative of each id, same shape as ``ids``."""
        if self._root_cache is None:
            self._root_cache = np.fromiter((self.find(i) for i in range(len(self._parent))), dtype=np.int64,
                                           count=len(self._parent))
        return self._root_cache[np.asarray(ids, dtype=np.int64)]

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie a[i] to b[i] for every i; both shape [n]."""
        self._root_cache = None
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx == ry:
                continue
            # Keep the older root so class order stays stable; carry a freeze reason over.
            if ry < rx:
                rx, ry = ry, rx
            self._parent[ry] = rx
            if ry in self._frozen and rx not in self._frozen:
                self._frozen[rx] = self._frozen[ry]
            self._frozen.pop(ry, None)

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        """Mark the classes of ``ids`` unprunable; the first reason given is kept."""
        for element in np.unique(ids).tolist():
            self._frozen.setdefault(self.find(element), reason)

    def frozen_reason(self, element: int) -> str | None:
        return self._frozen.get(self.find(element))
