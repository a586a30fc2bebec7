"""Benchmark (prints measured numbers): the cost of OCNNA's per-map statistic F.

Per image of a ResNet-56-shaped CIFAR batch (19 ReLU outputs of 16x32x32, 18 of 32x16x16,
18 of 64x8x8), it times ``ocnna_frobenius`` for tau = 0.95 and tau = 1.0 in float32 and
float64, with the PyTorch and NumPy eigenvalue solvers on 1 and 2 threads, and reports the
largest relative error of F in float32 against float64. With the shared ResNet-56 and
CIFAR-10 images it also uses the real ReLU outputs and times one plain ONNX Runtime pass
over the same images for comparison.

    python tools/bench_ocnna_stats.py [--batch 64] [--repeats 5] [--onnx M --images DIR]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from onnx_ocnna.criteria.ocnna import ocnna_frobenius

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ONNX = ROOT.parent / "shared/data/models/resnet56_ts_opset13.onnx"
DEFAULT_IMAGES = ROOT.parent / "shared/data/cifar10/test"
RESNET56_LAYERS = [(16, 32)] * 19 + [(32, 16)] * 18 + [(64, 8)] * 18  # (channels, side)


def synthetic_maps(batch: int, seed: int = 0) -> list[np.ndarray]:
    """ReLU of a spatially smoothed Gaussian field with per-channel offsets, float32."""
    rng = np.random.default_rng(seed)
    maps = []
    for channels, side in RESNET56_LAYERS:
        x = rng.standard_normal((batch, channels, side + 2, side + 2), dtype=np.float32)
        x = sum(x[:, :, i : i + side, j : j + side] for i in range(3) for j in range(3)) / 3.0
        x += rng.normal(0.0, 1.0, (1, channels, 1, 1)).astype(np.float32)
        maps.append(np.maximum(x, 0.0))
    return maps


def load_images(folder: Path, count: int) -> np.ndarray:
    """``count`` CIFAR JPEGs spread over the classes, normalised as the models expect, [N, 3, 32, 32]."""
    from PIL import Image

    files = sorted(folder.glob("*/*.jpg"))
    files = files[:: max(1, len(files) // count)][:count]
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) / 255.0 for f in files])
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def real_maps(onnx_path: Path, images: np.ndarray, repeats: int) -> tuple[list[np.ndarray], list[float], list[float]]:
    """Every Relu output of the model on ``images``, and (wall, CPU) ms/image of a plain
    pass and of a pass returning every Relu output."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    relus = [node.output[0] for node in model.graph.node if node.op_type == "Relu"]
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in relus)
    tapped = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {plain.get_inputs()[0].name: images}
    n = len(images)
    t_plain = [t / n for t in best_ms(lambda: plain.run(None, feed), repeats)]
    t_tapped = [t / n for t in best_ms(lambda: tapped.run(relus, feed), repeats)]
    return tapped.run(relus, feed), t_plain, t_tapped


def best_ms(fn, repeats: int) -> tuple[float, float]:
    """Fastest wall and fastest process CPU time of ``repeats`` calls after a warm-up, in ms.

    The minimum filters out other processes on a shared machine; CPU time (all threads of
    this process) is less sensitive to them than wall time.
    """
    fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return wall * 1e3, cpu * 1e3


def time_configs(maps: list[np.ndarray], repeats: int) -> None:
    n = maps[0].shape[0]
    print(f"{'tau':>5} {'dtype':>8} {'backend':>8} {'threads':>7} {'wall ms/img':>11} {'CPU ms/img':>10}")
    for tau in (1.0, 0.95):
        for dtype in (np.float32, np.float64):
            configs = [("numpy", 1)] if tau >= 1.0 else [(b, t) for b in ("torch", "numpy") for t in (1, 2)]
            for backend, threads in configs:
                kw = dict(dtype=dtype, threads=threads, backend=backend)
                wall, cpu = best_ms(lambda: [ocnna_frobenius(m, tau, **kw) for m in maps], repeats)
                shown = "-" if tau >= 1.0 else backend
                print(f"{tau:5.2f} {np.dtype(dtype).name:>8} {shown:>8} {threads:7d} {wall / n:11.3f} {cpu / n:10.3f}")


def accuracy(maps: list[np.ndarray]) -> None:
    for tau in (1.0, 0.95):
        err, flips, count = 0.0, 0, 0
        for m in maps:
            ref = ocnna_frobenius(m, tau, dtype=np.float64)
            got = ocnna_frobenius(m, tau)
            live = ref > 0
            rel = np.abs(got[live] - ref[live]) / ref[live]
            # A map whose cumulative variance sits within rounding of tau may keep one
            # component more or less in float32; count those separately.
            flipped = rel > 1e-4
            flips += int(flipped.sum())
            count += rel.size
            err = max(err, float(rel[~flipped].max(initial=0.0)))
            assert np.all(got[~live] == 0.0)
        print(f"tau={tau:.2f}: max relative error of F (float32 vs float64) {err:.2e} over {count} maps;"
              f" {flips} maps changed q")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--onnx", type=Path, default=DEFAULT_ONNX)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    args = parser.parse_args()
    print("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs")

    print(f"== synthetic ResNet-56-shaped maps, batch {args.batch}")
    maps = synthetic_maps(args.batch)
    accuracy(maps)
    time_configs(maps, args.repeats)

    if args.onnx.exists() and args.images.exists():
        images = load_images(args.images, args.batch)
        maps, t_plain, t_tapped = real_maps(args.onnx, images, args.repeats)
        print(f"== real ReLU outputs of {args.onnx.name} on {len(images)} CIFAR-10 test images")
        print(f"ONNX Runtime, default session: plain pass {t_plain[0]:.3f} ms/image wall ({t_plain[1]:.3f} CPU);"
              f" returning all {len(maps)} ReLU outputs {t_tapped[0]:.3f} wall ({t_tapped[1]:.3f} CPU)")
        accuracy(maps)
        time_configs(maps, args.repeats)
    print("load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if not (args.onnx.exists() and args.images.exists()):
        print(f"(no real-model run: {args.onnx} or {args.images} not found)")


if __name__ == "__main__":
    main()
