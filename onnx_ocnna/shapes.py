"""Tensor shapes from the best source available, for the channel analysis and the MAC count.

Exporters differ in what shape information they leave: some write value_info for every
tensor, some none; ONNX's own inference stops at operators it cannot propagate values
through (a Reshape whose target is computed from ``Shape`` at opset 8, where ONNX has no data
propagation), and ONNX Runtime's symbolic inference (``onnxruntime.tools.
symbolic_shape_infer``) carries such computed shapes as sympy expressions. The sources, in
order of trust:

1. ``value_info``: what the model itself declares (its value_info and graph outputs);
2. ``onnx``: ONNX shape inference with data propagation;
3. ``symbolic``: ONNX Runtime's symbolic shape inference (``auto_merge``), run only when the
   first two leave a tensor's rank or a non-input dimension unknown;
4. ``observed``: shapes seen when the model ran on real inputs (:func:`observed_shapes`; the
   API observes a calibration batch when a group would otherwise be frozen for a missing
   shape, ``api.pruner_for``); only dims that stay the same across runs are constants.

For each tensor the source that knows the most dimensions as integers wins; on a tie the
earlier source. Where the sources leave gaps, ONNX's inference runs once more starting from
the shapes found, so its rules carry them on. A dim is an int (static), a str (a symbol such
as ``batch``) or None.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterable

import numpy as np
import onnx

Dims = list[int | str | None]
"""One tensor's dims: int for a static dim, str for a named symbol, None for unknown."""


