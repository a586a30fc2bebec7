"""Measure the wall time of ``si`` scoring on ResNet-56-like layer shapes.

Default: synthetic features (n images, 10 classes; 19 layers x 16, 18 x 32, 18 x 64 channels,
the 55 ReLU outputs of a CIFAR ResNet-56). With ``--model`` and ``--images`` the features are
the real spatially averaged ReLU outputs of that model on the first n/10 images of each class
folder (the layout of ../shared/data/cifar10/test).

    python tools/bench_si.py                       # synthetic, n = 1000
    python tools/bench_si.py --model ../shared/data/models/resnet56_ts_opset13.onnx \
        --images ../shared/data/cifar10/test
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from onnx_ocnna.criteria import si
from onnx_ocnna.criteria.si import SIAccumulator

RESNET56_LAYERS = [16] * 19 + [32] * 18 + [64] * 18
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]


def synthetic_layers(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Features [n, C] per layer with a weak class signal, and labels [n]."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    layers = []
    for c in RESNET56_LAYERS:
        x = np.abs(rng.standard_normal((n, c)))
        x += 0.3 * rng.standard_normal((10, c))[y]  # per-class offsets, like a trained network
        layers.append(x)
    return layers, y


def real_layers(model: Path, images: Path, n: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Spatial means of every Relu output of ``model`` on n images, and their labels."""
    import onnx
    import onnxruntime as ort
    from PIL import Image

    proto = onnx.load(str(model))
    relus = [node.output[0] for node in proto.graph.node if node.op_type == "Relu"]
    existing = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=r) for r in relus if r not in existing)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    classes = sorted(p for p in images.iterdir() if p.is_dir())
    per_class = n // len(classes)
    xs, ys = [], []
    for label, folder in enumerate(classes):
        for f in sorted(folder.glob("*.jpg"))[:per_class]:
            img = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
            xs.append((img - MEAN) / STD)
            ys.append(label)
    x = np.stack(xs)
    feats: list[list[np.ndarray]] = [[] for _ in relus]
    name = sess.get_inputs()[0].name
    for b in range(0, len(x), 100):
        outs = sess.run(relus, {name: x[b : b + 100]})
        for i, o in enumerate(outs):
            feats[i].append(o.mean(axis=(2, 3), dtype=np.float64))
    return [np.concatenate(f) for f in feats], np.asarray(ys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-scan", action="store_true", help="disable the shortlist search, for comparison")
    args = parser.parse_args()
    if args.full_scan:
        si._PRUNE_K = 1 << 62

    if args.model:
        layers, y = real_layers(args.model, args.images, args.samples)
        source = f"real Relu outputs of {args.model.name}"
    else:
        layers, y = synthetic_layers(args.samples, args.seed)
        source = "synthetic features"
    search = "full scan" if args.full_scan else f"shortlist K = {si._PRUNE_K}"
    print(f"{source}: n = {len(y)}, {len(layers)} layers, {search}, cores = {os.cpu_count()}, "
          f"threads = {args.threads or 'auto'}, load average {os.getloadavg()[0]:.1f}")
    per_width: dict[int, list[float]] = {}
    total = time.perf_counter()
    for feats in layers:
        acc = SIAccumulator(feats.shape[1], si_max_samples=None, si_threads=args.threads)
        acc.update(feats, y)
        start = time.perf_counter()
        acc.scores()
        per_width.setdefault(feats.shape[1], []).append(time.perf_counter() - start)
    total = time.perf_counter() - total
    for c, times in sorted(per_width.items()):
        print(f"  C = {c:3d}: {len(times):2d} layers, {np.mean(times):7.3f} s per layer, {np.sum(times):7.2f} s total")
    print(f"all layers: {total:.2f} s")


if __name__ == "__main__":
    main()
