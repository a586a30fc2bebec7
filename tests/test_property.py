"""Property-based tests of analysis and surgery (issue 7): hypothesis draws random CNNs from
the building blocks exporters produce, random channels are made exactly zero, a plan removes
them, and the outputs must not change while every written model passes the checker and runs.

A graph is a stem Conv followed by random blocks: Conv chains (BatchNormalization before or
after the activation; ReLU, ReLU6 as Clip, LeakyReLU, SiLU, HardSwish), residual Adds (with
identity, 1x1 projection or option-A channel-padded shortcuts), DenseNet Concats, an Add of
two Concats cut at different places, Splits and Slices on the channel axis, depthwise and
grouped Convs, pools, squeeze-excite gates (Sigmoid or HardSigmoid), channel Pads, spatial
Pads before a 'valid' Conv, and a head (GlobalAveragePool/ReduceMean/Flatten -> Gemm,
Reshape -> MatMul + Add, the NHWC Transpose -> Reshape -> MatMul of tf2onnx, or rarely the
feature map itself), at opsets 9-21 with fixed or symbolic batch and NCHW or NHWC input.

The oracle's random pick is trimmed so it never empties a Split piece, a Slice or a member
Conv (see :func:`oracle.pick_channels`); the number of channels removed is then asserted exactly.

The examples are derandomised so CI is reproducible; set OCNNA_HYPOTHESIS_RANDOM=1 (and
OCNNA_HYPOTHESIS_EXAMPLES=N) to explore new graphs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from graphs import GraphBuilder
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from oracle import check_lossless, pick_channels

from onnx_ocnna.channels.analysis import analyse
from onnx_ocnna.model_io import ort_session, sample_feeds

EXAMPLES = int(os.environ.get("OCNNA_HYPOTHESIS_EXAMPLES", "200"))
RANDOM = os.environ.get("OCNNA_HYPOTHESIS_RANDOM") == "1"
# Shrinking a failure rebuilds and re-runs hundreds of graphs (minutes); by default the first
# failing graph is reported as drawn, with its block log. OCNNA_HYPOTHESIS_SHRINK=1 shrinks.
PHASES = [Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("OCNNA_HYPOTHESIS_SHRINK") == "1" else [])
OPSETS = [9, 11, 13, 15, 18, 21]
ACTIVATIONS = ["relu", "relu6", "leaky", "silu", "hardswish", "none"]


@dataclass
class Net:
    """A graph under construction: the current tensor, its channels and square spatial size."""

    g: GraphBuilder
    x: str
    c: int
    hw: int
    log: list[str] = field(default_factory=list)
    # What the analysis is right to freeze, as words of its reason ("channel multiplier").
    may_freeze: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- op helpers
# Each writes the op the way its opset spells it (attributes before, inputs after a change).


def _ints(g: GraphBuilder, values) -> str:
    return g.const(np.asarray(values, dtype=np.int64))


def activation(g: GraphBuilder, x: str, kind: str) -> str:
    if kind == "relu":
        return g.relu(x)
    if kind == "relu6":
        if g.opset < 11:
            return g.node("Clip", [x], min=0.0, max=6.0)[0]
        return g.node("Clip", [x, g.const(np.float32(0)), g.const(np.float32(6))])[0]
    if kind == "leaky":
        return g.node("LeakyRelu", [x], alpha=0.1)[0]
    if kind == "silu":
        return g.node("Mul", [x, g.node("Sigmoid", [x])[0]])[0]
    if kind == "hardswish":
        if g.opset >= 14:
            return g.node("HardSwish", [x])[0]
        return g.node("Mul", [x, g.node("HardSigmoid", [x], alpha=1 / 6, beta=0.5)[0]])[0]
    return x


def split(g: GraphBuilder, x: str, sizes: list[int]) -> list[str]:
    if g.opset < 13:
        return g.node("Split", [x], n_out=len(sizes), axis=1, split=sizes)
    return g.node("Split", [x, _ints(g, sizes)], n_out=len(sizes), axis=1)


def slice_channels(g: GraphBuilder, x: str, start: int, end: int) -> str:
    if g.opset < 10:
        return g.node("Slice", [x], starts=[start], ends=[end], axes=[1])[0]
    return g.node("Slice", [x, _ints(g, [start]), _ints(g, [end]), _ints(g, [1])])[0]


def pad(g: GraphBuilder, x: str, pads: list[int]) -> str:
    if g.opset < 11:
        return g.node("Pad", [x], pads=pads, mode="constant", value=0.0)[0]
    return g.node("Pad", [x, _ints(g, pads)], mode="constant")[0]


def reduce_mean(g: GraphBuilder, x: str, axes: list[int], keepdims: int) -> str:
    if g.opset < 18:
        return g.node("ReduceMean", [x], axes=axes, keepdims=keepdims)[0]
    return g.node("ReduceMean", [x, _ints(g, axes)], keepdims=keepdims)[0]


def squeeze(g: GraphBuilder, x: str, axes: list[int]) -> str:
    if g.opset < 13:
        return g.node("Squeeze", [x], axes=axes)[0]
    return g.node("Squeeze", [x, _ints(g, axes)])[0]


def matmul_add(g: GraphBuilder, x: str, k: int, n: int) -> str:
    w = g.const(g.rng.standard_normal((k, n)).astype(np.float32) * 0.1)
    b = g.const(g.rng.standard_normal(n).astype(np.float32) * 0.1)
    return g.node("Add", [g.node("MatMul", [x, w])[0], b])[0]


# --------------------------------------------------------------------------- blocks


def block_conv(draw, net: Net) -> None:
    """Conv [+ BN] + activation, BN possibly after the activation; sometimes strided."""
    c_out = draw(st.integers(2, 12))
    k = draw(st.sampled_from([1, 3]))
    stride = 2 if net.hw >= 4 and draw(st.booleans()) else 1
    bn = draw(st.sampled_from(["before", "after", "none"]))
    act = draw(st.sampled_from(ACTIVATIONS))
    y = net.g.conv(net.x, net.c, c_out, k=k, stride=stride, bias=bn == "none" or draw(st.booleans()))
    if bn == "before":
        y = net.g.bn(y, c_out)
    y = activation(net.g, y, act)
    if bn == "after":
        y = net.g.bn(y, c_out)
    net.x, net.c, net.hw = y, c_out, (net.hw + 1) // 2 if stride == 2 else net.hw
    net.log.append(f"conv(k{k},s{stride},{c_out},bn {bn},{act})")


def block_residual(draw, net: Net) -> None:
    """y = act(shortcut + branch): identity, 1x1 projection, or zero-padded channels (option A)."""
    kind = draw(st.sampled_from(["identity", "projection", "padded"]))
    act = draw(st.sampled_from(ACTIVATIONS))
    c_out = net.c if kind == "identity" else draw(st.integers(net.c + 1 if kind == "padded" else 2, net.c + 6))
    mid = draw(st.integers(2, 10))
    h = activation(net.g, net.g.bn(net.g.conv(net.x, net.c, mid, bias=False), mid), act)
    h = net.g.bn(net.g.conv(h, mid, c_out, bias=False), c_out)
    if kind == "identity":
        shortcut = net.x
    elif kind == "projection":
        shortcut = net.g.bn(net.g.conv(net.x, net.c, c_out, k=1, bias=False), c_out)
    else:
        before = draw(st.integers(0, c_out - net.c))
        shortcut = pad(net.g, net.x, [0, before, 0, 0, 0, c_out - net.c - before, 0, 0])
    order = [shortcut, h] if draw(st.booleans()) else [h, shortcut]
    net.x, net.c = activation(net.g, net.g.node("Add", order)[0], act), c_out
    net.log.append(f"residual({kind},{c_out},{act})")


def block_concat(draw, net: Net) -> None:
    """DenseNet: x = Concat(x, f(x)) [, with a second branch]."""
    growth = draw(st.integers(1, 6))
    act = draw(st.sampled_from(ACTIVATIONS))
    pieces = [net.x, activation(net.g, net.g.conv(net.x, net.c, growth), act)]
    total = net.c + growth
    if draw(st.booleans()):
        extra = draw(st.integers(1, 4))
        pieces.append(activation(net.g, net.g.conv(net.x, net.c, extra, k=1), act))
        total += extra
    pieces = draw(st.permutations(pieces))
    net.x, net.c = net.g.node("Concat", list(pieces), axis=1)[0], total
    net.log.append(f"concat({total})")


def block_concat_add(draw, net: Net) -> None:
    """Add(Concat(a, b), Concat(c, d)) with different cut points: no member Conv shows every
    channel of the group (what the group's plan entry must still express)."""
    total = draw(st.integers(3, 10))
    cut_ab, cut_cd = draw(st.integers(1, total - 1)), draw(st.integers(1, total - 1))
    act = draw(st.sampled_from(ACTIVATIONS))
    pieces = [activation(net.g, net.g.conv(net.x, net.c, n, k=1), act)
              for n in (cut_ab, total - cut_ab, cut_cd, total - cut_cd)]
    left = net.g.node("Concat", pieces[:2], axis=1)[0]
    right = net.g.node("Concat", pieces[2:], axis=1)[0]
    net.x, net.c = net.g.node("Add", [left, right])[0], total
    net.log.append(f"concat_add({cut_ab}|{cut_cd} of {total})")


def block_split(draw, net: Net) -> None:
    """Split the channels in two pieces; each through a Conv or kept; Concat or Add back."""
    if net.c < 2:
        return block_conv(draw, net)
    first = draw(st.integers(1, net.c - 1))
    a, b = split(net.g, net.x, [first, net.c - first])
    out_a = draw(st.integers(1, 6))
    a = activation(net.g, net.g.conv(a, first, out_a), "relu")
    if draw(st.booleans()):
        out_b = out_a
        b = activation(net.g, net.g.conv(b, net.c - first, out_b), "relu")
        if draw(st.booleans()):
            net.x, net.c = net.g.node("Add", [a, b])[0], out_a
            net.log.append(f"split({first})-add")
            return
    else:
        out_b = net.c - first
    net.x, net.c = net.g.node("Concat", [a, b], axis=1)[0], out_a + out_b
    net.log.append(f"split({first})-concat")


def block_slice(draw, net: Net) -> None:
    """Keep a channel range of x (a Slice on the channel axis) and continue on it."""
    if net.c < 2:
        return block_conv(draw, net)
    start = draw(st.integers(0, net.c - 1))
    end = draw(st.integers(start + 1, net.c))
    net.x, net.c = slice_channels(net.g, net.x, start, end), end - start
    net.log.append(f"slice({start}:{end})")


def block_depthwise(draw, net: Net) -> None:
    """Depthwise 3x3 [+ BN] + activation, sometimes with a channel multiplier (frozen)."""
    multiplier = 2 if draw(st.integers(0, 5)) == 0 else 1
    act = draw(st.sampled_from(ACTIVATIONS))
    c_out = net.c * multiplier
    y = net.g.conv(net.x, net.c, c_out, group=net.c, bias=draw(st.booleans()))
    if draw(st.booleans()):
        y = net.g.bn(y, c_out)
    if multiplier > 1 and net.c > 1:  # with one input channel it is a plain Conv
        net.may_freeze.append("channel multiplier")
    net.x, net.c = activation(net.g, y, act), c_out
    net.log.append(f"depthwise(x{multiplier},{act})")


def block_grouped(draw, net: Net) -> None:
    """Grouped Conv with 2..C-1 groups (channel j of every group tied)."""
    divisors = [d for d in range(2, net.c) if net.c % d == 0]
    if not divisors:
        return block_conv(draw, net)
    groups = draw(st.sampled_from(divisors))
    c_out = groups * draw(st.integers(1, 3))
    y = net.g.conv(net.x, net.c, c_out, group=groups)
    net.x, net.c = activation(net.g, y, draw(st.sampled_from(ACTIVATIONS))), c_out
    net.log.append(f"grouped(g{groups},{c_out})")


def block_pool(draw, net: Net) -> None:
    kind = draw(st.sampled_from(["max2", "avg3", "max3"]))
    g = net.g
    if kind == "max2" and net.hw >= 2:
        net.x, net.hw = g.node("MaxPool", [net.x], kernel_shape=[2, 2], strides=[2, 2])[0], net.hw // 2
    elif kind == "avg3":
        net.x = g.node("AveragePool", [net.x], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])[0]
    else:
        net.x = g.node("MaxPool", [net.x], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])[0]
    net.log.append(f"pool({kind})")


