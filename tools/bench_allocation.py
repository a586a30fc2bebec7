"""Measured budget allocation against the uniform percentile, no training (issue 12).

For each CIFAR-10 ResNet of ../shared/data and each target, three recipes are run on the same
512 class-balanced training images and evaluated on the same held-out test images:

* ``uniform``: the old default, one percentile searched for every group, no reconstruction;
* ``uniform + reconstruct``: the same cut, then the least-squares refit;
* ``default`` (``compress(target_...)`` as shipped: measured allocation + reconstruction).

Each row records RPR, MACs ratio, top-1, ONNX Runtime latency against the original (interleaved,
spinning off, 1 thread, batch 1 and 32) and the wall time of the call. Results are written after
every row to ``docs/results/allocation_<model>.json``; ``--resume`` skips rows already there.
Each pruned model is kept in ``--models-dir``, so that ``--remeasure-latency`` can time the
rows again on a quieter machine (speed-ups measured while other jobs share the 2 cores are
noise; the allocation's own latency search is timed at run time all the same).

    python tools/bench_allocation.py --models resnet56 --targets macs:0.5 latency:0.5
    python tools/bench_allocation.py --models resnet56 --remeasure-latency
    python tools/bench_allocation.py --models resnet56 --targets latency:0.5 --recipes default --latency-threads 2
    python tools/bench_allocation.py --models resnet56 --targets latency:0.5 --recipes default --latency-threads 2 \
        --latency-batch 32

``--latency-threads T`` deploys at T threads: the allocation's latency is timed at T and so are
the rows' speed-ups, each with the speed-up of the fastest runs beside the medians (at more than
one thread ONNX Runtime computes on a thread pool, so the thread CPU time that judges a 1-thread
run measures nothing); results go to ``allocation_<model>[_criterion]_threads<T>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.common import REPO, SHARED, calib_and_test, model_path, top1, write_json  # noqa: E402

RECIPES = ("uniform", "uniform + reconstruct", "default")


def run_row(model, scores, recipe: str, kind: str, ratio: float, calib, test, save_as: Path | None = None,
            damage_samples: int | None = None, threads: int = 1, latency_batch: int = 1) -> dict:
    from onnx_ocnna import api

    target = {f"target_{kind}": ratio, "latency_threads": threads, "latency_batch": latency_batch}
    if damage_samples is not None:
        target["damage_samples"] = damage_samples
    start = time.perf_counter()
    if recipe == "default":
        pruned, report = api.compress(model, calib, scores=scores, criterion=scores.criterion, progress=False, **target)
    else:
        if kind == "latency":
            return {"skipped": "the uniform search has no latency target"}
        pruned, report = api.compress(model, calib, scores=scores, criterion=scores.criterion, allocation="uniform", progress=False,
                                      reconstruct=recipe.endswith("reconstruct"), **target)
    seconds = time.perf_counter() - start
    acc, _ = top1(pruned, test)
    row = {"rpr": report.rpr, "macs_ratio": report.macs_ratio, "top1": acc, "seconds": seconds,
           "timings": report.timings, "percentile": report.settings.get("percentile"),
           "load_average": os.getloadavg()}
    if save_as is not None:
        import onnx

        save_as.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(pruned, str(save_as))
        row["model_path"] = str(save_as)
    row.update(speedups(model, pruned, threads))
    if "allocation" in report.extra:
        row["widths"] = {g["id"]: [g["channels"], g["kept"]] for g in report.extra["allocation"]["groups"]}
        row["latency_search"] = report.extra["allocation"]["latency"]
        row["final_check"] = report.extra["allocation"].get("final_check", {})
        row["blocks_removed"] = [b["add"] for b in report.extra["allocation"].get("blocks", []) if b["removed"]]
        row["speed_floor"] = report.extra["allocation"].get("speed", {})
        row["damage_samples"] = report.extra["allocation"]["damage_samples"]
    return row


def speedups(model, pruned, threads: int = 1) -> dict:
    """ONNX Runtime speed-up of ``pruned`` over ``model`` at ``threads``, batch 1 and 32 (median of
    30 interleaved runs; at more than one thread also of the fastest runs), with the load average
    when it was measured."""
    from onnx_ocnna.evaluate import interleaved_latency

    out: dict = {}
    for batch in (1, 32):
        row = interleaved_latency(model, pruned, batch, threads, runs=30)
        out[f"speedup_b{batch}"] = row["speedup"]
        if threads > 1:
            out[f"speedup_fastest_b{batch}"] = row["speedup_fastest"]
    out["latency_load_average"] = os.getloadavg()
    return out


def remeasure(path: Path, model, threads: int = 1) -> None:
    """Time every row whose pruned model was kept again, in place."""
    import onnx

    results = json.loads(path.read_text())
    for name, row in results.items():
        if not isinstance(row, dict) or not row.get("model_path") or not Path(row["model_path"]).exists():
            continue
        row.setdefault("speedups_before_remeasure", {k: row.get(k) for k in ("speedup_b1", "speedup_b32")})
        row.update(speedups(model, onnx.load(row["model_path"]), threads))
        write_json(path, results)
        print(path.stem, name, row["speedup_b1"], row["speedup_b32"], flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet56,resnet56-bn,resnet20,resnet20-bn")
    parser.add_argument("--targets", nargs="+", default=["macs:0.5", "params:0.8", "params:0.6", "params:0.4"],
                        help="kind:ratio, kind in params|macs|latency")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--criterion", default="ocnna",
                        help="importance criterion; results of any other go to allocation_<model>_<criterion>.json")
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--damage-samples", type=int, default=None,
                        help="images the allocation measures damage on (unset: the library's choice); "
                             "given, the results file is allocation_<model>[_criterion]_damage<N>.json")
    parser.add_argument("--test", type=int, default=5000)
    parser.add_argument("--latency-threads", type=int, default=1,
                        help="threads the latency budget and the speed-ups are timed at (the deployment's); "
                             "other than 1, the results file is allocation_<model>[_criterion]_threads<T>.json")
    parser.add_argument("--latency-batch", type=int, default=1,
                        help="batch the latency budget is timed at; other than 1, the results file name ends "
                             "in _batch<B> (the rows' speed-ups are timed at batch 1 and 32 either way)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/ocnna_bench_models"),
                        help="where the pruned models are kept for --remeasure-latency")
    parser.add_argument("--remeasure-latency", action="store_true",
                        help="only time the kept pruned models of the existing results again")
    args = parser.parse_args()
    if not SHARED.exists():
        print(f"needs {SHARED} (the shared CIFAR-10 data)", file=sys.stderr)
        return 2
    import onnx
    import onnxruntime

    from onnx_ocnna import api

    calib, test = calib_and_test(args.calib, args.test)
    for key in args.models.split(","):
        suffix = "" if args.criterion == "ocnna" else f"_{args.criterion}"
        suffix += "" if args.damage_samples is None else f"_damage{args.damage_samples}"
        suffix += "" if args.latency_threads == 1 else f"_threads{args.latency_threads}"
        suffix += "" if args.latency_batch == 1 else f"_batch{args.latency_batch}"
        path = args.out / f"allocation_{key}{suffix}.json"
        if args.remeasure_latency:
            remeasure(path, onnx.load(model_path(key)), args.latency_threads)
            continue
        results = json.loads(path.read_text()) if args.resume and path.exists() else {}
        model = onnx.load(model_path(key))
        base, _ = top1(model, test)
        results["meta"] = {"model": key, "top1": base, "calib": args.calib, "test": args.test, "criterion": args.criterion,
                           "damage_samples": args.damage_samples,
                           "latency_threads": args.latency_threads, "latency_batch": args.latency_batch,
                           "onnxruntime": onnxruntime.__version__, "load": os.getloadavg(),
                           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        scores = api.score(model, calib, criterion=args.criterion, progress=False)
        for target in args.targets:
            kind, ratio = target.split(":")
            for recipe in args.recipes.split(","):
                name = f"{recipe} @ {target}"
                if name in results:
                    continue
                try:
                    slug = f"{key}{suffix}_{recipe}_{kind}{ratio}".replace(" ", "").replace("+", "_")
                    row = run_row(model, scores, recipe, kind, float(ratio), calib, test,
                                  save_as=args.models_dir / f"{slug}.onnx", damage_samples=args.damage_samples,
                                  threads=args.latency_threads, latency_batch=args.latency_batch)
                except Exception as exc:  # a failed row is a result too
                    row = {"error": f"{type(exc).__name__}: {exc}"}
                results[name] = row
                write_json(path, results)
                print(key, name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                                  if k not in ("widths", "timings", "latency_search")}, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