def infer_model(model: onnx.ModelProto, observed: dict[str, tuple[int, Dims]] | None = None,
                symbolic: bool | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose ``graph.value_info`` holds the best shape of every tensor.

    Graph inputs declared with a non-positive ``dim_value`` (Paddle2ONNX writes -1 for a
    dynamic dim) are given a named symbol instead, so no source mistakes -1 for a size.

    Args:
        model: the model (weights may be external-data-loaded or not; only shapes are read).
        observed: tensor name -> (ONNX element type, dims) seen at run time (source 4), from
            :func:`observed_shapes`.
        symbolic: run ONNX Runtime's symbolic inference always (True), never (False) or only
            when the other sources leave a shape incomplete (None).
    """
    declared = onnx.ModelProto()
    declared.CopyFrom(model)
    _name_dynamic_input_dims(declared)
    own = _value_infos(declared.graph.value_info, declared.graph.output)
    inferred = _onnx_inference(declared)
    sources: list[dict[str, tuple[int, Dims]]] = [own, _value_infos(inferred.graph.value_info, inferred.graph.output)]
    best = _merge(sources)
    if own and _incomplete(declared, best):
        # ONNX's inference ran from scratch (stale value_info must not mislead it); where it
        # stopped, let it go on from the declared shapes.
        sources.append(_seeded_inference(declared, best))
        best = _merge(sources)
    added = False
    if symbolic or (symbolic is None and _incomplete(declared, best)):
        sym = symbolic_inference(declared)
        if sym:
            sources.append(sym)
            added = True
    if observed:
        sources.append({name: (elem, list(dims)) for name, (elem, dims) in observed.items()})
        added = True
    if added:
        best = _merge(sources)
        if _incomplete(declared, best):  # ONNX's rules may carry the new shapes further
            sources.append(_seeded_inference(declared, best))
            best = _merge(sources)
    return _with_value_info(inferred, declared, best)


def _name_dynamic_input_dims(model: onnx.ModelProto) -> None:
    """Turn dim_value <= 0 on graph inputs into a symbol named after the input and axis."""
    for value in model.graph.input:
        if not value.type.HasField("tensor_type"):
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.dim_param = f"{value.name}_dim{axis}"


# Float initializers of more elements than this go to ONNX's inference as type and dims only.
# Inference reads the values of shape-carrying inputs alone (integer, or a handful of Resize
# scales), and the weights' bytes were serialised and parsed on every call: on torchvision's
# ResNet-50 (100 MB) that was 0.24 s of each of the allocation's 3 s candidate cuts.
_VALUELESS_ELEMENTS = 4096


def onnx_inference(model: onnx.ModelProto, values: bool = True) -> onnx.ModelProto:
    """ONNX shape inference alone, from scratch (value_info cleared), with data propagation
    where it works: for a rewritten model about to be written, whose value_info must say only
    what ONNX itself derives. Raises what ONNX raises on an invalid graph. Large float weights
    are left out of the inference and put back afterwards (same result, less copying), unless
    ``values`` is False: then they stay name, type and dims only (for callers reading shapes)."""
    light = _without_weight_values(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # data propagation can fail where plain inference does not
        inferred = onnx.shape_inference.infer_shapes(light)
    if values:
        del inferred.graph.initializer[:]
        inferred.graph.initializer.extend(model.graph.initializer)
    return inferred


def _without_weight_values(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without value_info whose large float initializers keep their name,
    type and dims but no values."""
    light = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(light, field, value)
    for field, value in model.graph.ListFields():
        if field.name not in ("initializer", "value_info"):
            _copy_field(light.graph, field, value)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    for init in model.graph.initializer:
        if init.data_type in floats and int(np.prod(init.dims)) > _VALUELESS_ELEMENTS \
                and init.data_location != onnx.TensorProto.EXTERNAL:
            light.graph.initializer.add(name=init.name, dims=init.dims, data_type=init.data_type)
        else:
            light.graph.initializer.add().CopyFrom(init)
    return light


def _copy_field(target, field, value) -> None:
    if hasattr(value, "extend"):  # a repeated field
        getattr(target, field.name).extend(value)
    elif hasattr(value, "CopyFrom"):  # a message
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def _onnx_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    """:func:`onnx_inference` as one source among others (the model's value_info is a separate
    one): on an invalid graph, the model without value_info, as the other sources may still
    know the shapes."""
    try:
        return onnx_inference(model)
    except Exception:  # noqa: BLE001
        cleared = onnx.ModelProto()
        cleared.CopyFrom(model)
        del cleared.graph.value_info[:]
        return cleared


def _seeded_inference(model: onnx.ModelProto, best: dict[str, tuple[int, Dims]]) -> dict[str, tuple[int, Dims]]:
    """ONNX shape inference started from the shapes known so far (as value_info)."""
    seeded = onnx.ModelProto()
    seeded.CopyFrom(model)
    del seeded.graph.value_info[:]
    skip = {v.name for v in seeded.graph.input} | {i.name for i in seeded.graph.initializer} \
        | {v.name for v in seeded.graph.output}
    for name, (elem, dims) in best.items():
        if name not in skip and elem:
            seeded.graph.value_info.append(onnx.helper.make_tensor_value_info(name, elem, dims))
    try:
        result = onnx.shape_inference.infer_shapes(seeded, data_prop=True)
    except Exception:  # a conflict between sources: keep what the others said
        return {}
    return _value_infos(result.graph.value_info, result.graph.output)


def symbolic_inference(model: onnx.ModelProto) -> dict[str, tuple[int, Dims]]:
    """Shapes from ONNX Runtime's symbolic shape inference (``auto_merge=True``), {} if it fails.

    The engine is driven step by step rather than through ``SymbolicShapeInference.
    infer_shapes`` because that function, when a node cannot be inferred, writes
    ``sym_shape_infer_temp.onnx`` into the working directory and raises, discarding the shapes
    it did find; here whatever was inferred before the failure is kept.
    """
    try:
        engine_module = _symbolic_shape_infer()
    except ImportError:  # sympy missing: the source is simply not available
        return {}
    SymbolicShapeInference, get_opset = engine_module.SymbolicShapeInference, engine_module.get_opset
    if (get_opset(model) or 0) < 7:  # the engine's own lower bound
        return {}
    logger = logging.getLogger(engine_module.__name__)  # the module logs under its own name
    level = logger.level
    logger.setLevel(logging.ERROR)  # it warns about every op it has no rule for
    engine = SymbolicShapeInference(int_max=2**31 - 1, auto_merge=True, guess_output_rank=False, verbose=0)
    try:
        engine._preprocess(model)
        while engine.run_:
            engine._infer_impl()
    except Exception:  # keep what was inferred before the node it could not handle
        pass
    finally:
        logger.setLevel(level)
    known = getattr(engine, "known_vi_", {}) or {}
    initializers = {i.name for i in model.graph.initializer}
    return _value_infos(v for k, v in known.items() if k not in initializers)


def observed_shapes(model: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]],
                    names: Iterable[str] | None = None) -> dict[str, tuple[int, Dims]]:
    """Shapes of intermediate tensors seen in ONNX Runtime runs (source 4).

    Each run adds the tensors as graph outputs. A dim with the same size in every run is an
    int; one that changes (the batch, a dynamic height) becomes a symbol naming its sizes run
    by run (``obs_2_3``), so two tensors that vary alike share a symbol. Give at least two
    feeds that differ in every dynamic input dim, or a dynamic dim is taken for a constant.

    Args:
        feeds: input name -> array, one dict per run.
        names: the tensors to observe (default: every node output).

    Returns:
        tensor name -> (ONNX element type, dims), for the tensors every run produced with one rank.
    """
    from onnx_ocnna.collect import with_outputs  # collect imports the analysis, which imports this
    from onnx_ocnna.model_io import ort_session

    wanted = list(names) if names is not None else [o for n in model.graph.node for o in n.output if o]
    session = ort_session(with_outputs(model, wanted))
    order = [o.name for o in session.get_outputs() if o.name in set(wanted)]
    runs: dict[str, list[tuple[int, ...]]] = {name: [] for name in order}
    types: dict[str, int] = {}
    for feed in feeds:
        for name, value in zip(order, session.run(order, feed)):
            runs[name].append(tuple(np.shape(value)))
            types[name] = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype)
    seen: dict[str, tuple[int, Dims]] = {}
    for name, shapes in runs.items():
        if not shapes or len({len(s) for s in shapes}) != 1:
            continue
        seen[name] = (types[name], [sizes[0] if len(set(sizes)) == 1 else "obs_" + "_".join(map(str, sizes))
                                    for sizes in zip(*shapes)])
    return seen


