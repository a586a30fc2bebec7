"""Which channels should leave, when the pruned model is distilled afterwards? (issue 12)

The peer harness's R = 0.8 KD cell (docs/benchmarks.md) on its own data: 512 calibration
images, one epoch of distillation over 5,000 training images (bn = train, batch 64, lr 0.01,
seeds 0 and 1, ``api.distill``), top-1 on 2,000 test images (one image = 0.05 pt). For every
criterion, three students at parameter budget R:

* ``block-internal``: the residual spine (stem and every block's second Conv) kept whole, one
  percentile for the other groups, no reconstruction (Torch-Pruning's widths);
* ``block-internal + reconstruct``: the same cut, refitted by least squares;
* ``default``: the main command's recipe (measured allocation, reconstruction, final check).

    PYTHONPATH=. python tools/bench_kd_criteria.py --models resnet20,resnet20-bn \\
        --out docs/results/kd_criteria_r20.json

Rows are appended to ``--out`` as they finish; ``--resume`` skips the rows already there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.common import SHARED, cifar_subset, load_arrays, model_path, top1, write_json  # noqa: E402
from bench_kd import machine  # noqa: E402
from bench_kd_allocation import conv_widths  # noqa: E402
from onnx_ocnna import api  # noqa: E402

BLOCK_INTERNAL = ["/conv1/Conv", "*/conv2/Conv"]
RECIPES = {
    "block-internal": {"allocation": "uniform", "reconstruct": False, "exclude": BLOCK_INTERNAL},
    "block-internal + reconstruct": {"allocation": "uniform", "reconstruct": True, "exclude": BLOCK_INTERNAL},
    "default": {},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20,resnet20-bn", help="keys of bench.common.model_path")
    ap.add_argument("--criteria", default="ocnna,group-l2")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--targets", default="0.8", help="parameter budgets R, comma-separated")
    ap.add_argument("--seeds", default="0,1", help="distillation seeds (empty: no distillation)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out and skip them")
    args = ap.parse_args()
    if not (SHARED / "cifar10/train").is_dir():
        sys.exit("../shared/data is absent (set OCNNA_SHARED_DATA): this benchmark needs the CIFAR-10 JPEGs")
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        sys.exit(f"unknown recipe(s) {sorted(unknown)}; choose from {list(RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    cache = Path(os.environ.get("OCNNA_BENCH_CACHE", "/tmp/ocnna_bench_cache"))
    calib = load_arrays(cifar_subset("train", 512, 0, cache))
    train = load_arrays(cifar_subset("train", 5000, 1, cache, shuffle=True))
    test = load_arrays(cifar_subset("test", 2000, 0, cache))
    done = json.loads(args.out.read_text()) if args.resume and args.out.exists() else {"rows": []}
    rows = done["rows"]
    have = {(r["model"], r["criterion"], r["recipe"], r["target"]) for r in rows}
    started = machine()
    for key in args.models.split(","):
        original = onnx.load(str(model_path(key)))
        original_top1 = top1(original, test)[0]
        for criterion in args.criteria.split(","):
            scores = None
            for recipe in recipes:
                for target in (float(t) for t in args.targets.split(",")):
                    if (key, criterion, recipe, target) in have:
                        continue
                    if scores is None:
                        scores = api.score(original, calib, criterion=criterion, progress=False,
                                           calibration_options={"batch_size": 64})
                    start = time.perf_counter()
                    pruned, report = api.compress(original, calib, scores=scores, target_params=target,
                                                  criterion=criterion, progress=False,
                                                  calibration_options={"batch_size": 64}, **RECIPES[recipe])
                    row = {"model": key, "criterion": criterion, "recipe": recipe, "target": target,
                           "rpr": report.rpr, "widths": conv_widths(pruned), "original_top1": original_top1,
                           "top1_before": top1(pruned, test)[0], "compress_s": time.perf_counter() - start,
                           "top1_after": {}}
                    for seed in seeds:
                        distilled, _ = api.distill(pruned, original, train, epochs=1, lr=0.01, bn="train", seed=seed,
                                                   calibration_options={"batch_size": 64}, progress=False)
                        row["top1_after"][str(seed)] = top1(distilled, test)[0]
                    rows.append(row)
                    after = " / ".join(f"{100 * v:.2f}" for v in row["top1_after"].values())
                    print(f"{key} {criterion} {recipe} R={target}: RPR {row['rpr']:.3f}, top-1 "
                          f"{100 * row['top1_before']:.2f} % -> {after or '-'} % after KD", flush=True)
                    write_json(args.out, {"machine": {**started, "loadavg_end": os.getloadavg()},
                                          "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows})


if __name__ == "__main__":
    main()