def block_bn(draw, net: Net) -> None:
    """A lone BatchNormalization (after an Add or a Concat, as DenseNets have)."""
    net.x = net.g.bn(net.x, net.c)
    net.log.append("bn")


def block_se(draw, net: Net) -> None:
    """Squeeze-excite: x * gate(Conv(act(Conv(GAP(x))))), gate Sigmoid or HardSigmoid."""
    g = net.g
    squeeze_op = draw(st.sampled_from(["gap", "reducemean"]))
    pooled = g.node("GlobalAveragePool", [net.x])[0] if squeeze_op == "gap" else reduce_mean(g, net.x, [2, 3], 1)
    hidden = draw(st.integers(1, 4))
    h = activation(net.g, net.g.conv(pooled, net.c, hidden, k=1), draw(st.sampled_from(["relu", "silu"])))
    gate = net.g.conv(h, hidden, net.c, k=1)
    if draw(st.booleans()):
        gate = g.node("Sigmoid", [gate])[0]
    else:
        gate = g.node("HardSigmoid", [gate], alpha=0.2, beta=0.5)[0]
    order = [net.x, gate] if draw(st.booleans()) else [gate, net.x]
    net.x = g.node("Mul", order)[0]
    net.log.append(f"se({squeeze_op},{hidden})")


