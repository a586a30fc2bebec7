"""Distillation throughput against a bare PyTorch training step of the same student (issue 12).

The check: the whole distillation loop (JPEG decoding, augmentation, the teacher in ONNX Runtime,
the student's step through the project's interpreter) trains at least 0.7x the images per
second of a bare training step of the same student at the same batch size (decoded tensors in
memory, cross-entropy against fixed labels, no teacher, no augmentation).

Both sides use the student as distillation trains it (``bn = train``: BatchNorm folded by the
exporter is restored around its Conv and trained with batch statistics) and the same SGD
settings. The bare step is timed with 1 and with every CPU thread and the faster count is
kept, as the distiller chooses its own; the distillation's rate is its epoch's samples over its
wall time (``EpochRecord.seconds``, which includes waiting for decoded batches).

Students: the shared ResNet-20 (BN kept) itself and, unless ``--no-pruned``, the same model
pruned by the default command at ``--target-macs 0.4`` (with reconstruction). Training data:
``--images`` class-balanced CIFAR-10 training JPEGs from ../shared/data, read through the
library's image-folder reader as the CLI reads ``--train``.

    PYTHONPATH=. python tools/bench_distill_throughput.py --out docs/results/distill_throughput.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.common import SHARED, write_json  # noqa: E402
from bench_kd import link_folder, machine, pick_files  # noqa: E402
from onnx_ocnna import api  # noqa: E402
from onnx_ocnna.distill.records import DistillSettings  # noqa: E402
from onnx_ocnna.distill.train import _Distiller  # noqa: E402

PREPROCESS = "imagenet-32"


def bare_rate(student: onnx.ModelProto, batch_size: int, steps: int, threads: int, seed: int = 0) -> float:
    """Images per second of plain training steps on one decoded batch [batch_size, 3, 32, 32].

    The student module and its optimiser are the distiller's own (``bn = "train"``: folded
    BatchNorms restored as trainable normalisations; SGD with the default settings), so the
    bare step trains exactly what distillation trains, minus teacher, data and augmentation.
    """
    torch.set_num_threads(threads)
    distiller = _Distiller(student, student, DistillSettings(bn="train", threads=threads, progress=False))
    module, opt = distiller.module, distiller.optimizer
    module.train()
    module.batch_stats = True
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch_size,), generator=gen)
    name = module.input_names[0]

    def step() -> None:
        out = module(**{name: x})
        logits = out[0] if isinstance(out, tuple) else out
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up: allocator, first-call dispatch
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def distill_rate(student: onnx.ModelProto, teacher: onnx.ModelProto, folder: Path, batch_size: int) -> dict:
    """One label-free distillation epoch over ``folder``: samples, seconds, images per second."""
    _, report = api.distill(student, teacher, str(folder), epochs=1, alpha=0.0, progress=False,
                            calibration_options={"preprocess": PREPROCESS, "batch_size": batch_size})
    epoch = report.epochs[0]
    return {"samples": epoch.samples, "seconds": epoch.seconds, "images_per_s": epoch.samples / epoch.seconds,
            "threads": report.settings.get("threads")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=6400, help="training JPEGs in the distillation epoch")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--bare-steps", type=int, default=60)
    ap.add_argument("--no-pruned", action="store_true", help="measure the unpruned student only")
    ap.add_argument("--pruned", type=Path, help="a pruned ResNet-20 (BN kept) to use instead of pruning one here")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    started = machine()
    data = SHARED
    if not (data / "cifar10/train").is_dir():
        sys.exit("../shared/data is absent (set OCNNA_SHARED_DATA): this benchmark needs the CIFAR-10 JPEGs")
    teacher = onnx.load(str(data / "models/resnet20_ts_opset13_bn.onnx"))
    (files,) = pick_files(data / "cifar10/train", [args.images // 10], seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = link_folder(files, Path(tmp) / "train")
        students = {"original (BN kept)": teacher}
        if args.pruned:
            students[f"pruned ({args.pruned.name})"] = onnx.load(str(args.pruned))
        elif not args.no_pruned:
            pruned, _ = api.compress(teacher, str(folder), target_macs=0.4, progress=False,
                                     calibration_options={"preprocess": PREPROCESS, "max_samples": 512})
            students["pruned, --target-macs 0.4"] = pruned
        for label, student in students.items():
            threads = sorted({1, os.cpu_count() or 1})
            bare = {t: bare_rate(student, args.batch_size, args.bare_steps, t) for t in threads}
            torch.set_num_threads(os.cpu_count() or 1)
            kd = distill_rate(student, teacher, folder, args.batch_size)
            best = max(bare.values())
            row = {"student": label, "batch_size": args.batch_size, "bare_images_per_s": {str(t): r for t, r in
                                                                                          bare.items()},
                   "distill": kd, "ratio": kd["images_per_s"] / best}
            rows.append(row)
            print(f"{label}: distillation {kd['images_per_s']:.0f} images/s ({kd['samples']} in "
                  f"{kd['seconds']:.1f} s), bare step {best:.0f} images/s "
                  f"({', '.join(f'{t} thread(s) {r:.0f}' for t, r in bare.items())}): ratio {row['ratio']:.2f}",
                  flush=True)
    result = {"machine": {**started, "loadavg_end": os.getloadavg()}, "rows": rows}
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
