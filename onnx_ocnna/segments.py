"""Run a model over fixed calibration feeds one segment at a time, keeping the tensors that
cross each cut.

A layer-by-layer refit (:mod:`onnx_ocnna.reconstruct`) changes one layer's weights at a time,
in graph order, and before each change needs that layer's input as the model now computes
it. Run from the model's inputs, every layer costs a pass over everything before it: half
the model on average, 27 passes of ResNet-56 for its 55 layers. The tensors made before
the layer about to change do not change any more, so they are kept, and the next layer's
pass starts from them: the whole refit then costs about one pass of the model.

Kept tensors cost memory (images x their size): beyond ``budget`` bytes a cut is not kept,
and the next pass starts from the last cut that was (the model's inputs at worst), which is
as exact, only slower.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import onnx
from onnx import helper

from onnx_ocnna.collect import with_outputs
from onnx_ocnna.model_io import SharedWeights, ort_session

# Tensors kept at a cut, over all feeds, up to this many bytes.
FRONTIER_BUDGET = 1 << 30


class SegmentRunner:
    """The current values of a model's tensors over fixed feeds, computed from the last cut kept.

    Args:
        model: the model to run; its node list must keep its order between calls (weights
            may change, and a node may gain an initializer input).
        feeds: the calibration feeds, one dict (input name -> [B, ...]) per batch.
        budget: bytes of tensors kept at a cut, over all feeds (default :data:`FRONTIER_BUDGET`).
        start: a cut to start from, (node index, per feed the tensors that cross there), e.g.
            :meth:`OriginalPrefix.cut` of a model that is the original before that node.
    """

    def __init__(self, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                 budget: int | None = None, start: tuple[int, list[dict[str, np.ndarray]]] | None = None) -> None:
        self.feeds = feeds
        self.budget = FRONTIER_BUDGET if budget is None else budget
        # A node with a subgraph may read any outer tensor without naming it as an input, so
        # a cut cannot be found by following inputs: such models always run from their inputs.
        self.enabled = not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                               for n in model.graph.node for a in n.attribute)
        self.passes_from_inputs = 0
        self._reset()
        if start is not None and self.enabled:
            self._position, self._kept = start[0], list(start[1])

    def _reset(self) -> None:
        self._position = 0
        self._kept: list[dict[str, np.ndarray]] = [dict(feed) for feed in self.feeds]

    @property
    def position(self) -> int:
        """Index of the node before which the kept tensors were taken (0: the model's inputs)."""
        return self._position

    def run(self, model: onnx.ModelProto, wanted: list[str], before: int | None) -> Iterator[dict[str, np.ndarray]]:
        """Yield, feed by feed, the values of ``wanted`` as ``model`` computes them now.

        ``before``: index in ``model.graph.node`` of the next node whose weights will change;
        every node before it must be final. The tensors made before it and read from it on are
        kept for the next call. None keeps nothing new; a ``before`` behind the kept cut starts
        from the model's inputs again (for a model that does not change, any order is right).
        The generator must be run to its end for the cut to be kept; abandoned, the next call
        starts from the model's inputs.
        """
        if not self.enabled or before is None:
            yield from self._from_inputs(model, wanted)
            return
        if before < self._position:  # behind the kept cut: start again from the inputs
            self._reset()
        nodes = list(model.graph.node)
        crossing = _crossing(nodes, before, {i.name for i in model.graph.initializer})
        stored = set(self._kept[0]) if self._kept else set()
        computed = [n for n in dict.fromkeys(wanted + crossing) if n not in stored]
        try:
            segment = extract(model, nodes, self._kept[0], computed) if computed else None
        except KeyError:  # a tensor neither kept nor made by any node: run the old way
            yield from self._from_inputs(model, wanted)
            return
        session = ort_session(segment, spinning=False) if segment is not None else None
        inputs = {i.name for i in session.get_inputs()} if session is not None else set()
        keep = before > self._position
        fresh: list[dict[str, np.ndarray]] = []
        completed = False
        try:
            for index, kept in enumerate(self._kept):
                values = dict(kept)
                if session is not None:
                    outputs = session.run(computed, {k: v for k, v in kept.items() if k in inputs})
                    values.update(zip(computed, outputs))
                if keep:
                    fresh.append({n: values[n] for n in crossing})
                    if index == 0:
                        keep = _fits(fresh[0], crossing, self.feeds, self.budget)
                        if not keep:
                            fresh = []
                    if keep:  # the old cut's values of this feed are not read again
                        self._kept[index] = {}
                yield {n: values[n] for n in wanted}
            completed = True
        finally:
            if not completed:
                self._reset()
        if keep and completed:
            self._kept, self._position = fresh, before

    def _from_inputs(self, model: onnx.ModelProto, wanted: list[str]) -> Iterator[dict[str, np.ndarray]]:
        self.passes_from_inputs += 1
        yield from _run_from_inputs(model, wanted, self.feeds)


def _run_from_inputs(model: onnx.ModelProto, wanted: list[str],
                     feeds: list[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    session = ort_session(with_outputs(model, wanted), spinning=False)
    names = {i.name for i in session.get_inputs()}
    for feed in feeds:
        yield dict(zip(wanted, session.run(wanted, {k: v for k, v in feed.items() if k in names})))


def sample_count(feeds: list[dict[str, np.ndarray]]) -> int:
    """Samples in ``feeds`` (one dict, input name -> [B, ...], per batch)."""
    return sum(len(next(iter(f.values()))) for f in feeds)


def take_feeds(batches: Iterable, samples: int) -> list[dict[str, np.ndarray]]:
    """The feeds of the first ``samples`` samples of ``batches`` (calibration ``Batch`` objects),
    batch by batch, the last one cut short; read once, kept in memory."""
    feeds, count = [], 0
    for batch in batches:
        take = min(sample_count([batch.feeds]), samples - count)
        feeds.append({k: v[:take] for k, v in batch.feeds.items()})
        count += take
        if count >= samples:
            break
    return feeds


def _fits(first: dict[str, np.ndarray], names: list[str], feeds: list[dict[str, np.ndarray]], budget: int) -> bool:
    """Whether ``names`` (``first``: their values for the first feed) fit ``budget`` bytes over
    all feeds; the model's inputs are held anyway and not counted."""
    per_feed = sum(first[n].nbytes for n in names if n not in feeds[0])
    # Rows from the feed, not from a crossing tensor: that can be a scalar (a batch size read by
    # Shape -> Gather before a Reshape).
    rows = max(sample_count(feeds[:1]), 1)
    return per_feed / rows * sample_count(feeds) <= budget


def _crossing(nodes: list, before: int, initializers: set[str]) -> list[str]:
    """Tensors made before node ``before`` (or model inputs) that a node from ``before`` on reads."""
    made_later = {out for node in nodes[before:] for out in node.output}
    read_later = dict.fromkeys(name for node in nodes[before:] for name in node.input)
    return [name for name in read_later if name and name not in initializers and name not in made_later]


def extract(model: onnx.ModelProto, nodes: list, available: dict[str, np.ndarray],
            outputs: list[str], shared: SharedWeights | None = None) -> onnx.ModelProto:
    """The nodes of ``model`` that compute ``outputs`` from the tensors ``available`` (name ->
    one feed's value, [B, ...]), as a model whose inputs are those tensors, typed as the values
    are with any size of their first axis. Raises KeyError when an output cannot be reached.
    ``shared``: initializers equal to these are left as stubs (run it with ``ort_session(...,
    shared=shared)``)."""
    initializers = {i.name: i for i in model.graph.initializer}
    made_by = {out: index for index, node in enumerate(nodes) for out in node.output}
    have = set(available)
    needed_nodes: set[int] = set()
    read: set[str] = set()
    todo = list(outputs)
    while todo:
        name = todo.pop()
        if not name or name in read:
            continue
        read.add(name)
        if name in have or name in initializers:
            continue
        index = made_by[name]
        if index not in needed_nodes:
            needed_nodes.add(index)
            todo.extend(nodes[index].input)
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype),
                                            [None, *value.shape[1:]] if value.ndim else [])
              for name, value in available.items() if name in read]
    graph = helper.make_graph(
        [nodes[i] for i in sorted(needed_nodes)], f"{model.graph.name}_segment", inputs,
        [onnx.ValueInfoProto(name=name) for name in outputs],
        [shared.stub(initializers[name]) if shared is not None else initializers[name]
         for name in sorted(read & set(initializers))])
    segment = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    segment.functions.extend(model.functions)
    return segment


