"""Benchmark (prints measured numbers): what one candidate cut of the budget allocation costs.

The allocation measures every group alone at a few widths (``allocate.measure_candidates``):
each candidate is a rewrite of the model, a least-squares refit of the layers that read the
cut, and a run of the model from the original's tensors before the cut. On models with many
groups (Inception, EfficientNet, DenseNet) the number of candidates, not the images, makes
the allocation long, so the seconds per cut are what this tool reports: the whole table of
the first ``--groups`` prunable groups, measured on ``--images`` calibration images, the
scores and the meter made before the clock starts. Random-weight models are enough (time
depends on shapes), e.g. torchvision's, exported as in ``tools/bench_reconstruct_time.py``,
or the test zoo (``tools/export_zoo.py``):

    python tools/bench_candidate_cuts.py inception_v3.onnx densenet121.onnx --calib images/ \\
        --preprocess imagenet [--images 64] [--groups 30] [--json docs/results/candidate_cuts.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.common import SHARED, commit_id, write_json  # noqa: E402


def one(model_file: str, calib: str, preprocess: str, images: int, groups: int) -> dict:
    """The damage table of the first ``groups`` prunable groups of one model, in this process."""
    import onnx

    from onnx_ocnna import api
    from onnx_ocnna.allocate import DamageMeter, measure_candidates
    from onnx_ocnna.segments import take_feeds

    model = onnx.load(model_file)
    source = api.as_source(calib, model, preprocess=preprocess, max_samples=images, batch_size=32, seed=0)
    pruner = api.pruner_for(model, source)
    scores = api.score(model, source, pruner=pruner, progress=False)
    meter = DamageMeter(pruner.model, take_feeds(source.batches(), images), prepared=pruner.prepared_model())
    chosen = [g for g in pruner.analysis.groups if g.prunable][:groups]
    start = time.perf_counter()
    table = measure_candidates(pruner, scores.groups, chosen, meter, block=8, floor=1, progress=False)
    seconds = time.perf_counter() - start
    cuts = sum(len(rows) - 1 for rows in table.values())
    return {"model": Path(model_file).name, "groups": len(chosen), "cuts": cuts, "images": meter.samples,
            "seconds": round(seconds, 1), "seconds_per_cut": round(seconds / max(cuts, 1), 3),
            "load_average": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--calib", default=str(SHARED / "cifar10" / "train"))
    parser.add_argument("--preprocess", default="imagenet")
    parser.add_argument("--images", type=int, default=64, help="damage images per cut")
    parser.add_argument("--groups", type=int, default=30, help="the first N prunable groups")
    parser.add_argument("--json", default=None, help="write the runs here (default: print only)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one model, in a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.models[0], args.calib, args.preprocess, args.images, args.groups)))
        return
    runs = []
    for model in args.models:  # a fresh process each: one model's caches do not help the next
        child = subprocess.run([sys.executable, __file__, model, "--calib", args.calib, "--preprocess", args.preprocess,
                                "--images", str(args.images), "--groups", str(args.groups), "--one"],
                               capture_output=True, text=True, check=True)
        run = json.loads(child.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(f"{run['model']}: {run['cuts']} cuts of {run['groups']} groups on {run['images']} images in "
              f"{run['seconds']} s, {run['seconds_per_cut']} s per cut (load {run['load_average']:.1f})", flush=True)
    if args.json:
        write_json(Path(args.json), {
            "commit": commit_id(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "calib": args.calib, "preprocess": args.preprocess, "runs": runs})


if __name__ == "__main__":
    main()
