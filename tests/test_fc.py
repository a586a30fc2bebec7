"""Fully connected layers (issue 13): hidden Gemm/MatMul neurons are channels.

VGG-style nets with a two-hidden-layer classifier are exported by both torch exporters and in
tf2onnx's layout (MatMul by the weight, then an Add of the bias; BatchNormalization on the 2-D
hidden tensor); dead conv channels and dead neurons are removed and the outputs must not change.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder
from oracle import check_lossless, kill_channels

from onnx_ocnna.api import apply_plan, compress, member_info, score
from onnx_ocnna.channels.analysis import analyse
from onnx_ocnna.criteria import get_criterion
from onnx_ocnna.errors import PlanError
from onnx_ocnna.model_io import ort_session
from onnx_ocnna.plan import build_plan, resolve_plan

torch = pytest.importorskip("torch")
nn = torch.nn

SIZE = 16
HIDDEN = (32, 24)


class DenseHead(nn.Module):
    """tf2onnx's Dense: x @ W + b with W [K, N] (exported as MatMul then Add)."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, n) / k ** 0.5)
        self.bias = nn.Parameter(torch.randn(n) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


class VggFc(nn.Module):
    """Conv 8 - pool - Conv 16 - pool, Flatten, two hidden FC layers (32, 24), classifier 10.

    ``dense``: the FC layers are :class:`DenseHead` (MatMul + Add) and the first hidden layer
    has a BatchNorm1d, as a Keras model exported by tf2onnx; else ``nn.Linear`` (Gemm)."""

    def __init__(self, dense: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 16 * (SIZE // 4) ** 2
        layer = DenseHead if dense else nn.Linear
        self.fc1, self.fc2, self.out = layer(flat, HIDDEN[0]), layer(HIDDEN[0], HIDDEN[1]), layer(HIDDEN[1], 10)
        self.norm = nn.BatchNorm1d(HIDDEN[0]) if dense else nn.Identity()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        x = self.drop(torch.relu(self.norm(self.fc1(x))))
        x = torch.relu(self.fc2(x))
        return self.out(x)


def _randomised(dense: bool, dead: bool = False) -> nn.Module:
    """Random weights and BN statistics; with ``dead``, conv channels {1, 5} of the first conv,
    {0, 3, 9, 12} of the second and neurons 0, 4, 8, ... of both hidden layers output exactly 0."""
    torch.manual_seed(0)
    model = VggFc(dense)
    for bn in (model.features[1], model.norm):
        if isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    if dead:
        with torch.no_grad():
            conv1, bn1, conv2 = model.features[0], model.features[1], model.features[4]
            for c in (1, 5):  # Conv -> BN -> Relu: the BN maps the zero output to beta - mean * scale
                conv1.weight[c] = 0
                conv1.bias[c] = 0
                bn1.bias[c] = 0
                bn1.running_mean[c] = 0
            for c in (0, 3, 9, 12):
                conv2.weight[c] = 0
                conv2.bias[c] = 0
            for layer, norm in ((model.fc1, model.norm), (model.fc2, None)):
                rows = slice(0, None, 4)
                if isinstance(layer, nn.Linear):
                    layer.weight[rows] = 0
                else:
                    layer.weight[:, rows] = 0
                layer.bias[rows] = 0
                if isinstance(norm, nn.BatchNorm1d):
                    norm.bias[rows] = 0
                    norm.running_mean[rows] = 0
    return model.eval()


def _export(model: nn.Module, exporter: str, path: Path) -> onnx.ModelProto:
    x = torch.randn(2, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18, input_names=["input"],
                              output_names=["logits"], verbose=False)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=13, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return onnx.load(str(path), load_external_data=True)


VARIANTS = {"ts": ("ts", False), "dynamo": ("dynamo", False), "matmul": ("ts", True)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[tuple[str, bool], onnx.ModelProto]:
    """(variant, dead) -> model, exported once per module."""
    root = tmp_path_factory.mktemp("fc")
    cache: dict = {}

    def get(variant: str, dead: bool = False) -> onnx.ModelProto:
        if (variant, dead) not in cache:
            exporter, dense = VARIANTS[variant]
            cache[variant, dead] = _export(_randomised(dense, dead), exporter, root / f"{variant}_{dead}.onnx")
        return cache[variant, dead]

    return get


def _fc_groups(analysis) -> list:
    nodes = {n.name: n for n in analysis.graph.nodes}
    return [g for g in analysis.groups if nodes[g.members[0]].op in ("Gemm", "MatMul")]


def _feeds(n: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)}


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# --------------------------------------------------------------------------- analysis


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hidden_layers_are_groups_and_the_classifier_is_not(exports, variant):
    analysis = analyse(exports(variant))
    fc = _fc_groups(analysis)
    assert sorted(g.channels for g in fc) == sorted(HIDDEN)
    assert all(g.prunable for g in fc), [g.frozen_reason for g in fc]
    # The classifier's 10 outputs are no group; the convs still are.
    assert len(analysis.groups) == 4
    # Neurons are measured after their activation (through the bias Add and the BN in tf2onnx's layout).
    nodes = {t.name: n for n in analysis.graph.nodes for t in n.outputs}
    assert all(nodes[g.measured[g.members[0]]].op in ("Relu", "Dropout") for g in fc)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lossless_oracle_removes_neurons_and_channels(exports, variant):
    result = check_lossless(exports(variant), fraction=0.5, seed=2)
    assert result["max_rel_error"] < 1e-5
    assert result["after_neurons"] == result["before_neurons"] - sum(int(np.ceil(h / 2)) for h in HIDDEN)
    assert result["after_params"] < result["before_params"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dead_channels_and_neurons_are_all_removed(exports, variant):
    """l1 scores the dead filters and neurons 0; k = 25 removes exactly them, losslessly."""
    model = exports(variant, dead=True)
    pruned, report = compress(model, None, criterion="l1", percentile=25, progress=False)
    after = {w["layer"]: (w["before"], w["after"]) for w in report.extra["widths"]}
    assert sorted(after.values()) == [(8, 6), (16, 12), (24, 18), (32, 24)]
    feeds = _feeds()
    expected = ort_session(model).run(None, feeds)[0]
    actual = ort_session(pruned).run(None, feeds)[0]
    assert actual.shape == expected.shape == (2, 10)
    assert _relative(actual, expected) < 1e-4


def test_gemm_layouts_and_a_hidden_output_on_hand_built_graphs():
    """Gemm without transB (weight [K, N]) and with it; a hidden layer that is also a graph
    output is a frozen group with the reason; a MatMul on a [B, T, K] input makes no neurons."""
    g = GraphBuilder()
    flat = g.node("Flatten", [g.relu(g.conv("x", 3, 4, name="c"))], axis=1)[0]
    w1 = g.const(g.rng.standard_normal((4 * 9, 6)).astype(np.float32), "fc1.w")  # [K, N]
    h1 = g.relu(g.node("Gemm", [flat, w1, g.const(np.zeros(6, np.float32))], name="fc1")[0])
    h2 = g.relu(g.gemm(h1, 6, 5, name="fc2"))  # transB = 1: weight [N, K]
    out = g.gemm(h2, 5, 3, name="head")
    model = g.model([2, 3, 3, 3], out)
    analysis = analyse(model)
    assert {m: g.channels for g in analysis.groups for m in g.members} == {"c": 4, "fc1": 6, "fc2": 5}
    result = check_lossless(model, fraction=0.5, seed=0)
    assert result["max_rel_error"] < 1e-5
    shapes = {i.name: tuple(i.dims) for i in result["pruned"].graph.initializer}
    assert shapes["fc1.w"] == (2 * 9, 3) and shapes["fc2.w"] == (2, 3) and shapes["head.w"] == (3, 2)

    # fc2's output is also a graph output: its neurons are frozen, with the reason.
    model.graph.output.append(onnx.helper.make_tensor_value_info(h2, onnx.TensorProto.FLOAT, None))
    frozen = analyse(model).group_of("fc2")
    assert not frozen.prunable and "graph output" in frozen.frozen_reason

    g = GraphBuilder()
    w = g.const(g.rng.standard_normal((4, 6)).astype(np.float32), "w")
    h = g.relu(g.node("MatMul", ["x", w], name="seq")[0])
    model = g.model([2, 5, 4], g.node("ReduceMean", [h], axes=[2], keepdims=0)[0])
    assert analyse(model).groups == []


def test_neurons_pass_per_neuron_ops_and_reshapes():
    """Gemm -> BatchNormalization (2-D) -> Relu -> Dropout -> Identity -> Reshape [N, C] ->
    Flatten -> MatMul + Add -> Relu -> Reshape [N, C, 1, 1] -> 1x1 Conv (a consumer too)."""
    g = GraphBuilder()
    h = g.gemm("x", 5, 12, name="fc1")
    h = g.relu(g.bn(h, 12, name="bn1"))
    h = g.node("Identity", [g.node("Dropout", [h])[0]])[0]
    h = g.node("Reshape", [h, g.const(np.array([0, -1], np.int64))])[0]
    h = g.node("Flatten", [h], axis=1)[0]
    w = g.const(g.rng.standard_normal((12, 6)).astype(np.float32), "fc2.w")
    h = g.node("MatMul", [h, w], name="fc2")[0]
    h = g.relu(g.node("Add", [h, g.const(g.rng.standard_normal(6).astype(np.float32), "fc2.b")])[0])
    h = g.node("Reshape", [h, g.const(np.array([-1, 6, 1, 1], np.int64))])[0]
    out = g.node("Flatten", [g.conv(h, 6, 3, k=1, name="head")])[0]
    model = g.model([4, 5], out)
    analysis = analyse(model)
    assert sorted((g.members[0], g.channels, g.prunable) for g in analysis.groups) == \
        [("fc1", 12, True), ("fc2", 6, True), ("head", 3, False)]  # a Conv writing the output stays, frozen
    result = check_lossless(model, fraction=0.5, seed=1)
    assert result["max_rel_error"] < 1e-5
    shapes = {i.name: tuple(i.dims) for i in result["pruned"].graph.initializer}
    assert shapes["fc1.w"] == (6, 5) and shapes["bn1.mean"] == (6,) and shapes["fc2.w"] == (6, 3)
    assert shapes["fc2.b"] == (3,) and shapes["head.w"] == (3, 3, 1, 1)


def test_l1_reads_each_weight_layout():
    """Neuron j of every layer gets weight magnitude j + 1: l1 must rank 0 < 1 < ... in all layouts."""
    g = GraphBuilder()
    k, n = 5, 4
    magnitudes = np.arange(1, n + 1, dtype=np.float32)
    kn = np.ones((k, n), np.float32) * magnitudes  # column j = neuron j
    a = g.relu(g.node("Gemm", ["x", g.const(kn, "a.w")], name="a")[0])  # [K, N]
    b = g.relu(g.node("Gemm", [a, g.const(np.ones((n, n), np.float32) * magnitudes[:, None], "b.w")],
                      name="b", transB=1)[0])  # [N, K]
    c = g.relu(g.node("MatMul", [b, g.const(np.ones((n, n), np.float32) * magnitudes, "c.w")], name="c")[0])
    out = g.gemm(c, n, 2, name="head")
    model = g.model([3, k], out)
    analysis = analyse(model)
    l1 = get_criterion("l1")
    for name in ("a", "b", "c"):
        scores = l1.weight_scores(member_info(analysis, name))
        assert np.all(np.diff(scores) > 0), (name, scores)


# --------------------------------------------------------------------------- plans


def test_plan_names_a_gemm_member(exports):
    model = exports("ts", dead=True)
    analysis = analyse(model)
    fc1 = next(g for g in _fc_groups(analysis) if g.channels == HIDDEN[0])
    dead = list(range(0, HIDDEN[0], 4))
    pruned, _ = apply_plan(model, {"groups": [{"members": [fc1.members[0]], "remove": dead}]})
    feeds = _feeds()
    assert _relative(ort_session(pruned).run(None, feeds)[0], ort_session(model).run(None, feeds)[0]) < 1e-5
    inits = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    assert (HIDDEN[0] - len(dead), 16 * 16) in inits.values()  # fc1's weight [N, K] lost its dead rows
    with pytest.raises(PlanError, match="not a Conv, Gemm or MatMul"):
        apply_plan(model, {"groups": [{"members": ["no such node"], "remove": [0]}]})


def test_mobilenet_v2_plan_names_the_depthwise_conv(zoo):
    """The expand Conv and its depthwise Conv carry the same channels: naming the depthwise one
    removes them from the whole group, and dead channels go without changing the outputs."""
    model = onnx.load(zoo("mobilenet_v2", "ts", "kept"))
    analysis = analyse(model)
    depthwise = [(g, name) for g in analysis.groups for name in g.carriers if g.prunable]
    assert len(depthwise) >= 16  # one per inverted-residual block
    group, name = depthwise[3]
    positions = np.array([0, 2, 5])
    chosen = {group.id: np.sort(group.carriers[name][positions])}
    killed = kill_channels(model, chosen)
    plan = {"groups": [{"members": [name], "remove": positions.tolist()}]}
    assert {k: v.tolist() for k, v in resolve_plan(plan, analyse(killed)).items()} == \
        {k: v.tolist() for k, v in chosen.items()}
    pruned, report = apply_plan(killed, plan)
    feeds = {model.graph.input[0].name: np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)}
    assert _relative(ort_session(pruned).run(None, feeds)[0], ort_session(killed).run(None, feeds)[0]) < 1e-5
    node = next(n for n in pruned.graph.node if n.name == name)
    group_attr = next(a.i for a in node.attribute if a.name == "group")
    assert group_attr == len(group.carriers[name]) - len(positions)
    # A plan written by build_plan still names the group's first member.
    assert build_plan(analyse(killed), chosen, "")["groups"][group.id]["members"][0] == group.members[0]


# --------------------------------------------------------------------------- criteria and recovery


def _labelled(model: onnx.ModelProto, n: int = 96, seed: int = 1) -> dict[str, np.ndarray]:
    """Random inputs labelled by the model itself (so every criterion has classes to separate)."""
    x = _feeds(n, seed)["input"]
    labels = ort_session(model).run(None, {"input": x})[0].argmax(axis=1)
    return {"input": x, "labels": labels.astype(np.int64)}


@pytest.mark.parametrize("criterion", ["ocnna", "l1", "l2", "apoz", "mean-activation", "si"])
def test_every_criterion_scores_neurons(exports, criterion):
    model = exports("matmul")
    scores = score(model, _labelled(model), criterion=criterion, progress=False)
    for group in _fc_groups(scores.analysis):
        values = scores.groups[group.id]
        assert values.shape == (group.channels,) and not np.isnan(values).any()


@pytest.mark.parametrize("variant", ["ts", "matmul"])
def test_reconstruction_refits_the_next_fc_layer(exports, variant, tmp_path):
    model = exports(variant)
    data = tmp_path / "calib.npz"
    np.savez(data, **_labelled(model, 128))
    analysis = analyse(model)
    exclude = [m for g in analysis.groups if g not in _fc_groups(analysis) for m in g.members]
    pruned, report = compress(model, str(data), criterion="l1", percentile=50, exclude=exclude, progress=False)
    fits = {f["node"]: f for f in report.extra["reconstruction"]["layers"]}
    refitted = [f for f in fits.values() if f["op_type"] in ("Gemm", "MatMul") and not f["skipped"]]
    assert len(refitted) == 2  # fc2 and the classifier read cut neurons
    assert all(f["error_after"] < f["error_before"] for f in refitted)


def test_distillation_runs_a_pruned_fc_graph(exports):
    from onnx_ocnna.distill.torch_graph import OnnxModule

    model = exports("matmul")
    pruned, _ = compress(model, None, criterion="l1", percentile=40, progress=False)
    feeds = _feeds(3)
    np.testing.assert_allclose(OnnxModule(pruned).eval().run(feeds)[0], ort_session(pruned).run(None, feeds)[0],
                               rtol=1e-4, atol=1e-5)


def test_budget_allocation_cuts_neuron_groups(exports, tmp_path):
    """With the convs excluded, a parameter budget of 0.5 is met by narrowing the hidden layers,
    each measured at candidate widths like a channel group."""
    model = exports("ts")
    data = tmp_path / "calib.npz"
    np.savez(data, **_labelled(model, 64))
    analysis = analyse(model)
    fc = {g.members[0] for g in _fc_groups(analysis)}
    convs = [m for g in analysis.groups for m in g.members if m not in fc]
    pruned, report = compress(model, str(data), criterion="l1", target_params=0.5, damage_samples=32,
                              exclude=convs, progress=False, reconstruct=False)
    assert report.after.parameters <= 0.5 * report.before.parameters
    allocated = {g["members"][0]: g for g in report.extra["allocation"]["groups"]}
    assert set(allocated) == fc
    assert all(len(g["candidates"]) > 3 for g in allocated.values())
    widths = {w["layer"]: (w["before"], w["after"]) for w in report.extra["widths"]}
    assert widths[min(fc, key=lambda m: widths[m][0] != HIDDEN[0])][1] < HIDDEN[0]


# --------------------------------------------------------------------------- --fc-width csi


def test_csi_is_the_nearest_centroid_accuracy():
    from sklearn.neighbors import NearestCentroid

    from onnx_ocnna.fc_width import csi

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    features = rng.standard_normal((200, 6)) + labels[:, None] * np.array([1.0, 0.5, 0, 0, 0, 0])
    expected = NearestCentroid().fit(features, labels).score(features, labels)
    assert csi(features, labels) == pytest.approx(expected)
    assert csi(np.eye(3)[[0, 1, 2, 0]], np.array([0, 1, 2, 0])) == 1.0


def test_greedy_csi_order_is_the_brute_force_one():
    """Every step adds the neuron that maximises the CSI of the chosen set (ties: best single
    neuron, then lowest index), recomputed from scratch here."""
    from onnx_ocnna.fc_width import csi, csi_width, greedy_csi_order

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 90)
    features = rng.standard_normal((90, 7))
    features[:, 2] += 2.0 * labels  # neuron 2 separates the classes best
    features[:, 5] += 1.0 * (labels == 1)
    order, curve = greedy_csi_order(features, labels)
    single = [csi(features[:, [j]], labels) for j in range(7)]
    chosen: list[int] = []
    for step in range(7):
        candidates = [j for j in range(7) if j not in chosen]
        values = {j: csi(features[:, chosen + [j]], labels) for j in candidates}
        best = max(candidates, key=lambda j: (round(values[j] * 90), single[j], -j))
        assert order[step] == best and curve[step] == pytest.approx(values[best])
        chosen.append(best)
    assert order[0] == 2
    assert curve[-1] == pytest.approx(csi(features, labels))
    width = csi_width(curve, 0.01)
    assert curve[width - 1] >= 0.99 * curve[-1] and (width == 1 or curve[width - 2] < 0.99 * curve[-1])


def test_csi_width_is_the_smallest_prefix_within_tolerance():
    from onnx_ocnna.fc_width import csi_width

    curve = np.array([0.5, 0.8, 0.9, 0.95, 0.91])
    assert csi_width(curve, 0.0) == 4  # the prefix may pass the full layer's CSI
    assert csi_width(curve, 0.02) == 3
    assert csi_width(curve, 0.5) == 1
    with pytest.raises(Exception, match="csi-tolerance"):
        csi_width(curve, 1.5)


def test_fc_width_csi_sizes_the_hidden_layers(exports, tmp_path):
    """Each hidden layer keeps the CSI prefix; the convs are left to the percentile (0 here)."""
    from onnx_ocnna.cli import main

    model = exports("matmul")
    data = tmp_path / "calib.npz"
    np.savez(data, **_labelled(model, 200))
    path, out, report_path = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(model, str(path))
    code = main([str(path), str(out), "--calib", str(data), "--fc-width", "csi", "--csi-tolerance", "0.05",
                 "--percentile", "0", "--report", str(report_path), "--quiet"])
    assert code == 0
    import json

    report = json.loads(report_path.read_text())
    rows = {r["layer"]: r for r in report["extra"]["fc_width"]}
    assert sorted(r["channels"] for r in rows.values()) == sorted(HIDDEN)
    widths = {w["layer"]: (w["before"], w["after"]) for w in report["extra"]["widths"]}
    for layer, row in rows.items():
        assert widths[layer] == (row["channels"], row["kept"])
        assert len(row["curve"]) == row["channels"]
        assert row["csi_kept"] >= 0.95 * row["csi_full"] - 1e-12
        assert row["csi_kept"] == row["curve"][row["kept"] - 1]
        if row["kept"] > 1:  # the smallest such prefix
            assert row["curve"][row["kept"] - 2] < 0.95 * row["csi_full"]
    assert any(r["kept"] < r["channels"] for r in rows.values())
    assert all(after == before for layer, (before, after) in widths.items() if layer not in rows)
    assert report["timings"]["fc_width_s"] > 0


def test_fc_width_csi_counts_towards_a_budget(exports, tmp_path):
    model = exports("ts")
    data = tmp_path / "calib.npz"
    np.savez(data, **_labelled(model, 96))
    pruned, report = compress(model, str(data), criterion="l1", target_params=0.5, damage_samples=32,
                              fc_width="csi", csi_tolerance=0.05, reconstruct=False, progress=False)
    assert report.after.parameters <= 0.5 * report.before.parameters
    widths = {w["layer"]: w["after"] for w in report.extra["widths"]}
    assert all(widths[r["layer"]] == r["kept"] for r in report.extra["fc_width"])
    assert {g["members"][0] for g in report.extra["allocation"]["groups"]}.isdisjoint(
        r["layer"] for r in report.extra["fc_width"])
    with pytest.raises(Exception, match="labelled"):
        np.savez(tmp_path / "plain.npz", input=_labelled(model, 8)["input"])
        compress(model, str(tmp_path / "plain.npz"), fc_width="csi", progress=False)