class OriginalPrefix:
    """Runs changed copies of one model (cuts of it) over fixed feeds, each from the original's
    tensors just before the first node the copy changes.

    A cut of one group changes nothing before that group's first layer, yet a plain run
    computes that prefix again for every candidate width (half of ResNet-56 on average). The
    original's tensors at the cut come from a :class:`SegmentRunner` over the original, which
    moves forward through the model as the cuts do; a tensor counts as unchanged when the node
    that makes it is the original's (same operator, attributes, inputs and initializer values)
    and reads only unchanged tensors.

    Args:
        original: the model the copies were cut from (their tensor names are its names).
        feeds: the calibration feeds, one dict (input name -> [B, ...]) per batch.
    """

    def __init__(self, original: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                 budget: int | None = None) -> None:
        self.original, self.feeds = original, feeds
        self.runner = SegmentRunner(original, feeds, budget)
        self._made_by = {out: node for node in original.graph.node for out in node.output}
        self._position = {node.output[0]: index for index, node in enumerate(original.graph.node) if node.output}
        self._initializers = {i.name: i for i in original.graph.initializer}
        self._inputs = {i.name for i in original.graph.input} - set(self._initializers)
        self.passes_from_inputs = 0
        self.shared = SharedWeights(original)

    def unchanged(self, model: onnx.ModelProto) -> set[str]:
        """Tensors of ``model`` whose values are the original's."""
        initializers = {i.name: i for i in model.graph.initializer}
        same = {i.name for i in model.graph.input} & self._inputs
        for node in model.graph.node:
            twin = self._made_by.get(node.output[0]) if node.output else None
            if (twin is not None and twin.op_type == node.op_type and twin.domain == node.domain
                    and list(twin.input) == list(node.input) and list(twin.output) == list(node.output)
                    and list(twin.attribute) == list(node.attribute)
                    and all(self._same_input(name, same, initializers) for name in node.input)):
                same.update(node.output)
        return same

    def _same_input(self, name: str, same: set[str], initializers: dict) -> bool:
        if not name or name in same:
            return True
        mine, theirs = initializers.get(name), self._initializers.get(name)
        return mine is not None and theirs is not None and mine == theirs

    def cut(self, model: onnx.ModelProto) -> tuple[int, list[dict[str, np.ndarray]]] | None:
        """(index of ``model``'s first changed node, per feed the tensors that cross there, all
        of them the original's values); None when the first node changes, or nothing does, or
        the tensors would not fit the budget."""
        if not self.runner.enabled:
            return None
        nodes = list(model.graph.node)
        same = self.unchanged(model)
        first = next((i for i, node in enumerate(nodes) if not set(node.output) <= same), len(nodes))
        if first == 0 or first == len(nodes):
            return None
        crossing = _crossing(nodes, first, {i.name for i in model.graph.initializer})
        # The original's node that the first changed node replaces: the original is kept cut there.
        before = self._position.get(nodes[first].output[0]) if nodes[first].output else None
        values = self._prefix(crossing, before)
        return (first, values) if values else None

    def run(self, model: onnx.ModelProto, wanted: list[str]) -> Iterator[dict[str, np.ndarray]]:
        """Yield, feed by feed, the values of ``wanted`` as ``model`` computes them."""
        found = self.cut(model)
        try:
            segment = extract(model, list(model.graph.node), found[1][0], wanted, self.shared) if found else None
        except KeyError:  # an output not reachable from the cut
            segment = None
        if segment is None:
            yield from self._from_inputs(model, wanted)
            return
        session = ort_session(segment, spinning=False, shared=self.shared)
        inputs = {i.name for i in session.get_inputs()}
        for values in found[1]:
            yield dict(zip(wanted, session.run(wanted, {k: v for k, v in values.items() if k in inputs})))

    def _prefix(self, names: list[str], before: int | None) -> list[dict[str, np.ndarray]] | None:
        """The original's ``names`` for every feed; None when they would not fit the budget."""
        values: list[dict[str, np.ndarray]] = []
        passes = self.runner.run(self.original, names, before)
        for index, found in enumerate(passes):
            values.append(found)
            if index == 0 and not _fits(found, names, self.feeds, self.runner.budget):
                passes.close()
                return None
        return values

    def _from_inputs(self, model: onnx.ModelProto, wanted: list[str]) -> Iterator[dict[str, np.ndarray]]:
        self.passes_from_inputs += 1
        yield from _run_from_inputs(model, wanted, self.feeds)
