"""OCNNA importance (SPEC section 2): PCA energy of each feature map, then its steadiness.

For one image and filter, the H x W map is treated as H samples (rows) of W features
(columns); after centring the columns, F is the Frobenius norm of the PCA scores on the
fewest components that reach ``pca_variance`` of the variance. Over the calibration
images F is kept as streaming moments, and the score is mean(F) / std(F).

How F is computed, exactly and fast:

* Centring over rows is a projection onto the complement of the all-ones vector. With the
  Householder reflector that maps the ones vector onto e1, the centred map's Gram matrix
  equals Y^T Y for ``Y = D - colsum(D) / (H + sqrt(H))``, ``D = O[1:] - O[0]``, an
  (H-1) x W matrix whose constant columns are exact zeros (a constant map gives F = 0,
  not rounding noise). The eigenproblem is the smaller Gram matrix, Y Y^T or Y^T Y.
* tau = 1 keeps every component, so F^2 = ||O - column means||_F^2 and no eigenvalues
  are needed. By default ONNX Runtime reduces each map to two means of its column moments
  inside the scoring graph (:mod:`onnx_ocnna.reductions`,
  :func:`energy_from_column_moments`), which spares returning the maps; with
  ``in_graph=False`` the maps come back and NumPy reads them twice (:func:`_centred_energy`).
* tau < 1 needs the eigenvalues of every map's Gram matrix. They come from batched
  LAPACK calls in float32 (PyTorch's MKL when installed, else NumPy), after scaling each
  Gram matrix to unit trace; the relative error of F against float64 stays near 1e-6
  (tools/bench_ocnna_stats.py measures it). This step costs far more than everything
  else: a LAPACK call per map, some microseconds each.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from onnx_ocnna.criteria import register
from onnx_ocnna.criteria.base import Accumulator, Criterion, MemberInfo
from onnx_ocnna.criteria.stats import RunningMoments
from onnx_ocnna.errors import InputError
from onnx_ocnna.reductions import ColumnMoments

DEFAULT_PCA_VARIANCE = 1.0
# A coefficient of variation below this is under the resolution of F computed in float32
# (and absorbs the float64 rounding of merged batch means), so F counts as constant.
_CONSTANT_RTOL = 1e-6
# Matrices per LAPACK call; large enough to amortise the call, small enough for cache.
_EIG_CHUNK = 4096
# _centred_energy keeps its two-pass result only where variance >= this * raw energy.
_FAST_MIN_RATIO = 0.1
# energy_from_column_moments: a map whose variance is under this many (H + W)-ulps of its mean
# square (float32) has constant columns up to rounding.
_COLUMN_CONSTANT_ULPS = 2
# Maps per chunk of _centred_energy: about this many bytes, so a chunk stays in L2 cache.
_CHUNK_BYTES = 1 << 18

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def ocnna_frobenius(
    maps: np.ndarray,
    pca_variance: float = DEFAULT_PCA_VARIANCE,
    *,
    dtype: type = np.float32,
    threads: int = 1,
    backend: str = "auto",
) -> np.ndarray:
    """F for every image and channel.

    Args:
        maps: shape [N, C, H, W]; [N, C] or [N, C, 1, 1] are 1x1 maps (F = |o|); [N, C, L]
            is read as L x 1 (L samples of one feature). A 1 x W map (one sample) is read
            as W x 1, since one sample has no variance to analyse.
        pca_variance: tau in (0, 1]; the fewest components with cumulative s^2 >= tau *
            total are kept.
        dtype: working precision, np.float32 (fast, relative error about 1e-6) or
            np.float64.
        threads: worker threads for the eigenvalue step (tau < 1 only).
        backend: eigenvalue solver, "torch", "numpy" or "auto" (torch when installed).

    Returns:
        shape [N, C], float64.
    """
    tau = check_pca_variance(pca_variance)
    if backend not in ("auto", "torch", "numpy"):
        raise InputError(f"unknown eigenvalue backend {backend!r}; choose auto, torch or numpy")
    maps = np.asarray(maps)
    if maps.ndim == 2:
        return np.abs(maps).astype(np.float64)
    if maps.ndim == 3:
        maps = maps[..., None]
    if maps.ndim != 4:
        raise InputError(f"expected activations of shape [N, C, H, W] or [N, C], got {list(maps.shape)}")
    n, c, h, w = maps.shape
    if h == 1 and w == 1:
        return np.abs(maps[:, :, 0, 0]).astype(np.float64)
    if h == 1:
        maps, h, w = maps.transpose(0, 1, 3, 2), w, h
    o = maps.reshape(n * c, h, w).astype(dtype, copy=False)
    if tau >= 1.0:
        f2 = _centred_energy(o)
    else:
        f2 = _top_energy(_centred_rows(o), tau, threads, backend)
    return np.sqrt(f2).reshape(n, c)


def check_pca_variance(value: float) -> float:
    """Validate tau; raises InputError outside (0, 1]."""
    try:
        tau = float(value)
    except (TypeError, ValueError):
        raise InputError(f"pca_variance must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < tau <= 1.0:
        raise InputError(f"pca_variance must be in (0, 1], got {value!r}")
    return tau


def _centred_rows(o: np.ndarray) -> np.ndarray:
    """Coordinates of the column-centred maps in an orthonormal basis of 1-perp.

    Args:
        o: shape [B, H, W].

    Returns:
        Y, shape [B, H-1, W], with Y^T Y = Oc^T Oc (Oc = o minus its column means).
    """
    h = o.shape[1]
    # Subtracting the first row first is exact for constant columns and removes most of
    # the mean before any rounding; centring is invariant to that shift.
    d = o[:, 1:] - o[:, :1]
    # A ones-vector product is a BLAS call, several times faster than sum(axis=1) here.
    colsum = np.ones((1, h - 1), dtype=d.dtype) @ d
    d -= colsum / d.dtype.type(h + math.sqrt(h))
    return d


def _centred_energy(o: np.ndarray) -> np.ndarray:
    """||o - column means||_F^2 of each map in [B, H, W], shape [B] float64.

    Reads the maps without writing a copy: sum of squares minus the squared column sums over
    H, chunk by chunk so that the second read of a chunk hits the cache (ResNet-56's 55 ReLU
    outputs: 0.39 against 0.49 ms per image unchunked). That loses precision where the mean
    dominates the variance (constant columns, large offsets), so those maps, usually about
    1 %, are recomputed centred.
    """
    b, h, w = o.shape
    total = np.empty(b, dtype=o.dtype)
    squared_colsums = np.empty(b, dtype=o.dtype)
    ones = np.ones((1, h), dtype=o.dtype)
    step = max(1, _CHUNK_BYTES // max(1, h * w * o.itemsize))
    for start in range(0, b, step):
        chunk = o[start:start + step]
        flat = chunk.reshape(len(chunk), -1)
        total[start:start + step] = np.einsum("ij,ij->i", flat, flat)
        # A ones-vector product is a BLAS call, several times faster than sum(axis=1) here.
        colsum = (ones @ chunk)[:, 0]
        squared_colsums[start:start + step] = np.einsum("ij,ij->i", colsum, colsum)
    f2 = (total - squared_colsums / o.dtype.type(h)).astype(np.float64)
    # Keep the fast value where the variance is at least a tenth of the raw energy
    # (float32 error below 1e-6 there); NaN fails the test and propagates.
    redo = ~(f2 >= _FAST_MIN_RATIO * total)
    redo &= total != 0
    f2[total == 0] = 0.0
    if redo.any():
        y = _centred_rows(o[redo])
        f2[redo] = np.einsum("bij,bij->b", y, y)
    return f2


def energy_from_column_moments(mean_square: np.ndarray, mean_squared_column_mean: np.ndarray,
                               height: int, width: int) -> np.ndarray:
    """||o - column means||_F^2 of each map from its column moments, shape [N, C] float64.

    Args:
        mean_square: each map's mean square, float32, shape [N, C, 1, 1].
        mean_squared_column_mean: the mean over its W columns of each column's squared mean
            over the H rows, shape [N, C, 1, 1] (:class:`onnx_ocnna.reductions.ColumnMoments`).
        height, width: H and W.

    The energy is H * W * (mean square - mean squared column mean). The two float32 inputs
    carry their own rounding: where every column is constant they differ by less than H + W
    units of 2^-24 relative (measured: at most 0.7 (H + W), H and W from 1 to 224), so a map
    whose difference is under twice that counts as column-constant and gives exactly F = 0, as
    on the maps path, and not rounding noise that would look like a steady filter. Elsewhere
    the relative error of the energy is about (H + W) * 2^-24 * mean square / energy per pixel.
    Measured on the four CIFAR ResNets of ../shared/data (1,024 images, against float64 maps,
    tools/bench_in_graph_precision.py): see the README.
    """
    q = np.asarray(mean_square, dtype=np.float64)[:, :, 0, 0]
    m = np.asarray(mean_squared_column_mean, dtype=np.float64)[:, :, 0, 0]
    difference = q - m
    difference[difference <= _COLUMN_CONSTANT_ULPS * (height + width) * np.finfo(np.float32).epsneg * q] = 0.0
    return height * width * difference


def _top_energy(y: np.ndarray, tau: float, threads: int, backend: str) -> np.ndarray:
    """Sum of the top-q squared singular values of each Y [B, r, w], shape [B] float64."""
    b, r, w = y.shape
    if min(r, w) % 2:
        # MKL's float32 eigensolver gives batch-position-dependent bits for odd sizes
        # (alignment); a zero row or column adds one exact zero eigenvalue and makes F
        # reproducible whatever the batch split.
        pad = ((0, 0), (0, 1), (0, 0)) if r <= w else ((0, 0), (0, 0), (0, 1))
        y = np.pad(y, pad)
    gram = y @ y.transpose(0, 2, 1) if r <= w else y.transpose(0, 2, 1) @ y
    total = np.trace(gram, axis1=1, axis2=2).astype(np.float64)
    out = np.where(np.isfinite(total), 0.0, np.nan)
    live = np.flatnonzero(total > 0)
    if live.size == 0:
        return out
    if live.size < b:
        gram, total = gram[live], total[live]
    # Unit trace keeps every Gram matrix in the same range (no denormals in LAPACK).
    gram /= total.astype(gram.dtype)[:, None, None]
    lam = np.clip(_eigvalsh(gram, threads, backend)[:, ::-1].astype(np.float64), 0.0, None)
    cum = np.cumsum(lam, axis=1)
    q = np.minimum((cum < tau * cum[:, -1:]).sum(axis=1), cum.shape[1] - 1)
    out[live] = cum[np.arange(cum.shape[0]), q] / cum[:, -1] * total
    return out


def _eigvalsh(gram: np.ndarray, threads: int, backend: str) -> np.ndarray:
    """Ascending eigenvalues of a stack of symmetric matrices [B, k, k] -> [B, k]."""
    solve = _eig_numpy if backend == "numpy" or (backend == "auto" and not _have_torch()) else _eig_torch
    pieces = min(max(threads, -(-gram.shape[0] // _EIG_CHUNK)), gram.shape[0])
    chunks = np.array_split(gram, pieces) if pieces > 1 else [gram]
    if threads <= 1 or len(chunks) == 1:
        return np.concatenate([solve(chunk) for chunk in chunks])
    return np.concatenate(list(_worker_pool().map(solve, chunks)))


def _have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _eig_numpy(gram: np.ndarray) -> np.ndarray:
    return np.linalg.eigvalsh(gram)


def _eig_torch(gram: np.ndarray) -> np.ndarray:
    import torch

    try:
        return torch.linalg.eigvalsh(torch.from_numpy(gram)).numpy()
    except RuntimeError:
        # MKL's float32 QL iteration rarely fails to converge on nearly reducible
        # matrices; float64 does not.
        return np.linalg.eigvalsh(gram.astype(np.float64))


def _worker_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ocnna-eig")
        return _pool


class OCNNAAccumulator(Accumulator):
    """Streaming moments of F per channel; scores = mean/std (or the inverted ranking).

    ``in_graph``: at tau = 1, let ONNX Runtime reduce each map to its column moments inside
    the scoring graph (:func:`energy_from_column_moments`) instead of returning it.
    """

    def __init__(self, channels: int, pca_variance: float = DEFAULT_PCA_VARIANCE, invert: bool = False,
                 threads: int = 1, in_graph: bool = True):
        self.channels = int(channels)
        self.pca_variance = check_pca_variance(pca_variance)
        self.invert = bool(invert)
        self.threads = int(threads)
        self.in_graph = bool(in_graph)
        self.moments = RunningMoments(self.channels)

    def update(self, activations: np.ndarray, labels: np.ndarray | None = None) -> None:
        activations = np.asarray(activations)
        if activations.ndim < 2 or activations.shape[1] != self.channels:
            raise InputError(
                f"expected activations with {self.channels} channels on axis 1, got shape {list(activations.shape)}"
            )
        self._add(ocnna_frobenius(activations, self.pca_variance, threads=self.threads))

    def reduction(self, shape: list) -> ColumnMoments | None:
        # Only the tau = 1 energy is a function of column moments; an H = 1 map is read as
        # W x 1 (see ocnna_frobenius), which this reduction does not cover.
        if not self.in_graph or self.pca_variance < 1.0 or len(shape) != 4:
            return None
        _, channels, height, width = shape
        if channels != self.channels or not isinstance(height, int) or not isinstance(width, int) or height < 2:
            return None
        return ColumnMoments(channels, height, width)

    def update_reduced(self, reduction: ColumnMoments, reduced: list[np.ndarray],
                       labels: np.ndarray | None = None) -> None:
        mean_square, squared_mean = (np.asarray(r) for r in reduced)
        if mean_square.shape[1:] != (self.channels, 1, 1) or squared_mean.shape != mean_square.shape:
            raise InputError(f"expected column moments of shape [N, {self.channels}, 1, 1], got "
                             f"{list(mean_square.shape)} and {list(squared_mean.shape)}")
        self._add(np.sqrt(energy_from_column_moments(mean_square, squared_mean, reduction.height, reduction.width)))

    def _add(self, f: np.ndarray) -> None:
        if not np.isfinite(f).all():
            raise InputError("the activations contain NaN or infinite values")
        self.moments.update(f)

    def merge(self, other: Accumulator) -> None:
        if not isinstance(other, OCNNAAccumulator) or other.pca_variance != self.pca_variance:
            raise InputError("can only merge ocnna statistics computed with the same pca_variance")
        self.moments.merge(other.moments)

    def state(self) -> dict[str, np.ndarray]:
        return {**self.moments.state(), "pca_variance": np.asarray(self.pca_variance)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], **options) -> "OCNNAAccumulator":
        moments = RunningMoments.from_state(state)
        saved = float(state["pca_variance"])
        if "pca_variance" in options and check_pca_variance(options["pca_variance"]) != saved:
            raise InputError(f"saved ocnna statistics used pca_variance={saved}, not {options['pca_variance']}")
        options = {**options, "pca_variance": saved}
        acc = cls(moments.channels,
                  **{k: options[k] for k in ("pca_variance", "invert", "threads", "in_graph") if k in options})
        acc.moments = moments
        return acc

    def scores(self) -> np.ndarray:
        if self.moments.count == 0:
            raise InputError("no calibration images reached this layer, so it cannot be scored")
        return snr_scores(self.moments.mean, self.moments.std, invert=self.invert)


def snr_scores(mean: np.ndarray, std: np.ndarray, invert: bool = False) -> np.ndarray:
    """Scores from the moments of F, shape [C] float64 (higher = more important).

    Normal: mean/std; a constant non-zero F gives +inf, a dead filter (mean 0) gives 0.
    Inverted: 1 + std/mean for live filters (ordered exactly by the coefficient of
    variation, always >= 1) and 0 for dead ones, so a dead filter is still the lowest.
    F counts as constant when std <= 1e-6 * mean, the resolution of F in float32.
    """
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    live = mean > 0
    constant = live & (std <= _CONSTANT_RTOL * mean)
    out = np.zeros(mean.shape, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if invert:
            out[live] = 1.0 + np.where(constant, 0.0, std / mean)[live]
        else:
            out[live] = np.where(constant, np.inf, mean / std)[live]
    return out


@register
class OCNNA(Criterion):
    """Options: ``pca_variance`` (tau, default 1.0), ``invert`` (rank high CV first,
    dead filters still last; see :func:`snr_scores`), ``threads`` (eigenvalue worker
    threads, default 1), ``in_graph`` (tau = 1 only: reduce the maps inside ONNX Runtime's
    graph, default True; False returns every map and computes F from it as at tau < 1)."""

    name = "ocnna"
    needs_data = True
    min_samples = 2

    def new_accumulator(self, member: MemberInfo) -> OCNNAAccumulator:
        opts = self.options
        return OCNNAAccumulator(
            member.channels,
            pca_variance=opts.get("pca_variance", DEFAULT_PCA_VARIANCE),
            invert=opts.get("invert", False),
            threads=opts.get("threads", 1),
            in_graph=opts.get("in_graph", True),
        )
