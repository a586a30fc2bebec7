"""Calibration readers: image folders, .npy/.npz, ORT readers, presets and their errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnx_ocnna.calibration import (
    Batch,
    OrtReaderAdapter,
    list_presets,
    load_preset,
    model_input_spec,
    open_calibration,
)
from onnx_ocnna.errors import InputError

from shared_data import SHARED_DATA  # noqa: E402
SHARED_CIFAR = SHARED_DATA / "cifar10" / "train"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def make_model(*inputs: tuple[str, list, int], initializer_input: bool = False) -> onnx.ModelProto:
    """Identity on each (name, shape, elem_type) input; optionally one initializer listed as an input."""
    values = [helper.make_tensor_value_info(n, t, s) for n, s, t in inputs]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _, _ in inputs]
    outputs = [helper.make_tensor_value_info(f"{n}_out", t, s) for n, s, t in inputs]
    inits = []
    if initializer_input:
        inits = [numpy_helper.from_array(np.zeros(3, np.float32), "w")]
        values.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [3]))
    graph = helper.make_graph(nodes, "g", values, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def nchw(h=8, w=8, c=3, batch="N", elem=TensorProto.FLOAT) -> onnx.ModelProto:
    return make_model(("x", [batch, c, h, w], elem))


def nhwc(h=8, w=8, c=3, batch="N") -> onnx.ModelProto:
    return make_model(("x", [batch, h, w, c], TensorProto.FLOAT))


def write_image(path: Path, array: np.ndarray) -> np.ndarray:
    """Write uint8 [H, W, 3] (or [H, W]) losslessly as PNG unless the suffix says otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def random_pixels(rng: np.random.Generator, h=8, w=8, c=3) -> np.ndarray:
    shape = (h, w, c) if c > 1 else (h, w)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def all_batches(source) -> list[Batch]:
    return list(source.batches())


# ------------------------------------------------------------------------------------------ spec


def test_model_input_spec_skips_initializers_and_guesses_layout():
    model = make_model(
        ("a", ["N", 3, 32, 32], TensorProto.FLOAT),
        ("b", [1, 224, 224, 1], TensorProto.FLOAT16),
        ("c", ["N", 16], TensorProto.INT64),
        initializer_input=True,
    )
    specs = model_input_spec(model)
    assert [s.name for s in specs] == ["a", "b", "c"]
    assert specs[0].shape == (None, 3, 32, 32) and specs[0].layout == "NCHW"
    assert specs[1].dtype == np.float16 and specs[1].layout == "NHWC"
    assert specs[2].dtype == np.int64 and specs[2].layout is None


# --------------------------------------------------------------------------------- image folders


def test_class_folders_give_sorted_labels(tmp_path):
    rng = np.random.default_rng(0)
    for cls, count in (("zebra", 2), ("ant", 3), ("moth", 1)):
        for i in range(count):
            write_image(tmp_path / cls / f"{i}.png", random_pixels(rng))
    source = open_calibration(tmp_path, nchw(), batch_size=4, preprocess="raw")
    assert source.class_names == ["ant", "moth", "zebra"]
    assert source.has_labels and source.num_samples == 6 and len(source) == 2
    labels = np.concatenate([b.labels for b in all_batches(source)])
    assert labels.dtype == np.int64
    assert labels.tolist() == [0, 0, 0, 1, 2, 2]


def test_nested_folders_are_read_recursively(tmp_path):
    rng = np.random.default_rng(1)
    write_image(tmp_path / "cat" / "indoor" / "a.png", random_pixels(rng))
    write_image(tmp_path / "cat" / "outdoor" / "deep" / "b.PNG", random_pixels(rng))
    write_image(tmp_path / "dog" / "c.JPG", random_pixels(rng))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    write_image(tmp_path / "dog" / ".hidden" / "d.png", random_pixels(rng))
    source = open_calibration(tmp_path, nchw(), preprocess="raw")
    assert source.num_samples == 3
    assert [Path(f).name for f in source.files] == ["a.png", "b.PNG", "c.JPG"]
    assert np.concatenate([b.labels for b in all_batches(source)]).tolist() == [0, 0, 1]