def block_channel_pad(draw, net: Net) -> None:
    """Zero channels padded on the channel axis (the consumer Conv reads them)."""
    before, after = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    if before + after == 0:
        after = 1
    net.x, net.c = pad(net.g, net.x, [0, before, 0, 0, 0, after, 0, 0]), net.c + before + after
    net.log.append(f"chpad({before},{after})")


def block_spatial_pad(draw, net: Net) -> None:
    """An explicit spatial Pad before a 'valid' Conv (Keras ZeroPadding2D, tf2onnx 'same')."""
    c_out = draw(st.integers(2, 10))
    padded = pad(net.g, net.x, [0, 0, 1, 1, 0, 0, 1, 1])
    y = activation(net.g, net.g.conv(padded, net.c, c_out, k=3, pad=0), draw(st.sampled_from(ACTIVATIONS)))
    net.x, net.c = y, c_out
    net.log.append(f"pad(hw)+conv({c_out})")


BLOCKS = {
    "conv": block_conv, "residual": block_residual, "concat": block_concat, "concat_add": block_concat_add,
    "split": block_split, "slice": block_slice, "depthwise": block_depthwise, "grouped": block_grouped,
    "pool": block_pool, "bn": block_bn, "se": block_se, "chpad": block_channel_pad, "pad": block_spatial_pad,
}


