"""Benchmark (prints measured numbers): wall time and peak memory of one least-squares
reconstruction, with the original's targets computed a chunk of layers per pass (the library's
way) or one pass per layer (``--budgets 0``, the way before chunks).

The model is cut uniformly (``api.compress(percentile=P)``, no allocation) and refitted on N
calibration images; each setting runs in a fresh process, so its peak memory is its own. A
model of 224 x 224 inputs is what the chunks are for: ResNet-50 on 512 images samples more
targets than the 1 GiB budget holds (3 chunks of it), so before chunks every layer ran the original
up to itself. Random-weight torchvision models are enough (time and memory depend on shapes):

    python -c "import torch, torchvision; m = torchvision.models.resnet50().eval(); \\
        torch.onnx.export(m, torch.randn(1, 3, 224, 224), 'resnet50.onnx', input_names=['input'], \\
        dynamic_axes={'input': {0: 'N'}}, opset_version=13, dynamo=False)"
    python tools/bench_reconstruct_time.py resnet50.onnx [--samples 512] [--percentile 30]
        [--budgets 1024,0] [--json docs/results/reconstruct_time.json]
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
from bench.common import SHARED, commit_id, peak_rss_mib, write_json  # noqa: E402


def one(model_file: str, calib: str, preprocess: str, samples: int, percentile: float, budget_mib: int) -> dict:
    """One reconstruction in this process: its seconds, the original's passes, peak memory."""
    import onnx

    from onnx_ocnna import api
    from onnx_ocnna import reconstruct as module

    module._TARGET_BUDGET = budget_mib << 20
    made = []

    class Recorded(module._Targets):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    module._Targets = Recorded
    model = onnx.load(model_file)
    source = api.as_source(calib, model, preprocess=preprocess, max_samples=samples, batch_size=32, seed=0)
    _, report = api.compress(model, source, percentile=percentile, reconstruct=True,
                             reconstruct_options={"samples": samples}, progress=False)
    refit = report.as_dict()["extra"]["reconstruction"]
    return {"target_budget_mib": budget_mib, "seconds": round(refit["seconds"], 1), "samples": refit["samples"],
            "layers_refitted": sum(1 for f in refit["layers"] if not f["skipped"]),
            "original_passes": made[-1].passes, "chunks": len(made[-1].chunks),
            "peak_rss_mib": round(peak_rss_mib(), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--calib", default=str(SHARED / "cifar10" / "train"))
    parser.add_argument("--preprocess", default="imagenet")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--percentile", type=float, default=30.0)
    parser.add_argument("--budgets", default="1024,0", help="target budgets in MiB, one run each (0: a pass per layer)")
    parser.add_argument("--json", default=None, help="write the runs here (default: print only)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a single run, in a child process
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.model, args.calib, args.preprocess, args.samples, args.percentile, args.one)))
        return
    commit = commit_id()
    runs = []
    for budget in (int(b) for b in args.budgets.split(",")):
        start = time.perf_counter()
        child = subprocess.run([sys.executable, __file__, args.model, "--calib", args.calib, "--preprocess",
                                args.preprocess, "--samples", str(args.samples), "--percentile", str(args.percentile),
                                "--one", str(budget)], capture_output=True, text=True, check=True)
        run = json.loads(child.stdout.strip().splitlines()[-1])
        run["process_seconds"] = round(time.perf_counter() - start, 1)
        run["load_average"] = os.getloadavg()[0]
        runs.append(run)
        print(f"target budget {budget} MiB: reconstruction {run['seconds']} s, {run['original_passes']} passes of "
              f"the original ({run['chunks']} chunks), {run['layers_refitted']} layers, peak {run['peak_rss_mib']} MiB",
              flush=True)
    if args.json:
        write_json(Path(args.json), {
            "model": Path(args.model).name, "samples": args.samples, "percentile": args.percentile,
            "calib": args.calib, "preprocess": args.preprocess, "commit": commit,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(), "runs": runs})


if __name__ == "__main__":
    main()