def test_flat_folder_has_no_labels(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(5):
        write_image(tmp_path / f"{i}.bmp", random_pixels(rng))
    source = open_calibration(tmp_path, nchw(), batch_size=2, preprocess="raw")
    batches = all_batches(source)
    assert not source.has_labels and source.class_names is None
    assert [b.feeds["x"].shape[0] for b in batches] == [2, 2, 1]
    assert all(b.labels is None for b in batches)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_layout_and_mean_std_match_numpy(tmp_path, layout):
    rng = np.random.default_rng(3)
    pixels = [write_image(tmp_path / "c" / f"{i}.png", random_pixels(rng, 6, 5)) for i in range(3)]
    model = nchw(6, 5) if layout == "NCHW" else nhwc(6, 5)
    preset = tmp_path / "norm.json"
    preset.write_text(json.dumps({"mean": IMAGENET_MEAN.tolist(), "std": IMAGENET_STD.tolist()}))
    source = open_calibration(tmp_path / "c", model, preprocess=str(preset), batch_size=8)
    (batch,) = all_batches(source)
    expected = (np.stack(pixels).astype(np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    if layout == "NCHW":
        expected = expected.transpose(0, 3, 1, 2)
    got = batch.feeds["x"]
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_explicit_mean_std_override_preset_and_resize(tmp_path):
    rng = np.random.default_rng(4)
    big = write_image(tmp_path / "a.png", random_pixels(rng, 20, 30))
    with pytest.warns(UserWarning, match=r"preset's size \[32, 32\] differs"):
        source = open_calibration(tmp_path, nchw(8, 10), preprocess="cifar10", mean=0.5, std=[0.5, 0.25, 0.125])
    (batch,) = all_batches(source)
    resized = np.asarray(Image.fromarray(big).resize((10, 8), Image.Resampling.BILINEAR), np.float32)
    expected = ((resized / 255 - 0.5) / np.array([0.5, 0.25, 0.125], np.float32)).transpose(2, 0, 1)
    np.testing.assert_allclose(batch.feeds["x"][0], expected, atol=1e-6)


def test_grayscale_model_and_float16_input(tmp_path):
    rng = np.random.default_rng(5)
    rgb = write_image(tmp_path / "a.png", random_pixels(rng))
    source = open_calibration(tmp_path, nchw(c=1, elem=TensorProto.FLOAT16), preprocess="raw")
    (batch,) = all_batches(source)
    gray = np.asarray(Image.fromarray(rgb).convert("L"), np.float32) / 255
    assert batch.feeds["x"].dtype == np.float16 and batch.feeds["x"].shape == (1, 1, 8, 8)
    np.testing.assert_allclose(batch.feeds["x"][0, 0], gray.astype(np.float16), atol=1e-3)


def test_a_uint8_input_takes_the_pixels_as_they_are(tmp_path):
    """tf2onnx exports of models that normalise inside the graph take uint8 pixels [N, H, W, 3]."""
    rng = np.random.default_rng(7)
    rgb = write_image(tmp_path / "a.png", random_pixels(rng, 12, 12))
    model = make_model(("image", ["N", 8, 8, 3], TensorProto.UINT8))
    (batch,) = all_batches(open_calibration(tmp_path, model, preprocess="raw"))
    resized = np.asarray(Image.fromarray(rgb).resize((8, 8), Image.Resampling.BILINEAR))
    assert batch.feeds["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch.feeds["image"][0], resized)
    nchw_u8 = make_model(("image", ["N", 3, 8, 8], TensorProto.UINT8))
    with pytest.warns(UserWarning, match="fed as pixels 0-255, without the preset's mean and std"):
        source = open_calibration(tmp_path, nchw_u8, preprocess="imagenet-32", size=8)
    np.testing.assert_array_equal(all_batches(source)[0].feeds["image"][0], resized.transpose(2, 0, 1))
    assert source.describe()["preprocessing"]["formula"] == "pixel (uint8)"
    with pytest.raises(InputError, match="is uint8: it takes the pixels as they are"):
        open_calibration(tmp_path, model, preprocess="raw", mean=0.5, std=0.25)


def test_symbolic_spatial_dims_need_a_size(tmp_path):
    rng = np.random.default_rng(6)
    write_image(tmp_path / "a.png", random_pixels(rng, 12, 12))
    model = make_model(("x", ["N", 3, "H", "W"], TensorProto.FLOAT))
    with pytest.raises(InputError, match="symbolic height/width"):
        open_calibration(tmp_path, model, preprocess="raw")
    assert all_batches(open_calibration(tmp_path, model, size=4, preprocess="raw"))[0].feeds["x"].shape == (1, 3, 4, 4)
    assert all_batches(open_calibration(tmp_path, model, size=[5], preprocess="raw"))[0].feeds["x"].shape == (1, 3, 5, 5)
    assert all_batches(open_calibration(tmp_path, model, size=[5, 6], preprocess="raw"))[0].feeds["x"].shape == (1, 3, 5, 6)
    assert all_batches(open_calibration(tmp_path, model, preprocess="cifar10"))[0].feeds["x"].shape == (1, 3, 32, 32)


def test_imagenet_preset_matches_torchvision(tmp_path):
    torchvision = pytest.importorskip("torchvision", reason="torchvision gives the reference transform")
    import torchvision.transforms as T

    rng = np.random.default_rng(7)
    image = write_image(tmp_path / "a.png", random_pixels(rng, 300, 411))
    for side, resize in ((224, 256), (112, 128)):
        source = open_calibration(tmp_path, nchw(side, side), preprocess="imagenet")
        (batch,) = all_batches(source)
        reference = T.Compose([T.Resize(resize), T.CenterCrop(side), T.ToTensor(),
                               T.Normalize(IMAGENET_MEAN.tolist(), IMAGENET_STD.tolist())])
        expected = reference(Image.fromarray(image)).numpy()
        np.testing.assert_array_equal(batch.feeds["x"][0], expected)
    assert torchvision is not None


# ------------------------------------------------------------------------------------------ presets


def test_presets_load_by_name_and_path(tmp_path):
    assert {"imagenet", "imagenet-32", "cifar10", "raw"} <= set(list_presets())
    imagenet = load_preset("imagenet")
    assert imagenet["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert imagenet["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert imagenet["resize"] == 256 and imagenet["crop"] == (224, 224)
    assert load_preset("cifar10")["size"] == (32, 32)
    assert load_preset("raw")["mean"] == [0.0] and load_preset("raw")["std"] == [1.0]
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"mean": [0.5], "std": [0.5], "size": 16, "layout": "NHWC"}))
    assert load_preset(str(custom)) == {"description": "", "mean": [0.5], "std": [0.5], "size": (16, 16),
                                        "layout": "NHWC"}


def test_bad_presets_raise(tmp_path):
    with pytest.raises(InputError, match="unknown preprocessing preset 'imagenett'.*cifar10, imagenet, imagenet-32, raw"):
        load_preset("imagenett")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mean": [0.5], "scale": 2}))
    with pytest.raises(InputError, match="unknown keys \\['scale'\\]"):
        load_preset(bad)
    bad.write_text(json.dumps({"crop": 10}))
    with pytest.raises(InputError, match="crop needs resize"):
        load_preset(bad)
    with pytest.raises(InputError, match="does not exist"):
        load_preset(tmp_path / "missing.json")


def test_std_and_mean_length_checked(tmp_path):
    write_image(tmp_path / "a.png", random_pixels(np.random.default_rng(8)))
    with pytest.raises(InputError, match="mean has 2 values"):
        open_calibration(tmp_path, nchw(), mean=[0.1, 0.2])
    with pytest.raises(InputError, match="std must not contain zero"):
        open_calibration(tmp_path, nchw(), std=0)


# ------------------------------------------------------------------------------------------- arrays


def test_npy_batches_and_cast(tmp_path):
    data = np.random.default_rng(9).normal(size=(10, 3, 4, 4))
    np.save(tmp_path / "x.npy", data)
    source = open_calibration(tmp_path / "x.npy", nchw(4, 4), batch_size=4)
    batches = all_batches(source)
    assert not source.has_labels and len(source) == 3
    assert [b.feeds["x"].shape[0] for b in batches] == [4, 4, 2]
    assert batches[0].feeds["x"].dtype == np.float32
    np.testing.assert_allclose(np.concatenate([b.feeds["x"] for b in batches]), data.astype(np.float32))
    # A second pass gives the same data.
    np.testing.assert_array_equal(all_batches(source)[2].feeds["x"], batches[2].feeds["x"])


def test_npy_shape_and_dtype_errors(tmp_path):
    np.save(tmp_path / "rank.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(InputError, match=r"shape \[2, 3, 4\] but the model expects \[\?, 3, 4, 4\]"):
        open_calibration(tmp_path / "rank.npy", nchw(4, 4))
    np.save(tmp_path / "dims.npy", np.zeros((2, 3, 5, 4), np.float32))
    with pytest.raises(InputError, match="axis 2"):
        open_calibration(tmp_path / "dims.npy", nchw(4, 4))
    np.save(tmp_path / "text.npy", np.full((2, 3, 4, 4), "a"))
    with pytest.raises(InputError, match="non-numeric dtype"):
        open_calibration(tmp_path / "text.npy", nchw(4, 4))
    np.save(tmp_path / "float.npy", np.zeros((2, 16), np.float32))
    with pytest.raises(InputError, match="cannot be cast to the model's int64"):
        open_calibration(tmp_path / "float.npy", make_model(("ids", ["N", 16], TensorProto.INT64)))


def test_nan_names_the_sample(tmp_path):
    data = np.zeros((6, 3, 4, 4), np.float32)
    data[4, 1, 2, 3] = np.nan
    np.save(tmp_path / "x.npy", data)
    batches = open_calibration(tmp_path / "x.npy", nchw(4, 4), batch_size=2).batches()
    assert next(batches).feeds["x"].shape == (2, 3, 4, 4)  # checked batch by batch, not up front
    next(batches)
    with pytest.raises(InputError, match="sample 4 of input 'x' contains NaN or Inf"):
        next(batches)


def test_npz_multi_input_with_labels(tmp_path):
    rng = np.random.default_rng(10)
    image, extra = rng.normal(size=(5, 3, 4, 4)).astype(np.float32), rng.normal(size=(5, 7)).astype(np.float32)
    labels = np.array([1, 0, 2, 2, 1])
    np.savez(tmp_path / "d.npz", image=image, extra=extra, labels=labels, unused=np.zeros(3))
    model = make_model(("image", ["N", 3, 4, 4], TensorProto.FLOAT), ("extra", ["N", 7], TensorProto.FLOAT))
    source = open_calibration(tmp_path / "d.npz", model, batch_size=3)
    batches = all_batches(source)
    assert source.input_names == ["image", "extra"] and source.has_labels
    np.testing.assert_array_equal(np.concatenate([b.feeds["extra"] for b in batches]), extra)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), labels)


def test_npz_errors(tmp_path):
    model = make_model(("image", ["N", 3, 4, 4], TensorProto.FLOAT))
    np.savez(tmp_path / "wrong_key.npz", x=np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(InputError, match=r"no array for model input\(s\) \['image'\]; its keys are \['x'\]"):
        open_calibration(tmp_path / "wrong_key.npz", model)
    np.savez(tmp_path / "labels.npz", image=np.zeros((2, 3, 4, 4), np.float32), labels=np.array([0, 1, 1]))
    with pytest.raises(InputError, match="labels have shape \\[3\\] but there are 2 samples"):
        open_calibration(tmp_path / "labels.npz", model)
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 4, 4), np.float32))
    two_inputs = make_model(("a", ["N", 3, 4, 4], TensorProto.FLOAT), ("b", ["N", 2], TensorProto.FLOAT))
    with pytest.raises(InputError, match="the model has 2 inputs"):
        open_calibration(tmp_path / "x.npy", two_inputs)


