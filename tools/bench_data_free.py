"""The data-free criteria against each other: a uniform cut without calibration data.

What a user without data gets (`onnx-ocnna in.onnx out.onnx --criterion C --target-params R
--allocation uniform`): one percentile searched for every group, no reconstruction, channels
ranked by ``l1``, ``l2`` (each filter's weights) or ``group-l2`` (every weight a channel owns).
Top-1 on the harness's 2,000 CIFAR-10 test images (class-balanced, seed 0).

    PYTHONPATH=. python tools/bench_data_free.py --out docs/results/data_free_criteria.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.common import SHARED, cifar_subset, load_arrays, model_path, top1, write_json  # noqa: E402
from bench_kd import machine  # noqa: E402
from onnx_ocnna import api  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20,resnet20-bn,resnet56")
    ap.add_argument("--criteria", default="l1,l2,group-l2")
    ap.add_argument("--targets", default="0.8,0.6,0.4")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not (SHARED / "cifar10/test").is_dir():
        sys.exit("../shared/data is absent (set OCNNA_SHARED_DATA): this benchmark needs the CIFAR-10 JPEGs")
    test = load_arrays(cifar_subset("test", 2000, 0, Path(os.environ.get("OCNNA_BENCH_CACHE", "/tmp/ocnna_bench_cache"))))
    started, rows = machine(), []
    for key in args.models.split(","):
        original = onnx.load(str(model_path(key)))
        for criterion in args.criteria.split(","):
            scores = api.score(original, criterion=criterion, progress=False)
            for target in (float(t) for t in args.targets.split(",")):
                pruned, report = api.compress(original, scores=scores, criterion=criterion, target_params=target,
                                              allocation="uniform", progress=False)
                row = {"model": key, "criterion": criterion, "target": target, "rpr": report.rpr,
                       "top1": top1(pruned, test)[0], "original_top1": top1(original, test)[0]}
                rows.append(row)
                print(f"{key} {criterion} R={target}: RPR {row['rpr']:.3f}, top-1 {100 * row['top1']:.2f} %", flush=True)
    write_json(args.out, {"machine": {**started, "loadavg_end": os.getloadavg()},
                          "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows})


if __name__ == "__main__":
    main()
