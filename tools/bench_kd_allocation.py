"""Does the measured allocation or a uniform cut distil better under a long budget? (issue 12)

ResNet-20 (BN kept) from ../shared/data at ``--target-macs`` (default 0.4), OCNNA scores on 512
CIFAR-10 training JPEGs (the CLI's ``--max-samples 512``), reconstructed, then distilled without
labels (``alpha = 0``) for ``--epochs`` over all 50,000 training JPEGs at the CLI's batch size
(32); top-1 on the seeded 5,000 test JPEGs the CLI's ``--eval-samples 5000`` picks. Two students:

* ``uniform``: ``compress(allocation="uniform")``, one percentile for every group, k searched
  for the budget;
* ``allocation``: the default, widths from measured damage.

    PYTHONPATH=. python tools/bench_kd_allocation.py --epochs 1 --out docs/results/kd_allocation_r20.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.common import SHARED, write_json  # noqa: E402
from bench_kd import machine  # noqa: E402
from onnx_ocnna import api  # noqa: E402
from onnx_ocnna.evaluate import compare_accuracy  # noqa: E402

PREPROCESS = "imagenet-32"


def conv_widths(model: onnx.ModelProto) -> list[int]:
    """Output channels of every 4-D initializer (the Conv weights), in graph order."""
    return [int(t.dims[0]) for t in model.graph.initializer if len(t.dims) == 4]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-macs", type=float, default=0.4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    if not (SHARED / "cifar10/train").is_dir():
        sys.exit("../shared/data is absent (set OCNNA_SHARED_DATA): this benchmark needs the CIFAR-10 JPEGs")
    started = machine()
    original = onnx.load(str(SHARED / "models/resnet20_ts_opset13_bn.onnx"))
    train, calib = str(SHARED / "cifar10/train"), {"preprocess": PREPROCESS, "max_samples": 512}
    test = api.as_source(str(SHARED / "cifar10/test"), original, preprocess=PREPROCESS, max_samples=5000, seed=0,
                         batch_size=32)
    scores = api.score(original, train, calibration_options=calib, progress=False)
    rows = []
    for label, options in (("uniform", {"allocation": "uniform"}), ("allocation", {})):
        pruned, report = api.compress(original, train, scores=scores, target_macs=args.target_macs, progress=False,
                                      calibration_options=calib, **options)
        before = compare_accuracy(original, pruned, test.batches).as_dict()
        start = time.perf_counter()
        distilled, _ = api.distill(pruned, original, train, epochs=args.epochs, alpha=0.0, progress=False,
                                   calibration_options={"preprocess": PREPROCESS, "batch_size": 32})
        after = compare_accuracy(original, distilled, test.batches).as_dict()
        row = {"student": label, "rpr": report.rpr, "macs_ratio": report.macs_ratio, "widths": conv_widths(pruned),
               "top1_before": before["top1_after"], "top1_after": after["top1_after"],
               "distill_s": time.perf_counter() - start}
        rows.append(row)
        print(f"{label}: RPR {row['rpr']:.3f}, widths {row['widths']}, top-1 {100 * row['top1_before']:.2f} % -> "
              f"{100 * row['top1_after']:.2f} % after {args.epochs} epoch(s) ({row['distill_s']:.0f} s)", flush=True)
    if args.out:
        write_json(args.out, {"machine": {**started, "loadavg_end": os.getloadavg()},
                              "settings": vars(args) | {"out": str(args.out)}, "rows": rows})


if __name__ == "__main__":
    main()