# --------------------------------------------------------------------------- subsets and batching


def test_max_samples_is_class_balanced_and_seeded(tmp_path):
    rng = np.random.default_rng(11)
    for cls, count in (("a", 10), ("b", 10), ("c", 2)):
        for i in range(count):
            write_image(tmp_path / cls / f"{i:02d}.png", random_pixels(rng, 2, 2))
    model = nchw(2, 2)
    source = open_calibration(tmp_path, model, max_samples=9, seed=0, preprocess="raw")
    labels = np.concatenate([b.labels for b in all_batches(source)])
    assert np.bincount(labels).tolist() == [4, 3, 2]
    assert source.files == sorted(source.files)  # produced in file order
    again = open_calibration(tmp_path, model, max_samples=9, seed=0, preprocess="raw")
    other = open_calibration(tmp_path, model, max_samples=9, seed=1, preprocess="raw")
    assert again.files == source.files and other.files != source.files


def test_max_samples_without_labels_is_a_seeded_subset():
    model = make_model(("v", ["N", 2], TensorProto.FLOAT))
    data = np.arange(200, dtype=np.float32).reshape(100, 2)
    rows = np.concatenate([b.feeds["v"][:, 0] for b in open_calibration(data, model, max_samples=10).batches()]) / 2
    assert len(rows) == 10 and len(set(rows)) == 10 and np.all(np.diff(rows) > 0)
    assert rows.max() > 10  # not simply the first ten rows
    again = np.concatenate([b.feeds["v"][:, 0] for b in open_calibration(data, model, max_samples=10).batches()])
    np.testing.assert_array_equal(again / 2, rows)