def head(draw, net: Net, batch) -> str:
    """The classifier (reads all channels) or, rarely, the feature map itself as the output."""
    g, c, hw = net.g, net.c, net.hw
    classes = draw(st.integers(2, 5))
    kind = draw(st.sampled_from(["gap_flatten_gemm", "flatten_gemm", "gap_reshape_matmul", "nhwc_reshape_matmul",
                                 "reducemean_gemm", "gap_squeeze_gemm", "feature_map"]))
    net.log.append(f"head({kind})")
    if kind == "feature_map":  # the channels reach the graph output: frozen, with that reason
        net.may_freeze.append("reaches the graph output")
        return net.x
    if kind == "gap_flatten_gemm":
        return g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [net.x])[0]], axis=1)[0], c, classes)
    if kind == "flatten_gemm":
        return g.gemm(g.node("Flatten", [net.x], axis=1)[0], c * hw * hw, classes)
    if kind == "reducemean_gemm":
        return g.gemm(reduce_mean(g, net.x, [2, 3], 0), c, classes)
    if kind == "gap_squeeze_gemm":
        return g.gemm(squeeze(g, g.node("GlobalAveragePool", [net.x])[0], [2, 3]), c, classes)
    if kind == "gap_reshape_matmul":
        pooled = g.node("GlobalAveragePool", [net.x])[0]
        targets = [[0, -1], [-1, c], [0, c]] + ([[batch, c], [batch, -1]] if isinstance(batch, int) else [])
        target = draw(st.sampled_from(targets))
        return matmul_add(g, g.node("Reshape", [pooled, _ints(g, target)])[0], c, classes)
    nhwc = g.node("Transpose", [net.x], perm=[0, 2, 3, 1])[0]
    flat = g.node("Reshape", [nhwc, _ints(g, [-1, hw * hw * c])])[0]
    return matmul_add(g, flat, hw * hw * c, classes)


