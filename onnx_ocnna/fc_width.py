"""The Separation Index paper's fully connected design (SPEC section 3): each hidden Gemm/MatMul
layer keeps the smallest prefix of its neurons' greedy CSI order whose centre-based Separation
Index reaches (1 - tolerance) of the whole layer's.

CSI(X, y) is the fraction of samples whose nearest class centre (the mean of that class's
features, Euclidean) is their own class's. Squared distances to the centres are additive over
features, so the greedy forward selection keeps the [n, K] matrix of the chosen set's squared
distances and scores every candidate neuron by adding its own [n, K] term: O(C n K) per step.

Conventions (the project's choices, as for ``si``): features are the layer's measured tensor
(after its bias, BatchNormalization and activation), raw; ties between candidates with the
same CSI go to the best single-neuron CSI, then to the lowest index; a sample equidistant from
two centres goes to the lower class index (``argmin``); more than ``max_samples`` samples are
scored on a seeded subset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from onnx_ocnna.errors import InputError

# Candidate terms [chunk, n, K] in float64 up to this many bytes at a time.
_SCRATCH_BYTES = 64 << 20
# The full layer's CSI is met within float rounding of the distance sums.
_ROUNDING = 1e-12


def class_centres(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centres [K, d], the class index of each sample [n]) for the classes present in ``labels``."""
    classes, index = np.unique(np.asarray(labels).reshape(-1), return_inverse=True)
    x = np.asarray(features, dtype=np.float64).reshape(len(index), -1)
    centres = np.zeros((len(classes), x.shape[1]))
    np.add.at(centres, index, x)
    return centres / np.bincount(index, minlength=len(classes))[:, None], index


def csi(features: np.ndarray, labels: np.ndarray) -> float:
    """Centre-based Separation Index of ``features`` [n, d] with ``labels`` [n]."""
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    if len(x) != len(np.asarray(labels).reshape(-1)):
        raise InputError(f"{len(x)} feature rows but {np.asarray(labels).size} labels")
    if len(x) == 0:
        raise InputError("the centre-based separation index needs samples")
    centres, index = class_centres(x, labels)
    distances = ((x[:, None, :] - centres[None]) ** 2).sum(axis=2)  # [n, K]
    return float(np.mean(distances.argmin(axis=1) == index))


def greedy_csi_order(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy forward selection of neurons by CSI.

    Args:
        features: [n, C], one column per neuron; labels: [n].
    Returns:
        (order [C]: neuron indices in selection order, curve [C]: CSI of the chosen set after
        each step; the last entry is the CSI of all C neurons).
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise InputError(f"CSI features must be [n, C], got shape {x.shape}")
    n, c = x.shape
    if n < 2:
        raise InputError(f"the centre-based separation index needs at least 2 samples, got {n}")
    centres, index = class_centres(x, labels)
    k = len(centres)
    chosen = np.zeros((n, k))  # squared distances of the chosen set to every centre
    remaining = np.arange(c)
    order, curve = [], []
    single = None
    chunk = max(1, _SCRATCH_BYTES // (8 * n * k))
    for _ in range(c):
        hits = np.empty(len(remaining), dtype=np.int64)
        for lo in range(0, len(remaining), chunk):
            part = remaining[lo:lo + chunk]
            # [chunk, n, K]: the chosen set's distances plus each candidate's own term.
            trial = chosen[None] + (x[:, part].T[:, :, None] - centres[:, part].T[:, None, :]) ** 2
            hits[lo:lo + chunk] = np.count_nonzero(trial.argmin(axis=2) == index[None], axis=1)
        if single is None:
            single = np.zeros(c)
            single[remaining] = hits / n
        best = max(range(len(remaining)), key=lambda i: (hits[i], single[remaining[i]], -remaining[i]))
        neuron = int(remaining[best])
        order.append(neuron)
        curve.append(hits[best] / n)
        chosen += (x[:, neuron][:, None] - centres[:, neuron][None, :]) ** 2
        remaining = np.delete(remaining, best)
    return np.asarray(order, dtype=np.int64), np.asarray(curve, dtype=np.float64)


def csi_width(curve: np.ndarray, tolerance: float) -> int:
    """The smallest prefix length whose CSI reaches (1 - ``tolerance``) x the full layer's
    (``curve[-1]``, the CSI of every neuron)."""
    if not 0 <= tolerance < 1:
        raise InputError(f"--csi-tolerance must be in [0, 1), got {tolerance:g}")
    goal = (1 - tolerance) * curve[-1] - _ROUNDING
    return int(np.flatnonzero(curve >= goal)[0]) + 1


@dataclass
class LayerWidth:
    """One hidden FC layer sized by CSI.

    Attributes:
        group: the channel group id; layer: its (first) Gemm/MatMul; measured: the tensor read.
        channels: neurons before; kept: neurons after (frozen ones included).
        csi_full: CSI of all neurons; csi_kept: of the kept prefix.
        order: neurons in greedy order; curve: CSI after each step, [channels] each.
    """

    group: int
    layer: str
    measured: str
    channels: int
    kept: int
    csi_full: float
    csi_kept: float
    tolerance: float
    samples: int
    order: list[int] = field(default_factory=list)
    curve: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def fc_groups(analysis) -> list:
    """The prunable groups whose every member is a Gemm or MatMul (hidden FC layers)."""
    from onnx_ocnna.channels.ops_linear import LINEAR_OPS

    nodes = {n.name: n.op for n in analysis.graph.nodes}
    return [g for g in analysis.groups if g.prunable and all(nodes[m] in LINEAR_OPS for m in g.members)]


def csi_widths(pruner, batches, *, tolerance: float = 0.01, max_samples: int | None = 2000, seed: int = 0,
               exclude: set[int] | None = None, progress: bool = True) -> tuple[dict[int, np.ndarray], list[LayerWidth]]:
    """Size every hidden FC layer of ``pruner``'s model by CSI on labelled ``batches``.

    Returns:
        (group id -> group channel indices to remove, sorted; one :class:`LayerWidth` per layer).
    """
    from onnx_ocnna.collect import collect
    from onnx_ocnna.criteria import get_criterion
    from onnx_ocnna.criteria.si import SIAccumulator, _subsample

    analysis = pruner.analysis
    groups = [g for g in fc_groups(analysis) if g.id not in (exclude or set())]
    if not groups:
        return {}, []
    # The spatial mean of a [N, C] tensor is the tensor itself: the si accumulator keeps it.
    accumulators = {g.members[0]: SIAccumulator(g.channels, si_max_samples=None) for g in groups}
    collect(pruner.prepared_model(), analysis, get_criterion("si"), accumulators, batches, progress=progress)
    removed, rows = {}, []
    for group in groups:
        anchor = group.members[0]
        features, labels = accumulators[anchor].features()
        keep = _subsample(len(features), max_samples, seed)
        features, labels = features[keep], labels[keep]
        if len(np.unique(labels)) < 2:
            raise InputError("--fc-width csi needs calibration samples of at least two classes")
        order, curve = greedy_csi_order(features, labels)
        width = csi_width(curve, tolerance)
        dropped = group.member_channels[anchor][order[width:]]
        dropped = np.array(sorted(set(dropped.tolist()) & set(group.removable().tolist())), dtype=np.int64)
        if dropped.size:
            removed[group.id] = dropped
        rows.append(LayerWidth(group.id, anchor, group.measured[anchor], group.channels, group.channels - len(dropped),
                               float(curve[-1]), float(curve[width - 1]), tolerance, len(features),
                               order.tolist(), curve.tolist()))
    return removed, rows
