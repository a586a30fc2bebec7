"""Distillation budgets with the allocation (issue 12): prune + distil against self-distillation.

Four jobs, each the product's command run as a user would (a subprocess of
``python -m onnx_ocnna.cli``), with TRAIN = the 50,000 CIFAR-10 training JPEGs, TEST = the
10,000 test JPEGs, no labels in the loss (``--alpha 0``) and all of TRAIN (no ``--train-samples``):

  r20-prune  onnx-ocnna resnet20_ts_opset13_bn.onnx OUT --calib TRAIN --max-samples 512
             --preprocess imagenet-32 --target-macs 0.4 --distill --train TRAIN --alpha 0
             --epochs 4 --eval TEST --eval-samples 5000 --bench --report R.json --quiet
  r20-self   onnx-ocnna distill resnet20_ts_opset13_bn.onnx OUT --teacher (the same file)
             --train TRAIN --preprocess imagenet-32 --alpha 0 --epochs 4 --eval TEST
             --eval-samples 5000 --quiet
  r56-prune  as r20-prune on resnet56_ts_opset13.onnx with --target-latency 0.5 --epochs 3
  r56-self   as r20-self on resnet56_ts_opset13.onnx with --epochs 3

``--max-samples 512`` limits the calibration only: with ``--train`` given, the CLI reads the
training data with ``--train-samples`` (unset = all). The self-distilled original (the second
reference besides the original) is evaluated afterwards on the same 5,000 test images
(seeded class-balanced subset, as ``--eval-samples`` picks them).

Each job's result goes into docs/results/kd_budget.json as soon as it ends (commit, start/end,
load average, wall time, command, the report or the per-epoch history); a job already there is
skipped. ``--only NAME`` runs one job, ``--summarize`` prints the Markdown table, ``--smoke``
runs tiny budgets (1 epoch on 512 training images, 500 test images) into /tmp.
``--criterion C`` runs the two prune jobs with ``--criterion C`` into kd_budget_C.json; the
self-distilled references do not depend on the criterion and are copied from kd_budget.json.
``--lr X`` passes ``--lr X`` to every job (the references are then run again) into
kd_budget[_C]_lrX.json. ``--calib-samples N`` gives the prune jobs ``--max-samples N`` instead of 512
(into kd_budget[_C]_calibN.json, the references copied as for ``--criterion``): the reconstruction
refits on every calibration image up to 2,048, so this is how a student refitted on more images is
measured.

    PYTHONPATH=. python tools/bench_kd_budget.py            # all four, about an hour on 2 cores
    PYTHONPATH=. python tools/bench_kd_budget.py --summarize
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.common import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = Path("/work/shared/data")
TRAIN, TEST = DATA / "cifar10/train", DATA / "cifar10/test"
MODELS = {"r20": DATA / "models/resnet20_ts_opset13_bn.onnx", "r56": DATA / "models/resnet56_ts_opset13.onnx"}
BUDGET = {"r20": (["--target-macs", "0.4"], 4), "r56": (["--target-latency", "0.5"], 3)}  # target, epochs
JOBS = ["r20-prune", "r20-self", "r56-prune", "r56-self"]
EVAL_SAMPLES = 5000
CALIB_SAMPLES = 512  # the prune jobs' --max-samples unless --calib-samples says otherwise
COMMON = ["--preprocess", "imagenet-32", "--alpha", "0", "--quiet", "--overwrite"]


def command(job: str, out: Path, smoke: bool, criterion: str | None = None, lr: float | None = None,
            calib_samples: int = CALIB_SAMPLES) -> list[str]:
    model, kind = job.split("-")
    target, epochs = BUDGET[model]
    cli = [sys.executable, "-m", "onnx_ocnna.cli"]
    common = [*COMMON, *(["--lr", f"{lr:g}"] if lr is not None else [])]
    size = ["--epochs", "1", "--train-samples", "512", "--eval-samples", "500"] if smoke else \
        ["--epochs", str(epochs), "--eval-samples", str(EVAL_SAMPLES)]
    if kind == "prune":
        pruning = [*(["--damage-samples", "64"] if smoke else []), *(["--criterion", criterion] if criterion else [])]
        return [*cli, str(MODELS[model]), str(out / f"{job}.onnx"), "--calib", str(TRAIN),
                "--max-samples", str(calib_samples),
                *target, "--distill", "--train", str(TRAIN), "--eval", str(TEST), "--bench",
                "--report", str(out / f"{job}.report.json"), *size, *pruning, *common]
    return [*cli, "distill", str(MODELS[model]), str(out / f"{job}.onnx"), "--teacher", str(MODELS[model]),
            "--train", str(TRAIN), "--eval", str(TEST), *size, *common]


def top1(model_path: Path, original: Path, samples: int) -> dict:
    """Top-1 of ``model_path`` and of ``original`` on the seeded subset --eval-samples picks."""
    from onnx_ocnna import api
    from onnx_ocnna.evaluate import compare_accuracy

    source = api.as_source(str(TEST), api.as_model(original), preprocess="imagenet-32", max_samples=samples,
                            seed=0, batch_size=32)  # the CLI's defaults
    return compare_accuracy(api.as_model(original), api.as_model(model_path), source.batches).as_dict()


def run_job(job: str, out: Path, smoke: bool, criterion: str | None = None, lr: float | None = None,
            calib_samples: int = CALIB_SAMPLES) -> dict:
    cmd = command(job, out, smoke, criterion, lr, calib_samples)
    start, t0 = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    load_before = os.getloadavg()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    row = {"job": job, "commit": git("rev-parse", "HEAD"), "start": start,
           "end": datetime.now(timezone.utc).isoformat(timespec="seconds"), "wall_s": wall,
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "returncode": proc.returncode,
           "command": ["onnx-ocnna", *cmd[3:]], "stdout": proc.stdout[-4000:], "stderr": proc.stderr[-4000:]}
    if proc.returncode != 0:
        return row
    if job.endswith("-prune"):
        row["report"] = json.loads((out / f"{job}.report.json").read_text())
    else:  # the CLI prints one line per epoch; the written model is measured again here
        row["epochs"] = [{"epoch": int(m[1]), "top1": float(m[2]) / 100, "seconds": float(m[3])} for m in
                         re.finditer(r"epoch (\d+): .*held-out top-1 ([\d.]+) % \(([\d.]+) s\)", proc.stdout)]
        row["accuracy"] = top1(out / f"{job}.onnx", MODELS[job.split("-")[0]], 500 if smoke else EVAL_SAMPLES)
    return row


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()


def stage(report: dict, name: str) -> float | None:
    return next((s["top1"] for s in report["accuracy"]["stages"] if s["stage"] == name), None)


def summarize(results: dict) -> str:
    def pct(v):
        return "–" if v is None else f"{100 * v:.2f}"

    lines = ["| model | target, epochs | top-1 original | after pruning | after reconstruction | after distillation"
             " | self-distilled original | gap to self-distilled (points) | RPR | MACs ratio | speed-up b1 | b32"
             " | allocation s | distillation s | distillation images/s | self-KD images/s |",
             "|" + "---|" * 16]
    for model in ("r20", "r56"):
        prune, own = results.get(f"{model}-prune", {}), results.get(f"{model}-self", {})
        rep = prune.get("report")
        if rep is None:
            continue
        self_top1 = own.get("accuracy", {}).get("top1_after")
        kd = rep["extra"]["distillation"]["epochs"]
        speed = {row["batch"]: row["speedup"] for row in rep.get("latency") or []}
        target = " ".join(prune["command"][prune["command"].index("--target-macs" if model == "r20" else
                                                                  "--target-latency"):][:2])
        gap = None if self_top1 is None else 100 * (stage(rep, "distilled") - self_top1)

        def rate(epochs):
            return sum(e["samples"] for e in epochs) / sum(e["seconds"] for e in epochs) if epochs else None
        self_rate = None
        if own.get("epochs"):  # the CLI prints seconds per epoch; the samples are the epoch's images
            n = 512 if "--train-samples" in own["command"] else 50000
            self_rate = n * len(own["epochs"]) / sum(e["seconds"] for e in own["epochs"])
        lines.append(
            f"| {Path(prune['command'][1]).name} | `{target}`, {len(kd)} | {pct(stage(rep, 'original'))} "
            f"| {pct(stage(rep, 'pruned'))} | {pct(stage(rep, 'reconstructed'))} | {pct(stage(rep, 'distilled'))} "
            f"| {pct(self_top1)} | {'–' if gap is None else f'{gap:+.2f}'} | {rep['rpr']:.3f} "
            f"| {rep['macs_ratio']:.3f} | {speed.get(1, 0):.2f}× | {speed.get(32, 0):.2f}× "
            f"| {rep['timings'].get('allocate_s', 0):.0f} | {rep['timings'].get('distill_s', 0):.0f} "
            f"| {rate(kd):.0f} | {'–' if self_rate is None else f'{self_rate:.0f}'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=JOBS, help="run this job only")
    ap.add_argument("--smoke", action="store_true", help="tiny budgets, results in /tmp")
    ap.add_argument("--summarize", action="store_true", help="print the table and exit")
    ap.add_argument("--criterion", help="criterion of the prune jobs (default: the CLI's); the self-distilled "
                    "references do not depend on it and are taken from docs/results/kd_budget.json")
    ap.add_argument("--lr", type=float, help="--lr of every job (default: the CLI's); the self-distilled "
                    "references are then run too")
    ap.add_argument("--calib-samples", type=int, default=CALIB_SAMPLES, help="--max-samples of the prune jobs "
                    f"(default {CALIB_SAMPLES}); the calibration images also bound the reconstruction's (at most "
                    "2,048 by default)")
    ap.add_argument("--out", type=Path, help="results JSON (default docs/results/kd_budget.json; "
                    "kd_budget_CRITERION_lrLR_calibN.json with --criterion / --lr / --calib-samples)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/kd_budget"), help="where models and reports go")
    args = ap.parse_args()
    variant = "".join([f"_{args.criterion}" if args.criterion else "", f"_lr{args.lr:g}" if args.lr is not None else "",
                       f"_calib{args.calib_samples}" if args.calib_samples != CALIB_SAMPLES else ""])
    path = args.out or (Path("/tmp/kd_budget_smoke.json") if args.smoke else
                        ROOT / "docs/results" / f"kd_budget{variant}.json")
    work = args.work / ("smoke" if args.smoke else "full") / (variant.lstrip("_") or "default")
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    jobs = [args.only] if args.only else JOBS
    if (args.criterion or args.calib_samples != CALIB_SAMPLES) and args.lr is None:
        jobs = [job for job in jobs if job.endswith("-prune")]
        if not args.smoke:
            reference = json.loads((ROOT / "docs/results/kd_budget.json").read_text())
            results.update({job: row for job, row in reference.items() if job.endswith("-self")})
    if not args.summarize:
        for job in jobs:
            if results.get(job, {}).get("returncode") == 0:
                print(f"{job}: done, skipped", flush=True)
                continue
            print(f"{job}: running", flush=True)
            results[job] = run_job(job, work, args.smoke, args.criterion, args.lr, args.calib_samples)
            write_json(path, results)
            print(f"{job}: exit {results[job]['returncode']} in {results[job]['wall_s']:.0f} s", flush=True)
    print(summarize(results))


if __name__ == "__main__":
    main()
