"""Load, validate and atomically save ONNX models (external data included)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx

from onnx_ocnna.errors import InputError, ValidationError
from onnx_ocnna.metrics import is_float

# Above this size a model must be saved with external data (protobuf's 2 GiB limit).
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Files this process has put in place, in order: the CLI names them when a run is interrupted.
_written: list[Path] = []


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX model, with its external data, or raise ``InputError`` with one clear line."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: file is not readable")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: external data file missing ({exc.filename or exc})") from None
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
    if not model.graph.node:
        raise InputError(f"{path}: not an ONNX model (no graph nodes; truncated or a different format?)")
    if not model.graph.output:
        raise InputError(f"{path}: the ONNX graph has no outputs")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise InputError(f"{path}: invalid ONNX model: {_first_line(exc)}") from None
    return model


def model_sha256(model: onnx.ModelProto) -> str:
    """SHA-256 of the model's graph structure and weights (independent of external-data layout)."""
    digest = hashlib.sha256()
    for node in model.graph.node:
        digest.update(node.SerializeToString(deterministic=True))
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        digest.update(init.name.encode())
        digest.update(onnx.numpy_helper.to_array(init).tobytes())
    return digest.hexdigest()


def sample_feeds(model: onnx.ModelProto, batch: int = 2, seed: int = 0,
                 sizes: dict[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Random inputs for every graph input; symbolic dims become ``batch`` on axis 0, else the
    size in ``sizes`` or 1.

    Args:
        sizes: input name -> one sample's shape without the batch axis (e.g. (3, 48, 192) from
            the calibration data), for inputs whose height and width are dynamic.

    Returns:
        input name -> array with the model's dtype; float inputs are N(0, 1).
    """
    rng = np.random.default_rng(seed)
    initializers = {i.name for i in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        ttype = value.type.tensor_type
        dims = []
        sample = tuple((sizes or {}).get(value.name) or ())
        if sample and len(sample) + 1 != len(ttype.shape.dim):
            raise ValueError(f"sizes[{value.name!r}] = {list(sample)} does not fit the input's rank "
                             f"{len(ttype.shape.dim)} (give one sample's shape without the batch axis)")
        for axis, dim in enumerate(ttype.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(dim.dim_value)
            else:
                dims.append(batch if axis == 0 else int(sample[axis - 1]) if sample else 1)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.integers(0, 2, dims).astype(dtype)
        else:
            feeds[value.name] = rng.integers(0, 2, dims).astype(dtype)
    return feeds


class SharedWeights:
    """The large float initializers of one model, handed to ONNX Runtime as arrays, so that a
    session of a model cut from it does not serialise and parse the weights it kept unchanged.

    The allocation runs every candidate cut from the original's tensors before the cut
    (:class:`onnx_ocnna.segments.OriginalPrefix`): the rest of the model, weights included,
    was copied into a segment, serialised and parsed for each cut. Measured on Inception v3
    (96 px, 87 MB of weights), a session of the whole model took 0.28 s to make that way and
    0.08 s with the weights given as arrays, running alike.

    Args:
        model: the model whose initializers are shared.
        min_bytes: smaller initializers stay in the serialised model (shape constants among them).
    """

    LOCATION = "onnx-ocnna-shared-weights"  # a name ORT never opens: every stub is replaced

    def __init__(self, model: onnx.ModelProto, min_bytes: int = 4096) -> None:
        self._protos = {i.name: i for i in model.graph.initializer
                        if is_float(i.data_type) and i.HasField("raw_data") and len(i.raw_data) >= min_bytes}
        self._values: dict[str, object] = {}  # name -> OrtValue, made on first use

    def stub(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """``tensor`` itself, or when it equals the shared model's initializer of that name, a
        copy without data that names it as external (see :meth:`external`)."""
        original = self._protos.get(tensor.name)
        if original is None or not (tensor is original or tensor == original):
            return tensor
        stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                data_location=onnx.TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value=self.LOCATION)
        return stub

    def external(self, model: onnx.ModelProto) -> dict[str, object]:
        """Name -> OrtValue for every stub of ``model`` made by :meth:`stub`."""
        import onnxruntime as ort
        from onnx import numpy_helper

        found = {}
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL or tensor.name not in self._protos \
                    or not any(e.key == "location" and e.value == self.LOCATION for e in tensor.external_data):
                continue
            if tensor.name not in self._values:
                array = np.ascontiguousarray(numpy_helper.to_array(self._protos[tensor.name]))
                self._values[tensor.name] = ort.OrtValue.ortvalue_from_numpy(array)
            found[tensor.name] = self._values[tensor.name]
        return found


def ort_session(model: onnx.ModelProto | str | os.PathLike, threads: int | None = None, optimize: bool = True,
                spinning: bool = True, shared: SharedWeights | None = None):
    """An ONNX Runtime CPU session for a model held in memory or on disk.

    Args:
        spinning: let idle worker threads spin; turn off when other work shares the cores.
        shared: the weights behind the stubs of ``model`` (:meth:`SharedWeights.stub`).
    """
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    external = shared.external(model) if shared is not None and isinstance(model, onnx.ModelProto) else {}
    if external:
        options.add_external_initializers(list(external), list(external.values()))
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if isinstance(model, onnx.ModelProto):
        # The serialised length, not ByteSize(): that walks the whole message again (25 ms for
        # a 100 MB model, once per session of the allocation's every candidate cut).
        try:
            source = model.SerializeToString()
        except Exception as exc:  # noqa: BLE001 - protobuf refuses messages over 2 GB
            raise ValidationError("model too large to run from memory; save it first") from exc
        if len(source) > _EXTERNAL_DATA_THRESHOLD:
            raise ValidationError("model too large to run from memory; save it first")
    else:
        source = str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def validate_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Full checker, strict shape inference, an ONNX Runtime session and one run.

    Returns the outputs of the run. Raises ``ValidationError`` naming the failed step.
    """
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ValidationError(f"rewritten model fails onnx.checker: {_first_line(exc)}") from None
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        raise ValidationError(f"rewritten model fails shape inference: {_first_line(exc)}") from None
    try:
        session = ort_session(model)
    except Exception as exc:
        raise ValidationError(f"ONNX Runtime cannot load the rewritten model: {_first_line(exc)}") from None
    try:
        return session.run(None, feeds if feeds is not None else sample_feeds(model))
    except Exception as exc:
        raise ValidationError(f"ONNX Runtime cannot run the rewritten model: {_first_line(exc)}") from None


def check_output_path(input_path: str | os.PathLike, output_path: str | os.PathLike) -> Path:
    """Refuse to write over the input or into a missing directory."""
    out = Path(output_path)
    if Path(input_path).resolve() == out.resolve():
        raise InputError(f"output path {out} is the input model; choose another file name")
    if out.exists() and out.is_dir():
        raise InputError(f"output path {out} is a directory")
    if not out.resolve().parent.is_dir():
        raise InputError(f"output directory {out.parent} does not exist")
    return out


def default_file_mode() -> int:
    """The mode a new file gets from ``open`` under this process's umask (0o644 under 022);
    files made with ``tempfile.mkstemp`` (0o600) are given it before they replace an output."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def written_files() -> list[Path]:
    """Every file :func:`atomic_output` and :func:`save_model` have put in place in this process."""
    return list(_written)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write into: moved onto ``path`` when the block ends,
    removed when it raises (Ctrl-C included), so ``path`` is never left half-written and no
    temporary file is left behind. The temporary name keeps ``path``'s suffix (matplotlib reads
    the format from it)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.resolve().parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 would make the output private
        os.replace(tmp, path)
        _written.append(path)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write ``model`` atomically: into a temporary directory beside ``path``, then rename.

    Args:
        external_data: store tensors in ``<name>.data`` beside the model; by default only when
            the model is too large for a single protobuf file.
    """
    path = Path(path)
    if external_data is None:
        external_data = model.ByteSize() > _EXTERNAL_DATA_THRESHOLD
    tmp_dir = Path(tempfile.mkdtemp(prefix=".ocnna-", dir=path.resolve().parent))
    try:
        tmp_model = tmp_dir / path.name
        data_name = path.name + ".data"
        if external_data:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            # Small tensors (axes, shapes) stay inline: ONNX Runtime's load-time shape inference
            # cannot read them from an external file.
            onnx.save_model(copy, str(tmp_model), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            if (tmp_dir / data_name).exists():
                os.replace(tmp_dir / data_name, path.parent / data_name)
                _written.append(path.parent / data_name)
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, path)
        _written.append(path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def uses_external_data(path: str | os.PathLike) -> bool:
    """Whether the model file keeps any initializer in an external data file."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return False
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