# ------------------------------------------------------------------------------------------
# Merging


def _dims_of(value: onnx.ValueInfoProto) -> tuple[int, Dims] | None:
    """(elem_type, dims) of a tensor value info, None when its rank is unknown."""
    if not value.type.HasField("tensor_type"):
        return None
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims: Dims = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_value") and dim.dim_value == 0:
            dims.append(0)  # an empty tensor (e.g. an unused Resize roi) is a real size
        elif dim.HasField("dim_param") and dim.dim_param:
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return tensor_type.elem_type, dims


def declared_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, Dims]]:
    """Tensor name -> (elem_type, dims) where ``model``'s value infos and graph inputs and
    outputs give a rank."""
    return _value_infos(model.graph.value_info, model.graph.input, model.graph.output)


def _value_infos(*groups: Iterable[onnx.ValueInfoProto]) -> dict[str, tuple[int, Dims]]:
    found = {}
    for group in groups:
        for value in group:
            entry = _dims_of(value)
            if entry is not None and value.name:
                found[value.name] = entry
    return found


def _known(dims: Dims) -> int:
    return sum(isinstance(d, int) for d in dims)


def _merge(sources: list[dict[str, tuple[int, Dims]]]) -> dict[str, tuple[int, Dims]]:
    """Per tensor, the source with the most static dims (the earlier source on a tie).

    A tensor's dims are taken whole from one source, so symbols stay consistent within it.
    """
    best: dict[str, tuple[int, Dims]] = {}
    for source in sources:
        for name, (elem, dims) in source.items():
            current = best.get(name)
            if current is None or _known(dims) > _known(current[1]):
                best[name] = (elem or (current[0] if current else 0), dims)
    return best


@functools.cache
def _symbolic_shape_infer() -> ModuleType:
    """ONNX Runtime's ``symbolic_shape_infer`` module, loaded from its file when its package is
    not imported yet.

    Importing it as ``onnxruntime.tools.symbolic_shape_infer`` first runs
    ``onnxruntime/tools/__init__.py``, which imports torch whenever torch is installed (for an
    unrelated export helper): 1.7 s and about 400 MiB on every scoring run of a model that
    needs this source (ResNet-56: scoring's peak memory 1,050 instead of 650 MiB). The module
    itself needs only numpy, onnx, sympy and packaging.
    """
    loaded = sys.modules.get("onnxruntime.tools.symbolic_shape_infer")
    if loaded is not None:
        return loaded
    import onnxruntime

    path = Path(onnxruntime.__file__).parent / "tools" / "symbolic_shape_infer.py"
    spec = importlib.util.spec_from_file_location("onnx_ocnna._ort_symbolic_shape_infer", path)
    if spec is None or spec.loader is None or not path.is_file():
        from onnxruntime.tools import symbolic_shape_infer  # a layout this loader does not know

        return symbolic_shape_infer
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # raises ImportError without sympy, as the import would
    return module


def _incomplete(model: onnx.ModelProto, best: dict[str, tuple[int, Dims]]) -> bool:
    """Whether some node output has no rank, or a dim that is neither static nor an input symbol."""
    symbols = {d.dim_param for v in model.graph.input if v.type.HasField("tensor_type")
               for d in v.type.tensor_type.shape.dim if d.HasField("dim_param")}
    for node in model.graph.node:
        for name in node.output:
            if not name:
                continue
            entry = best.get(name)
            if entry is None or any(not isinstance(d, int) and d not in symbols for d in entry[1]):
                return True
    return False


def _with_value_info(inferred: onnx.ModelProto, declared: onnx.ModelProto,
                     best: dict[str, tuple[int, Dims]]) -> onnx.ModelProto:
    """``inferred`` with its value_info replaced by ``best`` (graph inputs, outputs and
    initializers keep their own declarations; an output of unknown rank gets the best shape)."""
    out = onnx.ModelProto()
    out.CopyFrom(inferred)
    del out.graph.input[:]
    out.graph.input.extend(declared.graph.input)
    skip = {v.name for v in out.graph.input} | {i.name for i in out.graph.initializer}
    outputs = {v.name: v for v in out.graph.output}
    del out.graph.value_info[:]
    for name, (elem, dims) in best.items():
        if name in skip:
            continue
        if name in outputs:
            if _dims_of(outputs[name]) is None and elem:
                outputs[name].CopyFrom(onnx.helper.make_tensor_value_info(name, elem, dims))
            continue
        if not elem:
            continue
        out.graph.value_info.append(onnx.helper.make_tensor_value_info(name, elem, dims))
    return out
