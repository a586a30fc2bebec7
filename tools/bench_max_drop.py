"""Benchmark: ``--max-drop D`` against the best fixed percentile, on the shared CIFAR-10 ResNets.

For each model and each accepted drop D: the search (``onnx_ocnna.search.most_compressed``, the
main command's recipe: allocation + reconstruction, no training) picks its model on a
*validation* split; the benchmark then measures that model on the held-out *test* split and
checks the two claims of issue 16:

* the chosen model's drop on test is within D + 0.5 points;
* it is at least as compressed, by the objective, as the best fixed-percentile setting
  (k = 10, 20, ..., 80, per group, reconstructed) that meets D on the same validation data.

Data (from ../shared/data/cifar10, by sorted file name within each class, so the splits are
disjoint by construction): calibration = files 0-51 of every class of ``train/`` (520), validation
= files 2500-2599 (1,000), test = the first 500 of every class of ``test/`` (5,000). Scores and
the allocation's damage tables are computed once per model and shared by all D.

    python tools/bench_max_drop.py --models resnet20 --out docs/results/max_drop_resnet20.json
    python tools/bench_max_drop.py --summarize docs/results/max_drop_*.json --plots docs/

Results are written after every row, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import SHARED, commit_id, model_path, write_json
from onnx_ocnna import api
from onnx_ocnna.evaluate import HeldOut
from onnx_ocnna.search import Candidate, SearchResult, most_compressed, plot_pareto

SPLITS = {"calibration": ("train", 0, 52), "validation": ("train", 2500, 2600), "test": ("test", 0, 500)}


def split_npz(name: str, model, cache: Path) -> Path:
    """Decode one split once into ``cache``/<name>.npz (``input`` [N, 3, 32, 32], ``labels`` [N])."""
    path = cache / f"max_drop_{name}.npz"
    if path.exists():
        return path
    folder, first, last = SPLITS[name]
    with tempfile.TemporaryDirectory() as tmp:
        for cls in sorted(os.listdir(SHARED / "cifar10" / folder)):
            (Path(tmp) / cls).mkdir()
            for file in sorted(os.listdir(SHARED / "cifar10" / folder / cls))[first:last]:
                (Path(tmp) / cls / file).symlink_to(SHARED / "cifar10" / folder / cls / file)
        source = api.as_source(tmp, model, preprocess="imagenet-32", batch_size=500)
        batches = list(source.batches())
    x = np.concatenate([b.feeds["input"] for b in batches])
    y = np.concatenate([b.labels for b in batches])
    order = np.random.default_rng(0).permutation(len(y))  # class-sorted folders: mix them
    np.savez(path, input=x[order], labels=y[order])
    return path


def objective_of(report, objective: str) -> float:
    return {"macs": report.macs_ratio, "params": report.rpr}[objective]


def run_model(key: str, args, rows: list, out: Path | None) -> None:
    model = api.as_model(model_path(key))
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    calib, val, test = (str(split_npz(n, model, cache)) for n in ("calibration", "validation", "test"))
    validation = HeldOut(model, api.as_source(val, model, batch_size=500).batches)
    testing = HeldOut(model, api.as_source(test, model, batch_size=500).batches)
    started = time.perf_counter()
    scores = api.score(model, calib, progress=False)
    # The fixed-percentile baseline: the main command's default recipe at every k.
    percentiles = []
    original = validation.measure(model).top1_after
    for k in args.percentiles:
        pruned, report = api.compress(model, calib, scores=scores, percentile=k, progress=False)
        percentiles.append({"k": k, "objective": objective_of(report, args.objective),
                            "val_drop": 100 * (original - validation.measure(pruned).top1_after)})
        print(f"{key} k={k:g}: {args.objective} {percentiles[-1]['objective']:.3f}, "
              f"validation drop {percentiles[-1]['val_drop']:.2f} pt", flush=True)
    for drop in args.drops:
        begin = time.perf_counter()
        result = most_compressed(model, calib, validation, drop, objective=args.objective, scores=scores,
                                 progress=False)
        chosen = result.chosen
        test_acc = testing.measure(chosen.model)
        test_drop = 100 * (test_acc.top1_before - test_acc.top1_after)
        meeting = [p for p in percentiles if p["val_drop"] <= drop]
        best_k = min(meeting, key=lambda p: p["objective"], default=None)
        row = {"model": key, "max_drop": drop, "objective": args.objective, "chosen": chosen.as_dict(),
               "test_top1_original": test_acc.top1_before, "test_top1": test_acc.top1_after, "test_drop": test_drop,
               "within_d_plus_half_on_test": test_drop <= drop + 0.5,
               "best_percentile": best_k,
               "at_least_as_compressed": best_k is None or chosen.objective_value <= best_k["objective"] + 1e-9,
               "candidates": [c.as_dict() for c in result.candidates], "search_seconds": time.perf_counter() - begin,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": os.getloadavg(),
               "commit": commit_id(), "machine": platform.processor() or platform.machine()}
        rows.append(row)
        if out is not None:
            write_json(out, rows)
        print(f"{key} D={drop:g}: chosen {chosen.setting} ({args.objective} {chosen.objective_value:.3f}), "
              f"validation drop {chosen.drop:.2f}, test drop {test_drop:.2f}; best k "
              f"{'-' if best_k is None else best_k['k']} ({'-' if best_k is None else round(best_k['objective'], 3)})"
              f" in {row['search_seconds']:.0f} s", flush=True)
    print(f"{key}: {time.perf_counter() - started:.0f} s in all", flush=True)


def summarize(paths: list[Path]) -> str:
    lines = ["| model | D | chosen | objective | val drop | test drop | ≤ D + 0.5 | best fixed k (objective) | "
             "as compressed | search s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        for r in json.loads(path.read_text()):
            c, k = r["chosen"], r["best_percentile"]
            fixed = "none meets D" if k is None else f"k = {k['k']:g} ({k['objective']:.3f})"
            lines.append(f"| {r['model']} | {r['max_drop']:g} | {c['setting']} | {r['objective']} "
                         f"{c['objective_value']:.3f} | {c['drop']:.2f} | {r['test_drop']:.2f} | "
                         f"{'yes' if r['within_d_plus_half_on_test'] else 'no'} | "
                         f"{fixed} | "
                         f"{'yes' if r['at_least_as_compressed'] else 'no'} | {r['search_seconds']:.0f} |")
    return "\n".join(lines)


def plot_rows(paths: list[Path], folder: Path) -> list[Path]:
    """One Pareto plot per (model, D) row of the result files, from the candidates they hold."""
    written = []
    for path in paths:
        for r in json.loads(path.read_text()):
            candidates = [Candidate(**{k: v for k, v in c.items() if k != "setting"}) for c in r["candidates"]]
            chosen = next(c for c in candidates if c.status == "chosen")
            result = SearchResult(chosen, candidates, r["objective"], r["max_drop"], True, r["search_seconds"])
            original = 100 * (chosen.top1 + chosen.drop / 100)  # validation top-1 of the original
            target = folder / f"max_drop_{r['model']}_d{r['max_drop']:g}.png"
            plot_pareto(result, target, original)
            written.append(target)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20"])
    ap.add_argument("--drops", nargs="+", type=float, default=[1.0, 2.0, 5.0])
    ap.add_argument("--objective", choices=["macs", "params"], default="macs",
                    help="counted objectives only: measured latency on a loaded machine would decide by noise")
    ap.add_argument("--percentiles", nargs="+", type=float, default=[10, 20, 30, 40, 50, 60, 70, 80])
    ap.add_argument("--cache", default="/tmp/ocnna_bench_cache")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--summarize", nargs="+", type=Path)
    ap.add_argument("--plots", type=Path, metavar="DIR", help="with --summarize: a Pareto plot per row into DIR")
    args = ap.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        for path in plot_rows(args.summarize, args.plots) if args.plots else []:
            print(f"wrote {path}")
        return
    rows = json.loads(args.out.read_text()) if args.out is not None and args.out.exists() else []
    for key in args.models:
        if any(r["model"] == key for r in rows):
            print(f"{key}: already in {args.out}, skipped")
            continue
        run_model(key, args, rows, args.out)


if __name__ == "__main__":
    main()
