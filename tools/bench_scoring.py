"""Benchmark of scoring cost, memory and pruned-model speed (issue: OCNNA end to end).

For a model and N calibration images it prints, each measured in a fresh subprocess so the
peak resident memory (ru_maxrss) belongs to that step alone:

* the wall time of one plain ONNX Runtime pass over the N images (decoding included),
* the wall time of scoring (same reader, same batches) for each criterion setting (OCNNA at
  tau = 1 with its statistic reduced inside the graph, or ``:maps`` for the maps returned),
* the scoring / plain ratio and the peak memory of both,
* ONNX Runtime latency of the model pruned at k (batch 1 and 32, 1 and 2 threads) against its
  MACs ratio.

    python tools/bench_scoring.py --model ../shared/data/models/resnet56_ts_opset13.onnx \
        --calib ../shared/data/cifar10/train --samples 512 4096
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _child(args) -> None:
    """One measured step; prints a JSON line."""
    import onnx

    from onnx_ocnna import api
    from onnx_ocnna.model_io import ort_session

    model = onnx.load(args.model)
    options = {"preprocess": args.preprocess, "max_samples": args.samples, "batch_size": args.batch_size}
    source = api.as_source(args.calib, model, **options)
    start = time.perf_counter()
    if args.step == "plain":
        session = ort_session(model)
        names = {i.name for i in session.get_inputs()}
        count = 0
        for batch in source.batches():
            session.run(None, {k: v for k, v in batch.feeds.items() if k in names})
            count += len(next(iter(batch.feeds.values())))
        result = {"samples": count}
    else:
        # ocnna[:tau[:eigenvalue threads[:maps]]]; "maps" returns every map (in_graph=False)
        criterion, tau, threads, path = (args.step.split(":") + ["", "", ""])[:4]
        opts = {"pca_variance": float(tau)} if tau else {}
        if threads:
            opts["threads"] = int(threads)
        if path == "maps":
            opts["in_graph"] = False
        scores = api.score(model, source, criterion=criterion, criterion_options=opts, progress=False)
        result = {"samples": scores.samples}
    result["seconds"] = time.perf_counter() - start
    result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _measure(step: str, samples: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", step, "--model", args.model, "--calib", args.calib,
           "--preprocess", args.preprocess, "--batch-size", str(args.batch_size), "--samples", str(samples)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _speed(args) -> list[dict]:
    import onnx

    from onnx_ocnna import api
    from onnx_ocnna.evaluate import compare_latency

    model = onnx.load(args.model)
    scores = api.score(model, args.calib, calibration_options={"preprocess": args.preprocess, "max_samples": 256},
                       progress=False)
    rows = []
    for percentile in args.percentile:
        for round_to in args.round_to:
            pruned, report = api.compress(model, percentile=percentile, round_to=round_to, scores=scores,
                                          progress=False)
            for row in compare_latency(model, pruned, batches=(1, 32), threads=args.threads, runs=args.runs):
                row.update(percentile=percentile, round_to=report.settings["round_to"], macs_ratio=report.macs_ratio,
                           rpr=report.rpr, speedup_over_macs=row["speedup"] * report.macs_ratio)
                rows.append(row)
                _print_speed(row)
    return rows


def _print_speed(row: dict) -> None:
    print(f"{row['percentile']:>5g} {row['round_to']:>5} {row['batch']:>5} {row['threads']:>3} {row['before_ms']:>9.2f} "
          f"{row['after_ms']:>9.2f} {row['speedup']:>8.2f} {1 / row['macs_ratio']:>7.2f} {row['rpr']:>6.3f} "
          f"{row['speedup_over_macs']:>6.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--preprocess", default="imagenet-32")
    parser.add_argument("--samples", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", nargs="+", default=["ocnna:0.95", "ocnna:1.0"],
                        help="criterion[:pca_variance[:eigenvalue threads[:maps]]], e.g. ocnna:0.95:1 or "
                             "ocnna:1.0::maps (the maps returned instead of reduced in the graph)")
    parser.add_argument("--percentile", type=float, nargs="+", default=[40])
    parser.add_argument("--round-to", nargs="+", default=["1", "auto"], help="integers or 'auto'")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--only", choices=("scoring", "speed"), help="run one half of the benchmark")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--child")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.child:
        args.step, args.samples = args.child, args.samples[0]
        _child(args)
        return
    results = {"model": args.model, "scoring": [], "speed": []}
    print(f"model {args.model}")
    print(f"{'samples':>7}  {'step':<12} {'seconds':>8} {'ms/img':>7} {'x plain':>8} {'peak MiB':>9}")
    for samples in args.samples if args.only != "speed" else []:
        plain = _measure("plain", samples, args)
        print(f"{samples:>7}  {'plain ORT':<12} {plain['seconds']:>8.2f} {1000 * plain['seconds'] / samples:>7.2f} "
              f"{1.0:>8.2f} {plain['peak_mib']:>9.0f}")
        results["scoring"].append({"samples": samples, "step": "plain", **plain})
        for step in args.steps:
            row = _measure(step, samples, args)
            ratio = row["seconds"] / plain["seconds"]
            print(f"{samples:>7}  {step:<12} {row['seconds']:>8.2f} {1000 * row['seconds'] / samples:>7.2f} "
                  f"{ratio:>8.2f} {row['peak_mib']:>9.0f}")
            results["scoring"].append({"samples": samples, "step": step, "ratio": ratio, **row})
    if args.only != "scoring":
        print(f"\npruned models: ONNX Runtime latency (median of {args.runs}); ratio = speed-up / (1 / MACs ratio)")
        print(f"{'k':>5} {'round':>5} {'batch':>5} {'thr':>3} {'before ms':>9} {'after ms':>9} {'speed-up':>8} "
              f"{'1/MACs':>7} {'RPR':>6} {'ratio':>6}")
        results["speed"] = _speed(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
