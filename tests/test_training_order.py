"""Training reads samples in a new shuffled order every epoch (folders list images class by
class; single-class batches made distillation collapse to one prediction)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from graphs import GraphBuilder
from onnx_ocnna.calibration import open_calibration


def _model():
    g = GraphBuilder()
    out = g.node("Flatten", [g.node("GlobalAveragePool", [g.relu(g.conv("x", 3, 4, name="a"))])[0]])[0]
    return g.model(["N", 3, 8, 8], out)


def _folder(tmp_path, classes=4, per_class=8):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (tmp_path / f"class{c}").mkdir()
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"class{c}" / f"{i}.png")
    return tmp_path


def test_folder_source_shuffles_per_pass_when_asked(tmp_path):
    source = open_calibration(str(_folder(tmp_path)), _model(), batch_size=8, preprocess="raw")
    plain = [b.labels.tolist() for b in source.batches()]
    assert all(len(set(labels)) == 1 for labels in plain)  # class by class without shuffling
    source.shuffle, source.seed = True, 0
    first = [b.labels.tolist() for b in source.batches()]
    second = [b.labels.tolist() for b in source.batches()]
    assert first != second
    assert sum(len(set(labels)) > 1 for labels in first) >= 3
    assert sorted(sum(first, [])) == sorted(sum(plain, []))  # a permutation of the same samples


def test_array_source_shuffles_and_keeps_pairs(tmp_path):
    x = np.arange(32, dtype=np.float32)[:, None, None, None] * np.ones((1, 3, 8, 8), np.float32)
    labels = np.arange(32) // 8
    source = open_calibration({"x": x, "labels": labels}, _model(), batch_size=8)
    source.shuffle = True
    batches = list(source.batches())
    seen = np.concatenate([b.feeds["x"][:, 0, 0, 0] for b in batches]).astype(int)
    assert sorted(seen.tolist()) == list(range(32)) and seen.tolist() != list(range(32))
    for b in batches:  # inputs and labels stay paired
        assert (b.feeds["x"][:, 0, 0, 0].astype(int) // 8 == b.labels).all()
