"""Benchmark (prints measured numbers): top-1 without training against the number of images the
least-squares reconstruction reads.

For each model the channels are scored once (``api.score``), then the same budget is compressed
with the reconstruction refitting on N calibration images for each N, with the speed floor off
(``speed_floor=None``) so that every N gets the same widths (a MACs target with the floor is
searched by timings, which move from run to run). The calibration pool holds 4,096 training
JPEGs, so the allocation's 512 damage images are the same for every N; only the refit differs.
Top-1 is on a seeded class-balanced subset of the test JPEGs.

    python tools/bench_reconstruct_samples.py [--models resnet56,resnet20-bn] [--target macs:0.5]
        [--samples 512,1024,2048] [--criterion ocnna] [--json docs/results/reconstruct_samples.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import onnx_ocnna
from onnx_ocnna import api
from onnx_ocnna.evaluate import compare_accuracy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.common import SHARED, commit_id, model_path, write_json  # noqa: E402

TARGETS = {"macs": "target_macs", "params": "target_params"}


def measure(name: str, target: tuple[str, float], samples: list[int], criterion: str, test_samples: int) -> list[dict]:
    model = api.as_model(str(model_path(name)))
    calibration = dict(preprocess="imagenet-32", max_samples=4096, seed=0)
    test = api.as_source(str(SHARED / "cifar10/test"), model, preprocess="imagenet-32", max_samples=test_samples, seed=0)
    scores = api.score(model, str(SHARED / "cifar10/train"), criterion=criterion, calibration_options=calibration,
                       progress=False)
    rows = []
    for count in samples:
        start = time.perf_counter()
        pruned, report = onnx_ocnna.compress(model, str(SHARED / "cifar10/train"), calibration_options=calibration,
                                             scores=scores, progress=False, speed_floor=None,
                                             reconstruct_options={"samples": count}, **{TARGETS[target[0]]: target[1]})
        accuracy = compare_accuracy(model, pruned, test.batches).as_dict()
        check = report.extra["allocation"]["final_check"]
        rows.append({"model": name, "target": f"{target[0]}:{target[1]:g}", "criterion": criterion,
                     "reconstruct_samples": count, "top1": accuracy["top1_after"], "top1_original": accuracy["top1_before"],
                     "rpr": report.rpr, "macs_ratio": report.macs_ratio, "written": check.get("chosen"),
                     "damage_after_reconstruction": check.get("damage_after_reconstruction"),
                     "reconstruct_s": round(report.timings.get("reconstruct_s", 0.0), 1),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet56,resnet20-bn")
    ap.add_argument("--target", default="macs:0.5", help="macs:R or params:R")
    ap.add_argument("--samples", default="512,1024,2048")
    ap.add_argument("--criterion", default="ocnna")
    ap.add_argument("--test-samples", type=int, default=5000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not (SHARED / "cifar10/train").is_dir():
        raise SystemExit(f"needs the shared CIFAR-10 data in {SHARED} (set OCNNA_SHARED_DATA)")
    kind, ratio = args.target.split(":")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = [row for name in args.models.split(",")
            for row in measure(name, (kind, float(ratio)), [int(n) for n in args.samples.split(",")],
                               args.criterion, args.test_samples)]
    commit = commit_id()
    if args.json:
        write_json(args.json, {"started": started, "commit": commit, "load_average": os.getloadavg(), "rows": rows})


if __name__ == "__main__":
    main()