@st.composite
def random_cnn(draw) -> tuple[onnx.ModelProto, Net]:
    opset = draw(st.sampled_from(OPSETS))
    g = GraphBuilder(seed=draw(st.integers(0, 2**16)), opset=opset)
    batch = draw(st.sampled_from([1, 2, "N"]))
    hw = draw(st.integers(3, 8))
    nhwc = draw(st.booleans())
    x = "x"
    if nhwc:  # tf2onnx: the NHWC input is transposed before the first Conv
        x = g.node("Transpose", [x], perm=[0, 3, 1, 2])[0]
    c = draw(st.integers(2, 10))
    net = Net(g, x, 3, hw, log=[f"opset {opset}, batch {batch}, {hw}x{hw}{' nhwc' if nhwc else ''}"])
    net.x, net.c = activation(g, g.bn(g.conv(x, 3, c), c), draw(st.sampled_from(ACTIVATIONS))), c
    for name in draw(st.lists(st.sampled_from(sorted(BLOCKS)), min_size=1, max_size=5)):
        BLOCKS[name](draw, net)
    out = head(draw, net, batch)
    if draw(st.integers(0, 3)) == 0 and out != net.x:
        out = g.node("Softmax", [out], axis=1 if opset < 13 else -1)[0]
    shape = [batch, hw, hw, 3] if nhwc else [batch, 3, hw, hw]
    return g.model(shape, out), net


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None, phases=PHASES,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(random_cnn(), st.floats(0.05, 0.9), st.integers(0, 1000))
def test_random_cnn_prunes_losslessly(case, fraction, seed):
    model, net = case
    note = " | ".join(net.log)
    analysis = analyse(model)
    for group in analysis.groups:
        if not group.prunable:
            assert group.frozen_reason, f"group {group.id} frozen without a reason: {note}"
            # Every op drawn here is supported: only a drawn freeze pattern may freeze a group.
            assert any(words in group.frozen_reason for words in net.may_freeze), \
                f"group {group.id} {group.members} frozen: {group.frozen_reason} | {note}"
    expected_removed = sum(len(c) for c in pick_channels(analysis, fraction, seed).values())
    result = check_lossless(model, fraction=fraction, seed=seed)
    assert result["max_rel_error"] < 1e-5, note
    assert result["removed"] == expected_removed, note
    if expected_removed:
        assert result["after_params"] < result["before_params"], note
    pruned = result["pruned"]
    onnx.checker.check_model(pruned, full_check=True)
    feeds = sample_feeds(model, batch=2, seed=seed)
    outputs = ort_session(pruned).run(None, feeds)
    expected = ort_session(model).run(None, feeds)
    assert [o.shape for o in outputs] == [e.shape for e in expected], note


# --------------------------------------------------------------------------- regressions
# Minimal graphs of failures the property test found.


def _member_covering_part_of_its_group() -> onnx.ModelProto:
    """stem (2 channels) and grow (1) are tied by a grouped Conv over Concat + channel Pad:
    group channels {stem0, grow0} and {stem1, pad}; removing the first empties Conv 'grow'."""
    g = GraphBuilder(opset=11)
    a = g.relu(g.conv("x", 3, 2, name="stem"))
    b = g.relu(g.conv(a, 2, 1, name="grow"))
    padded = pad(g, g.node("Concat", [a, b], axis=1)[0], [0, 0, 0, 0, 0, 1, 0, 0])
    y = g.relu(g.conv(padded, 4, 2, group=2, name="grouped"))
    out = g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [y])[0]], axis=1)[0], 2, 3)
    return g.model([1, 3, 3, 3], out)


def test_a_member_conv_keeps_one_filter():
    """A Conv left with no filters passes the checker but ONNX Runtime's optimiser rejects it:
    a plan may not empty a member, and selection keeps one of its channels."""
    from onnx_ocnna import api
    from onnx_ocnna.errors import PlanError
    from onnx_ocnna.plan import build_plan

    model = _member_covering_part_of_its_group()
    analysis = analyse(model)
    group = analysis.group_of("grow")
    assert group.members == ["stem", "grow"] and group.channels == 2
    shared = int(group.member_channels["grow"][0])
    plan = build_plan(analysis, {group.id: np.array([shared])}, model_sha256="")
    try:
        api.apply_plan(model, plan)
    except PlanError as exc:
        assert "every channel of output 'grow_out0' of Conv 'grow'" in str(exc)
    else:
        raise AssertionError("a plan emptying Conv 'grow' was applied")
    x = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    pruned, _ = api.compress(model, x, percentile=99, criterion="l1", progress=False)
    onnx.checker.check_model(pruned, full_check=True)
    ort_session(pruned).run(None, sample_feeds(model))


def test_size_one_channel_axis_is_not_mistaken_for_the_batch():
    """GlobalAveragePool of a 1-channel map at batch 1 is [1, 1, 1, 1]; Reshape to [0, 1] keeps
    the channel on axis 1 (the leading 1 is the copied batch), so nothing freezes."""
    g = GraphBuilder(opset=13)
    a = g.relu(g.conv("x", 3, 1, name="one"))
    flat = g.node("Reshape", [g.node("GlobalAveragePool", [a])[0], _ints(g, [0, 1])])[0]
    model = g.model([1, 3, 4, 4], matmul_add(g, flat, 1, 2))
    assert [group.frozen for group in analyse(model).groups] == [[""]]
