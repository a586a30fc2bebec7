"""The peer harness's pruned models distilled again with BatchNorm trained (issue 12).

The harness (``tools/bench/run.py``) distils every row with the BatchNorm statistics frozen;
the issue asks for ``bn = train`` for every tool. This re-distils the pruned ONNX files the
harness left in its work folder (their paths are in ``--peers``, the harness's results file),
with the harness's data and budget otherwise unchanged: 1 epoch over its 5,000 shuffled
training images, lr 0.01, batch 64, ``bn="train"``, seeds 0 and 1 (``api.distill``), top-1 on
its 2,000 test images (one image = 0.05 pt).

    PYTHONPATH=. python tools/bench_kd_harness_models.py --model resnet56 --target 0.8 \\
        --methods "onnx-ocnna group-l2,l1 (block-internal),apply_structured_wanda_pruning" \\
        --out docs/results/kd_harness_models_resnet56.json

Rows are written to ``--out`` as they finish; ``--resume`` skips the rows already there.
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
from bench.common import cifar_subset, load_arrays, model_path, top1, write_json  # noqa: E402
from onnx_ocnna import api  # noqa: E402


def harness_file(results: dict, method: str, target: float) -> Path:
    """The pruned model the harness wrote for ``method`` at ``target``, from its results file."""
    cell = results["tools"].get(method, {}).get("targets", {}).get(str(target), {})
    path = Path(cell.get("path", ""))
    if not cell.get("path") or not path.exists():
        raise SystemExit(f"no pruned model of {method!r} at R = {target} on disk (harness results: {cell or 'none'})")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56", help="key of bench.common.model_path")
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--methods", required=True, help="comma-separated harness method names")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--work", type=Path, default=Path("/tmp/onnx-ocnna-bench"), help="the harness's --work")
    ap.add_argument("--peers", type=Path, help="the harness's results (default docs/results/peers_<model>.json)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    data = args.work / "data"  # the harness's subsets, decoded there by its run (or now, if missing)
    train = load_arrays(cifar_subset("train", 5000, 1, data, shuffle=True))
    test = load_arrays(cifar_subset("test", 2000, 0, data))
    original = onnx.load(str(model_path(args.model)))
    peers = json.loads((args.peers or Path(__file__).resolve().parent.parent / "docs" / "results" /
                        f"peers_{args.model}.json").read_text())
    results = json.loads(args.out.read_text()) if args.resume and args.out.exists() else {
        "settings": {k: str(v) for k, v in vars(args).items()}, "original_top1": top1(original, test)[0], "rows": []}
    done = {(r["method"], r["seed"]) for r in results["rows"]}
    for method in args.methods.split(","):
        path = harness_file(peers, method, args.target)
        pruned = onnx.load(str(path))
        before = top1(pruned, test)[0]
        for seed in (int(s) for s in args.seeds.split(",")):
            if (method, seed) in done:
                continue
            start = time.perf_counter()
            distilled, _ = api.distill(pruned, original, train, epochs=1, lr=0.01, bn="train", seed=seed,
                                       calibration_options={"batch_size": 64}, progress=False)
            row = {"method": method, "file": path.name, "target": args.target, "seed": seed, "top1_before": before,
                   "top1_after": top1(distilled, test)[0], "seconds": time.perf_counter() - start,
                   "load_average": os.getloadavg()}
            results["rows"].append(row)
            write_json(args.out, results)
            print(f"{method} R={args.target} seed {seed}: {100 * before:.2f} % -> {100 * row['top1_after']:.2f} %",
                  flush=True)


if __name__ == "__main__":
    main()
