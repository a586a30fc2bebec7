"""Criteria: OCNNA's F against scikit-learn PCA and NumPy SVD, streaming statistics, the
other criteria against direct NumPy computations, and the registry."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from graphs import GraphBuilder, residual_net
from onnx import numpy_helper

from onnx_ocnna import api
from onnx_ocnna.criteria import CRITERIA, MemberInfo, get_criterion
from onnx_ocnna.criteria.activation import APoZAccumulator, MeanAbsAccumulator
from onnx_ocnna.criteria.ocnna import OCNNAAccumulator, ocnna_frobenius, snr_scores
from onnx_ocnna.criteria.stats import RunningMoments
from onnx_ocnna.errors import InputError

TAUS = [0.3, 0.8, 0.95, 1.0]


def _member(channels: int, name: str = "conv") -> MemberInfo:
    return MemberInfo(name=name, weight=np.zeros((channels, 1, 1, 1), np.float32), channels=channels)


def _relu_maps(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.maximum(rng.standard_normal(shape), 0.0)


def _q(energies: np.ndarray, tau: float) -> int:
    """Fewest leading components whose cumulative energy reaches tau of the total."""
    cum = np.cumsum(energies)
    return int(np.sum(cum < tau * cum[-1]) + 1)


def _f_sklearn(o: np.ndarray, tau: float) -> float:
    """F as SPEC section 2 words it: the Frobenius norm of the q-component PCA scores."""
    ratios = PCA(svd_solver="full").fit(o).explained_variance_ratio_
    q = min(_q(ratios, tau), len(ratios))
    return float(np.linalg.norm(PCA(n_components=q, svd_solver="full").fit_transform(o)))


def _f_svd(o: np.ndarray, tau: float) -> float:
    s2 = np.linalg.svd(o - o.mean(axis=0), compute_uv=False) ** 2
    return float(np.sqrt(np.cumsum(s2)[_q(s2, tau) - 1])) if s2.sum() > 0 else 0.0


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("hw", [(9, 9), (6, 11), (12, 5)])
def test_f_matches_sklearn_pca(tau: float, hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    maps = _relu_maps(rng, (3, 4, *hw))
    expected = np.array([[_f_sklearn(o, tau) for o in image] for image in maps])
    np.testing.assert_allclose(ocnna_frobenius(maps, tau, dtype=np.float64), expected, rtol=1e-10)
    np.testing.assert_allclose(ocnna_frobenius(maps.astype(np.float32), tau), expected, rtol=1e-5)


def test_tau_one_energy_is_exact_across_cache_chunks() -> None:
    """tau = 1 reads the maps in cache-sized chunks: maps on both sides of every chunk boundary
    (and a last partial chunk) get the same F as the plain SVD."""
    from onnx_ocnna.criteria import ocnna

    rng = np.random.default_rng(5)
    maps = _relu_maps(rng, (3, 700, 16, 16)).astype(np.float32)
    per_chunk = ocnna._CHUNK_BYTES // (16 * 16 * 4)
    assert 3 * 700 > 2 * per_chunk and (3 * 700) % per_chunk != 0
    expected = np.array([[_f_svd(o.astype(np.float64), 1.0) for o in image] for image in maps])
    np.testing.assert_allclose(ocnna_frobenius(maps, 1.0), expected, rtol=1e-5)


@pytest.mark.parametrize("tau", TAUS)
def test_f_matches_numpy_svd_on_many_maps(tau: float) -> None:
    rng = np.random.default_rng(1)
    # Correlated columns so that q varies between maps, plus offsets that centring removes.
    base = rng.standard_normal((8, 16, 16, 3)) @ rng.standard_normal((3, 16))
    maps = np.maximum(base + 0.3 * rng.standard_normal(base.shape) + 5.0, 0.0)
    expected = np.array([[_f_svd(o, tau) for o in image] for image in maps])
    got32 = ocnna_frobenius(maps.astype(np.float32), tau)
    np.testing.assert_allclose(ocnna_frobenius(maps, tau, dtype=np.float64), expected, rtol=1e-10)
    np.testing.assert_allclose(got32, expected, rtol=2e-5)
    assert got32.dtype == np.float64 and got32.shape == (8, 16)


def test_f_uses_fewer_components_for_smaller_tau() -> None:
    rng = np.random.default_rng(2)
    maps = rng.standard_normal((2, 3, 10, 10))
    f = [ocnna_frobenius(maps, tau, dtype=np.float64) for tau in (0.2, 0.6, 0.95, 1.0)]
    assert all(np.all(a <= b + 1e-12) for a, b in zip(f, f[1:]))
    assert np.all(f[0] < f[-1])
    expected_full = np.linalg.norm(maps - maps.mean(axis=2, keepdims=True), axis=(2, 3))
    np.testing.assert_allclose(f[-1], expected_full, rtol=1e-12)


def test_f_special_maps() -> None:
    maps = np.zeros((2, 4, 5, 7), np.float32)
    maps[:, 1] = 3.25  # constant map
    maps[:, 2, :, 3] = np.arange(5)  # one non-constant column
    maps[:, 3] = np.arange(7, dtype=np.float32) * 1e3  # every column constant, large values
    f = ocnna_frobenius(maps, 0.95)
    assert f[0, 0] == 0.0 and f[0, 1] == 0.0 and f[0, 3] == 0.0
    np.testing.assert_allclose(f[:, 2], np.linalg.norm(np.arange(5) - 2.0), rtol=1e-6)


def test_f_of_1x1_maps_is_abs() -> None:
    values = np.array([[1.5, -2.0, 0.0]], np.float32)
    for maps in (values, values[:, :, None, None]):
        for tau in (0.5, 1.0):
            np.testing.assert_array_equal(ocnna_frobenius(maps, tau), [[1.5, 2.0, 0.0]])


def test_f_other_layouts() -> None:
    rng = np.random.default_rng(8)
    maps = rng.standard_normal((3, 2, 9, 1))
    f = ocnna_frobenius(maps, 1.0, dtype=np.float64)
    np.testing.assert_allclose(ocnna_frobenius(maps[..., 0], 1.0, dtype=np.float64), f, rtol=1e-12)
    # One row is one sample, so it is read as a column.
    np.testing.assert_allclose(ocnna_frobenius(maps.transpose(0, 1, 3, 2), 1.0, dtype=np.float64), f, rtol=1e-12)
    np.testing.assert_allclose(f, np.linalg.norm(maps - maps.mean(axis=2, keepdims=True), axis=(2, 3)), rtol=1e-12)


def test_f_is_independent_of_batch_split_and_solver() -> None:
    rng = np.random.default_rng(9)
    maps = _relu_maps(rng, (70, 64, 6, 6)).astype(np.float32)  # 4480 maps: two LAPACK chunks
    whole = ocnna_frobenius(maps, 0.9)
    np.testing.assert_array_equal(ocnna_frobenius(maps[5:12], 0.9), whole[5:12])
    np.testing.assert_array_equal(ocnna_frobenius(maps, 0.9, threads=2), whole)
    np.testing.assert_allclose(ocnna_frobenius(maps, 0.9, backend="numpy"), whole, rtol=1e-5)
    with pytest.raises(InputError):
        ocnna_frobenius(maps, 0.9, backend="cuda")


def test_f_propagates_nan() -> None:
    maps = np.ones((1, 3, 4, 4), np.float32)
    maps[0, 1, 2, 2] = np.nan
    for tau in (0.9, 1.0):
        f = ocnna_frobenius(maps, tau)
        assert f[0, 0] == 0.0 and np.isnan(f[0, 1]) and f[0, 2] == 0.0


def test_f_rejects_bad_input() -> None:
    with pytest.raises(InputError):
        ocnna_frobenius(np.zeros((1, 2, 3, 3)), 0.0)
    with pytest.raises(InputError):
        ocnna_frobenius(np.zeros((1, 2, 3, 3)), 1.5)
    with pytest.raises(InputError):
        ocnna_frobenius(np.zeros((1, 2, 3, 3, 3)), 0.9)


def test_running_moments_streaming_and_merge() -> None:
    rng = np.random.default_rng(3)
    values = rng.gamma(2.0, 3.0, size=(101, 6)) + 1e6  # offset tests the numerics
    one = RunningMoments(6)
    one.update(values)
    streamed = RunningMoments(6)
    for part in np.array_split(values, [1, 2, 40, 77]):
        streamed.update(part)
    a, b = RunningMoments(6), RunningMoments(6)
    a.update(values[:30])
    b.update(values[30:])
    a.merge(b)
    restored = RunningMoments.from_state(a.state())
    for m in (one, streamed, a, restored):
        assert m.count == 101
        np.testing.assert_allclose(m.mean, values.mean(axis=0), rtol=1e-14)
        np.testing.assert_allclose(m.std, values.std(axis=0), rtol=1e-8)
    empty = RunningMoments(6)
    empty.merge(one)
    np.testing.assert_array_equal(empty.mean, one.mean)
    with pytest.raises(InputError):
        one.update(values[:, :5])


def _ocnna_acc(**options) -> OCNNAAccumulator:
    return get_criterion("ocnna", **options).new_accumulator(_member(5))


def test_ocnna_accumulator_streaming_merge_state() -> None:
    rng = np.random.default_rng(4)
    maps = _relu_maps(rng, (20, 5, 8, 8)).astype(np.float32)
    f = ocnna_frobenius(maps, 0.9)
    expected = f.mean(axis=0) / f.std(axis=0)

    whole = _ocnna_acc(pca_variance=0.9)
    whole.update(maps)
    streamed = _ocnna_acc(pca_variance=0.9)
    for part in np.array_split(maps, 4):
        streamed.update(part)
    left, right = _ocnna_acc(pca_variance=0.9), _ocnna_acc(pca_variance=0.9)
    left.update(maps[:7])
    right.update(maps[7:])
    left.merge(right)
    restored = OCNNAAccumulator.from_state(left.state())
    for acc in (whole, streamed, left, restored):
        np.testing.assert_allclose(acc.scores(), expected, rtol=1e-9)
    assert restored.pca_variance == 0.9
    with pytest.raises(InputError):
        left.merge(_ocnna_acc(pca_variance=0.95))
    with pytest.raises(InputError):
        OCNNAAccumulator.from_state(left.state(), pca_variance=0.5)


def test_ocnna_dead_and_constant_filters() -> None:
    rng = np.random.default_rng(5)
    maps = _relu_maps(rng, (12, 5, 6, 6)).astype(np.float32)
    maps[:, 0] = 0.0  # dead
    maps[:, 1] = maps[0, 1]  # the same non-constant map on every image: F constant > 0
    maps[:, 2] = 7.0  # constant map: F = 0 on every image, also dead for OCNNA
    maps[:, 3] *= 100.0  # live; scale must not matter
    normal, inverted = _ocnna_acc(), _ocnna_acc(invert=True)
    for part in np.array_split(maps, 3):  # the constant F passes through a merge of batch means
        normal.update(part)
        inverted.update(part)
    s, t = normal.scores(), inverted.scores()
    assert s[0] == 0.0 and s[2] == 0.0 and t[0] == 0.0 and t[2] == 0.0
    assert s[1] == np.inf and t[1] == 1.0
    assert np.all(s[3:] > 0) and np.all(np.isfinite(s[3:])) and np.all(t[3:] > 1.0)
    # Dead filters rank lowest in both directions.
    assert set(np.argsort(s, kind="stable")[:2]) == {0, 2}
    assert set(np.argsort(t, kind="stable")[:2]) == {0, 2}
    # Among live filters the inverted ranking is exactly the reverse.
    live = [1, 3, 4]
    assert list(np.argsort(s[live])) == list(np.argsort(t[live])[::-1])


def test_snr_scores_invert_orders_by_cv() -> None:
    mean = np.array([2.0, 1.0, 0.0, 4.0])
    std = np.array([1.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(snr_scores(mean, std), [2.0, 1.0, 0.0, np.inf])
    np.testing.assert_array_equal(snr_scores(mean, std, invert=True), [1.5, 2.0, 0.0, 1.0])


def test_ocnna_1x1_and_errors() -> None:
    acc = get_criterion("ocnna").new_accumulator(_member(3))
    values = np.array([[1.0, -2.0, 0.0], [3.0, 2.0, 0.0]], np.float32)
    acc.update(values)
    np.testing.assert_allclose(acc.scores(), [2.0, np.inf, 0.0])
    with pytest.raises(InputError):
        acc.update(np.zeros((2, 4)))
    with pytest.raises(InputError):
        acc.update(np.full((2, 3, 4, 4), np.nan))
    with pytest.raises(InputError):
        get_criterion("ocnna").new_accumulator(_member(3)).scores()
    with pytest.raises(InputError):
        get_criterion("ocnna", pca_variance=2.0).new_accumulator(_member(3))


def test_magnitude_criteria() -> None:
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    member = MemberInfo("conv", weight, 8)
    flat = weight.reshape(8, -1).astype(np.float64)
    l1, l2 = get_criterion("l1"), get_criterion("l2")
    assert not l1.needs_data and not l2.needs_data
    np.testing.assert_allclose(l1.weight_scores(member), np.abs(flat).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(l2.weight_scores(member), np.sqrt((flat**2).sum(axis=1)), rtol=1e-12)
    with pytest.raises(InputError):
        l1.weight_scores(MemberInfo("conv", weight, 4))


def test_activation_criteria() -> None:
    rng = np.random.default_rng(7)
    x = _relu_maps(rng, (10, 4, 5, 5)).astype(np.float32)
    x[:, 1] = 0.0
    x[:3, 2] = 0.0
    expected_apoz = 1.0 - (x == 0).mean(axis=(0, 2, 3))
    expected_mean = np.abs(x.astype(np.float64)).mean(axis=(0, 2, 3))
    for name, expected, cls in (("apoz", expected_apoz, APoZAccumulator), ("mean-activation", expected_mean, MeanAbsAccumulator)):
        criterion = get_criterion(name)
        assert criterion.needs_data
        whole = criterion.new_accumulator(_member(4))
        whole.update(x)
        left, right = criterion.new_accumulator(_member(4)), criterion.new_accumulator(_member(4))
        left.update(x[:4])
        right.update(x[4:6])
        right.update(x[6:])
        left.merge(right)
        for acc in (whole, left, cls.from_state(left.state())):
            np.testing.assert_allclose(acc.scores(), expected, rtol=1e-12)
        assert whole.scores()[1] == 0.0
    flat = get_criterion("apoz").new_accumulator(_member(2))
    flat.update(np.array([[0.0, 1.0], [2.0, 0.0], [3.0, 4.0]]))
    np.testing.assert_allclose(flat.scores(), [2 / 3, 2 / 3])
    with pytest.raises(InputError):
        get_criterion("apoz").new_accumulator(_member(2)).merge(get_criterion("mean-activation").new_accumulator(_member(2)))


def test_random_is_reproducible_and_seeded() -> None:
    member = _member(16, "layer1.conv")
    a = get_criterion("random", seed=3).weight_scores(member)
    assert a.shape == (16,) and np.all((a >= 0) & (a < 1))
    np.testing.assert_array_equal(a, get_criterion("random", seed=3).weight_scores(member))
    assert not np.array_equal(a, get_criterion("random", seed=4).weight_scores(member))
    assert not np.array_equal(a, get_criterion("random", seed=3).weight_scores(_member(16, "layer2.conv")))
    assert not get_criterion("random").needs_data
    with pytest.raises(InputError):
        get_criterion("random", seed="x").weight_scores(member)


def test_registry() -> None:
    criterion = get_criterion("ocnna", pca_variance=0.9)
    assert criterion.name == "ocnna" and criterion.needs_data and not criterion.needs_labels
    assert criterion.new_accumulator(_member(2)).pca_variance == 0.9
    assert {"ocnna", "l1", "l2", "apoz", "mean-activation", "random"} <= set(CRITERIA)
    with pytest.raises(InputError):
        get_criterion("no-such-criterion")


def test_spread_criteria_refuse_one_sample_and_warn_below_the_advised_minimum():
    from graphs import GraphBuilder

    from onnx_ocnna import api
    from onnx_ocnna.errors import InputError

    g = GraphBuilder(seed=0)
    model = g.model(["N", 3, 8, 8], g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [
        g.relu(g.conv(g.relu(g.conv("x", 3, 8)), 8, 8))])[0]])[0], 8, 3))
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    with pytest.raises(InputError, match="at least 2 calibration samples; got 1"):
        api.score(model, x[:1], criterion="ocnna", progress=False)
    with pytest.warns(UserWarning, match="only 8 calibration samples"):
        api.score(model, x, criterion="ocnna", progress=False)
    api.score(model, x[:1], criterion="mean-activation", progress=False)  # a mean needs no spread


def _init(model, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name).astype(np.float64)


def test_group_l2_sums_every_learned_slice_a_channel_owns() -> None:
    """Conv a -> BN -> Relu -> Conv b -> Relu -> Flatten -> Gemm: a channel of a owns its filter,
    its BN scale and b's input slice; a channel of b its filter and the Gemm's columns of it
    (flattened with 2 x 2 positions). Biases and BN statistics are not counted."""
    g = GraphBuilder(seed=3)
    h = g.relu(g.bn(g.conv("x", 3, 4, name="a"), 4, name="bn"))
    h = g.relu(g.conv(h, 4, 5, name="b"))
    out = g.gemm(g.node("Flatten", [h])[0], 5 * 2 * 2, 3, name="fc")
    model = g.model(["N", 3, 2, 2], out)
    scores = api.score(model, criterion="group-l2", progress=False)
    assert scores.samples == 0 and get_criterion("group-l2").coupled
    a, b, scale, fc = (_init(model, n) for n in ("a.w", "b.w", "bn.scale", "fc.w"))
    expected_a = np.sqrt((a**2).sum(axis=(1, 2, 3)) + scale**2 + (b**2).sum(axis=(0, 2, 3)))
    expected_b = np.sqrt((b**2).sum(axis=(1, 2, 3)) + (fc.reshape(3, 5, 4) ** 2).sum(axis=(0, 2)))
    group_a = scores.analysis.group_of("a").id
    group_b = scores.analysis.group_of("b").id
    np.testing.assert_allclose(scores.groups[group_a], expected_a, rtol=1e-6)
    np.testing.assert_allclose(scores.groups[group_b], expected_b, rtol=1e-6)
    np.testing.assert_allclose(scores.member_scores["a"], expected_a, rtol=1e-6)
    # An unread channel keeps only what writes it; biases and statistics never count.
    for init in model.graph.initializer:
        if init.name == "b.w":
            weight = numpy_helper.to_array(init).copy()
            weight[:, 0] = 0.0
            init.CopyFrom(numpy_helper.from_array(weight, init.name))
        if init.name in ("bn.mean", "bn.var", "bn.bias", "a.b"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 7.0, init.name))
    moved = api.score(model, criterion="group-l2", progress=False).groups[group_a]
    np.testing.assert_allclose(moved[0], np.sqrt((a[0] ** 2).sum() + scale[0] ** 2), rtol=1e-6)
    np.testing.assert_allclose(moved[1:], expected_a[1:], rtol=1e-6)


def test_group_l2_on_a_residual_group_counts_every_member() -> None:
    model = residual_net(set(), channels=4, blocks=2)
    scores = api.score(model, criterion="group-l2", progress=False)
    spine = scores.analysis.group_of("stem")
    assert set(spine.members) == {"stem", "b0_c2", "b1_c2"}
    w = {n: _init(model, f"{n}.w") for n in ("stem", "b0_c1", "b0_c2", "b1_c1", "b1_c2")}
    energy = sum((w[n] ** 2).sum(axis=(1, 2, 3)) for n in ("stem", "b0_c2", "b1_c2"))
    energy = energy + sum((w[n] ** 2).sum(axis=(0, 2, 3)) for n in ("b0_c1", "b1_c1"))
    fc = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name.startswith("fc"))
    energy = energy + (fc.astype(np.float64) ** 2).sum(axis=0)  # transB: the channels are columns
    np.testing.assert_allclose(scores.groups[spine.id], np.sqrt(energy), rtol=1e-6)
