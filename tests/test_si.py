"""Separation Index: the index itself, the incremental greedy selection and the ``si`` criterion."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

import onnx_ocnna.criteria.si as si_module
from onnx_ocnna.criteria import MemberInfo, get_criterion
from onnx_ocnna.criteria.si import (
    SIAccumulator,
    greedy_si_order,
    nearest_other,
    separation_index,
    si_of_tensor_batches,
)
from onnx_ocnna.errors import InputError


def _brute_nearest(x: np.ndarray) -> np.ndarray:
    """Nearest other sample by explicit differences, float64, lowest index on ties."""
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return d.argmin(1)


def _brute_si(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(y[_brute_nearest(x)] == y))


def _reference_greedy(x: np.ndarray, y: np.ndarray) -> tuple[list[int], list[float]]:
    """Greedy selection recomputing every distance matrix from scratch; same tie rule."""
    c = x.shape[1]
    single = [_brute_si(x[:, [j]], y) for j in range(c)]
    chosen: list[int] = []
    curve: list[float] = []
    remaining = list(range(c))
    while remaining:
        si = {j: _brute_si(x[:, chosen + [j]], y) for j in remaining}
        best = max(remaining, key=lambda j: (si[j], single[j], -j))
        chosen.append(best)
        curve.append(si[best])
        remaining.remove(best)
    return chosen, curve


@pytest.mark.parametrize("d", [1, 5, 40, 300])
def test_separation_index_matches_sklearn_neighbours(d: int) -> None:
    rng = np.random.default_rng(d)
    x = rng.standard_normal((150, d)) + 3.0  # offset: exercises the centring
    y = rng.integers(0, 4, 150)
    nn = NearestNeighbors(n_neighbors=2, algorithm="brute").fit(x)
    _, idx = nn.kneighbors(x)
    # Continuous data: no exact ties, so the first non-self neighbour is unambiguous.
    other = np.where(idx[:, 0] == np.arange(150), idx[:, 1], idx[:, 0])
    np.testing.assert_array_equal(nearest_other(x), other)
    assert separation_index(x, y) == pytest.approx(np.mean(y[other] == y), abs=0)


def test_equidistant_neighbours_resolve_to_lowest_index() -> None:
    x = np.array([[0.0], [1.0], [-1.0], [5.0], [5.0]])
    # 0 is equidistant to 1 and 2; 3 and 4 are duplicates of each other.
    np.testing.assert_array_equal(nearest_other(x), [1, 0, 0, 4, 3])
    assert separation_index(x, np.array([0, 0, 1, 2, 2])) == pytest.approx(4 / 5)


def test_separation_index_rejects_bad_input() -> None:
    with pytest.raises(InputError):
        separation_index(np.zeros((1, 3)), np.zeros(1))
    with pytest.raises(InputError):
        separation_index(np.zeros((4, 3)), np.zeros(3))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_incremental_greedy_matches_recomputation(dtype: type) -> None:
    rng = np.random.default_rng(7)
    n, c = 90, 18  # >= 16 candidates in the first steps: exercises the shortlist search
    y = rng.integers(0, 3, n)
    x = rng.standard_normal((n, c))
    x[:, 2] += 0.8 * y  # a few informative channels so the curve is not flat noise
    x[:, 5] -= 0.5 * y
    given = x.copy()
    order, curve = greedy_si_order(x, y, dtype=dtype, threads=1)
    np.testing.assert_array_equal(x, given)  # the caller's features are not centred in place
    ref_order, ref_curve = _reference_greedy(x, y)
    np.testing.assert_array_equal(order, ref_order)
    np.testing.assert_allclose(curve, ref_curve, atol=0)
    for k in range(1, c + 1):
        assert curve[k - 1] == separation_index(x[:, order[:k]], y)


@pytest.mark.parametrize("integer_features", [False, True])
def test_shortlist_search_equals_full_scan(monkeypatch: pytest.MonkeyPatch, integer_features: bool) -> None:
    rng = np.random.default_rng(12)
    x = rng.standard_normal((400, 24))
    if integer_features:
        x = np.round(2 * x)  # many exactly equidistant neighbours: the tie rule must hold
    y = rng.integers(0, 6, 400)
    x[:, 4] += y
    shortlist = greedy_si_order(x, y, threads=1)
    monkeypatch.setattr(si_module, "_PRUNE_K", 10**9)  # disables the shortlist
    full = greedy_si_order(x, y, threads=1)
    np.testing.assert_array_equal(shortlist[0], full[0])
    np.testing.assert_array_equal(shortlist[1], full[1])


def test_greedy_threads_do_not_change_the_result() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 13))
    y = rng.integers(0, 5, 200)
    one = greedy_si_order(x, y, threads=1)
    three = greedy_si_order(x, y, threads=3)
    np.testing.assert_array_equal(one[0], three[0])
    np.testing.assert_array_equal(one[1], three[1])


def test_perfect_separator_is_selected_first() -> None:
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 3, n)
    x = rng.standard_normal((n, 10))
    x[:, 6] = 10.0 * y + 0.01 * rng.standard_normal(n)
    order, curve = greedy_si_order(x, y)
    assert order[0] == 6
    assert curve[0] == 1.0
    assert sorted(order.tolist()) == list(range(10))


def test_max_steps_truncates_the_order() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 8))
    y = rng.integers(0, 2, 60)
    full, _ = greedy_si_order(x, y)
    part, curve = greedy_si_order(x, y, max_steps=3)
    np.testing.assert_array_equal(part, full[:3])
    assert curve.shape == (3,)


def _activations(rng: np.random.Generator, n: int, c: int, informative: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 4, n)
    act = rng.standard_normal((n, c, 3, 3)).astype(np.float32)
    act[:, informative] += 5.0 * y[:, None, None]
    return act, y


def test_criterion_scores_via_registry() -> None:
    rng = np.random.default_rng(5)
    act, y = _activations(rng, 120, 6, informative=4)
    crit = get_criterion("si")
    assert crit.needs_data and crit.needs_labels
    member = MemberInfo(name="conv", weight=np.zeros((6, 3, 3, 3), np.float32), channels=6)
    acc = crit.new_accumulator(member)
    acc.update(act[:50], y[:50])
    acc.update(act[50:], y[50:])
    scores = acc.scores()
    assert scores.shape == (6,) and scores.dtype == np.float64
    assert int(np.argmax(scores)) == 4
    # Scores are C - rank of the greedy order over the spatial means.
    order, curve = greedy_si_order(act.mean(axis=(2, 3), dtype=np.float64), y)
    np.testing.assert_array_equal(scores[order], 6.0 - np.arange(6))
    np.testing.assert_array_equal(acc.si_curve, curve)


def test_criterion_accepts_pooled_activations() -> None:
    rng = np.random.default_rng(6)
    act, y = _activations(rng, 80, 5, informative=1)
    acc = get_criterion("si").new_accumulator(MemberInfo("g", np.zeros((5, 1)), 5))
    acc.update(act.mean(axis=(2, 3)), y)  # [N, C]
    assert int(np.argmax(acc.scores())) == 1


def test_criterion_without_labels_is_an_input_error() -> None:
    acc = get_criterion("si").new_accumulator(MemberInfo("conv", np.zeros((4, 1)), 4))
    with pytest.raises(InputError, match="labelled calibration data"):
        acc.update(np.zeros((2, 4, 2, 2), np.float32), None)


def test_merge_and_state_round_trip() -> None:
    rng = np.random.default_rng(8)
    act, y = _activations(rng, 90, 5, informative=0)
    whole = SIAccumulator(5)
    whole.update(act, y)
    a, b = SIAccumulator(5), SIAccumulator(5)
    a.update(act[:40], y[:40])
    b.update(act[40:], y[40:])
    a.merge(b)
    np.testing.assert_array_equal(a.state()["features"], whole.state()["features"])
    np.testing.assert_array_equal(a.scores(), whole.scores())
    restored = SIAccumulator.from_state(a.state())
    np.testing.assert_array_equal(restored.scores(), whole.scores())
    with pytest.raises(InputError):
        a.merge(SIAccumulator(6))


def test_subsampling_is_deterministic_and_bounded() -> None:
    rng = np.random.default_rng(9)
    act, y = _activations(rng, 200, 4, informative=2)
    a = SIAccumulator(4, si_max_samples=50, si_seed=3)
    a.update(act, y)
    b = SIAccumulator(4, si_max_samples=50, si_seed=3)
    b.update(act, y)
    np.testing.assert_array_equal(a.scores(), b.scores())
    # The curve's values are multiples of 1/50: the greedy ran on 50 samples.
    np.testing.assert_allclose(a.si_curve * 50, np.round(a.si_curve * 50), atol=1e-9)


def test_max_steps_ranks_unselected_channels_last() -> None:
    rng = np.random.default_rng(10)
    act, y = _activations(rng, 100, 6, informative=3)
    acc = SIAccumulator(6, si_max_steps=2)
    acc.update(act, y)
    scores = acc.scores()
    assert scores[3] == 6.0
    assert sorted(scores)[-2] == 5.0
    assert np.sum(scores < 1.0) == 4


def test_si_of_tensor_batches() -> None:
    rng = np.random.default_rng(11)
    act, y = _activations(rng, 60, 3, informative=0)
    batches = [(act[:30], y[:30]), (act[30:], y[30:])]
    assert si_of_tensor_batches(batches) == separation_index(act.mean(axis=(2, 3)), y)
    assert si_of_tensor_batches(batches, reduce="flatten") == pytest.approx(
        _brute_si(act.reshape(60, -1).astype(np.float64), y), abs=0
    )
    with pytest.raises(InputError):
        si_of_tensor_batches([(act, None)])


def test_bad_options_are_input_errors() -> None:
    with pytest.raises(InputError):
        SIAccumulator(4, si_max_samples=0)
    with pytest.raises(InputError):
        SIAccumulator(4, si_seed="x")
    acc = SIAccumulator(4, seed=5, threads=2)  # generic options as the API passes them
    assert acc.seed == 5 and acc.threads == 2