def test_fixed_batch_models(tmp_path):
    rng = np.random.default_rng(12)
    for i in range(5):
        write_image(tmp_path / f"{i}.png", random_pixels(rng))
    source = open_calibration(tmp_path, nchw(batch=1), batch_size=32, preprocess="raw")
    assert source.batch_size == 1 and len(source) == 5
    assert [b.feeds["x"].shape for b in all_batches(source)] == [(1, 3, 8, 8)] * 5
    data = np.zeros((10, 3, 8, 8), np.float32)
    with pytest.warns(UserWarning, match="last 2 samples are not used"):
        fixed4 = open_calibration(data, nchw(batch=4))
    assert [b.feeds["x"].shape[0] for b in all_batches(fixed4)] == [4, 4]
    with pytest.raises(InputError, match="fixed to 4"):
        open_calibration(data[:3], nchw(batch=4))
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        open_calibration(data, nchw(), batch_size=0)
    assert len(open_calibration(data, nchw(), batch_size=np.int64(5), max_samples=np.int32(9))) == 2


# ------------------------------------------------------------------------------------------- readers


class ListReader:
    """An ORT-style CalibrationDataReader over a list of feed dicts, optionally with rewind()."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.position = feeds, 0

    def get_next(self):
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]


class RewindableReader(ListReader):
    def rewind(self):
        self.position = 0


def test_reader_with_rewind_iterates_again_and_truncates():
    feeds = [{"x": np.full((3, 3, 2, 2), i, np.float64)} for i in range(3)]
    source = open_calibration(RewindableReader(feeds), nchw(2, 2), max_samples=7)
    assert source.num_samples is None and not source.one_shot
    with pytest.raises(TypeError):
        len(source)
    for _ in range(2):
        batches = all_batches(source)
        assert [b.feeds["x"].shape[0] for b in batches] == [3, 3, 1]
        assert batches[0].feeds["x"].dtype == np.float32 and batches[0].labels is None


def test_one_shot_reader_and_bad_feeds():
    feeds = [{"x": np.zeros((2, 3, 2, 2), np.float32)}]
    source = open_calibration(ListReader(feeds), nchw(2, 2))
    assert source.one_shot and len(all_batches(source)) == 1
    with pytest.raises(InputError, match="no rewind\\(\\) method, so it can be read only once"):
        source.batches()
    with pytest.raises(InputError, match="has keys \\['y'\\] but the model's inputs are \\['x'\\]"):
        all_batches(open_calibration(ListReader([{"y": feeds[0]["x"]}]), nchw(2, 2)))
    nan = np.zeros((2, 3, 2, 2), np.float32)
    nan[1, 0, 0, 0] = np.inf
    with pytest.raises(InputError, match="batch 1, row 1 of input 'x' contains NaN or Inf"):
        all_batches(open_calibration(ListReader([feeds[0], {"x": nan}]), nchw(2, 2)))
    with pytest.raises(InputError, match="has shape \\[2, 3, 3, 2\\]"):
        all_batches(open_calibration(ListReader([{"x": np.zeros((2, 3, 3, 2))}]), nchw(2, 2)))


def test_ort_adapter_drives_quantize_static(tmp_path):
    from onnxruntime.quantization import QuantFormat, quantize_static

    rng = np.random.default_rng(13)
    weight = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.save(model, tmp_path / "m.onnx")
    source = open_calibration(rng.normal(size=(10, 3, 8, 8)).astype(np.float32), model, batch_size=4)
    adapter = OrtReaderAdapter(source)
    assert len(adapter) == 3
    shapes = []
    while (feed := adapter.get_next()) is not None:
        shapes.append(feed["x"].shape[0])
    assert shapes == [4, 4, 2] and adapter.get_next() is None
    adapter.set_range(1, 3)
    assert [adapter.get_next()["x"].shape[0] for _ in range(2)] == [4, 2] and adapter.get_next() is None
    adapter.set_range(0, 3)
    quantize_static(str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), adapter,
                    quant_format=QuantFormat.QDQ, per_channel=True)
    ops = {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


# ------------------------------------------------------------------------------------- bad inputs


def test_bad_paths_and_images(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_calibration(tmp_path / "nope", nchw())
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(InputError, match="contains no images"):
        open_calibration(tmp_path / "empty", nchw(), preprocess="raw")
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(InputError, match="must be a folder of images, a .npy or a .npz"):
        open_calibration(tmp_path / "data.csv", nchw())
    rng = np.random.default_rng(14)
    write_image(tmp_path / "mixed" / "a.png", random_pixels(rng))
    write_image(tmp_path / "mixed" / "sub" / "b.png", random_pixels(rng))
    with pytest.raises(InputError, match="both directly inside it and in sub-folders"):
        open_calibration(tmp_path / "mixed", nchw(), preprocess="raw")
    corrupt = tmp_path / "corrupt"
    write_image(corrupt / "good.png", random_pixels(rng))
    (corrupt / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    source = open_calibration(corrupt, nchw(), preprocess="raw")
    with pytest.raises(InputError, match="cannot read image .*zz_bad.jpg"):
        all_batches(source)
    with pytest.raises(InputError, match="unknown preprocessing preset 'foo'; available: cifar10, imagenet, imagenet-32, raw"):
        open_calibration(corrupt, nchw(), preprocess="foo")


def test_truncated_image_is_reported(tmp_path):
    path = tmp_path / "a.jpg"
    Image.fromarray(random_pixels(np.random.default_rng(15), 64, 64)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(InputError, match="cannot read image .*a.jpg"):
        all_batches(open_calibration(tmp_path, nchw(), preprocess="raw"))


def test_unsupported_image_inputs(tmp_path):
    write_image(tmp_path / "a.png", random_pixels(np.random.default_rng(16)))
    with pytest.raises(InputError, match="cannot tell whether model input 'x'"):
        open_calibration(tmp_path, make_model(("x", ["N", 8, 8, 8], TensorProto.FLOAT)), preprocess="raw")
    with pytest.raises(InputError, match="images need a float or uint8 input"):
        open_calibration(tmp_path, make_model(("x", ["N", 3, 8, 8], TensorProto.INT32)), preprocess="raw")
    two = make_model(("a", ["N", 3, 8, 8], TensorProto.FLOAT), ("b", ["N", 3, 8, 8], TensorProto.FLOAT))
    with pytest.raises(InputError, match="single-input model only"):
        open_calibration(tmp_path, two, preprocess="raw")


def test_preset_options_ignored_for_arrays_warn():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        open_calibration(np.zeros((2, 3, 8, 8), np.float32), nchw(), preprocess="imagenet")
    assert any("ignored" in str(w.message) for w in caught)


# ------------------------------------------------------------------------------------ shared data


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason=f"shared CIFAR-10 images not found at {SHARED_CIFAR}")
def test_shared_cifar10_train():
    source = open_calibration(SHARED_CIFAR, nchw(32, 32), preprocess="imagenet-32", max_samples=100, batch_size=64)
    assert source.num_samples == 100 and len(source.class_names) == 10
    batches = all_batches(source)
    assert [b.feeds["x"].shape for b in batches] == [(64, 3, 32, 32), (36, 3, 32, 32)]
    assert all(b.feeds["x"].dtype == np.float32 for b in batches)
    labels = np.concatenate([b.labels for b in batches])
    assert labels.min() >= 0 and labels.max() <= 9
    assert np.bincount(labels, minlength=10).tolist() == [10] * 10
    # Normalised CIFAR pixels: roughly zero mean, within the range the mean/std allow.
    x = np.concatenate([b.feeds["x"] for b in batches])
    assert -2.2 < x.min() < -1.5 and 2.0 < x.max() < 2.7 and abs(x.mean()) < 0.5


# -------------------------------------------------------------------- preprocessing said explicitly


def test_an_image_folder_needs_its_preprocessing_said(tmp_path):
    write_image(tmp_path / "cat" / "a.png", random_pixels(np.random.default_rng(0)))
    # Raw 0-1 pixels were the silent default: a normalised model then reports believable,
    # meaningless accuracies.
    with pytest.raises(InputError, match=r"needs its preprocessing: --preprocess "
                                         r"cifar10\|imagenet\|imagenet-32\|raw\|FILE.json or --mean/--std"):
        open_calibration(tmp_path, nchw())
    assert all_batches(open_calibration(tmp_path, nchw(), preprocess="raw"))[0].feeds["x"].max() <= 1
    assert all_batches(open_calibration(tmp_path, nchw(), mean=0.5, std=0.5))[0].feeds["x"].min() >= -1
    # Arrays are already preprocessed: nothing to say.
    assert all_batches(open_calibration(np.zeros((2, 3, 8, 8), np.float32), nchw()))[0].feeds["x"].shape[0] == 2


def test_presets_say_what_they_are():
    cifar = load_preset("cifar10")
    assert cifar["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert cifar["std"] == pytest.approx([0.2470, 0.2435, 0.2616])
    imagenet_32 = load_preset("imagenet-32")  # the old "cifar10": ImageNet statistics at 32x32
    assert imagenet_32["mean"] == pytest.approx(IMAGENET_MEAN.tolist())
    assert imagenet_32["std"] == pytest.approx(IMAGENET_STD.tolist())
    assert cifar["size"] == imagenet_32["size"] == (32, 32)
    assert "ImageNet" in imagenet_32["description"] and "CIFAR-10" in cifar["description"]


@pytest.mark.parametrize("dims", [[-1, 3, -1, -1], [-1, 3, "h", "w"], [0, 3, "h", "w"]])
def test_non_positive_dim_values_are_dynamic(dims):
    """Paddle2ONNX wrote dim_value -1 for a dynamic dim: taken as a size, the batch was -1 and
    len(source) -8 ("__len__() should return >= 0"). Every non-positive dim is dynamic; the
    number of batches is honest and a dynamic height/width takes its size from the data."""
    model = make_model(("x", dims, TensorProto.FLOAT))
    (spec,) = model_input_spec(model)
    assert spec.shape == (None, 3, None, None)
    source = open_calibration(np.zeros((8, 3, 48, 192), np.float32), model)
    assert len(source) == 1
    assert source.sample_shapes() == {"x": (3, 48, 192)}
    assert [b.feeds["x"].shape for b in source.batches()] == [(8, 3, 48, 192)]


def test_length_is_never_negative():
    source = open_calibration(np.zeros((5, 3, 8, 8), np.float32), nchw(), batch_size=2)
    assert len(source) == 3
    source.batch_size = -1  # a broken subclass or caller: an error, not a negative length
    with pytest.raises(InputError, match="must be positive"):
        len(source)


def test_image_folder_sample_shapes_follow_the_size_option(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        write_image(tmp_path / f"{i}.png", random_pixels(rng, 20, 30))
    source = open_calibration(tmp_path, nchw(h="h", w="w"), preprocess="raw", size=[12, 16])
    assert source.sample_shapes() == {"x": (3, 12, 16)}
    assert next(iter(source.batches())).feeds["x"].shape == (3, 3, 12, 16)


def test_a_shuffled_source_repeats_its_order_when_told_not_to_reshuffle():
    from graphs import GraphBuilder

    from onnx_ocnna.api import as_source

    g = GraphBuilder(seed=0)
    model = g.model(["N", 3, 4, 4], g.relu(g.conv("x", 3, 4, name="a")))
    x = np.arange(40, dtype=np.float32)[:, None, None, None] * np.ones((1, 3, 4, 4), np.float32)
    source = as_source({"x": x}, model, batch_size=8)
    source.shuffle, source.seed = True, 3

    def order():
        return np.concatenate([b.feeds["x"][:, 0, 0, 0] for b in source.batches()])

    first, second = order(), order()
    assert sorted(first) == list(range(40)) and not np.array_equal(first, second)  # a new order per pass
    source.reshuffle = False
    third, fourth = order(), order()
    assert np.array_equal(third, fourth) and sorted(third) == list(range(40))
