"""Train the embedded demo model: a small CNN on scikit-learn's bundled 8x8 digits.

Writes ``onnx_ocnna/data/digits_cnn.onnx`` (input ``input`` [N, 1, 8, 8] float32 = pixel / 16,
output ``logits`` [N, 10]) and ``onnx_ocnna/data/digits_split.json`` (the fixed
train / calibration / test indices into ``sklearn.datasets.load_digits()``).
Deterministic: fixed seeds, one CPU thread; runs in a few seconds.

The images stay 8x8: three 3x3 convolutions (32, 64, 64 filters, BatchNorm kept as separate
nodes so the pruner sees them), one 2x2 max-pool, global average pooling and a linear head.
The network is deliberately wider than 1,800 tiny images need, so pruning has filters to remove.

Usage: python tools/make_digits_model.py [--out-dir onnx_ocnna/data]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
TEST_FRACTION = 0.25
CALIBRATION_FRACTION = 0.15
EPOCHS = 40
BATCH = 64


def build_model() -> nn.Module:
    layers: dict[str, nn.Module] = {}
    for i, (cin, cout) in enumerate([(1, 32), (32, 64), (64, 64)], start=1):
        layers[f"conv{i}"] = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        layers[f"bn{i}"] = nn.BatchNorm2d(cout)
        layers[f"relu{i}"] = nn.ReLU()
        if i == 2:
            layers["pool"] = nn.MaxPool2d(2)
    layers.update(gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(64, 10))
    return nn.Sequential(OrderedDict(layers))


def make_split(labels: np.ndarray) -> dict[str, list[int]]:
    """Stratified train / calibration / test indices (fixed random_state)."""
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=TEST_FRACTION, stratify=labels, random_state=SEED)
    train, calib = train_test_split(
        rest, test_size=CALIBRATION_FRACTION / (1 - TEST_FRACTION), stratify=labels[rest], random_state=SEED
    )
    return {"train": sorted(train.tolist()), "calibration": sorted(calib.tolist()), "test": sorted(test.tolist())}


def shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (zero fill), x: [N, 1, 8, 8]."""
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, x.shape[0]), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8] for i in range(x.shape[0])])


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = EPOCHS * -(-len(x) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), BATCH):
            idx = order[start : start + BATCH]
            loss = nn.functional.cross_entropy(model(shift(x[idx], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "onnx_ocnna" / "data")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # one thread: bit-for-bit reproducible reductions
    start = time.perf_counter()

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8] in [0, 1]
    labels = digits.target.astype(np.int64)
    split = make_split(labels)
    x = {k: torch.from_numpy(images[v]) for k, v in split.items()}
    y = {k: torch.from_numpy(labels[v]) for k, v in split.items()}

    model = build_model()
    train(model, x["train"], y["train"])
    with torch.no_grad():
        acc = {k: float((model(x[k]).argmax(1) == y[k]).float().mean()) for k in split}

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "digits_cnn.onnx"
    # PRESERVE with an eval-mode model skips the exporter's Conv+BN fusion, keeping BN nodes.
    with warnings.catch_warnings():
        # The legacy-exporter deprecation notice and the PRESERVE/constant-folding hint do not apply.
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
        torch.onnx.export(
            model,
            (x["test"][:2],),
            str(onnx_path),
            dynamo=False,
            opset_version=13,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            training=torch.onnx.TrainingMode.PRESERVE,
        )
    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    if not any(n.op_type == "BatchNormalization" for n in proto.graph.node):
        raise SystemExit("export folded BatchNormalization; the demo model must keep it")

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_logits = session.run(None, {"input": x["test"].numpy()})[0]
    with torch.no_grad():
        torch_logits = model(x["test"]).numpy()
    diff = float(np.abs(ort_logits - torch_logits).max())
    if diff > 1e-4:
        raise SystemExit(f"ONNX Runtime and PyTorch disagree by {diff:.3g}")
    ort_acc = float((ort_logits.argmax(1) == labels[split["test"]]).mean())

    meta = {
        "dataset": "sklearn.datasets.load_digits",
        "preprocess": "images / 16.0 as float32, shape [N, 1, 8, 8] (NCHW)",
        "input": "input",
        "output": "logits",
        "seed": SEED,
        "accuracy": {"train": acc["train"], "calibration": acc["calibration"], "test": ort_acc},
        **split,
    }
    (args.out_dir / "digits_split.json").write_text(json.dumps(meta, indent=None, separators=(",", ":")) + "\n")
    size = onnx_path.stat().st_size
    print(
        f"digits CNN: train {acc['train']:.2%}  calibration {acc['calibration']:.2%}  test {ort_acc:.2%} "
        f"(ORT, {len(split['test'])} images)  ORT-vs-torch max diff {diff:.2g}  {size / 1024:.0f} KB  "
        f"{time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
